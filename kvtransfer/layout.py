"""What a transfer message holds: a rectangle of (request pages x layers), K and V, as raw bytes.

A pool stores per layer one K and one V tensor `[num_pages, page_size, kv_heads, head_dim]` (or one
plane only, where V is read out of K: `num_planes` 1). A message carries pages `[first_page,
first_page + num_pages)` of the request's page list for layers `[layer_begin, layer_end)`, laid
out `[layers, planes (K, V), pages, page_size, kv_heads, head_dim]` in the pool dtype. On the wire it is plain bytes: dtypes travel by name and tensors are viewed as
uint8, so bfloat16 (which numpy lacks) never goes through numpy's dtype system.

`plan_messages` cuts one `send()` into messages of at most `max_bytes`: whole layers of a block of
pages when a block fits, else one layer at a time. Messages of one request arrive in order, so the
receiver can count cells (page x layer) to know that nothing went missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kvtransfer.wire import Data
from pdserve.shared.engine.kv_pool import PagedKVPool


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    dtype: torch.dtype
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    num_planes: int = 2

    @classmethod
    def of(cls, pool: PagedKVPool) -> KVLayout:
        s = pool.shape
        return cls(pool.dtype, s.num_layers, s.page_size, s.num_kv_heads, s.head_dim, s.num_planes)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def page_bytes(self) -> int:
        """One page of K (or of V) in one layer: one plane."""
        return self.page_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def cell_bytes(self) -> int:
        """Every plane (K and V) of one page in one layer: the unit a message is counted in."""
        return self.num_planes * self.page_bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "dtype": dtype_name(self.dtype),
            "layers": self.num_layers,
            "page_size": self.page_size,
            "heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "planes": self.num_planes,
        }


def layout_mismatch(sender: dict[str, Any], receiver: dict[str, Any]) -> str | None:
    """Why a prefill worker's pages (layout `sender`, `to_wire()` form) cannot go into a decode worker's
    pool of layout `receiver`, or None. Pages travel as they are stored, so a pair must agree on every
    field; the KV cache dtype (`--kv-cache-dtype`) is named first, as the likeliest to differ."""
    if sender == receiver:
        return None
    if sender.get("dtype") != receiver.get("dtype"):
        return (
            f"KV cache dtype mismatch: the prefill worker stores {sender.get('dtype')}, the decode worker "
            f"{receiver.get('dtype')} (--kv-cache-dtype and --dtype must give both the same pool dtype)"
        )
    return f"KV layout mismatch: sender {sender}, receiver {receiver}"


@dataclass(frozen=True)
class MessageSpec:
    """Pages [first_page, first_page + num_pages) of the request x layers [layer_begin, layer_end)."""

    first_page: int
    num_pages: int
    layer_begin: int
    layer_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_begin

    @property
    def cells(self) -> int:
        return self.num_pages * self.num_layers

    def nbytes(self, layout: KVLayout) -> int:
        return self.cells * layout.cell_bytes

    def shape(self, layout: KVLayout) -> tuple[int, ...]:
        return (
            self.num_layers,
            layout.num_planes,
            self.num_pages,
            layout.page_size,
            layout.num_kv_heads,
            layout.head_dim,
        )


def plan_messages(first_page: int, num_pages: int, layout: KVLayout, max_bytes: int) -> list[MessageSpec]:
    """Splits pages [first_page, first_page + num_pages) x all layers into messages of <= max_bytes
    (a single cell larger than max_bytes still goes alone). Page blocks outer, layer groups inner."""
    if num_pages <= 0:
        return []
    cell = layout.cell_bytes
    pages_per_block = max(1, min(num_pages, max_bytes // cell))
    specs = []
    for p0 in range(0, num_pages, pages_per_block):
        n = min(pages_per_block, num_pages - p0)
        layers_per_msg = max(1, max_bytes // (n * cell))
        for l0 in range(0, layout.num_layers, layers_per_msg):
            specs.append(MessageSpec(first_page + p0, n, l0, min(l0 + layers_per_msg, layout.num_layers)))
    return specs


def typed_view(raw: torch.Tensor, layout: KVLayout, spec: MessageSpec) -> torch.Tensor:
    """A uint8 buffer (at least spec.nbytes) seen as the message's [layers, planes, pages, ...] tensor."""
    return raw[: spec.nbytes(layout)].view(layout.dtype).view(spec.shape(layout))


def data_header(
    rid: str,
    nonce: bytes,
    spec: MessageSpec,
    layout: KVLayout,
    last: bool,
    total_pages: int,
    first_output: Any,
) -> Data:
    """The Data header of one message of this spec; the last message of a transfer carries its
    total page count and first_output (else -1 and None)."""
    return Data(
        rid, nonce, spec.first_page, spec.num_pages, spec.layer_begin, spec.layer_end,
        dtype_name(layout.dtype), spec.nbytes(layout), is_last=last,
        total_pages=total_pages if last else -1, first_output=first_output if last else None,
    )  # fmt: skip


def data_error(layout: KVLayout, dest_pages: list[int] | None, msg: Data) -> str | None:
    """Why a Data header cannot be written into a receiver with `dest_pages` (None: not init()ed
    yet) and this layout, or None."""
    if dest_pages is None:
        return "data before the receiver's init()"
    if msg.dtype != dtype_name(layout.dtype):
        return f"dtype {msg.dtype}, the pool holds {dtype_name(layout.dtype)}"
    if not 0 <= msg.layer_begin <= msg.layer_end <= layout.num_layers:
        return f"layers [{msg.layer_begin}, {msg.layer_end}) of {layout.num_layers}"
    if msg.first_page < 0 or msg.num_pages < 0 or msg.first_page + msg.num_pages > len(dest_pages):
        return f"pages [{msg.first_page}, +{msg.num_pages}) beyond the {len(dest_pages)} given to init()"
    expected = msg.num_pages * (msg.layer_end - msg.layer_begin) * layout.cell_bytes
    if msg.nbytes != expected:
        return f"{msg.nbytes} bytes announced, the layout needs {expected}"
    return None

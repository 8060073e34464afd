"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, all in one memory pool.

    graphs = DecodeGraphRunner(model, pool, backend, max_bs=160, max_pages_per_req=..., device=...)
    graphs.capture()                              # after the KV pool is allocated
    if graphs.fits(bs): logits = graphs.replay(DecodeInputs(...))   # logits [bs, vocab] float32
    meta, table = graphs.pack(step); graphs.replay_packed(meta, table)  # the same, in two halves

Why: at batch 1 a Llama-8B decode step launches several hundred kernels; launched one by one from
Python, the launches take longer than the kernels. A graph replays them all in one call.

Rules:
- Every captured graph reads its inputs from the same static buffers (token ids, positions, KV
  slots, sequence lengths, page table) and writes logits into its own output view. `replay`
  copies a step's inputs into the first `bs` rows, pads up to the bucket and replays the bucket's
  graph; nothing else may write these buffers between a replay and the use of its logits.
- Padding rows have sequence length 0 and write their K/V into slot 0, which lies in page 0: the
  page the allocator never hands out. The attention backend must treat a row of length 0 as
  empty, and nothing the graph computes for it is read.
- Buckets are 1, 2, 4, 8, then every 8 up to `max_bs`; captured largest first, so the largest
  graph sizes the shared pool and the smaller ones reuse its memory.
- The page-table buffer is [max_bs, max_pages_per_req]; a step writes only the columns its longest
  request needs (the kernels read no further than each row's sequence length).
- Under tensor parallelism (tp_decode_graphs.py) every rank captures the same buckets in
  `capture_order`, `gather_logits` puts the logits all-gather inside each graph, and rank 0 sends
  the packed inputs so that the followers `replay_packed` the same bucket.
- The attention backend keeps its own work buffers between calls (a graph replays the addresses
  it saw at capture); TritonAttention does.
- With `compile_forward` (--enable-torch-compile) the buckets up to TORCH_COMPILE_MAX_BS capture
  a torch.compile'd forward, as SGLang does: compiled (and autotuned) during the warm-up, outside
  the capture. The kernels are custom ops (kernels.custom_ops), so the compiled forward writes the
  KV pool in place. Larger buckets capture the eager forward.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain, repeat

import torch

from pdserve.shared.engine.kv_pool import PagedKVPool
from pdserve.shared.models.forward_batch import AttentionBackend, ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)

# SGLang's defaults (--torch-compile-max-bs 32, max-autotune without inductor's own CUDA graphs):
# every compiled bucket costs compile and GEMM-autotune time at start-up, and buckets up to 32 are
# 7 variants, under dynamo's limit of 8 recompiles of one function.
TORCH_COMPILE_MAX_BS = 32
TORCH_COMPILE_MODE = "max-autotune-no-cudagraphs"


def batch_size_buckets(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to and including max_bs."""
    buckets = [b for b in (1, 2, 4) if b < max_bs]
    buckets += list(range(8, max_bs, 8))
    buckets.append(max_bs)
    return sorted(set(buckets))


def smallest_bucket(buckets: list[int], batch_size: int) -> int:
    """The bucket whose graph replays a step of batch_size requests."""
    for b in buckets:
        if b >= batch_size:
            return b
    raise ValueError(f"batch size {batch_size} is over the largest captured graph ({buckets[-1]})")


def capture_order(buckets: list[int]) -> list[int]:
    """The order `capture` captures the buckets in: largest first (it sizes the one shared pool)."""
    return list(reversed(buckets))


@dataclass
class DecodeInputs:
    """One decode step, as plain host lists (one entry per request)."""

    input_ids: list[int]  # the token whose K/V this step computes
    positions: list[int]  # its position = tokens already in the pool
    slots: list[int]  # flat KV slot of that token
    page_rows: list[list[int]]  # each request's pages, covering positions[i] + 1 tokens

    @property
    def batch_size(self) -> int:
        return len(self.input_ids)


def pack_decode_inputs(step: DecodeInputs, bucket: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's host lists as the graphs' two input blocks (CPU tensors):

    - meta [4, bucket] int64: rows input ids, positions, slots, sequence lengths (position + 1);
      padding rows bs..bucket-1 are token 0, position 0, slot 0, length 0;
    - table [bs, width] int32: each request's pages, zero-padded to width.

    Through array.array: torch.tensor over nested Python lists costs ~0.4 ms per step at 64
    requests x 80 pages on a 2-core dev box, this about half."""
    fill = bucket - step.batch_size
    columns = (step.input_ids, step.positions, step.slots, [p + 1 for p in step.positions])
    meta = array("q", chain.from_iterable(chain(c, repeat(0, fill)) for c in columns))
    rows = array("i", chain.from_iterable(chain(r, repeat(0, width - len(r))) for r in step.page_rows))
    return (
        torch.frombuffer(meta, dtype=torch.int64).view(4, bucket),
        torch.frombuffer(rows, dtype=torch.int32).view(step.batch_size, width),
    )


class DecodeGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        pool: PagedKVPool,
        attn_backend: AttentionBackend,
        max_bs: int,
        max_pages_per_req: int,
        device: torch.device,
        compile_forward: bool = False,
        gather_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
        capture_error_mode: str = "global",
    ) -> None:
        self.model = model
        self.pool = pool
        self.attn_backend = attn_backend
        self.max_bs = max_bs
        self.max_pages_per_req = max_pages_per_req
        self.device = device
        self.buckets = batch_size_buckets(max_bs)
        # tensor parallelism: a rank's vocabulary slice to the whole logits, inside the graph
        self._gather_logits = gather_logits
        self._capture_error_mode = capture_error_mode
        # rows: input ids, positions, slots, seq_lens; one host->device copy per step
        self._meta = torch.zeros((4, max_bs), dtype=torch.int64, device=device)
        self._meta_host = torch.zeros((4, max_bs), dtype=torch.int64, pin_memory=True)
        self._page_table = torch.zeros((max_bs, max_pages_per_req), dtype=torch.int32, device=device)
        self._page_table_host = torch.zeros((max_bs, max_pages_per_req), dtype=torch.int32, pin_memory=True)
        self._ones = torch.ones(max_bs, dtype=torch.int64, device=device)
        self._arange = torch.arange(max_bs, dtype=torch.int64, device=device)
        self._staging_read = torch.cuda.Event()  # recorded after the copies out of the pinned buffers
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._mempool = None
        self._compiled_forward = (
            torch.compile(self._forward, mode=TORCH_COMPILE_MODE, dynamic=False) if compile_forward else None
        )

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.max_bs and bool(self._graphs)

    def _batch(self, bs: int) -> ForwardBatch:
        """The ForwardBatch of bucket bs over the static buffers (views, never copies)."""
        meta = self._meta
        seq_lens = meta[3, :bs]
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=meta[0, :bs],
            positions=meta[1, :bs],
            out_cache_loc=meta[2, :bs],
            prefix_lens=meta[1, :bs],
            extend_lens=self._ones[:bs],
            seq_lens=seq_lens,
            extend_start_loc=self._arange[:bs],
            page_table=self._page_table[:bs],
            kv_pool=self.pool,
            attn_backend=self.attn_backend,
            logits_indices=self._arange[:bs],
            prefix_lens_cpu=[0] * bs,  # only read by extend paths; a decode graph never takes them
            extend_lens_cpu=[1] * bs,
        )

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        logits = self.model.compute_logits(self.model.forward(batch))
        return logits if self._gather_logits is None else self._gather_logits(logits)

    def _captured_forward(self, bs: int) -> Callable[[ForwardBatch], torch.Tensor]:
        """What the graph of bucket bs replays: the compiled forward where it applies."""
        if self._compiled_forward is not None and bs <= TORCH_COMPILE_MAX_BS:
            return self._compiled_forward
        return self._forward

    @torch.inference_mode()
    def capture(self) -> None:
        # valid inputs for capture: every row one token at position 0 in page 0 (harmless writes)
        self._meta.zero_()
        self._meta[3].fill_(1)
        self._page_table.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        free_before = torch.cuda.mem_get_info(self.device)[0]
        with torch.cuda.stream(stream):
            for bs in capture_order(self.buckets):
                batch = self._batch(bs)
                forward = self._captured_forward(bs)
                # Warm-up outside the graph: eager first (Triton kernels compile, backends size their
                # buffers, so a compiled forward never allocates them), then what the graph captures.
                self._forward(batch)
                forward(batch)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(
                    graph, pool=self._mempool, stream=stream, capture_error_mode=self._capture_error_mode
                ):
                    self._logits[bs] = forward(batch)
                if self._mempool is None:
                    self._mempool = graph.pool()
                self._graphs[bs] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d), %.0f MiB",
            len(self._graphs),
            self.buckets[0],
            self.buckets[-1],
            used / 2**20,
        )

    def bucket_for(self, batch_size: int) -> int:
        return smallest_bucket(self.buckets, batch_size)

    def pack(self, step: DecodeInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The step as its bucket's host input blocks (pack_decode_inputs); the bucket is meta's width."""
        width = max(len(r) for r in step.page_rows)
        if width > self.max_pages_per_req:
            raise ValueError(
                f"a request holds {width} pages, the graphs' page table {self.max_pages_per_req}"
            )
        return pack_decode_inputs(step, self.bucket_for(step.batch_size), width)

    def replay(
        self, step: DecodeInputs, resolve_input_ids: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """Logits [bs, vocab] (float32) of one decode step; valid until the next replay.

        `resolve_input_ids` edits the step's input ids on the device after the copy, before the
        graph reads them (in_flight.py)."""
        meta, table = self.pack(step)
        return self.replay_packed(meta, table, resolve_input_ids)

    def replay_packed(
        self,
        meta: torch.Tensor,
        table: torch.Tensor,
        resolve_input_ids: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """`replay` from packed inputs: meta [4, bucket] and table [bs, width] (pack).

        The host buffers are pinned and copied without blocking; they are rewritten only once the
        previous replay's copies are done (an event), since with overlap scheduling the caller
        launches the next step without waiting for this one."""
        bucket, (bs, width) = meta.shape[1], table.shape
        self._staging_read.synchronize()  # the last replay's copies have read the pinned buffers
        self._meta_host[:, :bucket].copy_(meta)
        self._meta[:, :bucket].copy_(self._meta_host[:, :bucket], non_blocking=True)
        self._page_table_host[:bs, :width].copy_(table)
        self._page_table[:bs, :width].copy_(self._page_table_host[:bs, :width], non_blocking=True)
        self._staging_read.record()
        if resolve_input_ids is not None:
            resolve_input_ids(self._meta[0, :bs])
        self._graphs[bucket].replay()
        return self._logits[bucket][:bs]

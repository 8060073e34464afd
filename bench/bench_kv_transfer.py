"""KV transfer bandwidth per backend and transfer size, with the raw baseline measured in the same run.

    python -m pdserve.bench.bench_kv_transfer --backend zmq                  # CPU pools, loopback TCP
    python -m pdserve.bench.bench_kv_transfer --backend zmq --device cuda    # GPU pools via pinned host
    python -m pdserve.bench.bench_kv_transfer --backend nccl                 # cuda:0 -> cuda:1
    python -m pdserve.bench.bench_kv_transfer --backend cuda_ipc --device cuda   # cuda:0 -> cuda:0, two processes
    python -m pdserve.bench.bench_kv_transfer --backend cuda_ipc               # CPU shared memory: the control plane's cost
    python -m pdserve.bench.bench_kv_transfer --backend cuda_ipc --device cuda --peer-device cuda:1

The KV is shaped like Llama-3.1-8B's (32 layers, 8 KV heads, head_dim 128, bfloat16, 16-token
pages: 128 KiB per token), filled with non-zero data. Two processes: this one sends, a spawned child
receives (its own pool; GPU: cuda:1 when there are two). Pages are a fixed random permutation on both
sides, as an allocator would hand them out. For each size (`--tokens`), after a warm-up, `--repeats`
transfers are timed from the single `send(all pages, is_last=True)` to the sender's Success, which
comes after the receiver wrote every page and acknowledged (cuda_ipc: after the sender's own copy
into the receiver's pool finished): the whole copy out of one pool and into the other. The handshake (make_sender .. WaitingForInput) is outside the timing and reported apart.

Baselines, same bytes, same run:
- zmq: a bare ZMQ DEALER -> ROUTER over the same loopback TCP, zero-copy, in messages of the
  backend's size (`--slab-mib`), the receiver acknowledging the last one (no gather, no scatter,
  no pool): what the socket alone moves. Goal: zmq within 1.5x of it at 1024 tokens.
- nccl: a device-to-device copy cuda:0 -> cuda:1 of the same bytes in this process (peer access
  when available). Goal: nccl at >= 80% of it at 1024 tokens.
- cuda_ipc (and auto): a device-to-device copy of the same bytes from the sender's GPU to the
  receiver's (one contiguous `copy_`, timed with CUDA events: the copy rate of the hardware). The
  transfer itself is timed end to end as above (send() .. the sender's Success, once its copy
  finished); `delivered ms` ends where the receiver saw Success instead (what a decode worker waits for);
  `kernel ms` is the one page-move launch alone (pool to pool, the same random pages, events), so
  the rest is the control plane. Goal: 1024 tokens in <= 0.3 ms, >= 30% of the copy rate.

GB/s are 10^9 bytes per second; the table shows medians (and the best run).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch
import zmq

from pdserve.kvtransfer import KVPoll, make_kv_manager
from pdserve.shared.engine.kv_pool import KVPoolShape, PagedKVPool

LAYERS, KV_HEADS, HEAD_DIM, PAGE_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # K and V, bf16: 128 KiB


def make_pool(max_tokens: int, device: str) -> PagedKVPool:
    pages = max_tokens // PAGE_SIZE + 1  # page 0 is never handed out
    pool = PagedKVPool(KVPoolShape(LAYERS, pages, PAGE_SIZE, KV_HEADS, HEAD_DIM), DTYPE, device)
    for i, t in enumerate(pool.k_buffers + pool.v_buffers):
        t.fill_(1.0 + i / 64)  # touches every page: no zero-page reads flattering the copy
    return pool


def page_ids(max_tokens: int, tokens: int) -> list[int]:
    perm = torch.randperm(max_tokens // PAGE_SIZE, generator=torch.Generator().manual_seed(0)) + 1
    return perm[: tokens // PAGE_SIZE].tolist()


def wait_final(handle: Any, timeout_s: float = 120.0) -> KVPoll:
    deadline = time.monotonic() + timeout_s
    while handle.poll() not in (KVPoll.Success, KVPoll.Failed):
        if time.monotonic() > deadline:
            raise TimeoutError("transfer did not finish")
        time.sleep(0.0001)
    return handle.poll()


# ---------------------------------------------------------------------- receiver process


def receiver_main(
    conn: Any, backend: str, device: str, max_tokens: int, options: dict[str, Any], threads: int
) -> None:
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    manager = make_kv_manager(backend, make_pool(max_tokens, device), "bench-D", **options)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.ROUTER)
    raw.bind("tcp://127.0.0.1:0")
    conn.send((manager.endpoint, raw.getsockopt_string(zmq.LAST_ENDPOINT)))
    while True:
        cmd = conn.recv()
        if cmd[0] == "recv":
            _, rid, src, pages = cmd
            receiver = manager.make_receiver(rid, src)
            receiver.init(pages)
            conn.send("ready")
            state = wait_final(receiver)
            # perf_counter is CLOCK_MONOTONIC, one clock for every process on the host
            conn.send((state.name, receiver.failure_reason, time.perf_counter()))
        elif cmd[0] == "raw":
            while True:  # [identity, flag, payload]: acknowledge the message flagged last
                identity, flag, _ = raw.recv_multipart(copy=False)
                if flag.bytes == b"L":
                    raw.send_multipart([identity.bytes, b"ack"])
                    break
        else:
            break
    manager.close()
    ctx.destroy(linger=0)


# ---------------------------------------------------------------------- measurements (sender process)


def time_backend(
    manager: Any, conn: Any, dest: str, pages: list[int], rid: str
) -> tuple[float, float, float]:
    """(handshake, transfer, delivered) seconds of one request: transfer ends at the sender's
    Success (the receiver's Ack; cuda_ipc: its own copy done), delivered when the receiver saw Success (what a decode
    worker waits for before its first step)."""
    start = time.perf_counter()
    sender = manager.make_sender(rid, dest)
    conn.send(("recv", rid, manager.endpoint, pages))
    assert conn.recv() == "ready"
    while sender.poll() == KVPoll.Bootstrapping:
        time.sleep(0.0001)
    bound = time.perf_counter()
    sender.send(pages, is_last=True, first_output={"token": 1})
    state = wait_final(sender)
    done = time.perf_counter()
    received = conn.recv()
    if state != KVPoll.Success or received[0] != "Success":
        raise RuntimeError(f"transfer {rid} failed: sender {sender.failure_reason}, receiver {received}")
    return bound - start, done - bound, received[2] - bound


def time_raw_zmq(dealer: zmq.Socket, conn: Any, buf: torch.Tensor, message_bytes: int) -> float:
    conn.send(("raw",))
    view = memoryview(buf.numpy())
    start = time.perf_counter()
    offsets = list(range(0, len(view), message_bytes))
    for i, off in enumerate(offsets):
        flag = b"L" if i == len(offsets) - 1 else b"-"
        dealer.send_multipart([flag, view[off : off + message_bytes]], copy=False)
    dealer.recv()
    return time.perf_counter() - start


def time_copy_events(src: torch.Tensor, dst: torch.Tensor, copy: Any, repeats: int = 5) -> float:
    """Median seconds of `copy()` on the current stream, by CUDA events, after a warm-up (on the
    CPU, by the clock)."""
    copy()
    times = []
    if src.device.type == "cpu":
        for _ in range(repeats):
            start = time.perf_counter()
            copy()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        copy()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def time_same_host_copy(nbytes: int, device: str, peer_device: str) -> float:
    """One contiguous device-to-device copy of nbytes from device to peer_device."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=peer_device)
    return time_copy_events(src, dst, lambda: dst.copy_(src))


def time_page_move(pool: PagedKVPool, pages: list[int], peer_device: str) -> float:
    """The cuda_ipc kernel alone: the pages of `pool` into a second pool on peer_device."""
    from pdserve.kvtransfer.page_move import move_kv_pages

    dst = torch.empty_like(pool.kv, device=peer_device)
    idx = torch.tensor(pages, dtype=torch.int64, device=pool.device)
    layers = pool.shape.num_layers
    return time_copy_events(pool.kv, dst, lambda: move_kv_pages(pool.kv, idx, dst, idx, 0, layers))


def time_gpu_copy(nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    start = time.perf_counter()
    dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(t) for t in args.tokens.split(",")]
    max_tokens = max(sizes)
    two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    same_host = args.backend in ("cuda_ipc", "auto")
    device = "cuda:0" if args.device == "cuda" or args.backend == "nccl" else "cpu"
    peer_device = ("cuda:1" if two_gpus else "cuda:0") if device != "cpu" else "cpu"
    if same_host and device != "cpu":
        peer_device = args.peer_device or "cuda:0"  # default: two processes on one GPU
    options: dict[str, Any] = {}
    if args.backend == "zmq":
        options = {"slab_bytes": args.slab_mib << 20, "max_slabs": args.slabs}
    elif args.backend == "nccl":
        options = {"max_message_bytes": args.slab_mib << 20}
    if device != "cpu":
        torch.cuda.set_device(device)

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(
        target=receiver_main, args=(child_conn, args.backend, peer_device, max_tokens, options, args.threads)
    )
    child.start()
    dest, raw_endpoint = conn.recv()
    pool = make_pool(max_tokens, device)
    manager = make_kv_manager(args.backend, pool, "bench-P", **options)
    zctx = zmq.Context()
    dealer = zctx.socket(zmq.DEALER)
    dealer.connect(raw_endpoint)
    rows = []
    try:
        for tokens in sizes:
            pages = page_ids(max_tokens, tokens)
            nbytes = len(pages) * PAGE_SIZE * BYTES_PER_TOKEN
            handshakes, times, delivered, base = [], [], [], []
            raw_buf = torch.ones(nbytes, dtype=torch.uint8)
            for rep in range(args.repeats + 1):  # the first is a warm-up
                hs, t, seen = time_backend(manager, conn, dest, pages, f"r{tokens}-{rep}")
                if args.backend == "zmq":
                    b = time_raw_zmq(dealer, conn, raw_buf, args.slab_mib << 20)
                elif same_host:
                    b = time_same_host_copy(nbytes, device, peer_device)
                else:
                    b = time_gpu_copy(nbytes) if two_gpus else float("nan")
                if rep:
                    handshakes.append(hs)
                    times.append(t)
                    delivered.append(seen)
                    base.append(b)
            row = {
                "backend": args.backend,
                "device": f"{device}->{peer_device}",
                "tokens": tokens,
                "mib": nbytes / 2**20,
                "handshake_ms": statistics.median(handshakes) * 1000,
                "ms": statistics.median(times) * 1000,
                "delivered_ms": statistics.median(delivered) * 1000,
                "gbps": nbytes / statistics.median(times) / 1e9,
                "gbps_best": nbytes / min(times) / 1e9,
                "baseline": BASELINES.get(args.backend, "cuda:0->cuda:1 copy").format(device, peer_device),
                "baseline_gbps": nbytes / statistics.median(base) / 1e9,
            }
            if same_host:
                row["kernel_ms"] = time_page_move(pool, pages, peer_device) * 1000
            row["ratio"] = row["baseline_gbps"] / row["gbps"]
            rows.append(row)
            print_row(row)
    finally:
        conn.send(("exit",))
        child.join(timeout=30)
        manager.close()
        zctx.destroy(linger=0)
    return rows


BASELINES = {"zmq": "bare zmq socket", "cuda_ipc": "{}->{} copy", "auto": "{}->{} copy"}

HEADER = (
    "| backend | device | tokens | MiB | handshake ms | transfer ms (kernel) | delivered ms | GB/s (best) "
    "| baseline | baseline GB/s | baseline / backend |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
)


def print_row(r: dict[str, Any]) -> None:
    kernel = f" (kernel {r['kernel_ms']:.3f})" if "kernel_ms" in r else ""
    print(
        f"| {r['backend']} | {r['device']} | {r['tokens']} | {r['mib']:.0f} | {r['handshake_ms']:.2f} | "
        f"{r['ms']:.3f}{kernel} | {r['delivered_ms']:.3f} | {r['gbps']:.2f} ({r['gbps_best']:.2f}) | {r['baseline']} | "
        f"{r['baseline_gbps']:.2f} | {r['ratio']:.2f}x |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("zmq", "nccl", "cuda_ipc", "auto"), default="zmq")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the pools are (nccl: always cuda)"
    )
    parser.add_argument(
        "--peer-device", help="cuda_ipc/auto: the receiver's GPU (default cuda:0: two processes, one GPU)"
    )
    parser.add_argument(
        "--tokens", default="16,256,1024,4096", help="transfer sizes in tokens, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slab-mib", type=int, default=32, help="message size (zmq slab, nccl ring buffer)")
    parser.add_argument("--slabs", type=int, default=4, help="zmq: staging slabs in flight")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process for CPU gather/scatter (1: no oversubscription on a small box)",
    )
    parser.add_argument("--output-file", help="also write the rows as JSON lines here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# load average before: {os.getloadavg()}, cpus: {os.cpu_count()}, torch {torch.__version__}, "
        f"threads/process: {args.threads}, message MiB: {args.slab_mib}"
    )
    print(HEADER, flush=True)
    rows = run(args)
    print(f"# load average after: {os.getloadavg()}")
    if args.output_file:
        with open(args.output_file, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()

"""Suite-wide hooks: `gpu` tests run only where CUDA is present; child processes use one CPU thread;
end-to-end tests share one xdist worker."""

from __future__ import annotations

import os

import pytest
import torch

# Worker, router and stand-in processes started by tests share the two cores with each other and
# with the test processes. With one OpenMP thread per core in every process, a busy machine made a
# tiny model's decode step 30 times slower (34 ms against 1.1 ms with one thread): each parallel
# region waits for a thread that is not scheduled. Children get one thread. A test process keeps
# its cores' share: under xdist (the README's `-n 2` on two cores) one thread each, since the other
# xdist worker keeps the other core busy (SmolLM2's batch of 8 with a busy second core: 13-16 s with
# one thread, 45-49 s with two); run alone, the default.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))
os.environ["OMP_NUM_THREADS"] = "1"

# Without a GPU the Triton kernels run in Triton's interpreter (numpy underneath). It must be set
# before any kernel module is imported: triton.jit picks interpreter or compiler at decoration.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# With `-n 2 --dist loadgroup` (the README's test command) the end-to-end tests that judge timings
# (liveness windows, drains, restarts, detection within seconds) run one after the other on one
# xdist worker, so two of them never compete for the cores; the rest, and end-to-end tests marked
# `untimed`, are spread over both workers, each such module kept whole on one.
E2E_DIR = os.path.join(os.path.dirname(__file__), "e2e") + os.sep


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    e2e = pytest.mark.xdist_group("e2e")
    for item in items:
        if not str(item.path).startswith(E2E_DIR):
            continue
        if "untimed" not in item.keywords:
            item.add_marker(e2e)
        else:  # its module's processes (module-scoped fixtures) start on one worker, not on both
            item.add_marker(pytest.mark.xdist_group(f"e2e-{item.path.stem}"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

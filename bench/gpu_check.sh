#!/usr/bin/env bash
# Runs on a lent GPU machine (the device tool), from the repository root: installs the carried wheels,
# runs the `gpu` tests, then the benchmarks that exist, and prints a short table last.
#   device run: bash bench/gpu_check.sh      (carry: .whl)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
# The namespace pdserve.<dir> without pip: a throwaway package dir of symlinks.
mkdir -p /tmp/pdns/pdserve
for d in router prefill decode kvtransfer kernels shared bench; do ln -sfn "$PWD/$d" /tmp/pdns/pdserve/$d; done
export PYTHONPATH=/tmp/pdns:$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
status=${PIPESTATUS[0]}
# KV transfer bandwidth: zmq from GPU pools (pinned staging); nccl needs two GPUs
python3 -m pdserve.bench.bench_kv_transfer --backend zmq --device cuda --tokens 16,256,1024,4096 \
  --output-file "$OUT/kv_zmq_cuda.jsonl" 2>&1 | tee "$OUT/kv_zmq_cuda.log" | tail -12
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python3 -m pdserve.bench.bench_kv_transfer --backend nccl --tokens 16,256,1024,4096 \
    --output-file "$OUT/kv_nccl.jsonl" 2>&1 | tee "$OUT/kv_nccl.log" | tail -12
fi
echo
echo "| check | result |"
echo "| --- | --- |"
echo "| gpu tests | $(tail -1 "$OUT/gpu_tests.log") (exit $status) |"
echo "| kv transfer zmq (cuda pools), 1024 tokens | $(grep -F '| 1024 |' "$OUT/kv_zmq_cuda.log" | head -1) |"
exit "$status"

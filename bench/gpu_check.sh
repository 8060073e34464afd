#!/usr/bin/env bash
# Runs on a lent GPU machine (the device tool), from the repository root: installs the carried
# wheels, runs the `gpu` tests, then the benchmarks, and prints a short table last.
#   device run: bash bench/gpu_check.sh [stages]      (carry: .whl)
# Stages (default: all, in this order): tests kernels one_batch compile profile hf serving serving_pd kv split
# interleave threshold; also tests_kv (the KV transfer `gpu` tests alone), kv_ipc (kv's cuda_ipc run alone),
# the model kinds: embed (/v1/embeddings against HF), moe (fused-MoE kernel, Qwen1.5-MoE served), gemma2,
# deepseek (DeepSeek-V2-Lite); kinds_engine (Gemma-2 and Qwen1.5-MoE engines and the fused-MoE kernel, no serve), gemma2_engine (Gemma-2's alone);
# grammar (every request under a grammar against the same serve unconstrained); fp8 (the fp8 GEMMs against
# _scaled_mm and bf16, then bench_one_batch bf16 against --quantization fp8, and fp8 weights with an
# fp8_e4m3 KV cache at batch 64 x 1280), fp8_compile (the same, compiled), fp8_step (fp8's decode steps and profile alone), gemm_kernels (the fp8 GEMM and the fused MoE
# alone, no sweep), same_lease (bench_one_batch of a carried older tree, .baseline, then of this one), fp8_serving (serve bf16
# against fp8 weights + fp8 KV, c1 and c64); tp (needs 2 GPUs: bench_one_batch of the 8B shape at batch 1 and 64,
# --tp 1 and --tp 2 in one run, the TP=2/TP=1 decode-step ratio, then the TP=2 CUDA-graph parity test);
# on two GPUs: multi (= multi_kv multi_pd tp multi_split multi_threshold; multi_tp is another name of tp;
# bench/gpu_multi.sh says what each runs and how to split them over device calls)
# (the device's copy carries no up-to-date .git: record the commit you ran at yourself)
# Everything goes to $OUT/gpu_check.log (and JSON lines to $OUT/results.jsonl); each stage has a
# time limit so that one hung stage cannot eat the whole lease.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"; RES="$OUT/results.jsonl"; SUMMARY=$(mktemp)
source bench/gpu_multi.sh
STAGES=$(expand_stages ${*:-tests kernels one_batch compile profile hf serving serving_pd kv split interleave threshold})
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
# The namespace pdserve.<dir> without pip: a throwaway package dir of symlinks.
mkdir -p /tmp/pdns/pdserve
for d in router prefill decode kvtransfer kernels shared bench; do ln -sfn "$PWD/$d" /tmp/pdns/pdserve/$d; done
export PYTHONPATH=/tmp/pdns:$PWD:${PYTHONPATH:-}
# importlib.metadata.version("pdserve") needs a dist-info: a minimal one beside the namespace
mkdir -p /tmp/pdns/pdserve-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: pdserve\nVersion: 0.1.0\n' > /tmp/pdns/pdserve-0.1.0.dist-info/METADATA
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee -a "$LOG"

run() {  # run NAME SECONDS CMD...: logs, times out, records exit status for the table
  local name=$1 secs=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$secs" "$@" 2>&1 | tee -a "$LOG" | tail -25
  local rc=${PIPESTATUS[0]}
  echo "| $name | exit $rc | $((SECONDS - t0)) s |" >> "$SUMMARY"
  return "$rc"
}

# SGLang's own bench_serving.py when carried (.whl/sglang_bench_serving.py, copied from the cache
# that tests/helpers/sglang_bench.py fills), else pdserve's, which takes the same flags
SGLANG_BENCH=.whl/sglang_bench_serving.py
serve_start() {  # serve_start NAME [serve flags...]: serve on port 30000 ($SERVE_MODEL, else the 8B), back once /health answers
  SERVE_NAME=$1; shift
  python3 -m pdserve.shared.launch.serve.cli --model-path ${SERVE_MODEL:-$MODEL8B} --load-format dummy --device cuda \
    --port 30000 --log-level warning "$@" > "$OUT/$SERVE_NAME.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 300); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:30000/health', timeout=2)" 2>/dev/null && break
    sleep 1
  done
}

serve_stop() {
  kill -INT $SERVE_PID; wait $SERVE_PID; tail -5 "$OUT/$SERVE_NAME.log" | tee -a "$LOG"
  [ -f "$OUT/$SERVE_NAME.jsonl" ] && cat "$OUT/$SERVE_NAME.jsonl" >> "$RES"
}

bench_random() {  # bench_random STAGE SECONDS IN OUT [bench flags...]: random ids against the serve running
  local name=$1 secs=$2 in=$3 out=$4; shift 4
  local bench=(python3 -m pdserve.bench.bench_serving --tokenize-prompt)
  # SGLang 0.5.3's --tokenize-prompt sends numpy ints its json cannot encode: it sends the text of
  # the random ids instead (the synthetic tokenizer gives them back one token per word)
  [ -f "$SGLANG_BENCH" ] && bench=(env HF_HUB_OFFLINE=1 python3 "$SGLANG_BENCH")
  run "$name" "$secs" "${bench[@]}" --backend sglang --base-url http://127.0.0.1:30000 --model ${SERVE_MODEL:-$MODEL8B} \
    --tokenizer ${SERVE_MODEL:-$MODEL8B} --dataset-name random-ids --random-input-len "$in" --random-output-len "$out" \
    --random-range-ratio 1 --flush-cache --disable-tqdm --output-file "$OUT/$SERVE_NAME.jsonl" "$@"
}

serve_and_bench() {  # serve_and_bench NAME [serve flags...]: 1,024 in / 256 out at concurrency 1 and 64
  serve_start "$@"
  bench_random "$1-c1" 150 1024 256 --num-prompts 24 --max-concurrency 1 --warmup-requests 2
  bench_random "$1-c64" 200 1024 256 --num-prompts 320 --max-concurrency 64 --warmup-requests 4
  serve_stop
}

# Runs that more than one stage makes (each stage says why it makes them)
fp8_decode_steps() {  # bench_one_batch at batch 1, 8 and 64: bf16, then fp8 weights
  for q in bf16 fp8; do
    run one-batch-$q 240 python3 -m pdserve.bench.bench_one_batch --batch-size 1 8 64 --input-len 1024 \
      --output-len 128 $([ $q = fp8 ] && echo --quantization fp8) --result-filename "$RES" --run-name weights-$q
  done
}

fp8_profile_bs1() {  # where the fp8 batch-1 step's time goes (its floor: the fp8 weights' bytes at the copy rate)
  run profile-fp8-bs1 150 python3 -m pdserve.bench.profile_decode --batch-size 1 --input-len 1024 \
    --quantization fp8 --json-out "$OUT/profile_fp8_bs1.json"
}

fp8_profile_bs64() {  # where batch 64 x 1,280 goes with fp8 weights and an fp8 KV cache (issue 16's 0.6x goal), bf16 beside it
  run profile-fp8-kv-bs64 150 python3 -m pdserve.bench.profile_decode --batch-size 64 --input-len 1280 \
    --quantization fp8 --kv-cache-dtype fp8_e4m3 --json-out "$OUT/profile_fp8_kv_bs64.json"
  run profile-bf16-bs64 150 python3 -m pdserve.bench.profile_decode --batch-size 64 --input-len 1280 \
    --json-out "$OUT/profile_bf16_bs64.json"
}

gemma2_engine() {  # Gemma-2-9B's engine alone: its steps and a batch-1 decode profile
  run gemma2-one-batch 200 python3 -m pdserve.bench.bench_one_batch --model-path bench/configs/gemma-2-9b.json \
    --batch-size 1 64 --input-len 1024 --output-len 32 --result-filename "$RES" --run-name gemma2
  run gemma2-profile 150 python3 -m pdserve.bench.profile_decode --model-path bench/configs/gemma-2-9b.json \
    --batch-size 1 --input-len 1024 --json-out "$OUT/profile_gemma2.json"
}

moe_profile_bs1() {  # Qwen1.5-MoE's batch-1 step's kernels (the goal: 1.5x the active weights' bytes at the copy rate)
  run profile-moe-bs1 150 python3 -m pdserve.bench.profile_decode --model-path bench/configs/qwen1.5-moe-a2.7b.json \
    --batch-size 1 --input-len 1024 --json-out "$OUT/profile_moe_bs1.json"
}

fused_moe_kernel() {  # fused_moe_kernel [--fp8]: the fused-MoE kernel against the weights' memory roofline
  run bench-fused-moe${1:+-fp8} 200 python3 -m pdserve.bench.bench_fused_moe "$@" --json-out "$OUT/fused_moe.json"
}

MODEL8B=/tmp/llama8b
python3 -m pdserve.bench.synthetic_model_dir --config bench/configs/llama-3.1-8b.json --out $MODEL8B >/dev/null

for stage in $STAGES; do
  case $stage in
  tests)
    # GPU_TESTS narrows the run to some files (default: all of tests/gpu)
    run gpu-tests 480 python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/gpu} -p no:cacheprovider -x --timeout 240 ;;
  tests_kv)
    run gpu-tests-kv 180 python3 -m pytest -q -m gpu tests/gpu/test_kvtransfer_cuda_ipc.py \
      tests/gpu/test_gpu_serve_cuda_ipc.py -p no:cacheprovider --timeout 120 ;;
  kernels)
    run bench-attention 150 python3 -m pdserve.bench.bench_attention --json-out "$OUT/attention.json" ;;
  same_lease)
    # this tree's bench_one_batch against an older commit's in the same lease (issue 17: TP=1 no
    # slower). Make the older tree first: git archive <commit> | tar -x -C .baseline (carry .baseline).
    if [ ! -d .baseline ]; then echo "same_lease: no .baseline tree carried" | tee -a "$LOG"; continue; fi
    mkdir -p /tmp/pdns_base/pdserve
    for d in router prefill decode kvtransfer kernels shared bench; do ln -sfn "$PWD/.baseline/$d" /tmp/pdns_base/pdserve/$d; done
    cp -r /tmp/pdns/pdserve-0.1.0.dist-info /tmp/pdns_base/
    for tree in baseline this; do
      # not .baseline itself on the path: its top-level `kernels` would shadow the hub package transformers imports
      path=$([ $tree = baseline ] && echo /tmp/pdns_base:/tmp/site || echo "$PYTHONPATH")
      run one-batch-$tree 240 env PYTHONPATH="$path" python3 -m pdserve.bench.bench_one_batch --batch-size 1 64 \
        --input-len 1024 --output-len 128 --result-filename "$RES" --run-name same-lease-$tree
    done ;;
  one_batch)
    run one-batch 300 python3 -m pdserve.bench.bench_one_batch --batch-size 1 64 --input-len 1024 \
      --output-len 256 --result-filename "$RES" --run-name in1024-out256
    run one-batch-prefill 200 python3 -m pdserve.bench.bench_one_batch --batch-size 8 64 --input-len 1024 1280 \
      --output-len 16 --result-filename "$RES" --run-name prefill-and-ctx1280 ;;
  compile)
    run one-batch-compile 420 python3 -m pdserve.bench.bench_one_batch --batch-size 1 8 --input-len 1024 \
      --output-len 128 --cuda-graph-max-bs 8 --enable-torch-compile --result-filename "$RES" \
      --run-name torch-compile ;;
  profile)
    run profile-bs1 150 python3 -m pdserve.bench.profile_decode --batch-size 1 --input-len 1024 \
      --json-out "$OUT/profile_bs1.json"
    run profile-bs64 150 python3 -m pdserve.bench.profile_decode --batch-size 64 --input-len 1280 \
      --json-out "$OUT/profile_bs64.json" ;;
  hf)
    run hf-generate 240 python3 -m pdserve.bench.bench_hf_generate --batch-size 1 64 --input-len 1024 \
      --output-len 256 --result-filename "$RES" ;;
  serving)
    serve_start serving
    bench_random serving-c64 240 1024 256 --num-prompts 500 --max-concurrency 64 --warmup-requests 4
    bench_random serving-c1 120 1024 256 --num-prompts 24 --max-concurrency 1 --warmup-requests 2
    serve_stop ;;
  serving_pd)
    # disaggregated on one GPU: a prefill and a decode worker share it, KV pages over zmq
    serve_start serving-pd --prefill 1 --decode 1 --kv-transfer-backend zmq
    bench_random serving-pd-c16 200 1024 128 --num-prompts 96 --max-concurrency 16 --warmup-requests 2
    serve_stop ;;
  split)
    # the split's price on one GPU: the mixed worker against --prefill 1 --decode 1 over cuda_ipc on the
    # same GPU, 1,024 in / 256 out random ids at concurrency 1 and 64, in one lease
    serve_and_bench split-mixed
    serve_and_bench split-pd-cuda-ipc --prefill 1 --decode 1 --kv-transfer-backend cuda_ipc ;;
  interleave)
    # how the prefill and the decode worker's kernels share one GPU at concurrency 64: a 3 s trace
    # of both (/start_profile, GPU activity) taken mid-run, read by bench/pd_interleave.py
    serve_start interleave --prefill 1 --decode 1 --kv-transfer-backend cuda_ipc
    bench_random interleave-c64 200 1024 256 --num-prompts 500 --max-concurrency 64 --warmup-requests 4 &
    BENCH_PID=$!
    sleep 20
    python3 - <<'PY' 2>&1 | tee -a "$LOG"
import time, urllib.request as u
post = lambda path, body: u.urlopen(u.Request("http://127.0.0.1:30000" + path, data=body.encode(), headers={"Content-Type": "application/json"}), timeout=300).read().decode()
print(post("/start_profile", '{"output_dir": "/tmp/traces", "activities": ["GPU"]}'), end="")
time.sleep(3)
print(post("/stop_profile", "{}"), end="")
PY
    wait $BENCH_PID
    serve_stop
    run pd-interleave 120 python3 -m pdserve.bench.pd_interleave /tmp/traces/*-prefill-*.trace.json.gz \
      /tmp/traces/*-decode-*.trace.json.gz --json-out "$OUT/interleave.json" ;;
  threshold)
    # the router's --local-prefill-threshold: prompts prefilled at the decode worker (a huge
    # threshold) or sent through the prefill worker and cuda_ipc (0), alone and beside 15 others
    for threshold in 0 100000; do
      serve_start "threshold-$threshold" --prefill 1 --decode 1 --kv-transfer-backend cuda_ipc \
        --local-prefill-threshold $threshold
      for len in 32 256 1024; do
        bench_random "threshold-$threshold-in$len-c1" 60 $len 64 --num-prompts 12 --max-concurrency 1 --warmup-requests 1
        bench_random "threshold-$threshold-in$len-c16" 60 $len 64 --num-prompts 48 --max-concurrency 16 --warmup-requests 1
      done
      serve_stop
    done ;;
  embed)
    # /v1/embeddings against HF AutoModel, gte-Qwen2-1.5B shape, 512-token inputs, batch 32
    python3 -m pdserve.bench.synthetic_model_dir --config bench/configs/gte-qwen2-1.5b.json --out /tmp/gte >/dev/null
    SERVE_MODEL=/tmp/gte; serve_start embed --is-embedding
    run embed-pdserve 240 python3 -m pdserve.bench.bench_embeddings --config bench/configs/gte-qwen2-1.5b.json \
      --base-url http://127.0.0.1:30000 --json-out "$RES"
    serve_stop; unset SERVE_MODEL
    run embed-hf 240 python3 -m pdserve.bench.bench_embeddings --hf --config bench/configs/gte-qwen2-1.5b.json \
      --json-out "$RES" ;;
  moe)
    # the fused-MoE kernel against the weights' memory roofline, then Qwen1.5-MoE-A2.7B served with dummy weights,
    # bf16 and then fp8
    fused_moe_kernel
    moe_profile_bs1
    python3 -m pdserve.bench.synthetic_model_dir --config bench/configs/qwen1.5-moe-a2.7b.json --out /tmp/qwenmoe >/dev/null
    SERVE_MODEL=/tmp/qwenmoe; serve_start moe
    bench_random moe-c1 120 1024 256 --num-prompts 8 --max-concurrency 1 --warmup-requests 1
    bench_random moe-c64 200 1024 256 --num-prompts 128 --max-concurrency 64 --warmup-requests 2
    serve_stop
    # the same with fp8 experts and linears (--quantization fp8): the kernel, then the served model
    fused_moe_kernel --fp8
    serve_start moe-fp8 --quantization fp8
    bench_random moe-fp8-c1 120 1024 256 --num-prompts 8 --max-concurrency 1 --warmup-requests 1
    bench_random moe-fp8-c64 200 1024 256 --num-prompts 128 --max-concurrency 64 --warmup-requests 2
    serve_stop; unset SERVE_MODEL ;;
  grammar)
    # issue 15's overhead: every request under a JSON schema (GRAMMAR=regex: a regex) against the same
    # serve unconstrained, 1,024 in / 256 out at concurrency 1 and 64. The synthetic tokenizer's
    # tokens are the words w<i> and JSON's pieces (synthetic_model_dir), so the schema's key is a
    # word and its strings hold words (at least 100 of them: no request closes its object before
    # 256 tokens); each step fills and applies the batch's bitmask and advances every matcher, which
    # is the cost measured.
    serve_start grammar
    free='{"temperature": 0.0, "max_new_tokens": 256, "ignore_eos": true}'
    if [ "${GRAMMAR:-json}" = regex ]; then
      constraint='"regex": "(w[0-9]+)+"'
    else
      constraint='"json_schema": "{\"type\": \"object\", \"properties\": {\"w99\": {\"type\": \"array\", \"items\": {\"type\": \"string\"}, \"minItems\": 100}}, \"required\": [\"w99\"]}"'
    fi
    constrained="{\"temperature\": 0.0, \"max_new_tokens\": 256, \"ignore_eos\": true, $constraint}"
    for c in 1 64; do
      n=$([ $c = 1 ] && echo 8 || echo 256)
      bench_random grammar-free-c$c 200 1024 256 --num-prompts $n --max-concurrency $c --warmup-requests 2 \
        --extra-request-body "{\"sampling_params\": $free}"
      bench_random grammar-${GRAMMAR:-json}-c$c 200 1024 256 --num-prompts $n --max-concurrency $c --warmup-requests 2 \
        --extra-request-body "{\"sampling_params\": $constrained}"
    done
    serve_stop ;;
  fp8)
    run bench-fp8-gemm 200 python3 -m pdserve.bench.bench_fp8_gemm --rows 1,16,64 --sweep --json-out "$OUT/fp8_gemm.json"
    fp8_decode_steps
    run one-batch-fp8-kv 300 python3 -m pdserve.bench.bench_one_batch --quantization fp8 --kv-cache-dtype fp8_e4m3 \
      --batch-size 64 --input-len 1280 --output-len 128 --result-filename "$RES" --run-name weights-fp8-kv-fp8
    fp8_profile_bs1 ;;
  gemm_kernels)
    # the skinny fp8 GEMM (no sweep) and the fused-MoE kernel in bf16 and fp8, each against its roofline
    run bench-fp8-gemm 150 python3 -m pdserve.bench.bench_fp8_gemm --rows 1,16,64 --json-out "$OUT/fp8_gemm.json"
    fused_moe_kernel
    fused_moe_kernel --fp8 ;;
  fp8_step)
    # the fp8 stage's decode steps and batch-1 profile alone (bf16 beside it), without the GEMM sweep
    fp8_decode_steps
    fp8_profile_bs1
    fp8_profile_bs64 ;;
  fp8_serving)
    # issue 16's serving goal: bf16 against fp8 weights + fp8 KV through serve, 1,024 in / 256 out, c64
    serve_and_bench fp8-serving-bf16
    serve_and_bench fp8-serving-fp8 --quantization fp8 --kv-cache-dtype fp8_e4m3 ;;
  fp8_compile)
    for q in bf16 fp8; do
      run one-batch-compile-$q 300 python3 -m pdserve.bench.bench_one_batch --batch-size 1 --input-len 1024 \
        --output-len 128 --cuda-graph-max-bs 8 --enable-torch-compile $([ $q = fp8 ] && echo --quantization fp8) \
        --result-filename "$RES" --run-name compile-weights-$q
    done ;;
  deepseek)
    # DeepSeek-V2-Lite served with dummy weights (MLA over the one-plane latent pool, DeepSeek MoE)
    python3 -m pdserve.bench.synthetic_model_dir --config bench/configs/deepseek-v2-lite.json --out /tmp/dsv2 >/dev/null
    run deepseek-one-batch 200 python3 -m pdserve.bench.bench_one_batch --model-path bench/configs/deepseek-v2-lite.json \
      --batch-size 1 64 --input-len 1024 --output-len 32 --result-filename "$RES" --run-name deepseek-v2-lite
    SERVE_MODEL=/tmp/dsv2; serve_start deepseek
    bench_random deepseek-c1 120 1024 256 --num-prompts 8 --max-concurrency 1 --warmup-requests 1
    bench_random deepseek-c64 200 1024 256 --num-prompts 128 --max-concurrency 64 --warmup-requests 2
    serve_stop; unset SERVE_MODEL ;;
  gemma2_engine)
    gemma2_engine ;;
  kinds_engine)
    # the model kinds' engines alone, no serve: Gemma-2-9B's step and profile, Qwen1.5-MoE's batch-1
    # profile, the fused-MoE kernel in bf16 and fp8
    gemma2_engine
    moe_profile_bs1
    fused_moe_kernel --sweep
    fused_moe_kernel --fp8 ;;
  gemma2)
    # Gemma-2-9B served with dummy weights (soft-capping, alternating sliding window)
    python3 -m pdserve.bench.synthetic_model_dir --config bench/configs/gemma-2-9b.json --out /tmp/gemma2 >/dev/null
    # the engine alone first (bench_one_batch and a decode profile), so a slow serve can be placed
    gemma2_engine
    SERVE_MODEL=/tmp/gemma2; serve_start gemma2
    bench_random gemma2-c1 120 1024 256 --num-prompts 8 --max-concurrency 1 --warmup-requests 1
    bench_random gemma2-c64 200 1024 256 --num-prompts 128 --max-concurrency 64 --warmup-requests 2
    serve_stop; unset SERVE_MODEL ;;
  kv_ipc)
    run kv-cuda-ipc 150 python3 -m pdserve.bench.bench_kv_transfer --backend cuda_ipc --device cuda \
      --tokens 16,256,1024,4096 --repeats 20 --output-file "$OUT/kv_cuda_ipc.jsonl"
    cat "$OUT"/kv_cuda_ipc.jsonl >> "$RES" ;;
  kv)
    run kv-zmq 150 python3 -m pdserve.bench.bench_kv_transfer --backend zmq --device cuda \
      --tokens 16,256,1024,4096 --output-file "$OUT/kv_zmq.jsonl"
    # two processes on one GPU: the receiver's pool mapped through CUDA IPC, pages written in place
    run kv-cuda-ipc 150 python3 -m pdserve.bench.bench_kv_transfer --backend cuda_ipc --device cuda \
      --tokens 16,256,1024,4096 --repeats 20 --output-file "$OUT/kv_cuda_ipc.jsonl"
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      run kv-nccl 150 python3 -m pdserve.bench.bench_kv_transfer --backend nccl --tokens 16,256,1024,4096 \
        --output-file "$OUT/kv_nccl.jsonl"
      run kv-cuda-ipc-2gpu 150 python3 -m pdserve.bench.bench_kv_transfer --backend cuda_ipc --device cuda \
        --peer-device cuda:1 --tokens 16,256,1024,4096 --repeats 20 --output-file "$OUT/kv_cuda_ipc_2gpu.jsonl"
    fi
    cat "$OUT"/kv_*.jsonl >> "$RES" ;;
  tp)
    # issue 18's TP=2 run: the decode graphs are captured across both ranks (shared/engine/tp_decode_graphs.py)
    if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then
      echo "| tp | skipped: needs 2 GPUs | 0 s |" >> "$SUMMARY"
    else
      for tp in 1 2; do
        run one-batch-tp$tp 360 python3 -m pdserve.bench.bench_one_batch --tp $tp --batch-size 1 64 \
          --input-len 1024 --output-len 256 --result-filename "$OUT/tp.jsonl" --run-name tp$tp
      done
      cat "$OUT/tp.jsonl" >> "$RES"
      python3 - "$OUT/tp.jsonl" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
step = {(r["tp"], r["batch_size"]): r["median_decode_latency_s"] for r in rows}
for bs in (1, 64):
    if (1, bs) in step and (2, bs) in step:
        print(f"| tp2/tp1 decode step, bs {bs} | {step[2, bs] / step[1, bs]:.3f} (goal at bs 1: <= 0.6) |")
PY
      run gpu-tests-tp 300 python3 -m pytest -q -m gpu tests/gpu/test_gpu_tp_graphs.py -p no:cacheprovider --timeout 240
    fi ;;
  multi_*)
    multi_stage "$stage" ;;
  esac
done

echo
echo "| stage | result | time |"
echo "| --- | --- | --- |"
cat "$SUMMARY"
echo
grep -h '^|' "$LOG" | tail -60 || true
if [ -f "$OUT/multi/goodput.md" ]; then echo; cat "$OUT/multi/goodput.md"; fi

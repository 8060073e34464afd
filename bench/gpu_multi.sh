# The multi-GPU stages of bench/gpu_check.sh (two GPUs of one host: GPU 0 and GPU 1), sourced by it:
# it defines run, serve_start, serve_stop, bench_random, $OUT, $SUMMARY and $MODEL8B. Sourcing this
# file only defines functions and defaults.
#
#   multi_kv         nccl and cuda_ipc KV transfer cuda:0 -> cuda:1 against the pair's copy rate (goal >= 80%
#                    at 1,024 tokens of the Llama-3.1-8B KV)                                        ~80 s
#   multi_pd         the two-GPU `gpu` tests: bit-exact nccl and cuda_ipc transfers cuda:0 -> cuda:1, SIGKILL
#                    of an nccl sender; serve with P on cuda:0 and D on cuda:1 (nccl, cuda_ipc): the mixed
#                    engine's greedy tokens, and SIGKILL of either worker frees the survivor's pages in 5 s ~220 s
#   multi_tp         TP=2 against TP=1: another name of gpu_check.sh's `tp` stage (bench_one_batch of the 8B
#                    at --tp 1 and 2, batch 1 and 64, the step ratio; the TP=2 CUDA-graph parity test) ~400 s
#   multi_split      1P1D (P on cuda:0, D on cuda:1, --local-prefill-threshold 0) against two mixed workers
#                    (one per GPU), the Llama-3.1-8B shape with dummy weights, SGLang's bench_serving at
#                    Poisson request rates swept to saturation: prefill-heavy 4,096 in / 256 out, decode-heavy
#                    256 in / 1,024 out, and short+long (32..2,048 in / 256 out); tables by bench/goodput.py ~400 s
#   multi_threshold  the router's conditional disaggregation (1P1D, --local-prefill-threshold 512) on the
#                    short+long mix against multi_split's two pure setups (needs multi_split's files in
#                    the same $OUT: run it in the same call, after multi_split)                    ~90 s
#
# `multi` is all five in that order (~20 minutes). A device call is capped at 600 s, so the first lease
# of a two-GPU kind (nvidia-h100-x2 or nvidia-h200-x2, carry .whl) takes three calls:
#   bash bench/gpu_check.sh multi_kv multi_pd
#   bash bench/gpu_check.sh multi_tp
#   bash bench/gpu_check.sh multi_split multi_threshold
# The rates aim past saturation: a 4,096-token prefill of the 8B takes ~0.3 s on an H100, so one
# prefill worker saturates near 3 req/s and the mixed pair near 6; one decode worker of 1,024-token
# outputs near 4 req/s. Raise a mix's rates when its top rate's throughput still follows the offered rate.
# A call that runs past 600 s still brings back $OUT: `python -m pdserve.bench.goodput` makes the tables
# from $OUT/multi/*.jsonl afterwards (multi_split and multi_threshold below show its flags).
# Each stage stops starting runs once its budget is spent; MULTI_SECONDS (arrivals per rate, default 8 s),
# MULTI_RATES_PREFILL, MULTI_RATES_DECODE, MULTI_RATES_SHORT_LONG and MULTI_KV_BACKEND (the 1P1D pair's
# backend, default auto) change the sweep. The goodput tables and the goals' verdicts are printed last.

MULTI_STAGES="multi_kv multi_pd tp multi_split multi_threshold"
MULTI_SECONDS=${MULTI_SECONDS:-8}
MULTI_RATES_PREFILL=${MULTI_RATES_PREFILL:-1.5 3 6}
MULTI_RATES_DECODE=${MULTI_RATES_DECODE:-2 4 8}
MULTI_RATES_SHORT_LONG=${MULTI_RATES_SHORT_LONG:-3 6}
MULTI_THRESHOLD=512
# the three mixes: name, input length, output length, range ratio (input lengths uniform in [ratio*in, in])
MULTI_MIXES="prefill-heavy:4096:256:1 decode-heavy:256:1024:1 short-long:2048:256:0.015625"

expand_stages() {  # expand_stages STAGE...: the stage list, `multi` replaced by its stages, multi_tp by tp
  local stage out=()
  for stage in "$@"; do
    case $stage in
    multi) out+=($MULTI_STAGES) ;;
    multi_tp) out+=(tp) ;;
    *) out+=("$stage") ;;
    esac
  done
  echo "${out[*]}"
}

num_prompts() {  # num_prompts RATE: MULTI_SECONDS of Poisson arrivals at RATE, at least 8
  awk -v r="$1" -v s="$MULTI_SECONDS" 'BEGIN { n = int(r * s + 0.5); print (n < 8 ? 8 : n) }'
}

mix_rates() {  # mix_rates MIX: the request rates swept for that mix
  case $1 in
  prefill-heavy) echo "$MULTI_RATES_PREFILL" ;;
  decode-heavy) echo "$MULTI_RATES_DECODE" ;;
  short-long) echo "$MULTI_RATES_SHORT_LONG" ;;
  esac
}

sweep() {  # sweep SETUP DEADLINE MIX...: each mix's rates against the serve running, $OUT/multi/SETUP-MIX.jsonl
  local setup=$1 deadline=$2 spec mix in out ratio rate; shift 2
  for spec in "$@"; do
    IFS=: read -r mix in out ratio <<< "$spec"
    for rate in $(mix_rates "$mix"); do
      if [ "$SECONDS" -ge "$deadline" ]; then
        echo "| multi-$setup-$mix-r$rate | skipped: stage budget spent | 0 s |" >> "$SUMMARY"
        continue
      fi
      bench_random "multi-$setup-$mix-r$rate" 90 "$in" "$out" --num-prompts "$(num_prompts "$rate")" \
        --request-rate "$rate" --random-range-ratio "$ratio" --warmup-requests 2 --output-details \
        --output-file "$OUT/multi/$setup-$mix.jsonl"
    done
  done
}

goodput_table() {  # goodput_table NAME [goodput.py flags...]: the table into the log and $OUT/multi/goodput.md
  local name=$1; shift
  run "goodput-$name" 60 python3 -m pdserve.bench.goodput "$@"
  { python3 -m pdserve.bench.goodput "$@" 2>&1; echo; } >> "$OUT/multi/goodput.md"
}

multi_stage() {  # multi_stage STAGE: one multi-GPU stage (skipped on fewer than two GPUs)
  local stage=$1 gpus deadline
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$gpus" -lt 2 ]; then
    echo "| $stage | skipped: $gpus GPU(s), needs 2 | 0 s |" >> "$SUMMARY"
    return
  fi
  mkdir -p "$OUT/multi"
  case $stage in
  multi_kv)
    run multi-kv-nccl 150 python3 -m pdserve.bench.bench_kv_transfer --backend nccl --tokens 16,256,1024,4096 \
      --repeats 20 --output-file "$OUT/multi/kv_nccl.jsonl"
    run multi-kv-cuda-ipc 150 python3 -m pdserve.bench.bench_kv_transfer --backend cuda_ipc --device cuda \
      --peer-device cuda:1 --tokens 16,256,1024,4096 --repeats 20 --output-file "$OUT/multi/kv_cuda_ipc.jsonl"
    cat "$OUT"/multi/kv_*.jsonl >> "$RES" 2>/dev/null ;;
  multi_pd)
    run multi-pd-tests 330 python3 -m pytest -q -m gpu tests/gpu/test_kvtransfer_nccl.py \
      "tests/gpu/test_kvtransfer_cuda_ipc.py::test_bit_exact_bf16_two_processes_one_gpu[cuda_ipc-cuda:1]" \
      tests/gpu/test_gpu_serve_two_gpus.py -p no:cacheprovider --timeout 240 ;;
  multi_split)
    deadline=$((SECONDS + 400))  # half of it for each setup, its start included
    serve_start multi-1p1d --prefill 1 --decode 1 --device cuda:0,cuda:1 \
      --kv-transfer-backend "${MULTI_KV_BACKEND:-auto}" --local-prefill-threshold 0
    sweep 1p1d $((deadline - 200)) $MULTI_MIXES
    serve_stop
    serve_start multi-2mixed --workers 2 --device cuda:0,cuda:1
    sweep 2mixed "$deadline" $MULTI_MIXES
    serve_stop
    for mix in prefill-heavy decode-heavy; do
      goodput_table "$mix" --mix "$mix" --setup 1P1D "$OUT/multi/1p1d-$mix.jsonl" \
        --setup "2 mixed" "$OUT/multi/2mixed-$mix.jsonl"
    done ;;
  multi_threshold)
    deadline=$((SECONDS + 80))
    serve_start multi-conditional --prefill 1 --decode 1 --device cuda:0,cuda:1 \
      --kv-transfer-backend "${MULTI_KV_BACKEND:-auto}" --local-prefill-threshold "$MULTI_THRESHOLD"
    sweep conditional "$deadline" "${MULTI_MIXES##* }"
    serve_stop
    goodput_table conditional --goals conditional --mix short-long \
      --setup "1P1D threshold $MULTI_THRESHOLD" "$OUT/multi/conditional-short-long.jsonl" \
      --setup 1P1D "$OUT/multi/1p1d-short-long.jsonl" --setup "2 mixed" "$OUT/multi/2mixed-short-long.jsonl" ;;
  esac
}

#!/usr/bin/env bash
# The gpu_check `serving` c64 run again with --disable-overlap-schedule: what overlap scheduling
# buys through serve + bench_serving. Run it after gpu_check.sh in the same device call: that made
# the model dir, installed the carried wheels into /tmp/site and the pdserve namespace in /tmp/pdns.
set -u
export PYTHONPATH=/tmp/pdns:/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; MODEL8B=/tmp/llama8b
python3 -m pdserve.shared.launch.serve.cli --model-path $MODEL8B --load-format dummy --device cuda \
  --port 30000 --log-level warning --disable-overlap-schedule > "$OUT/serve_no_overlap.log" 2>&1 &
SERVE=$!
for _ in $(seq 240); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:30000/health', timeout=2)" 2>/dev/null && break
  sleep 1
done
timeout 240 python3 -m pdserve.bench.bench_serving --backend sglang --dataset-name random-ids --tokenize-prompt --flush-cache \
  --num-prompts 500 --random-input-len 1024 --random-output-len 256 --random-range-ratio 1 \
  --max-concurrency 64 --warmup-requests 4 --disable-tqdm --output-file "$OUT/results.jsonl" 2>&1 | tail -30
kill -INT $SERVE; wait $SERVE

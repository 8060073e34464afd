"""pdserve.bench: the benchmarks (bench_serving, bench_one_batch, bench_attention, profile_decode,
the HF generate anchor, KV transfer and router benchmarks, the router's stand-in engine) and
gpu_check.sh; results go to RESULTS.md.

May import: anything in pdserve (it measures every layer); nothing in pdserve imports it.
"""

"""Benchmarks (bench_serving, bench_one_batch, ...)."""

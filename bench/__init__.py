"""kmodd benchmarks (not timed tests): `python -m bench.bench_core` and friends."""

"""Serving benchmark: stock TorchServe handler vs this project's handler vs the in-process ceiling.

See docs/benchmarks.md. Entry points (run as modules): python -m bench.run (throughput/latency table),
bench.stages, bench.batch_script, bench.cold_start, bench.parity. Shared pieces: bench.harness.
"""

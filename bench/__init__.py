"""Serving benchmark: stock TorchServe handler vs this project's handler vs the in-process ceiling.

See bench/README.md. Entry points: bench/run.py (throughput/latency table), bench/cold_start.py.
"""

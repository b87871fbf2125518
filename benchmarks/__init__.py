"""Benchmarks run by `make bench` (benchmarks.run)."""

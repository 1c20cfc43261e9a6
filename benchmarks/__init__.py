"""Benchmarks of medssl's hot loops against a naive baseline: `python -m benchmarks` (docs/testing.md, Benchmarks)."""

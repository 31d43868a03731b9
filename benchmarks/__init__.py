"""Benchmarks of the tuner engine: `python benchmarks/run.py [--quick]` (see benchmarks/README.md)."""

"""Benchmarks of the driver; see docs/benchmarks.md."""

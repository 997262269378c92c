"""Benchmarks: each prints vibed's figures next to its baseline, measured in one run."""

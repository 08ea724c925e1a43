"""Benchmarks (not tests): each module exposes ``run(quick=False) -> list[BenchResult]``."""

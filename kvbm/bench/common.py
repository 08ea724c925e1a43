"""Shared result type for kvbm benchmarks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BenchResult:
    """One measured figure next to the physical limit measured in the same run.

    ``limit`` is what the hardware (or the raw primitive) achieves for the same
    work, in ``limit_unit``; ``ratio`` is ``value / limit`` when both exist.
    ``goal`` states the target in words (e.g. "< 1 ms"). ``ok`` is False when the run behind
    the figure failed a correctness check (``kvbm bench`` then exits 1).
    """

    figure: str
    value: float
    unit: str
    limit: float | None
    limit_unit: str
    ratio: float | None
    goal: str
    ok: bool = True

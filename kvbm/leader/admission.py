"""Admission filter for G2 -> G3 offload: Dynamo's ``FrequencyFilter`` rule, exactly.

Dynamo (``lib/llm/src/block_manager/offload/filter.rs``, built as ``FrequencyFilter::new(2, 600 s,
1_000_000)``) keeps a count per sequence hash: a new hash starts at 1, a repeat doubles it, and a
block is offloaded when the count is >= 2, so a block must be registered in G2 a second time before
it is written to disk. Every 600 s every count drops by 1 and zeros are forgotten; when the map
grows past 1,000,000 entries it is pruned (one decay per pass) until it is back within the limit,
and the decay interval restarts. Dynamo runs the decay on a background task; here it runs lazily
from :meth:`FrequencyFilter.tick` against an injectable clock, which gives the same counts.
``DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER`` maps to ``enabled=False``.
"""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["FrequencyFilter", "COUNT_MAX"]

# Counts saturate here (u32) instead of growing without bound on a hot block.
COUNT_MAX = 2**32 - 1


class FrequencyFilter:
    """Frequency-based admission: offload a block to disk once it has been seen twice."""

    def __init__(
        self,
        min_count: int = 2,
        decay_interval_s: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        enabled: bool = True,
    ) -> None:
        """Create an empty filter; ``enabled=False`` admits everything and tracks nothing."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if not decay_interval_s > 0:
            raise ValueError(f"decay_interval_s must be > 0, got {decay_interval_s}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.min_count = min_count
        self.decay_interval_s = float(decay_interval_s)
        self.max_entries = max_entries
        self.enabled = enabled
        self._clock = clock
        self._counts: dict[int, int] = {}
        self._last_decay = clock()

    def should_offload(self, seq_hash: int) -> bool:
        """Record one sighting of ``seq_hash`` and say whether to offload it now."""
        if not self.enabled:
            return True
        self.tick()
        counts = self._counts
        c = counts.get(seq_hash)
        c = 1 if c is None else min(c * 2, COUNT_MAX)
        counts[seq_hash] = c
        if len(counts) > self.max_entries:
            self._prune_oversize()
        return c >= self.min_count

    def tick(self) -> None:
        """Apply the decays due by now, then prune while over ``max_entries``."""
        now = self._clock()
        due = int((now - self._last_decay) // self.decay_interval_s)
        if due > 0:
            # n decays of "-1, drop zeros" in one pass: each count is independent.
            self._decay(due)
            self._last_decay += due * self.decay_interval_s
        if len(self._counts) > self.max_entries:
            self._prune_oversize()

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, seq_hash: int) -> int:
        """Current count of a hash (0 if not tracked)."""
        return self._counts.get(seq_hash, 0)

    def _decay(self, n: int) -> None:
        self._counts = {h: c - n for h, c in self._counts.items() if c > n}

    def _prune_oversize(self) -> None:
        # As Dynamo: it may take several passes; then the decay interval restarts.
        while len(self._counts) > self.max_entries:
            self._decay(1)
        self._last_decay = self._clock()

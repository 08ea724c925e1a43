"""Copy engines between the engine's KV cache (G1) and this rank's slice of the host pool (G2).

The CPU engine copies with NumPy: for each run of consecutive (engine block, host slot)
pairs, one strided ``np.copyto`` per layer moves the whole run, with no temporary buffer.
The GPU engine (kvbm.worker.cuda_copy) has the same interface.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from kvbm.worker.layout import EngineKV


class CopyEngine(Protocol):
    def store(self, engine_blocks: Sequence[int], slots: Sequence[int]) -> None:
        """G1 -> G2: copy engine blocks into host slots (this rank's slice only)."""

    def load(self, slots: Sequence[int], engine_blocks: Sequence[int]) -> None:
        """G2 -> G1: copy host slots into engine blocks."""


def runs(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split paired index lists into ``(a0, b0, length)`` runs where both advance by one."""
    out: list[tuple[int, int, int]] = []
    if len(a) != len(b):
        raise ValueError(f"{len(a)} sources but {len(b)} destinations")
    i, n = 0, len(a)
    while i < n:
        j = i + 1
        while j < n and a[j] == a[j - 1] + 1 and b[j] == b[j - 1] + 1:
            j += 1
        out.append((int(a[i]), int(b[i]), j - i))
        i = j
    return out


class NumpyCopyEngine:
    """CPU copies between NumPy/torch-CPU KV tensors and the shared host pool."""

    def __init__(self, kv: EngineKV, host: np.ndarray) -> None:
        self.kv = kv
        self.host = host  # (host_blocks, layers, outer, region)

    def _check(self, engine_blocks: Sequence[int], slots: Sequence[int]) -> None:
        nb, ns = self.kv.layout.num_blocks, self.host.shape[0]
        for b in engine_blocks:
            if not 0 <= b < nb:
                raise IndexError(f"engine block {b} is outside [0, {nb})")
        for s in slots:
            if not 0 <= s < ns:
                raise IndexError(f"host slot {s} is outside [0, {ns})")

    def store(self, engine_blocks: Sequence[int], slots: Sequence[int]) -> None:
        self._check(engine_blocks, slots)
        for b0, s0, n in runs(engine_blocks, slots):
            if self.kv.whole is not None:
                np.copyto(self.host[s0 : s0 + n], self.kv.whole[b0 : b0 + n])
                continue
            for layer, view in enumerate(self.kv.layers):
                np.copyto(self.host[s0 : s0 + n, layer], view[b0 : b0 + n])

    def load(self, slots: Sequence[int], engine_blocks: Sequence[int]) -> None:
        self._check(engine_blocks, slots)
        for s0, b0, n in runs(slots, engine_blocks):
            if self.kv.whole is not None:
                np.copyto(self.kv.whole[b0 : b0 + n], self.host[s0 : s0 + n])
                continue
            for layer, view in enumerate(self.kv.layers):
                np.copyto(view[b0 : b0 + n], self.host[s0 : s0 + n, layer])

"""The KV oracle: what every byte of a computed block must be.

A block's bytes are derived from (sequence hash, layer, K/V, rank): a random base pattern per
(rank, layer, K/V), or per (layer, K/V, KV head) when the model's heads are split over the ranks,
XORed with a 64-bit mix of the sequence hash. The sequence hash covers the
block's tokens, their positions and the whole prefix, so a wrong, stale, shifted or partially
copied block differs from the oracle in (almost) every word and is always caught.
"""

from __future__ import annotations

import numpy as np

from kvbm.ipc.block_format import HeadSplit
from kvbm.worker.layout import EngineKV

_MASK = (1 << 64) - 1
_HEADS_STREAM = 1 << 20  # the random stream of head-split models (rank streams are 0 .. 1023)


def mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit value per sequence hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class Oracle:
    """Fills and checks one rank's engine blocks."""

    def __init__(self, kv: EngineKV, rank: int, seed: int = 0, heads: HeadSplit | None = None) -> None:
        """``heads``: the rank holds these of the model's KV heads (token-major regions): its base
        pattern is theirs, drawn per head for the whole model, so every TP size has the same bytes."""
        lay = kv.layout
        if lay.region_bytes % 8:
            raise ValueError("the oracle needs regions that are a multiple of 8 bytes")
        self.kv = kv
        if heads is None:
            rng = np.random.default_rng([seed, rank])
            self.base = rng.integers(0, 2**63, size=(lay.num_layers, lay.outer, lay.region_bytes // 8), dtype=np.uint64)
        else:
            if heads.head_bytes % 8 or heads.head_major:
                raise ValueError("the oracle splits token-major regions into heads of a multiple of 8 bytes")
            tokens = lay.region_bytes // (heads.count * heads.head_bytes)
            rng = np.random.default_rng([seed, _HEADS_STREAM])
            whole = rng.integers(0, 2**63, size=(lay.num_layers, lay.outer, tokens, heads.total, heads.head_bytes // 8),
                                 dtype=np.uint64)
            mine = whole[:, :, :, heads.first:heads.first + heads.count]
            self.base = mine.reshape(lay.num_layers, lay.outer, lay.region_bytes // 8)
        self._views = [v.view(np.uint64) for v in kv.layers]

    def fill(self, engine_block: int, seq_hash: int) -> None:
        """Write the oracle's bytes for ``seq_hash`` into an engine block (a simulated forward pass)."""
        key = np.uint64(mix64(seq_hash))
        for layer, view in enumerate(self._views):
            np.bitwise_xor(self.base[layer], key, out=view[engine_block])

    def check(self, engine_block: int, seq_hash: int) -> bool:
        """True if the engine block holds exactly the oracle's bytes for ``seq_hash``."""
        key = np.uint64(mix64(seq_hash))
        for layer, view in enumerate(self._views):
            if not np.array_equal(view[engine_block], self.base[layer] ^ key):
                return False
        return True

    def scramble(self, engine_block: int) -> None:
        """Overwrite a block with garbage (so a load that did nothing is caught)."""
        for view in self._views:
            view[engine_block] = 0xDEADBEEFDEADBEEF

"""A fixed-capacity map from 64-bit block hash to slot whose operations are vectorised with NumPy.

A tier's registered hashes live in a Python dict too (the source of truth for single-hash
work); this mirror exists for the lookup of a whole prompt: 2048 hashes tested in a few NumPy
gathers over u64 arrays, with no Python int per hash (a dict walk costs ~30-50 ns a hash, plus
turning the wire bytes into Python ints first). Stores and evictions change it a batch at a
time, also vectorised, so the leader's store path pays a few NumPy passes, not a Python loop.

Open addressing with linear probing at a load of at most 1/4 with the tier full (1/2 counting
tombstones): short clusters, so most hashes settle in one or two vectorised rounds. Sequence hashes are already
uniform 64-bit values (xxh3), so their low bits are the bucket. Key 0 marks an empty bucket and
key 1 a removed one (a tombstone: lookups probe past it, inserts reuse it); the hashes 0 and 1
themselves, should a sequence hash ever be one, are kept aside in a dict. When tombstones
reach a quarter of the buckets the table is rebuilt from its live keys.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_EMPTY, _TOMB = 0, 1
# Memory per hash of capacity: at most 8 buckets (4x capacity rounded up to a power of two) of
# a u64 key, an i32 slot and an i32 scratch entry.
BYTES_PER_HASH = 128


def _u64(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, np.uint64)


class HashSlotTable:
    """hash -> slot for at most ``capacity`` hashes."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        size = 1 << max(4, (4 * capacity - 1).bit_length())  # >= 4 x capacity
        self._mask = size - 1
        self._keys = np.zeros(size, np.uint64)
        self._slots = np.zeros(size, np.int32)
        self._owner = np.zeros(size, np.int32)  # scratch: which inserted hash claimed a bucket
        self._aside: dict[int, int] = {}  # the hashes 0 and 1 (the empty and tombstone keys)
        self._len = 0  # live hashes, aside ones included
        self._tombs = 0

    def __len__(self) -> int:
        return self._len

    def _home(self, q: np.ndarray) -> np.ndarray:
        return (q & np.uint64(self._mask)).astype(np.intp)

    def _positions(self, q: np.ndarray, rounds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(bucket of each hash of ``q``, -1 where absent; indices still unsure after ``rounds``
        buckets probed, None: as many as needed). ``q`` holds no aside hash."""
        keys, mask = self._keys, self._mask
        pos = self._home(q)
        k = keys[pos]
        where = np.where(k == q, pos, -1)  # most hashes settle in their home bucket
        todo = np.flatnonzero((where < 0) & (k != _EMPTY))  # another hash (or a tombstone) there
        pos = pos[todo]
        left = -1 if rounds is None else rounds - 1
        while len(todo) and left:
            left -= 1
            pos = (pos + 1) & mask
            k = keys[pos]
            hit = k == q[todo]
            where[todo[hit]] = pos[hit]
            more = ~hit & (k != _EMPTY)
            todo, pos = todo[more], pos[more]
        return where, todo

    def get(self, h: int) -> int | None:
        slot = int(self.slots_of(_u64([h]))[0])
        return None if slot < 0 else slot

    def slots_of(self, hashes: np.ndarray) -> np.ndarray:
        """The slot of each hash of the uint64 array ``hashes``, -1 where absent."""
        q = _u64(hashes)
        where, _ = self._positions(q)
        out = np.where(where >= 0, self._slots[where], -1)
        for i in np.flatnonzero(q <= _TOMB).tolist():
            out[i] = self._aside.get(int(q[i]), -1)
        return out

    def probe(self, hashes: np.ndarray, rounds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(a bool per hash: found, indices of the hashes still unsure after ``rounds`` buckets
        probed; None: as many as needed, so none is unsure). A few hashes sit far from their
        home bucket and each further round costs NumPy's fixed price per operation, so callers
        with a dict of the same hashes finish the stragglers there."""
        q = _u64(hashes)
        if not self._len or not len(q):
            return np.zeros(len(q), np.bool_), np.empty(0, np.intp)
        where, unsure = self._positions(q, rounds)
        found = where >= 0
        special = np.flatnonzero(q <= _TOMB)  # never stored as keys: the aside dict decides
        if len(special):
            found[special] = [int(h) in self._aside for h in q[special].tolist()]
            unsure = np.setdiff1d(unsure, special)
        return found, unsure

    def not_near_home(self, q: np.ndarray) -> np.ndarray:
        """Indices (ascending) of the hashes of the uint64 array ``q`` not found in their home
        bucket or the next one: the absent ones, the few that sit further away and the aside
        hashes. The cheap first pass of a prefix match (a handful of NumPy operations whatever
        the length); a caller with a dict of the same hashes settles these in order."""
        keys, mask = self._keys, self._mask
        if not len(q):
            return np.empty(0, np.intp)
        aside = q.min() <= _TOMB  # the empty and tombstone keys are no hashes (practically never)
        pos = q.view(np.int64) & mask  # the bucket index directly (the mask is < 2**63)
        far = keys.take(pos) != q
        if aside:
            far |= q <= _TOMB
        missed = far.nonzero()[0]  # q is 1-D: no flatnonzero (its ravel) needed
        if len(missed):
            qm = q.take(missed)
            far = keys.take((pos.take(missed) + 1) & mask) != qm
            if aside:
                far |= qm <= _TOMB
            missed = missed[far]
        return missed

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """A bool per hash of the uint64 array ``hashes``: present in the table."""
        return self.probe(hashes)[0]

    def insert(self, hashes: Sequence[int] | np.ndarray, slots: Sequence[int] | np.ndarray) -> None:
        """Add ``hashes[i] -> slots[i]``: distinct hashes not in the table yet (the caller's dict
        of the same hashes guarantees it; not checked, it would cost a probe). ValueError
        (nothing added) when the table would hold more than its capacity."""
        q, s = _u64(hashes), np.asarray(slots, np.int32)
        if len(q) != len(s):
            raise ValueError(f"{len(q)} hashes for {len(s)} slots")
        if 2 * (self._len + len(q)) > len(self._keys):
            raise ValueError(f"hash table full ({self._len} hashes, {len(q)} more)")
        special = q <= _TOMB
        if special.any():
            self._aside.update(zip(q[special].tolist(), s[special].tolist()))
            self._len += int(special.sum())
            q, s = q[~special], s[~special]
        if 2 * (self._len + self._tombs + len(q)) > len(self._keys):
            self._rebuild()
        self._place(q, s)

    def _place(self, q: np.ndarray, s: np.ndarray) -> None:
        """Put new non-aside hashes in the first free (empty or tombstone) bucket from their home."""
        keys, table, owner, mask = self._keys, self._slots, self._owner, self._mask
        todo = np.arange(len(q))
        pos = self._home(q)
        while len(todo):
            k = keys[pos]
            free = (k == _EMPTY) | (k == _TOMB)
            cand, cpos = todo[free], pos[free]
            owner[cpos] = cand  # several may want one bucket: the last write wins it
            won = owner[cpos] == cand
            wpos, wq = cpos[won], cand[won]
            self._tombs -= int(np.count_nonzero(keys[wpos] == _TOMB))
            keys[wpos] = q[wq]
            table[wpos] = s[wq]
            stay = np.ones(len(todo), np.bool_)
            stay[np.flatnonzero(free)[won]] = False
            todo, pos = todo[stay], (pos[stay] + 1) & mask
        self._len += len(q)

    def remove(self, hashes: Sequence[int] | np.ndarray) -> None:
        """Drop ``hashes``; KeyError (nothing dropped) for one not present."""
        q = _u64(hashes)
        special = q <= _TOMB
        if special.any():
            for h in q[special].tolist():
                if h not in self._aside:
                    raise KeyError(h)
            q = q[~special]
        where, _ = self._positions(q)
        if (where < 0).any():
            raise KeyError(int(q[int(np.argmin(where))]))
        if len(np.unique(where)) != len(where):
            raise KeyError("a hash is repeated")
        if special.any():
            for h in _u64(hashes)[special].tolist():
                del self._aside[h]
            self._len -= int(special.sum())
        self._keys[where] = _TOMB
        self._tombs += len(where)
        self._len -= len(where)
        if 4 * self._tombs > len(self._keys):
            self._rebuild()

    def _rebuild(self) -> None:
        """Re-insert the live keys into a table without tombstones."""
        live = np.flatnonzero(self._keys > _TOMB)
        q, s = self._keys[live].copy(), self._slots[live].copy()
        self._keys.fill(_EMPTY)
        self._tombs = 0
        self._len -= len(q)
        self._place(q, s)

    def clear(self) -> None:
        self._keys.fill(_EMPTY)
        self._aside.clear()
        self._len = self._tombs = 0


def leading(flags: np.ndarray) -> int:
    """Number of leading True values of a bool array."""
    if not len(flags):
        return 0
    first_false = int(np.argmin(flags))
    return len(flags) if flags[first_false] else first_false

"""A fixed-capacity map from 64-bit block hash to slot whose lookups are vectorised with NumPy.

A tier's registered hashes live in a Python dict too (the source of truth for single-hash
work); this mirror exists for the lookup of a whole prompt: 2048 hashes tested in a few NumPy
gathers over u64 arrays, with no Python int per hash (a dict walk costs ~50 ns a hash, plus
turning the wire bytes into Python ints first).

Open addressing with linear probing at a load of at most 1/2. Sequence hashes are already
uniform 64-bit values (xxh3), so their low bits are the bucket. A removal shifts the rest of
its cluster back (no tombstones), so probe lengths stay short however long the table lives.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Memory per hash of capacity: at most 4 buckets (2x capacity rounded up to a power of two) of
# a u64 key and an i32 slot.
BYTES_PER_HASH = 48


class HashSlotTable:
    """hash -> slot for at most ``capacity`` hashes; inserts and removals one hash at a time,
    membership tests for a whole array at once.

    Key 0 marks an empty bucket (so a lookup gathers keys only); the hash 0 itself, should a
    sequence hash ever be 0, is kept aside.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        size = 1 << max(4, (2 * capacity - 1).bit_length())  # >= 2 x capacity
        self._mask = size - 1
        self._keys = np.zeros(size, np.uint64)
        self._slots = np.zeros(size, np.int32)
        self._zero_slot: int | None = None  # slot of the hash 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _find(self, h: int) -> int:
        """Bucket holding ``h`` (not 0), or -1."""
        keys, mask = self._keys, self._mask
        i = h & mask
        while True:
            k = int(keys[i])
            if k == h:
                return i
            if k == 0:
                return -1
            i = (i + 1) & mask

    def get(self, h: int) -> int | None:
        if h == 0:
            return self._zero_slot
        i = self._find(h)
        return None if i < 0 else int(self._slots[i])

    def insert(self, hashes: Sequence[int], slots: Sequence[int]) -> None:
        """Add ``hashes[i] -> slots[i]``; ValueError for a hash already present (nothing added
        from it on) or when full."""
        keys, table, mask = self._keys, self._slots, self._mask
        for h, s in zip(hashes, slots):
            if self._len * 2 >= len(keys):
                raise ValueError(f"hash table full ({self._len} hashes)")
            if h == 0:
                if self._zero_slot is not None:
                    raise ValueError("hash 0x0 is already in the table")
                self._zero_slot = s
                self._len += 1
                continue
            i = h & mask
            while (k := int(keys[i])) != 0:
                if k == h:
                    raise ValueError(f"hash {h:#x} is already in the table")
                i = (i + 1) & mask
            keys[i] = h
            table[i] = s
            self._len += 1

    def remove(self, hashes: Sequence[int]) -> None:
        """Drop ``hashes``; KeyError for one not present (the ones before it are dropped)."""
        keys, table, mask = self._keys, self._slots, self._mask
        for h in hashes:
            if h == 0:
                if self._zero_slot is None:
                    raise KeyError(h)
                self._zero_slot = None
                self._len -= 1
                continue
            i = self._find(h)
            if i < 0:
                raise KeyError(h)
            # Backward-shift deletion: move later members of the cluster into the hole when
            # their home bucket does not lie cyclically in (hole, their position].
            j = i
            while True:
                j = (j + 1) & mask
                k = int(keys[j])
                if k == 0:
                    break
                home = k & mask
                if (home <= i < j) or (j < home <= i) or (i < j < home):
                    keys[i] = k
                    table[i] = table[j]
                    i = j
            keys[i] = 0
            self._len -= 1

    def clear(self) -> None:
        self._keys.fill(0)
        self._zero_slot = None
        self._len = 0

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """A bool per hash of the uint64 array ``hashes``: present in the table."""
        found, unsure = self.probe(hashes)
        assert not len(unsure)
        return found

    def probe(self, hashes: np.ndarray, rounds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(a bool per hash: found, indices of the hashes still unsure after ``rounds`` buckets
        probed; None: as many as needed, so none is unsure). A few hashes sit far from their
        home bucket and each further round costs NumPy's fixed price per operation, so callers
        with a dict of the same hashes finish the stragglers there."""
        q = np.asarray(hashes, np.uint64)
        if not self._len or not len(q):
            return np.zeros(len(q), np.bool_), np.empty(0, np.intp)
        keys, mask = self._keys, self._mask
        pos = (q & np.uint64(mask)).astype(np.intp)
        k = keys[pos]
        found = k == q  # most hashes settle in their home bucket
        todo = np.flatnonzero(~found & (k != 0))  # another hash there: probe further
        pos = pos[todo]
        left = -1 if rounds is None else rounds - 1
        while len(todo) and left:
            left -= 1
            pos = (pos + 1) & mask
            k = keys[pos]
            hit = k == q[todo]
            found[todo[hit]] = True
            more = ~hit & (k != 0)
            todo, pos = todo[more], pos[more]
        zero = np.flatnonzero(q == 0)  # an empty bucket's key: the kept-aside hash 0 decides
        if len(zero):
            found[zero] = self._zero_slot is not None
            todo = np.setdiff1d(todo, zero)
        return found, todo


def leading(flags: np.ndarray) -> int:
    """Number of leading True values of a bool array."""
    if not len(flags):
        return 0
    first_false = int(np.argmin(flags))
    return len(flags) if flags[first_false] else first_false

"""Leader-side block registry: fixed-capacity slot pools per tier and prefix matching.

The leader holds no KV bytes. A :class:`TierPool` tracks, for one tier (G2 host or G3 disk), which
sequence hash lives in which slot and in what state:

* FREE: holds nothing.
* WRITING: allocated for a store that is in flight; never matchable. ``commit`` registers it,
  ``abort`` frees it (a failed or partial store never becomes matchable).
* REGISTERED: matchable; carries a pin count for loads in flight. Registered blocks with pin count 0
  are evictable, lowest priority first, then least recently used (as Dynamo's inactive pool:
  ``BasicMetadata{priority, returned_tick}`` order).

Every registration and eviction is recorded as a :class:`BlockEvent` for KV events and metrics.
:class:`BlockRegistry` combines the G2 and optional G3 pools and matches a hash list over both.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import time
from array import array
from bisect import insort
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from kvbm.ipc.messages import BlockEventKind
from kvbm.ipc.stats import PoolStats
from kvbm.leader.hash_table import BYTES_PER_HASH, HashSlotTable, leading

__all__ = [
    "Tier",
    "SlotState",
    "BlockEvent",
    "TierPool",
    "MatchResult",
    "BlockRegistry",
]


class Tier(enum.IntEnum):
    """Storage tier of a pool (Dynamo numbering: G1 is engine memory, not managed here)."""

    HOST = 2  # G2
    DISK = 3  # G3
    OBJECT = 4  # G4: an object store; the pool is the leader's index of the objects it knows

    @property
    def medium(self) -> str:
        """KV-event medium string of this tier (vllm.distributed.kv_events MEDIUM_* values; vLLM
        has none for an object store: ``"EXTERNAL"``, which Dynamo's router indexes as its
        external tier; it drops a store of a medium it does not know)."""
        return _MEDIA[self]


_MEDIA = {Tier.HOST: "CPU", Tier.DISK: "STORAGE", Tier.OBJECT: "EXTERNAL"}


class SlotState(enum.IntEnum):
    """State of one slot of a :class:`TierPool`."""

    FREE = 0
    WRITING = 1
    REGISTERED = 2


SLOT_STATE_BYTES = 46 + BYTES_PER_HASH
"""Leader memory per slot once used: state, hash, parent (+flag), priority, pins, time, free
stack, and the vectorised hash -> slot table."""

# Plain ints for the per-slot state array: enum members are slow in hot loops.
_FREE = 0
_WRITING = 1
_REGISTERED = 2

# Event kinds in the hot loops below, as plain names (the enum lives in kvbm.ipc.messages).
_STORED, _REMOVED, _CLEARED = BlockEventKind.STORED, BlockEventKind.REMOVED, BlockEventKind.CLEARED


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """One registry change, for KV events and metrics.

    CLEARED (from :meth:`TierPool.clear`) stands for every block of the tier and has
    ``seq_hash`` 0 and no parent.
    """

    kind: BlockEventKind
    tier: Tier
    seq_hash: int
    parent_hash: int | None


# Events are recorded as tuples (global sequence number, kind, hash, parent) and only turned into
# BlockEvent objects when drained: building a frozen dataclass costs ~1.5 us, ten times a tuple.
_RawEvent = tuple[int, BlockEventKind, int, int | None]

# Building many events: set the slots through their descriptors, which skips the frozen
# __setattr__ checks of the generated __init__ (half the cost; the result is identical).
_new = object.__new__
_set_kind = getattr(BlockEvent, "kind").__set__
_set_tier = getattr(BlockEvent, "tier").__set__
_set_hash = getattr(BlockEvent, "seq_hash").__set__
_set_parent = getattr(BlockEvent, "parent_hash").__set__


def _make_events(raw: Sequence[tuple[BlockEventKind, Tier, int, int | None]]) -> list[BlockEvent]:
    out = []
    for kind, tier, h, p in raw:
        e = _new(BlockEvent)
        _set_kind(e, kind)
        _set_tier(e, tier)
        _set_hash(e, h)
        _set_parent(e, p)
        out.append(e)
    return out


def _u64(values: Sequence[int]) -> np.ndarray:
    """Python ints as a uint64 array; through array.array, ~5x faster than np.array for big ints."""
    return np.frombuffer(array("Q", values), np.uint64)


# Lookups of at most this many hashes walk the dict (Python ints), longer ones the hash table.
_DICT_WALK_MAX = 256


def _hash_array(hashes: Sequence[int] | np.ndarray, start: int) -> np.ndarray:
    """``hashes[start:]`` as a uint64 array (a view when already one)."""
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if isinstance(hashes, np.ndarray):
        return hashes[start:].astype(np.uint64, copy=False)
    return _u64(hashes[start:] if start else hashes)


def _index(values: Sequence[int]) -> np.ndarray:
    """Slot numbers as an int64 index array (same fast path as :func:`_u64`)."""
    if isinstance(values, np.ndarray):
        return values.astype(np.int64, copy=False)
    return np.frombuffer(array("q", values), np.int64)


def _fail(msg: str) -> None:
    raise AssertionError(msg)


class TierPool:
    """Fixed-capacity slot pool of one tier; slots are ints ``0..capacity-1``.

    Per-slot state lives in compact numpy arrays (:data:`SLOT_STATE_BYTES` a slot, allocated zeroed and
    untouched, so a pool costs memory only for the slots it has used): a leader sized for a
    huge disk does not build Python lists of its capacity. Bulk operations index the arrays
    once per call rather than once per slot.

    Not thread-safe: the leader owns it from one thread. Mutating calls validate all their
    arguments first and raise ``ValueError`` without changing anything on bad input.
    """

    def __init__(
        self,
        tier: Tier,
        capacity: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        record_events: bool = True,
        event_seq: Iterator[int] | None = None,
    ) -> None:
        """Create an empty pool.

        ``clock`` stamps :meth:`last_used`; eviction order itself uses an internal use order, so
        blocks used at the same clock reading still evict oldest first. ``record_events=False``
        keeps no event log (for callers that never drain it). ``event_seq`` is a counter shared
        by the pools of one :class:`BlockRegistry` so their events can be merged in order.
        """
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.tier = Tier(tier)
        self.capacity = capacity
        self._clock = clock
        self._record = record_events
        self._seq = event_seq if event_seq is not None else itertools.count()
        self._events: list[_RawEvent] = []
        # Per-slot state (index = slot). Hash and parent are meaningful only where the state is
        # not FREE and, for the parent, where _has_parent is set (None otherwise).
        try:
            self._state = np.zeros(capacity, np.int8)
            self._hash = np.zeros(capacity, np.uint64)
            self._parent = np.zeros(capacity, np.uint64)
            self._has_parent = np.zeros(capacity, np.bool_)
            self._prio = np.zeros(capacity, np.int64)
            self._pins = np.zeros(capacity, np.int32)
            self._used = np.zeros(capacity, np.float64)
            # Free slots: a stack of freed slots (top last) over the never-used slots
            # _fresh..capacity-1, handed out in ascending order once the stack is empty.
            self._freed = np.empty(capacity, np.int64)
            # The registered hashes again, for vectorised prefix matches (no Python int a hash).
            self._table = HashSlotTable(capacity)
        except (MemoryError, ValueError):  # numpy: "array is too big" / cannot allocate
            raise ValueError(
                f"{self.tier.name} tier: cannot hold the state of {capacity:.3g} blocks "
                f"({SLOT_STATE_BYTES} B each) in this process' address space"
            ) from None
        self._num_freed = 0
        self._fresh = 0
        self._writing: dict[int, int] = {}  # hash -> slot
        self._registered: dict[int, int] = {}  # hash -> slot
        # Evictable (registered, pin count 0) slots: one LRU list per priority, least recent first.
        self._lru: dict[int, OrderedDict[int, None]] = {}
        self._levels: list[int] = []  # priorities present in _lru, ascending
        self._num_pinned = 0

    # ---- counts -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Slots holding nothing."""
        return self._num_freed + self.capacity - self._fresh

    @property
    def num_writing(self) -> int:
        """Slots allocated for a store in flight."""
        return len(self._writing)

    @property
    def num_registered(self) -> int:
        """Matchable slots (pinned or not)."""
        return len(self._registered)

    @property
    def num_pinned(self) -> int:
        """Registered slots with pin count > 0."""
        return self._num_pinned

    def occupancy(self) -> PoolStats:
        """The pool's slots by state, as the stats report them."""
        return PoolStats(self.capacity, self.num_registered, self.num_free, self.num_writing, self.num_pinned)

    # ---- queries (no side effects) ------------------------------------------------------------

    def lookup(self, seq_hash: int) -> int | None:
        """Slot of a registered block, or None (also for a block still being written)."""
        return self._registered.get(seq_hash)

    def holds(self, seq_hash: int) -> bool:
        """True if the hash is registered or being written here."""
        return seq_hash in self._registered or seq_hash in self._writing

    def match_prefix(self, hashes: Sequence[int] | np.ndarray, start: int = 0) -> int:
        """Number of consecutive registered hashes in ``hashes`` from index ``start``."""
        q = _hash_array(hashes, start)
        registered = self._registered
        if len(q) <= _DICT_WALK_MAX:  # NumPy's fixed cost per operation exceeds the walk
            return len(list(itertools.takewhile(registered.__contains__, q.tolist())))
        # The table settles most hashes in two buckets; the dict the rest, in order, up to the first
        # miss. A chunk at a time: a prompt held only in part leaves every hash past the match
        # unsure, and the walk stops at the first of them, so converting them all would be waste.
        unsure = self._table.not_near_home(q)
        for at in range(0, len(unsure), _DICT_WALK_MAX):
            chunk = unsure[at : at + _DICT_WALK_MAX]
            for i, h in zip(chunk.tolist(), q.take(chunk).tolist()):
                if h not in registered:
                    return i
        return len(q)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """A bool per hash of the uint64 array ``hashes``: registered (matchable) here."""
        registered = self._registered.__contains__
        if len(hashes) <= _DICT_WALK_MAX:  # NumPy's fixed cost per operation exceeds the walk
            return np.fromiter(map(registered, hashes.tolist()), np.bool_, len(hashes))
        # Two bucket rounds settle ~95% of the hashes at a load <= 1/2; the dict the rest.
        found, unsure = self._table.probe(hashes, rounds=2)
        if len(unsure):
            found[unsure] = np.fromiter(map(registered, hashes[unsure].tolist()), np.bool_, len(unsure))
        return found

    def hash_of(self, slot: int) -> int | None:
        """Hash held by a slot (registered or being written), None if free."""
        self._check_index(slot)
        return None if self._state[slot] == _FREE else int(self._hash[slot])

    def parent_of(self, slot: int) -> int | None:
        """Parent hash recorded with the block in a slot (None: first block, or free)."""
        self._check_index(slot)
        return int(self._parent[slot]) if self._has_parent[slot] else None

    def state_of(self, slot: int) -> SlotState:
        """State of a slot."""
        self._check_index(slot)
        return SlotState(int(self._state[slot]))

    def pin_count(self, slot: int) -> int:
        """Loads in flight from this slot."""
        self._check_index(slot)
        return int(self._pins[slot])

    def last_used(self, slot: int) -> float:
        """Clock reading of the slot's last commit, pin, touch or re-store (0.0 if never)."""
        self._check_index(slot)
        return float(self._used[slot])

    # ---- allocation and stores ----------------------------------------------------------------

    def allocate(
        self,
        hashes: Sequence[int],
        parents: Sequence[int | None] | None = None,
        priority: int = 0,
    ) -> list[int | None]:
        """Allocate WRITING slots for a store of ``hashes``.

        Returns one entry per hash, in order: a new slot for a hash not held here, None for a hash
        already held (registered or being written, including an earlier occurrence in this call).
        Free slots are used first, then registered unpinned blocks are evicted, lowest priority
        first, then least recently used. Blocks of this request that are already registered are
        never evicted to make room for the rest, and count as used. When no slot can be found the
        answer stops early: it is then a prefix, shorter than ``hashes``. Never raises for lack of
        space. ``parents[i]`` is the parent sequence hash of ``hashes[i]`` (for events).
        """
        if parents is not None and len(parents) != len(hashes):
            raise ValueError(f"{len(parents)} parents for {len(hashes)} hashes")
        registered = self._registered
        writing = self._writing
        lru = self._lru
        # Take this request's registered, evictable blocks out of the LRU so that allocating the
        # rest cannot evict them; they go back at the most recent end below.
        protected: list[int] = []
        none_registered = registered.keys().isdisjoint(hashes)  # C-level: usually none held
        if not none_registered:
            for h in hashes:
                s = registered.get(h)
                if s is not None and self._pins[s] == 0:
                    od = lru[int(self._prio[s])]
                    if s in od:  # not yet taken out
                        del od[s]
                        protected.append(s)
        # The hashes that need a slot (first occurrences of hashes not held here).
        new: list[int] = []
        if none_registered and writing.keys().isdisjoint(hashes):  # the usual store, all in C
            new = list(dict.fromkeys(hashes))
        else:
            seen: set[int] = set()
            for h in hashes:
                if h not in registered and h not in writing and h not in seen:
                    seen.add(h)
                    new.append(h)
        slots, evicted = self._take(len(new))
        out: list[int | None] = []
        if len(slots) == len(new) and len(new) == len(hashes):
            out = list(slots)  # the usual store: every block is new and found room
        else:
            j, n = 0, len(slots)
            placed = set()
            for h in hashes:
                if h in registered or h in writing or h in placed:
                    out.append(None)
                elif j < n:
                    out.append(slots[j])
                    placed.add(h)
                    j += 1
                else:
                    break  # no slot for this block: the answer stops here
        if evicted:
            self._unregister(evicted)
        if slots:
            idx = _index(slots)
            taken = new[: len(slots)]
            self._state[idx] = _WRITING
            self._hash[idx] = _u64(taken)
            self._prio[idx] = priority
            if parents is None:
                self._has_parent[idx] = False
            else:
                if len(taken) == len(hashes):
                    ps = list(parents)
                else:  # a slot goes with a hash's first occurrence, so does the parent
                    parent_of: dict[int, int | None] = {}
                    for h, p in zip(hashes, parents):
                        parent_of.setdefault(h, p)
                    ps = [parent_of[h] for h in taken]
                self._set_parents(idx, ps)
            writing.update(zip(taken, slots))
        if protected:
            now = self._clock()
            for s in protected:
                self._used[s] = now
                self._attach(s)
        return out

    def _take(self, n: int) -> tuple[list[int], list[int]]:
        """Up to ``n`` slots: freed ones (last freed first), never-used ones, then LRU victims.

        Returns (slots, the victims among them); victims leave the LRU but stay registered.
        """
        slots: list[int] = []
        k = min(n, self._num_freed)
        if k:
            top = self._num_freed
            slots = self._freed[top - k : top][::-1].tolist()
            self._num_freed = top - k
        k = min(n - len(slots), self.capacity - self._fresh)
        if k:
            slots.extend(range(self._fresh, self._fresh + k))
            self._fresh += k
        evicted: list[int] = []
        # Nothing becomes evictable while taking, so the lowest non-empty LRU list stays the
        # eviction source until it runs empty.
        while len(slots) < n:
            victims = self._lowest_lru()
            if victims is None:
                break  # nothing evictable
            for _ in range(min(n - len(slots), len(victims))):
                victim = victims.popitem(False)[0]
                evicted.append(victim)
                slots.append(victim)
        return slots, evicted

    def commit(self, slots: Sequence[int]) -> None:
        """Register stored blocks (WRITING -> REGISTERED, most recently used); emits ``stored``."""
        idx = self._check_slots(slots, _WRITING, "commit")
        if not len(idx):
            return
        now = self._clock()
        hs = self._hash[idx].tolist()
        prios = self._prio[idx].tolist()
        parents = self._parents(idx)
        self._state[idx] = _REGISTERED
        self._used[idx] = now
        writing = self._writing
        registered = self._registered
        lru = self._lru
        record = self._record
        seq = self._seq
        events = self._events
        slots = idx.tolist()
        for s, h, pr, p in zip(slots, hs, prios, parents):
            del writing[h]
            registered[h] = s
            od = lru.get(pr)
            if od is None:
                self._attach(s)
            else:
                od[s] = None  # most recently used end
            if record:
                events.append((next(seq), _STORED, h, p))
        self._table.insert(self._hash[idx], idx)

    def abort(self, slots: Sequence[int]) -> None:
        """Give up stores (WRITING -> FREE); the blocks were never matchable, so no event."""
        idx = self._check_slots(slots, _WRITING, "abort")
        for h in self._hash[idx].tolist():
            del self._writing[h]
        self._release(idx)

    # ---- loads and use ------------------------------------------------------------------------

    def pin(self, slots: Sequence[int]) -> None:
        """Pin registered blocks for loads in flight (+1 each; a slot may repeat); touches them."""
        idx = self._check_slots(slots, _REGISTERED, "pin", allow_repeats=True)
        uniq = np.unique(idx)
        for s, count, pr in zip(uniq.tolist(), self._pins[uniq].tolist(), self._prio[uniq].tolist()):
            if count == 0:
                del self._lru[pr][s]
                self._num_pinned += 1
        np.add.at(self._pins, idx, 1)
        self._used[idx] = self._clock()

    def unpin(self, slots: Sequence[int]) -> None:
        """Release pins; a block whose count reaches 0 becomes evictable as most recently used."""
        idx = self._check_slots(slots, _REGISTERED, "unpin", allow_repeats=True)
        needed = Counter(slots) if len(set(slots)) != len(slots) else dict.fromkeys(slots, 1)
        pins = dict(zip(needed, self._pins[np.array(list(needed), np.int64)].tolist()))
        for s, k in needed.items():
            if pins[s] < k:
                raise ValueError(f"unpin: slot {s} has pin count {pins[s]}, asked to unpin {k}")
        np.subtract.at(self._pins, idx, 1)
        # A slot reaches 0 at its last occurrence: attach in that order (LRU order).
        last = {s: i for i, s in enumerate(slots)}
        for s in sorted((s for s in needed if pins[s] == needed[s]), key=last.__getitem__):
            self._num_pinned -= 1
            self._attach(s)

    def touch(self, slots: Sequence[int]) -> None:
        """Mark registered blocks as recently used (moves them last in eviction order)."""
        idx = self._check_slots(slots, _REGISTERED, "touch", allow_repeats=True)
        self._used[idx] = self._clock()
        lru = self._lru
        for s, count, pr in zip(idx.tolist(), self._pins[idx].tolist(), self._prio[idx].tolist()):
            if count == 0:
                lru[pr].move_to_end(s)

    def restore(self, blocks: Sequence[tuple[int, int, int | None]]) -> int:
        """Register ``(slot, seq_hash, parent)`` blocks found in persistent storage, at their slots.

        Only on a pool that never allocated a slot (a new leader re-indexing its disk file); a
        hash already restored keeps its first slot and later copies stay free. Emits ``stored``
        for each block registered; returns how many.
        """
        if self._fresh or self._writing or self._registered:
            raise ValueError(f"{self.tier.name} tier: restore needs a pool that was never used")
        keep: dict[int, tuple[int, int | None]] = {}
        used: set[int] = set()
        for slot, h, parent in blocks:
            self._check_index(slot)
            if slot in used:
                raise ValueError(f"restore: repeated slot {slot}")
            used.add(slot)
            keep.setdefault(h, (slot, parent))
        if not keep:
            return 0
        slots = [s for s, _ in keep.values()]
        idx = _index(slots)
        self._state[idx] = _REGISTERED
        self._hash[idx] = _u64(list(keep))
        self._set_parents(idx, [p for _, p in keep.values()])
        self._used[idx] = self._clock()
        for h, (s, parent) in keep.items():
            self._registered[h] = s
            self._attach(s)
            if self._record:
                self._events.append((next(self._seq), _STORED, h, parent))
        self._table.insert(self._hash[idx], idx)
        # Slots below the highest restored one that hold nothing go on the free stack, lowest
        # on top (handed out first); the ones above stay never-used.
        self._fresh = max(slots) + 1
        free = np.setdiff1d(np.arange(self._fresh, dtype=np.int64), idx)[::-1]
        self._freed[: len(free)] = free
        self._num_freed = len(free)
        return len(keep)

    # ---- removal ------------------------------------------------------------------------------

    def evict(self, seq_hash: int) -> bool:
        """Drop one registered, unpinned block (e.g. a failed checksum); emits ``removed``.

        Returns False, changing nothing, if the hash is not registered or is pinned.
        """
        s = self._registered.get(seq_hash)
        if s is None or self._pins[s]:
            return False
        del self._lru[int(self._prio[s])][s]
        self._unregister([s])
        self._release(np.array([s], np.int64))
        return True

    def clear(self) -> int:
        """Drop every registered unpinned block (reset_cache); returns how many.

        Emits a single ``cleared`` event (no per-block ``removed``) if anything was dropped.
        Pinned blocks and stores in flight stay.
        """
        dropped = [s for od in self._lru.values() for s in od]
        self._lru.clear()
        self._levels.clear()
        if not dropped:
            return 0
        idx = np.array(dropped, np.int64)
        for h in self._hash[idx].tolist():
            del self._registered[h]
        self._table.remove(self._hash[idx])
        self._release(idx)
        if self._record:
            self._events.append((next(self._seq), _CLEARED, 0, None))
        return len(dropped)

    # ---- events -------------------------------------------------------------------------------

    def drain_events(self) -> list[BlockEvent]:
        """Return and forget the events recorded since the last drain, oldest first."""
        tier = self.tier
        return _make_events([(kind, tier, h, p) for _, kind, h, p in self._drain_raw()])

    def _drain_raw(self) -> list[_RawEvent]:
        events, self._events = self._events, []
        return events

    # ---- consistency --------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the internal structures disagree (tests, soak runs)."""
        cap = self.capacity
        state, pins = self._state, self._pins
        arrays = (state, self._hash, self._parent, self._has_parent, self._prio, pins, self._used,
                  self._freed)
        if any(len(a) != cap for a in arrays):
            _fail("per-slot arrays do not match capacity")
        if not 0 <= self._fresh <= cap or not 0 <= self._num_freed <= self._fresh:
            _fail(f"free counters out of range: fresh {self._fresh}, freed {self._num_freed}")
        freed = self._freed[: self._num_freed].tolist()
        free = set(freed)
        if len(free) != len(freed) or any(not 0 <= s < self._fresh for s in free):
            _fail("free stack has duplicates or never-used slots")
        free.update(range(self._fresh, cap))
        if len(free) + len(self._writing) + len(self._registered) != cap:
            _fail(
                f"free {len(free)} + writing {len(self._writing)} + registered "
                f"{len(self._registered)} != capacity {cap}"
            )
        for s in free:
            if state[s] != _FREE or pins[s] or self._has_parent[s]:
                _fail(f"free slot {s} is in state {state[s]} / pins {pins[s]} / has a parent")
        for h, s in self._writing.items():
            if state[s] != _WRITING or self.hash_of(s) != h or pins[s]:
                _fail(f"writing slot {s} disagrees: state {state[s]}, hash {self.hash_of(s)} != {h}")
        for h, s in self._registered.items():
            if state[s] != _REGISTERED or self.hash_of(s) != h:
                _fail(f"registered slot {s} disagrees: state {state[s]}, hash {self.hash_of(s)} != {h}")
        if self._registered:
            mapped = self._table.slots_of(_u64(list(self._registered)))
            wrong = np.flatnonzero(mapped != np.fromiter(self._registered.values(), np.int64, len(self._registered)))
            if len(wrong):
                h = list(self._registered)[int(wrong[0])]
                _fail(f"hash table maps registered hash {h:#x} to {mapped[wrong[0]]}, not slot {self._registered[h]}")
        if len(self._table) != len(self._registered):
            _fail(f"hash table holds {len(self._table)} hashes, {len(self._registered)} are registered")
        bad = np.flatnonzero((pins < 0) | ((pins != 0) & (state != _REGISTERED)))
        if len(bad):
            s = int(bad[0])
            _fail(f"slot {s} in state {state[s]} has pin count {pins[s]}")
        if self._num_pinned != int(np.count_nonzero(pins > 0)):
            _fail("num_pinned is out of date")
        if self._levels != sorted(self._lru):
            _fail("priority levels out of sync with LRU lists")
        evictable: set[int] = set()
        for p, od in self._lru.items():
            for s in od:
                if self._prio[s] != p or s in evictable:
                    _fail(f"slot {s} in the wrong or in two LRU lists")
                evictable.add(s)
        expected = {s for s in self._registered.values() if pins[s] == 0}
        if evictable != expected:
            _fail("evictable set != registered unpinned slots")

    # ---- internals ----------------------------------------------------------------------------

    def _check_index(self, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} out of range 0..{self.capacity - 1}")

    def _check_slots(
        self, slots: Sequence[int], want: int, op: str, allow_repeats: bool = False
    ) -> np.ndarray:
        """Validate ``slots`` for ``op``; returns them as an index array."""
        cap = self.capacity
        try:
            idx = _index(slots)
        except (OverflowError, ValueError, TypeError):
            idx = np.array([], np.int64)
            ok = False
        else:
            ok = idx.ndim == 1 and (
                not len(idx) or (0 <= idx.min() and idx.max() < cap and bool((self._state[idx] == want).all())))
        if not ok:  # find the first bad slot, in order, for the message
            for s in slots:
                if not 0 <= s < cap:
                    raise ValueError(f"{op}: slot {s} out of range 0..{cap - 1}")
                st = int(self._state[s])
                if st != want:
                    raise ValueError(
                        f"{op}: slot {s} is {SlotState(st).name}, expected {SlotState(want).name}"
                    )
        if not allow_repeats and len(set(slots)) != len(slots):
            raise ValueError(f"{op}: repeated slot in {list(slots)}")
        return idx

    def _set_parents(self, idx: np.ndarray, parents: list[int | None]) -> None:
        nones = parents.count(None)  # C-level; usually 0, or 1 for a sequence's first block
        if nones == 0:
            self._has_parent[idx] = True
            self._parent[idx] = _u64(parents)  # type: ignore[arg-type]
        elif nones == 1 and parents[0] is None:
            self._has_parent[idx] = True
            self._has_parent[idx[0]] = False
            self._parent[idx[1:]] = _u64(parents[1:])  # type: ignore[arg-type]
        else:
            self._has_parent[idx] = [p is not None for p in parents]
            self._parent[idx] = np.array([0 if p is None else p for p in parents], np.uint64)

    def _parents(self, idx: np.ndarray) -> list[int | None]:
        parents: list[int | None] = self._parent[idx].tolist()
        for i in np.flatnonzero(~self._has_parent[idx]).tolist():  # usually none or one
            parents[i] = None
        return parents

    def _attach(self, slot: int) -> None:
        """Append a registered unpinned slot to its priority's LRU list (most recent end)."""
        p = int(self._prio[slot])
        od = self._lru.get(p)
        if od is None:
            od = self._lru[p] = OrderedDict()
            insort(self._levels, p)
        od[slot] = None

    def _lowest_lru(self) -> OrderedDict[int, None] | None:
        """The non-empty LRU list of the lowest priority, or None if nothing is evictable."""
        levels = self._levels
        while levels:
            od = self._lru[levels[0]]
            if od:
                return od
            del self._lru[levels[0]]  # forget empty levels so the scan stays short
            levels.pop(0)
        return None

    def _unregister(self, slots: list[int]) -> None:
        """Unregister slots already taken out of the LRU; emits ``removed`` for each, in order."""
        idx = _index(slots)
        hs = self._hash[idx].tolist()
        for h in hs:
            del self._registered[h]
        self._table.remove(self._hash[idx])
        if self._record:
            seq, events = self._seq, self._events
            events.extend((next(seq), _REMOVED, h, p) for h, p in zip(hs, self._parents(idx)))

    def _release(self, idx: np.ndarray) -> None:
        """Make slots FREE and push them on the free stack (in order: the last is reused first)."""
        if not len(idx):
            return
        self._state[idx] = _FREE
        self._has_parent[idx] = False
        self._prio[idx] = 0
        top = self._num_freed
        self._freed[top : top + len(idx)] = idx
        self._num_freed = top + len(idx)


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Result of :meth:`BlockRegistry.match`.

    ``tiers[i]`` is where matched block ``start + i`` is found (G2 preferred, then G3, then G4).
    ``host``, ``disk`` and ``object`` count the matched blocks per tier. Usually the G2 blocks
    lead and the G3 (then G4) blocks follow; when the tiers interleave (they evict
    independently), use ``tiers``.
    """

    host: int
    disk: int
    tiers: tuple[Tier, ...]
    object: int = 0

    @property
    def total(self) -> int:
        """Number of matched blocks."""
        return self.host + self.disk + self.object


class BlockRegistry:
    """G2 host pool plus optional G3 disk and G4 object pools; prefix matching over all."""

    def __init__(
        self,
        host_capacity: int,
        disk_capacity: int = 0,
        clock: Callable[[], float] = time.monotonic,
        *,
        record_events: bool = True,
        object_capacity: int = 0,
    ) -> None:
        """Create the pools; no disk (object) pool when ``disk_capacity`` (``object_capacity``) is 0.

        The object pool's slots hold no bytes: a slot is an entry of the leader's index of the
        objects it knows in the store (written by it, or found there by a store lookup).
        """
        seq = itertools.count()  # shared, so drain_events can merge the tiers in order
        self.host = TierPool(
            Tier.HOST, host_capacity, clock, record_events=record_events, event_seq=seq
        )
        self.disk: TierPool | None = (
            TierPool(Tier.DISK, disk_capacity, clock, record_events=record_events, event_seq=seq)
            if disk_capacity > 0
            else None
        )
        self.object: TierPool | None = (
            TierPool(Tier.OBJECT, object_capacity, clock, record_events=record_events, event_seq=seq)
            if object_capacity > 0
            else None
        )

    def pool(self, tier: Tier) -> TierPool:
        """The pool of a tier; ValueError if that tier is not configured."""
        if tier == Tier.HOST:
            return self.host
        if tier == Tier.DISK and self.disk is not None:
            return self.disk
        if tier == Tier.OBJECT and self.object is not None:
            return self.object
        raise ValueError(f"no pool for tier {Tier(tier).name}")

    def match(self, hashes: Sequence[int] | np.ndarray, start: int = 0) -> MatchResult:
        """Longest run of blocks from ``start`` registered in G2, else G3, else G4. No side effects.

        Vectorised: one membership test per tier over the uint64 array (pass an array, e.g. the
        wire bytes viewed as one, to skip any per-hash Python work); the lower tiers are probed
        only from the first block not in G2 on."""
        q = _hash_array(hashes, start)
        if self.disk is None and self.object is None:  # G2 only: a prefix match, no per-hash answer
            h = self.host.match_prefix(q)
            return MatchResult(h, 0, (Tier.HOST,) * h)
        # Lower tiers: where G2 ends the match continues through G2, G3 and G4 together, so the
        # G2 answer per hash serves twice.
        on_host = self.host.contains(q)
        h = leading(on_host)
        if h == len(q):
            return MatchResult(h, 0, (Tier.HOST,) * h)
        rest = q[h:]
        none = np.zeros(len(rest), np.bool_)
        on_disk = self.disk.contains(rest) if self.disk is not None else none
        on_object = self.object.contains(rest) if self.object is not None else none
        n = leading(on_host[h:] | on_disk | on_object)
        seg_host, seg_disk = on_host[h : h + n], on_disk[:n] & ~on_host[h : h + n]
        host, disk = int(np.count_nonzero(seg_host)), int(np.count_nonzero(seg_disk))
        obj = n - host - disk
        if host == 0 and obj == 0:  # the usual case: G2 blocks, then G3 blocks
            return MatchResult(h, n, (Tier.HOST,) * h + (Tier.DISK,) * n)
        codes = np.where(seg_host, int(Tier.HOST), np.where(seg_disk, int(Tier.DISK), int(Tier.OBJECT)))
        tiers = (Tier.HOST,) * h + tuple(map(Tier, codes.tolist()))
        return MatchResult(h + host, disk, tiers, obj)

    @property
    def pools(self) -> list[TierPool]:
        """The configured pools, G2 first."""
        return [p for p in (self.host, self.disk, self.object) if p is not None]

    def drain_events(self) -> list[BlockEvent]:
        """Events of every tier since the last drain, in order of occurrence."""
        pools = self.pools
        if len(pools) == 1:
            return self.host.drain_events()
        streams = [
            [(seq, kind, pool.tier, h, p) for seq, kind, h, p in pool._drain_raw()]
            for pool in pools
        ]
        streams = [s for s in streams if s]
        if len(streams) == 1:
            return _make_events([e[1:] for e in streams[0]])
        return _make_events([e[1:] for e in heapq.merge(*streams)])

    def check_invariants(self) -> None:
        """Check every pool."""
        for pool in self.pools:
            pool.check_invariants()

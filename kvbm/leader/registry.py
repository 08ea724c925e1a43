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
from bisect import insort
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

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

    @property
    def medium(self) -> str:
        """vLLM KV-event medium string of this tier."""
        return "CPU" if self is Tier.HOST else "STORAGE"  # vllm.distributed.kv_events MEDIUM_* values


class SlotState(enum.IntEnum):
    """State of one slot of a :class:`TierPool`."""

    FREE = 0
    WRITING = 1
    REGISTERED = 2


# Plain ints for the per-slot state list: enum members are slow in hot loops.
_FREE = 0
_WRITING = 1
_REGISTERED = 2

EventKind = Literal["stored", "removed", "cleared"]


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """One registry change, for KV events and metrics.

    ``cleared`` (from :meth:`TierPool.clear`) stands for every block of the tier and has
    ``seq_hash`` 0 and no parent.
    """

    kind: EventKind
    tier: Tier
    seq_hash: int
    parent_hash: int | None


# Events are recorded as tuples (global sequence number, kind, hash, parent) and only turned into
# BlockEvent objects when drained: building a frozen dataclass costs ~1.5 us, ten times a tuple.
_RawEvent = tuple[int, EventKind, int, int | None]

# Building many events: set the slots through their descriptors, which skips the frozen
# __setattr__ checks of the generated __init__ (half the cost; the result is identical).
_new = object.__new__
_set_kind = getattr(BlockEvent, "kind").__set__
_set_tier = getattr(BlockEvent, "tier").__set__
_set_hash = getattr(BlockEvent, "seq_hash").__set__
_set_parent = getattr(BlockEvent, "parent_hash").__set__


def _make_events(raw: Sequence[tuple[EventKind, Tier, int, int | None]]) -> list[BlockEvent]:
    out = []
    for kind, tier, h, p in raw:
        e = _new(BlockEvent)
        _set_kind(e, kind)
        _set_tier(e, tier)
        _set_hash(e, h)
        _set_parent(e, p)
        out.append(e)
    return out


def _fail(msg: str) -> None:
    raise AssertionError(msg)


class TierPool:
    """Fixed-capacity slot pool of one tier; slots are ints ``0..capacity-1``.

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
        # Per-slot state in plain lists (index = slot).
        self._state: list[int] = [_FREE] * capacity
        self._hash: list[int | None] = [None] * capacity
        self._parent: list[int | None] = [None] * capacity
        self._prio: list[int] = [0] * capacity
        self._pins: list[int] = [0] * capacity
        self._used: list[float] = [0.0] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
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
        return len(self._free)

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

    # ---- queries (no side effects) ------------------------------------------------------------

    def lookup(self, seq_hash: int) -> int | None:
        """Slot of a registered block, or None (also for a block still being written)."""
        return self._registered.get(seq_hash)

    def holds(self, seq_hash: int) -> bool:
        """True if the hash is registered or being written here."""
        return seq_hash in self._registered or seq_hash in self._writing

    def match_prefix(self, hashes: Sequence[int], start: int = 0) -> int:
        """Number of consecutive registered hashes in ``hashes`` from index ``start``."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        # takewhile with a C predicate keeps the whole walk in C: 3x a Python loop.
        rest = itertools.islice(hashes, start, None) if start else hashes
        return len(list(itertools.takewhile(self._registered.__contains__, rest)))

    def hash_of(self, slot: int) -> int | None:
        """Hash held by a slot (registered or being written), None if free."""
        self._check_index(slot)
        return self._hash[slot]

    def parent_of(self, slot: int) -> int | None:
        """Parent hash recorded with the block in a slot (None: first block, or free)."""
        self._check_index(slot)
        return self._parent[slot]

    def state_of(self, slot: int) -> SlotState:
        """State of a slot."""
        self._check_index(slot)
        return SlotState(self._state[slot])

    def pin_count(self, slot: int) -> int:
        """Loads in flight from this slot."""
        self._check_index(slot)
        return self._pins[slot]

    def last_used(self, slot: int) -> float:
        """Clock reading of the slot's last commit, pin, touch or re-store (0.0 if never)."""
        self._check_index(slot)
        return self._used[slot]

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
        pins = self._pins
        prio = self._prio
        lru = self._lru
        # Take this request's registered, evictable blocks out of the LRU so that allocating the
        # rest cannot evict them; they go back at the most recent end below.
        protected: list[int] = []
        if not registered.keys().isdisjoint(hashes):  # C-level test first: usually none held
            for h in hashes:
                s = registered.get(h)
                if s is not None and pins[s] == 0 and s in lru[prio[s]]:  # not yet taken out
                    del lru[prio[s]][s]
                    protected.append(s)
        state = self._state
        hash_ = self._hash
        parent = self._parent
        free = self._free
        record = self._record
        seq = self._seq
        events = self._events
        # Nothing becomes evictable during the loop, so the lowest non-empty LRU list stays the
        # eviction source until it runs empty.
        victims: OrderedDict[int, None] | None = None
        out: list[int | None] = []
        for h, p in zip(hashes, itertools.repeat(None) if parents is None else parents):
            if h in registered or h in writing:
                out.append(None)
                continue
            if free:
                slot = free.pop()
            else:
                if not victims:
                    victims = self._lowest_lru()
                    if victims is None:
                        break  # nothing evictable: the answer stops here
                slot = victims.popitem(False)[0]
                old = hash_[slot]
                assert old is not None
                del registered[old]
                if record:
                    events.append((next(seq), "removed", old, parent[slot]))
            state[slot] = _WRITING
            hash_[slot] = h
            parent[slot] = p
            prio[slot] = priority
            writing[h] = slot
            out.append(slot)
        if protected:
            now = self._clock()
            for s in protected:
                self._used[s] = now
                self._attach(s)
        return out

    def commit(self, slots: Sequence[int]) -> None:
        """Register stored blocks (WRITING -> REGISTERED, most recently used); emits ``stored``."""
        self._check_slots(slots, _WRITING, "commit")
        now = self._clock()
        state = self._state
        hash_ = self._hash
        parent = self._parent
        prio = self._prio
        used = self._used
        writing = self._writing
        registered = self._registered
        lru = self._lru
        record = self._record
        seq = self._seq
        events = self._events
        for s in slots:
            h = hash_[s]
            assert h is not None
            del writing[h]
            registered[h] = s
            state[s] = _REGISTERED
            used[s] = now
            od = lru.get(prio[s])
            if od is None:
                self._attach(s)
            else:
                od[s] = None  # most recently used end
            if record:
                events.append((next(seq), "stored", h, parent[s]))

    def abort(self, slots: Sequence[int]) -> None:
        """Give up stores (WRITING -> FREE); the blocks were never matchable, so no event."""
        self._check_slots(slots, _WRITING, "abort")
        for s in slots:
            h = self._hash[s]
            assert h is not None
            del self._writing[h]
            self._reset(s)
            self._free.append(s)

    # ---- loads and use ------------------------------------------------------------------------

    def pin(self, slots: Sequence[int]) -> None:
        """Pin registered blocks for loads in flight (+1 each; a slot may repeat); touches them."""
        self._check_slots(slots, _REGISTERED, "pin", allow_repeats=True)
        now = self._clock()
        pins = self._pins
        for s in slots:
            if pins[s] == 0:
                del self._lru[self._prio[s]][s]
                self._num_pinned += 1
            pins[s] += 1
            self._used[s] = now

    def unpin(self, slots: Sequence[int]) -> None:
        """Release pins; a block whose count reaches 0 becomes evictable as most recently used."""
        self._check_slots(slots, _REGISTERED, "unpin", allow_repeats=True)
        pins = self._pins
        needed = Counter(slots) if len(set(slots)) != len(slots) else dict.fromkeys(slots, 1)
        for s, k in needed.items():
            if pins[s] < k:
                raise ValueError(f"unpin: slot {s} has pin count {pins[s]}, asked to unpin {k}")
        for s in slots:
            pins[s] -= 1
            if pins[s] == 0:
                self._num_pinned -= 1
                self._attach(s)

    def touch(self, slots: Sequence[int]) -> None:
        """Mark registered blocks as recently used (moves them last in eviction order)."""
        self._check_slots(slots, _REGISTERED, "touch", allow_repeats=True)
        now = self._clock()
        for s in slots:
            self._used[s] = now
            if self._pins[s] == 0:
                self._lru[self._prio[s]].move_to_end(s)

    # ---- removal ------------------------------------------------------------------------------

    def evict(self, seq_hash: int) -> bool:
        """Drop one registered, unpinned block (e.g. a failed checksum); emits ``removed``.

        Returns False, changing nothing, if the hash is not registered or is pinned.
        """
        s = self._registered.get(seq_hash)
        if s is None or self._pins[s]:
            return False
        del self._lru[self._prio[s]][s]
        self._drop(s)
        self._free.append(s)
        return True

    def clear(self) -> int:
        """Drop every registered unpinned block (reset_cache); returns how many.

        Emits a single ``cleared`` event (no per-block ``removed``) if anything was dropped.
        Pinned blocks and stores in flight stay.
        """
        dropped = 0
        for od in self._lru.values():
            for s in od:
                h = self._hash[s]
                assert h is not None
                del self._registered[h]
                self._reset(s)
                self._free.append(s)
            dropped += len(od)
        self._lru.clear()
        self._levels.clear()
        if dropped and self._record:
            self._events.append((next(self._seq), "cleared", 0, None))
        return dropped

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
        state, hash_, pins = self._state, self._hash, self._pins
        if len(state) != cap or len(hash_) != cap or len(pins) != cap:
            _fail("per-slot arrays do not match capacity")
        free = set(self._free)
        if len(free) != len(self._free):
            _fail("free list has duplicates")
        if len(free) + len(self._writing) + len(self._registered) != cap:
            _fail(
                f"free {len(free)} + writing {len(self._writing)} + registered "
                f"{len(self._registered)} != capacity {cap}"
            )
        for s in free:
            if state[s] != _FREE or hash_[s] is not None or pins[s]:
                _fail(f"free slot {s} is in state {state[s]} / hash {hash_[s]} / pins {pins[s]}")
        for h, s in self._writing.items():
            if state[s] != _WRITING or hash_[s] != h or pins[s]:
                _fail(f"writing slot {s} disagrees: state {state[s]}, hash {hash_[s]} != {h}")
        for h, s in self._registered.items():
            if state[s] != _REGISTERED or hash_[s] != h:
                _fail(f"registered slot {s} disagrees: state {state[s]}, hash {hash_[s]} != {h}")
        for s in range(cap):
            if pins[s] < 0 or (pins[s] and state[s] != _REGISTERED):
                _fail(f"slot {s} in state {state[s]} has pin count {pins[s]}")
        if self._num_pinned != sum(1 for p in pins if p > 0):
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
    ) -> None:
        state = self._state
        cap = self.capacity
        for s in slots:
            if not 0 <= s < cap:
                raise ValueError(f"{op}: slot {s} out of range 0..{cap - 1}")
            if state[s] != want:
                raise ValueError(
                    f"{op}: slot {s} is {SlotState(state[s]).name}, expected {SlotState(want).name}"
                )
        if not allow_repeats and len(set(slots)) != len(slots):
            raise ValueError(f"{op}: repeated slot in {list(slots)}")

    def _attach(self, slot: int) -> None:
        """Append a registered unpinned slot to its priority's LRU list (most recent end)."""
        p = self._prio[slot]
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

    def _drop(self, slot: int) -> None:
        """Unregister a slot already taken out of the LRU; emits ``removed``; leaves it FREE."""
        h = self._hash[slot]
        assert h is not None
        del self._registered[h]
        if self._record:
            self._events.append((next(self._seq), "removed", h, self._parent[slot]))
        self._reset(slot)

    def _reset(self, slot: int) -> None:
        self._state[slot] = _FREE
        self._hash[slot] = None
        self._parent[slot] = None
        self._prio[slot] = 0


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Result of :meth:`BlockRegistry.match`.

    ``tiers[i]`` is where matched block ``start + i`` is found (G2 preferred when in both).
    ``host`` and ``disk`` count the matched blocks per tier. Usually the G2 blocks lead and the G3
    blocks follow; when a G2 block follows a G3 one (the tiers evict independently), use
    ``tiers``.
    """

    host: int
    disk: int
    tiers: tuple[Tier, ...]

    @property
    def total(self) -> int:
        """Number of matched blocks."""
        return self.host + self.disk


class BlockRegistry:
    """G2 host pool plus optional G3 disk pool; prefix matching over both."""

    def __init__(
        self,
        host_capacity: int,
        disk_capacity: int = 0,
        clock: Callable[[], float] = time.monotonic,
        *,
        record_events: bool = True,
    ) -> None:
        """Create the pools; no disk pool when ``disk_capacity`` is 0."""
        seq = itertools.count()  # shared, so drain_events can merge the tiers in order
        self.host = TierPool(
            Tier.HOST, host_capacity, clock, record_events=record_events, event_seq=seq
        )
        self.disk: TierPool | None = (
            TierPool(Tier.DISK, disk_capacity, clock, record_events=record_events, event_seq=seq)
            if disk_capacity > 0
            else None
        )

    def pool(self, tier: Tier) -> TierPool:
        """The pool of a tier; ValueError if that tier is not configured."""
        if tier == Tier.HOST:
            return self.host
        if tier == Tier.DISK and self.disk is not None:
            return self.disk
        raise ValueError(f"no pool for tier {Tier(tier).name}")

    def match(self, hashes: Sequence[int], start: int = 0) -> MatchResult:
        """Longest run of blocks from ``start`` registered in G2 or else G3. No side effects."""
        on_host = self.host.match_prefix(hashes, start)
        pos = start + on_host
        if self.disk is None or pos >= len(hashes):
            return MatchResult(on_host, 0, (Tier.HOST,) * on_host)
        host_reg = self.host._registered
        in_disk = self.disk._registered.__contains__
        tiers = [Tier.HOST] * on_host
        end = len(hashes)
        while pos < end:
            # Alternate runs: blocks in G3 (counted as G2 if also there), then blocks in G2.
            run = list(itertools.takewhile(in_disk, itertools.islice(hashes, pos, None)))
            if host_reg.keys().isdisjoint(run):  # the usual case, tested in C
                tiers.extend([Tier.DISK] * len(run))
            else:
                tiers.extend([Tier.HOST if h in host_reg else Tier.DISK for h in run])
            pos += len(run)
            n = self.host.match_prefix(hashes, pos)
            if not n:
                break
            tiers.extend([Tier.HOST] * n)
            pos += n
        on_disk = tiers.count(Tier.DISK)
        return MatchResult(len(tiers) - on_disk, on_disk, tuple(tiers))

    def drain_events(self) -> list[BlockEvent]:
        """Events of both tiers since the last drain, in order of occurrence."""
        if self.disk is None:
            return self.host.drain_events()
        streams = [
            [(seq, kind, pool.tier, h, p) for seq, kind, h, p in pool._drain_raw()]
            for pool in (self.host, self.disk)
        ]
        if not streams[1]:
            return _make_events([e[1:] for e in streams[0]])
        if not streams[0]:
            return _make_events([e[1:] for e in streams[1]])
        return _make_events([e[1:] for e in heapq.merge(*streams)])

    def check_invariants(self) -> None:
        """Check both pools."""
        self.host.check_invariants()
        if self.disk is not None:
            self.disk.check_invariants()

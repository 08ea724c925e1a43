"""Tests of the leader's slot pools and block registry (kvbm.leader.registry)."""

from __future__ import annotations

from typing import Sequence

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from kvbm.ipc.messages import BlockEventKind
from kvbm.leader.registry import (
    BlockEvent,
    BlockRegistry,
    MatchResult,
    SlotState,
    Tier,
    TierPool,
)


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def store(pool: TierPool, hashes: Sequence[int], priority: int = 0) -> list[int]:
    """Allocate and commit; returns the new slots (asserts everything was allocated)."""
    out = pool.allocate(hashes, priority=priority)
    assert len(out) == len(hashes)
    slots = [s for s in out if s is not None]
    pool.commit(slots)
    return slots


def new_slots(pool: TierPool, hashes: Sequence[int], **kw: object) -> list[int]:
    """Allocate; asserts every hash got a new slot."""
    out = pool.allocate(hashes, **kw)  # type: ignore[arg-type]
    assert len(out) == len(hashes) and None not in out
    return [s for s in out if s is not None]


def stored(tier: Tier, h: int, parent: int | None = None) -> BlockEvent:
    return BlockEvent(BlockEventKind.STORED, tier, h, parent)


def removed(tier: Tier, h: int, parent: int | None = None) -> BlockEvent:
    return BlockEvent(BlockEventKind.REMOVED, tier, h, parent)


# ---- Tier / enums ----------------------------------------------------------------------------


def test_tier_medium_and_values() -> None:
    assert (Tier.HOST.medium, Tier.DISK.medium) == ("CPU", "STORAGE")
    assert (int(Tier.HOST), int(Tier.DISK)) == (2, 3)
    assert [int(s) for s in SlotState] == [0, 1, 2]


# ---- allocate / commit / abort ---------------------------------------------------------------


def test_allocate_commit_lifecycle() -> None:
    pool = TierPool(Tier.HOST, 4)
    assert (pool.num_free, pool.num_writing, pool.num_registered) == (4, 0, 0)
    slots = pool.allocate([10, 11, 12], parents=[None, 10, 11])
    assert slots == [0, 1, 2]
    assert all(pool.state_of(s) is SlotState.WRITING for s in (0, 1, 2))
    # Being written: held but not matchable.
    assert pool.holds(10) and pool.lookup(10) is None and pool.match_prefix([10]) == 0
    assert (pool.num_free, pool.num_writing) == (1, 3)
    pool.commit([0, 1])
    assert pool.lookup(10) == 0 and pool.lookup(11) == 1
    assert pool.match_prefix([10, 11, 12]) == 2
    assert pool.hash_of(1) == 11 and pool.hash_of(3) is None
    assert pool.drain_events() == [stored(Tier.HOST, 10), stored(Tier.HOST, 11, 10)]
    assert pool.drain_events() == []
    pool.check_invariants()


def test_allocate_skips_held_and_repeated_hashes() -> None:
    pool = TierPool(Tier.HOST, 8)
    store(pool, [1])
    pool.allocate([2])
    assert pool.allocate([1, 2, 3, 3, 4]) == [None, None, 2, None, 3]
    pool.check_invariants()


def test_allocate_rejects_parent_length_mismatch() -> None:
    pool = TierPool(Tier.HOST, 4)
    with pytest.raises(ValueError):
        pool.allocate([1, 2], parents=[None])
    assert pool.num_free == 4


def test_abort_frees_and_is_never_matchable() -> None:
    pool = TierPool(Tier.HOST, 2)
    pool.abort(new_slots(pool, [5]))
    assert pool.num_free == 2 and not pool.holds(5) and pool.match_prefix([5]) == 0
    assert pool.state_of(0) is SlotState.FREE
    assert pool.drain_events() == []
    # The hash can be stored again later.
    assert store(pool, [5]) != []
    pool.check_invariants()


def test_bad_commit_or_abort_changes_nothing() -> None:
    pool = TierPool(Tier.HOST, 4)
    store(pool, [1])  # slot 0 registered
    (w,) = new_slots(pool, [2])  # slot 1 writing
    for op in (pool.commit, pool.abort):
        with pytest.raises(ValueError):
            op([w, 0])  # 0 is registered
        with pytest.raises(ValueError):
            op([w, w])
        with pytest.raises(ValueError):
            op([w, 3])  # free
        with pytest.raises(ValueError):
            op([-1])
        with pytest.raises(ValueError):
            op([4])
    assert pool.state_of(1) is SlotState.WRITING and pool.num_registered == 1
    pool.check_invariants()


# ---- eviction --------------------------------------------------------------------------------


def test_free_slots_used_before_eviction() -> None:
    pool = TierPool(Tier.HOST, 3)
    store(pool, [1, 2])
    assert pool.allocate([3]) == [2]
    assert pool.drain_events() == [stored(Tier.HOST, 1), stored(Tier.HOST, 2)]


def test_eviction_is_lru() -> None:
    pool = TierPool(Tier.HOST, 3)
    store(pool, [1, 2, 3])
    pool.drain_events()
    pool.touch([0])  # block 1
    out = pool.allocate([4, 5])
    assert len(out) == 2 and None not in out
    assert pool.drain_events() == [removed(Tier.HOST, 2), removed(Tier.HOST, 3)]
    assert pool.lookup(1) is not None
    pool.check_invariants()


def test_eviction_lowest_priority_first() -> None:
    pool = TierPool(Tier.HOST, 3)
    store(pool, [1], priority=5)
    store(pool, [2], priority=0)
    store(pool, [3], priority=5)
    pool.drain_events()
    pool.allocate([4, 5])
    # Priority 0 first (even though newer), then the LRU of priority 5.
    assert pool.drain_events() == [removed(Tier.HOST, 2), removed(Tier.HOST, 1)]
    pool.check_invariants()


def test_eviction_event_carries_parent() -> None:
    pool = TierPool(Tier.DISK, 1)
    pool.commit(new_slots(pool, [20], parents=[19]))
    pool.allocate([21])
    assert pool.drain_events() == [stored(Tier.DISK, 20, 19), removed(Tier.DISK, 20, 19)]


def test_pinned_and_writing_never_evicted_partial_answer() -> None:
    pool = TierPool(Tier.HOST, 4)
    a, b = store(pool, [1, 2])
    pool.allocate([3])  # writing
    pool.pin([a])
    assert pool.num_pinned == 1
    out = pool.allocate([10, 11, 12])
    # One free slot, then block 2 is evicted; 1 is pinned and 3 is being written: stop.
    assert out == [3, b]
    assert pool.lookup(1) == a and pool.holds(3)
    pool.check_invariants()
    # Everything pinned or writing: an empty answer, no exception.
    assert pool.allocate([13]) == []
    # Held hashes still answer None before the point where space ran out.
    assert pool.allocate([1, 3, 14, 15]) == [None, None]
    pool.unpin([a])
    assert pool.num_pinned == 0
    assert pool.allocate([16]) == [a]
    pool.check_invariants()


def test_allocate_protects_blocks_of_the_same_request() -> None:
    pool = TierPool(Tier.HOST, 3)
    store(pool, [1, 2, 3])  # 1 is least recently used
    pool.drain_events()
    # Re-storing [1, 2] plus one new block must evict 3, not 1 or 2.
    assert pool.allocate([1, 2, 4]) == [None, None, 2]
    assert pool.drain_events() == [removed(Tier.HOST, 3)]
    pool.commit([2])
    # 1 and 2 were touched by the re-store; 4 was committed after: 1 is now the LRU.
    pool.allocate([5])
    assert pool.drain_events() == [stored(Tier.HOST, 4), removed(Tier.HOST, 1)]
    pool.commit([0])
    # A request larger than the pool keeps its prefix instead of evicting its own blocks.
    assert pool.allocate([2, 4, 6, 7]) == [None, None, 0]
    assert pool.drain_events() == [stored(Tier.HOST, 5), removed(Tier.HOST, 5)]
    pool.check_invariants()


def test_evict_by_hash() -> None:
    pool = TierPool(Tier.HOST, 3)
    s1, s2 = store(pool, [1, 2])
    pool.allocate([3])
    pool.pin([s2])
    pool.drain_events()
    assert pool.evict(1) is True
    assert pool.evict(1) is False  # gone
    assert pool.evict(2) is False  # pinned
    assert pool.evict(3) is False  # being written
    assert pool.evict(99) is False
    assert pool.drain_events() == [removed(Tier.HOST, 1)]
    assert pool.num_free == 1 and pool.state_of(s1) is SlotState.FREE
    pool.check_invariants()


def test_clear_keeps_pinned_and_writing() -> None:
    pool = TierPool(Tier.HOST, 5)
    s1, _, _ = store(pool, [1, 2, 3], priority=1)
    store(pool, [4])
    pool.allocate([5])
    pool.pin([s1])
    pool.drain_events()
    assert pool.clear() == 3
    assert pool.drain_events() == [BlockEvent(BlockEventKind.CLEARED, Tier.HOST, 0, None)]
    assert pool.lookup(1) == s1 and pool.holds(5) and not pool.holds(2)
    assert pool.clear() == 0
    assert pool.drain_events() == []  # nothing dropped, no event
    pool.check_invariants()
    # The pool still evicts correctly after a clear.
    pool.unpin([s1])
    assert len(pool.allocate([6, 7, 8, 9])) == 4
    assert pool.drain_events() == [removed(Tier.HOST, 1)]
    pool.check_invariants()


# ---- pins / touch ----------------------------------------------------------------------------


def test_pin_unpin_counts_and_errors() -> None:
    pool = TierPool(Tier.HOST, 3)
    (s,) = store(pool, [1])
    w = pool.allocate([2])[0]
    assert w is not None
    pool.pin([s, s])
    assert pool.pin_count(s) == 2 and pool.num_pinned == 1
    with pytest.raises(ValueError):
        pool.pin([w])  # not registered
    with pytest.raises(ValueError):
        pool.pin([2])  # free
    with pytest.raises(ValueError):
        pool.unpin([s, s, s])  # underflow: nothing changes
    assert pool.pin_count(s) == 2
    pool.unpin([s])
    pool.unpin([s])
    assert pool.pin_count(s) == 0 and pool.num_pinned == 0
    with pytest.raises(ValueError):
        pool.unpin([s])
    with pytest.raises(ValueError):
        pool.touch([w])
    pool.check_invariants()


def test_unpin_makes_block_most_recent() -> None:
    pool = TierPool(Tier.HOST, 2)
    s1, _ = store(pool, [1, 2])
    pool.pin([s1])
    pool.unpin([s1])
    pool.drain_events()
    pool.allocate([3])
    assert pool.drain_events() == [removed(Tier.HOST, 2)]


def test_last_used_follows_injected_clock() -> None:
    clock = FakeClock(5.0)
    pool = TierPool(Tier.HOST, 2, clock)
    (s,) = store(pool, [1])
    assert pool.last_used(s) == 5.0
    clock.t = 7.0
    pool.pin([s])
    assert pool.last_used(s) == 7.0
    clock.t = 9.0
    pool.touch([s])
    assert pool.last_used(s) == 9.0
    pool.unpin([s])
    clock.t = 11.0
    pool.allocate([1])  # a re-store counts as use
    assert pool.last_used(s) == 11.0


def test_slot_queries_reject_out_of_range() -> None:
    pool = TierPool(Tier.HOST, 2)
    for q in (pool.hash_of, pool.state_of, pool.pin_count, pool.last_used):
        with pytest.raises(ValueError):
            q(2)
        with pytest.raises(ValueError):
            q(-1)


def test_zero_capacity_pool() -> None:
    pool = TierPool(Tier.DISK, 0)
    assert pool.allocate([1, 2]) == []
    assert pool.match_prefix([1]) == 0 and pool.clear() == 0
    pool.check_invariants()
    with pytest.raises(ValueError):
        TierPool(Tier.DISK, -1)


def test_record_events_off() -> None:
    pool = TierPool(Tier.HOST, 1, record_events=False)
    store(pool, [1])
    store(pool, [2])
    assert pool.drain_events() == []


def test_check_invariants_detects_corruption() -> None:
    pool = TierPool(Tier.HOST, 2)
    store(pool, [1])
    pool._pins[0] = 1  # pinned without leaving the LRU / updating the count
    with pytest.raises(AssertionError):
        pool.check_invariants()


# ---- registry over both tiers ----------------------------------------------------------------


def test_match_host_then_disk() -> None:
    reg = BlockRegistry(host_capacity=8, disk_capacity=8)
    store(reg.host, [1, 2])
    store(reg.pool(Tier.DISK), [2, 3, 4, 6])
    m = reg.match([1, 2, 3, 4, 5, 6])
    assert m == MatchResult(2, 2, (Tier.HOST, Tier.HOST, Tier.DISK, Tier.DISK))
    assert m.total == 4
    assert reg.match([3, 4], start=0) == MatchResult(0, 2, (Tier.DISK, Tier.DISK))
    assert reg.match([1, 2, 3, 4], start=1) == MatchResult(1, 2, (Tier.HOST, Tier.DISK, Tier.DISK))
    assert reg.match([9, 1]) == MatchResult(0, 0, ())
    assert reg.match([1], start=5).total == 0
    with pytest.raises(ValueError):
        reg.match([1], start=-1)


def test_match_interleaved_tiers_prefers_host() -> None:
    reg = BlockRegistry(host_capacity=8, disk_capacity=8)
    store(reg.host, [1, 3])
    store(reg.pool(Tier.DISK), [1, 2])
    m = reg.match([1, 2, 3, 4])
    assert m.tiers == (Tier.HOST, Tier.DISK, Tier.HOST)
    assert (m.host, m.disk, m.total) == (2, 1, 3)


def test_match_without_disk_and_blocks_being_written() -> None:
    reg = BlockRegistry(host_capacity=4)
    assert reg.disk is None
    with pytest.raises(ValueError):
        reg.pool(Tier.DISK)
    assert reg.pool(Tier.HOST) is reg.host
    store(reg.host, [1])
    reg.host.allocate([2])
    assert reg.match([1, 2]) == MatchResult(1, 0, (Tier.HOST,))


def test_match_has_no_side_effects() -> None:
    reg = BlockRegistry(host_capacity=2, disk_capacity=2)
    store(reg.host, [1, 2])
    reg.drain_events()
    for _ in range(3):
        reg.match([1])
    # 1 is still the least recently used: matching did not touch it.
    reg.host.allocate([3])
    assert reg.drain_events() == [removed(Tier.HOST, 1)]


def test_registry_events_in_global_order() -> None:
    reg = BlockRegistry(host_capacity=1, disk_capacity=1)
    store(reg.host, [1])
    store(reg.pool(Tier.DISK), [1])
    store(reg.host, [2])  # evicts 1 from G2
    reg.pool(Tier.DISK).clear()
    assert reg.drain_events() == [
        stored(Tier.HOST, 1),
        stored(Tier.DISK, 1),
        removed(Tier.HOST, 1),
        stored(Tier.HOST, 2),
        BlockEvent(BlockEventKind.CLEARED, Tier.DISK, 0, None),
    ]
    assert reg.drain_events() == []
    reg.check_invariants()


# ---- state machine ---------------------------------------------------------------------------


class PoolModel:
    """Reference model of one pool, keyed by hash; eviction order by (priority, use tick)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.writing: dict[int, int] = {}  # hash -> slot
        self.registered: dict[int, int] = {}  # hash -> slot
        self.pins: dict[int, int] = {}  # hash -> count (registered only)
        self.prio: dict[int, int] = {}
        self.tick: dict[int, int] = {}  # last use, for unpinned registered blocks
        self.clock = 0

    def use(self, h: int) -> None:
        self.clock += 1
        self.tick[h] = self.clock

    def evictable(self, exclude: set[int] = set()) -> list[int]:
        cands = [h for h in self.registered if self.pins[h] == 0 and h not in exclude]
        return sorted(cands, key=lambda h: (self.prio[h], self.tick[h]))

    @property
    def free(self) -> int:
        return self.capacity - len(self.writing) - len(self.registered)


HASHES = st.integers(min_value=1, max_value=20)
PRIORITIES = st.sampled_from([0, 0, 0, 1, 2])


class RegistryMachine(RuleBasedStateMachine):
    """Random operations on a two-tier registry, checked against PoolModel after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.reg: BlockRegistry
        self.models: dict[Tier, PoolModel] = {}

    @initialize(
        host=st.integers(min_value=1, max_value=6), disk=st.integers(min_value=0, max_value=6)
    )
    def setup(self, host: int, disk: int) -> None:
        self.reg = BlockRegistry(host, disk)
        self.models = {Tier.HOST: PoolModel(host)}
        if disk:
            self.models[Tier.DISK] = PoolModel(disk)

    def pick_tier(self, data: st.DataObject) -> tuple[TierPool, PoolModel]:
        tier = data.draw(st.sampled_from(sorted(self.models)))
        return self.reg.pool(tier), self.models[tier]

    @rule(data=st.data(), hashes=st.lists(HASHES, max_size=10), priority=PRIORITIES)
    def allocate(self, data: st.DataObject, hashes: list[int], priority: int) -> None:
        pool, m = self.pick_tier(data)
        self._allocate(pool, m, hashes, priority)

    @rule(data=st.data(), hashes=st.lists(HASHES, max_size=6), priority=PRIORITIES)
    def store(self, data: st.DataObject, hashes: list[int], priority: int) -> None:
        """Allocate and commit at once: fills the pools so that eviction is exercised often."""
        pool, m = self.pick_tier(data)
        out = self._allocate(pool, m, hashes, priority)
        new = [(h, s) for h, s in zip(hashes, out) if s is not None]
        pool.commit([s for _, s in new])
        for h, _ in new:
            m.registered[h] = m.writing.pop(h)
            m.pins[h] = 0
            m.use(h)

    def _allocate(
        self, pool: TierPool, m: PoolModel, hashes: list[int], priority: int
    ) -> list[int | None]:
        # Expected answer: None for held hashes, slots while the free + evictable budget lasts.
        protected = {h for h in hashes if h in m.registered and m.pins[h] == 0}
        victims = m.evictable(exclude=protected)
        budget = m.free + len(victims)
        expected: list[bool] = []  # True = new slot
        seen: set[int] = set()
        for h in hashes:
            held = h in m.registered or h in m.writing or h in seen
            if not held and budget == 0:
                break
            expected.append(not held)
            if not held:
                budget -= 1
                seen.add(h)
        n_new = sum(expected)
        n_evict = max(0, n_new - m.free)
        pool.drain_events()
        parents = [None] + hashes[:-1] if hashes else []
        out = pool.allocate(hashes, parents=parents, priority=priority)
        assert [s is not None for s in out] == expected
        # Exactly the n_evict lowest (priority, last use) unpinned blocks go, in that order.
        events = pool.drain_events()
        assert [(e.kind, e.seq_hash) for e in events] == [(BlockEventKind.REMOVED, h) for h in victims[:n_evict]]
        for h in victims[:n_evict]:
            del m.registered[h], m.pins[h], m.prio[h], m.tick[h]
        for h in dict.fromkeys(h for h in hashes if h in protected):
            m.use(h)  # a re-store counts as use, in order of first appearance
        for h, s in zip(hashes, out):
            if s is not None:
                m.writing[h] = s
                m.prio[h] = priority
        return out

    def _writing_slots(self, data: st.DataObject) -> tuple[TierPool, PoolModel, list[int]]:
        pool, m = self.pick_tier(data)
        hs = data.draw(st.lists(st.sampled_from(sorted(m.writing)), unique=True)) if m.writing else []
        return pool, m, hs

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        pool, m, hs = self._writing_slots(data)
        pool.commit([m.writing[h] for h in hs])
        for h in hs:
            m.registered[h] = m.writing.pop(h)
            m.pins[h] = 0
            m.use(h)

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        pool, m, hs = self._writing_slots(data)
        pool.abort([m.writing[h] for h in hs])
        for h in hs:
            del m.writing[h], m.prio[h]
            assert not pool.holds(h)

    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        pool, m = self.pick_tier(data)
        if not m.registered:
            return
        hs = data.draw(st.lists(st.sampled_from(sorted(m.registered)), max_size=4))
        pool.pin([m.registered[h] for h in hs])
        for h in hs:
            m.pins[h] += 1
            m.tick.pop(h, None)

    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        pool, m = self.pick_tier(data)
        pinned = sorted(h for h, c in m.pins.items() if c > 0)
        if not pinned:
            return
        hs = data.draw(st.lists(st.sampled_from(pinned), unique=True))
        pool.unpin([m.registered[h] for h in hs])
        for h in hs:
            m.pins[h] -= 1
            if m.pins[h] == 0:
                m.use(h)

    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        pool, m = self.pick_tier(data)
        if not m.registered:
            return
        hs = data.draw(st.lists(st.sampled_from(sorted(m.registered)), unique=True, max_size=4))
        pool.touch([m.registered[h] for h in hs])
        for h in hs:
            if m.pins[h] == 0:
                m.use(h)

    @rule(data=st.data(), h=HASHES)
    def evict(self, data: st.DataObject, h: int) -> None:
        pool, m = self.pick_tier(data)
        ok = h in m.registered and m.pins[h] == 0
        assert pool.evict(h) is ok
        if ok:
            del m.registered[h], m.pins[h], m.prio[h], m.tick[h]

    @rule(data=st.data())
    def clear(self, data: st.DataObject) -> None:
        pool, m = self.pick_tier(data)
        gone = [h for h in m.registered if m.pins[h] == 0]
        pool.drain_events()
        assert pool.clear() == len(gone)
        assert pool.drain_events() == ([BlockEvent(BlockEventKind.CLEARED, pool.tier, 0, None)] if gone else [])
        for h in gone:
            del m.registered[h], m.pins[h], m.prio[h], m.tick[h]

    @rule(data=st.data())
    def bad_ops_change_nothing(self, data: st.DataObject) -> None:
        pool, m = self.pick_tier(data)
        before = self.snapshot(pool)
        not_writing = [s for s in range(pool.capacity) if s not in m.writing.values()]
        not_registered = [s for s in range(pool.capacity) if s not in m.registered.values()]
        unpinned = [m.registered[h] for h, c in m.pins.items() if c == 0]
        for op, bad in (
            (pool.commit, not_writing),
            (pool.abort, not_writing),
            (pool.pin, not_registered),
            (pool.unpin, unpinned + not_registered),
        ):
            if bad:
                good = list(m.writing.values())[:1] if op in (pool.commit, pool.abort) else []
                with pytest.raises(ValueError):
                    op(good + [data.draw(st.sampled_from(bad))])
        assert self.snapshot(pool) == before

    @staticmethod
    def snapshot(pool: TierPool) -> list[tuple[object, ...]]:
        return [
            (pool.state_of(s), pool.hash_of(s), pool.pin_count(s)) for s in range(pool.capacity)
        ]

    @rule(hashes=st.lists(HASHES, max_size=12), start=st.integers(min_value=0, max_value=3))
    def match(self, hashes: list[int], start: int) -> None:
        host = self.models[Tier.HOST].registered
        disk = self.models[Tier.DISK].registered if Tier.DISK in self.models else {}
        expected: list[Tier] = []
        for h in hashes[start:]:
            if h in host:
                expected.append(Tier.HOST)
            elif h in disk:
                expected.append(Tier.DISK)
            else:
                break
        r = self.reg.match(hashes, start)
        assert r.tiers == tuple(expected)
        assert (r.host, r.disk) == (expected.count(Tier.HOST), expected.count(Tier.DISK))
        assert self.reg.host.match_prefix(hashes, start) == self.leading(expected)

    @staticmethod
    def leading(tiers: list[Tier]) -> int:
        n = 0
        while n < len(tiers) and tiers[n] == Tier.HOST:
            n += 1
        return n

    @rule()
    def settle(self) -> None:
        """Unpin and commit everything: then free + registered == capacity."""
        for tier, m in self.models.items():
            pool = self.reg.pool(tier)
            pinned = [(h, c) for h, c in m.pins.items() if c]
            pool.unpin([m.registered[h] for h, c in pinned for _ in range(c)])
            for h, _ in pinned:  # each reaches 0 at its last repeat, in this order
                m.pins[h] = 0
                m.use(h)
            hs = list(m.writing)
            pool.commit([m.writing[h] for h in hs])
            for h in hs:
                m.registered[h] = m.writing.pop(h)
                m.pins[h] = 0
                m.use(h)
            assert pool.num_free + pool.num_registered == pool.capacity
            assert pool.num_pinned == 0 and pool.num_writing == 0

    @invariant()
    def consistent(self) -> None:
        if not self.models:
            return
        self.reg.check_invariants()
        for tier, m in self.models.items():
            pool = self.reg.pool(tier)
            assert pool.num_free + pool.num_writing + pool.num_registered == pool.capacity
            assert (pool.num_free, pool.num_writing, pool.num_registered) == (
                m.free,
                len(m.writing),
                len(m.registered),
            )
            assert pool.num_pinned == sum(1 for c in m.pins.values() if c)
            for h, s in m.writing.items():
                assert pool.state_of(s) is SlotState.WRITING and pool.hash_of(s) == h
                assert pool.lookup(h) is None and pool.holds(h)
            for h, s in m.registered.items():
                assert pool.lookup(h) == s and pool.pin_count(s) == m.pins[h]
            # Pinned blocks are still registered (never evicted): checked by the model match.
            used = list(m.writing.values()) + list(m.registered.values())
            assert len(set(used)) == len(used)


RegistryMachine.TestCase.settings = settings(
    max_examples=100,  # ~4,500 steps (50 at most per run; some runs end early)
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_registry_state_machine = RegistryMachine.TestCase

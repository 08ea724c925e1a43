"""The vectorised hash -> slot table against a dict, under random inserts and removals that
force long clusters (hashes sharing their low bits) and wrap-around at the table's end."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvbm.leader.hash_table import HashSlotTable, leading
from kvbm.leader.registry import Tier, TierPool


def _check(table: HashSlotTable, model: dict[int, int], probes: list[int]) -> None:
    assert len(table) == len(model)
    q = np.array(probes, np.uint64)
    assert table.slots_of(q).tolist() == [model.get(h, -1) for h in probes]
    assert table.contains(q).tolist() == [h in model for h in probes]
    assert [table.get(h) for h in probes[:20]] == [model.get(h) for h in probes[:20]]


@pytest.mark.parametrize("seed", range(6))
def test_random_inserts_and_removals_agree_with_a_dict(seed: int) -> None:
    rng = random.Random(seed)
    cap = rng.choice([1, 7, 64, 300])
    table = HashSlotTable(cap)
    mask = (1 << max(4, (2 * cap - 1).bit_length())) - 1
    # Few distinct low bits (long clusters), some near the end of the table (wrap-around),
    # and high bits set (values above 2**63).
    lows = [rng.randrange(mask + 1) for _ in range(8)] + [mask, mask - 1]
    model: dict[int, int] = {}
    universe = [(rng.getrandbits(40) << 24) | (1 << 63) | rng.choice(lows) for _ in range(3 * cap + 5)]
    universe = list(dict.fromkeys(universe + [0, 1]))  # 0 and 1 are the empty and tombstone keys
    for step in range(800):
        if model and (len(model) == cap or rng.random() < 0.45):
            victims = rng.sample(sorted(model), rng.randint(1, min(3, len(model))))
            table.remove(victims)
            for h in victims:
                del model[h]
        else:
            fresh = [h for h in rng.sample(universe, 4) if h not in model][: cap - len(model)]
            slots = [rng.randrange(cap) for _ in fresh]
            table.insert(fresh, slots)
            model.update(zip(fresh, slots))
        if step % 50 == 0:
            _check(table, model, universe)
    _check(table, model, universe)
    table.clear()
    _check(table, {}, universe)


def test_full_table_missing_hash_tombstones_and_leading() -> None:
    table = HashSlotTable(2)
    table.insert([5, 21], [0, 1])  # same low bits at size 16: one cluster
    with pytest.raises(KeyError):
        table.remove([37, 5])  # nothing dropped
    assert table.get(5) == 0
    table.remove([5])
    assert table.get(21) == 1 and table.get(5) is None  # found past 5's tombstone
    table.insert([37], [1])  # reuses the tombstone
    assert table.slots_of(np.array([37, 21, 5], np.uint64)).tolist() == [1, 1, -1]
    table.insert(list(range(100, 106)), [0] * 6)  # 8: half the 16 buckets
    with pytest.raises(ValueError, match="full"):
        table.insert([200], [0])
    assert leading(np.array([True, True, False, True])) == 2
    assert leading(np.array([True, True])) == 2 and leading(np.array([], bool)) == 0
    assert table.contains(np.array([], np.uint64)).tolist() == []
    with pytest.raises(ValueError, match="capacity"):
        HashSlotTable(-1)


def test_probe_with_few_rounds_leaves_only_far_hashes_unsure() -> None:
    table = HashSlotTable(8)  # 16 buckets
    hs = [(i << 8) | 3 for i in range(1, 7)]  # one cluster from bucket 3
    table.insert(hs, list(range(6)))
    q = np.array(hs + [(99 << 8) | 3, 5], np.uint64)
    found, unsure = table.probe(q, rounds=2)
    # Two rounds settle two of the cluster (in buckets 3 and 4); the other four, the missing
    # hash with the same home, and 5 (its home bucket taken by the cluster) stay unsure.
    assert found[:6].sum() == 2 and not found[6:].any()
    assert sorted(unsure.tolist()) == sorted(set(range(8)) - set(np.flatnonzero(found).tolist()))
    assert table.contains(q).tolist() == [True] * 6 + [False, False]


def test_registry_lookups_over_the_table_agree_with_the_dict() -> None:
    """Prefix matches long enough to use the table (not the short-lookup dict walk), over a
    pool whose hashes share their low bits (long clusters), after evictions and a clear."""
    rng = random.Random(7)
    pool = TierPool(Tier.HOST, 600)
    hs = list(dict.fromkeys((rng.getrandbits(50) << 12) | rng.choice([1, 2, 4000]) for _ in range(1500)))
    first, second = hs[:600], hs[600:1200]
    pool.commit([s for s in pool.allocate(first) if s is not None])
    assert pool.match_prefix(first) == 600 and pool.match_prefix(first, 100) == 500
    assert pool.match_prefix(first[:300] + second[:1] + first[300:]) == 300
    pool.commit([s for s in pool.allocate(second[:400]) if s is not None])  # evicts 400 of the first
    q = np.array(first + second, np.uint64)
    assert pool.contains(q).tolist() == [pool.lookup(h) is not None for h in first + second]
    pool.check_invariants()
    pool.clear()
    assert not pool.contains(q).any() and pool.match_prefix(second) == 0
    pool.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_prefix_match_first_pass_and_the_dict_agree_with_a_walk(seed: int) -> None:
    """The prefix match's two-bucket pass (``not_near_home``) never calls a hash found that is not
    there (hashes 0 and 1, which equal the empty and tombstone keys, included), and the pool's
    match_prefix over it equals a plain dict walk, with clusters, tombstones and misses anywhere."""
    rng = random.Random(seed)
    pool = TierPool(Tier.HOST, 400)
    hs = list(dict.fromkeys([0, 1] + [(rng.getrandbits(50) << 12) | rng.choice([2, 3, 4095]) for _ in range(900)]))
    held = hs[:400]
    pool.commit([s for s in pool.allocate(held) if s is not None])
    pool.commit([s for s in pool.allocate(hs[400:500]) if s is not None])  # evicts 100: tombstones
    model = set(pool._registered)
    for _ in range(30):
        q = [rng.choice(hs) for _ in range(rng.choice([300, 600]))]
        if rng.random() < 0.5:
            q = [h for h in q if h in model] + q[:5]  # a long hit prefix
        arr = np.array(q, np.uint64)
        unsure = set(pool._table.not_near_home(arr).tolist())
        assert all(q[i] in model for i in range(len(q)) if i not in unsure)
        walk = 0
        for h in q:
            if h not in model:
                break
            walk += 1
        assert pool.match_prefix(arr) == pool.match_prefix(q) == walk
    empty = TierPool(Tier.HOST, 16)
    assert empty._table.not_near_home(np.array([0, 1, 5], np.uint64)).tolist() == [0, 1, 2]

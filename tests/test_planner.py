"""The engine-neutral planner against a real leader and real ranks (the simulated engine).

The races its non-blocking design opens: a stale index replica claiming blocks the leader
does not hold (fewer blocks pinned -> recomputed, never wrong KV), a request preempted before
its store allocation came back (released, not copied), a request aborted while its pin is in
flight (released, nothing stays pinned).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from kvbm.connector.index import IndexReplica, follow_leader
from kvbm.ipc import messages as m
from kvbm.ipc.messages import BlockEventKind
from kvbm.leader.client import IndexDelta, TierBlocks
from kvbm.connector.planner import ConnectorCounters, Planner, ScheduledRequest
from kvbm.hashing import EMPTY_SALT_HASH, sequence_hashes
from kvbm.leader.client import LeaderClient
from kvbm.leader.registry import Tier
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel
from kvbm.testing.support import random_prompts

pytestmark = pytest.mark.slow  # a leader and rank processes (the sim fixture)

BS = 16
MODEL = SimModel(num_layers=2, kv_heads=2, head_dim=32, num_gpu_blocks=64)


def _snapshot(hashes: list[int]) -> IndexDelta:
    """A replica view as current as any leader position (so lookups answer from it)."""
    n = len(hashes)
    return IndexDelta(True, 1 << 63, np.full(n, BlockEventKind.STORED, np.uint8), np.full(n, Tier.HOST, np.uint8),
                      np.asarray(hashes, np.uint64))


@pytest.fixture
def sim(make_config):
    with SimEngine(make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="64"), world_size=2, model=MODEL) as s:
        yield s


def test_lookups_never_answer_from_an_index_older_than_the_planner_saw(sim: SimEngine) -> None:
    """The follower here polls once a minute (no long-poll), so its replica stays as it was unless a lookup
    asks it to catch up: after the stats of an idle leader a lookup sees what was committed,
    after a reset it no longer claims what was dropped."""
    p = random_prompts(1, 6 * BS, seed=3)[0]
    follower = follow_leader(sim.endpoint, wait_s=0, interval_s=60.0)
    planner = Planner(BS, sim.world_size, LeaderClient(sim.endpoint), replica=follower.replica)
    try:
        assert follower.sync(10.0)
        sim.run([p])
        sim.quiesce()
        planner.add("a", p, EMPTY_SALT_HASH)
        assert planner.lookup("a", 0) == 0  # the replica has not seen the store, nor has the planner
        planner.client.wait_idle()  # the leader's stats carry its index position
        assert planner.lookup("a", 0) == 5 * BS  # 6 blocks, the last held back
        assert planner.counters.index_waits == 1 and planner.counters.remote_lookups == 0
        assert planner.lookup("a", 0) == 5 * BS and planner.counters.index_waits == 1  # current now
        assert planner.reset_cache()
        assert planner.lookup("a", 0) == 0  # not the 5 blocks the replica held before the reset
        assert planner.counters.index_waits == 2 and planner.counters.remote_lookups == 0
    finally:
        planner.shutdown()
        follower.stop()


def test_stale_replica_claims_are_recomputed_never_wrong_kv(sim: SimEngine) -> None:
    stored, never = random_prompts(1, 6 * BS, seed=1)[0], random_prompts(1, 6 * BS, seed=2)[0]
    sim.run([stored])
    sim.quiesce()
    replica = IndexReplica()
    # The replica claims both prompts; the leader holds only the first.
    replica.apply(_snapshot(sequence_hashes(stored, BS) + sequence_hashes(never, BS)))
    sim.planner.replica = replica
    sim.reset_engine_cache()
    before = sim.stats.tokens_from_host
    sim.run([never])
    assert sim.stats.tokens_from_host == before  # nothing loaded: the pin granted nothing
    assert sim.stats.mismatches == 0 and sim.stats.load_failures == 0
    sim.run([stored])  # real hits through the replica, bytes checked against the oracle
    assert sim.stats.tokens_from_host == before + 5 * BS  # the last block is held back
    assert sim.stats.mismatches == 0
    stats = sim.quiesce()
    assert stats.host.pinned == 0 and stats.ops_in_flight == 0


def test_preempted_before_its_store_allocation_came_back(sim: SimEngine) -> None:
    planner = Planner(BS, sim.world_size, LeaderClient(sim.endpoint))
    try:
        tokens = random_prompts(1, 4 * BS, seed=3)[0]
        planner.add("r", tokens, EMPTY_SALT_HASH)
        plan = planner.step([ScheduledRequest("r", 0, len(tokens), [10, 11, 12, 13], True)])
        assert not plan.stores and planner.busy()  # the allocation is posted, not waited for
        plan = planner.step([], preempted=["r"])  # its blocks went back before the grant arrived
        plan.extend(planner.settle(10))
        assert plan.preempted == ["r"] and not plan.stores  # never copied from reused blocks
        stats = sim.quiesce()  # the grant was released: nothing stays in flight
        assert stats.ops_in_flight == 0 and stats.host.writing == 0
        assert planner.finished("r") is False
    finally:
        planner.shutdown()


@contextmanager
def _held_prompt(sim: SimEngine, seed: int) -> Iterator[tuple[Planner, int]]:
    """A fresh planner with request "r", a 5-block prompt the leader holds, looked up: (planner,
    the tokens it hit); shut down afterwards."""
    tokens = random_prompts(1, 5 * BS, seed=seed)[0]
    sim.run([tokens])
    sim.quiesce()
    planner = Planner(BS, sim.world_size, LeaderClient(sim.endpoint))
    try:
        planner.add("r", tokens, EMPTY_SALT_HASH)
        yield planner, planner.lookup("r", 0)
    finally:
        planner.shutdown()


def test_aborted_while_its_pin_is_in_flight(sim: SimEngine) -> None:
    with _held_prompt(sim, seed=4) as (planner, hit):
        assert hit == 4 * BS  # 5 blocks held, the last held back
        planner.load_after_alloc("r", [20, 21, 22, 23, 24], hit)
        assert planner.finished("r") is False  # aborted: nothing of its blocks is read
        plan = planner.settle(10)
        assert [(op.req_id, op.op_id) for op in plan.loads] == [("r", 0)]  # reported as received only
        stats = sim.quiesce()
        assert stats.host.pinned == 0 and stats.ops_in_flight == 0


def test_a_steps_requests_go_out_in_one_burst_at_the_step(sim: SimEngine) -> None:
    """Lookups and pins queue their messages on the scheduler thread; the step sends them
    together, and the leader counts the lookup once they arrived."""
    tokens = random_prompts(1, 5 * BS, seed=5)[0]
    sim.run([tokens])
    idle = sim.quiesce()
    replica = IndexReplica()
    replica.apply(_snapshot(sequence_hashes(tokens, BS)))
    planner = Planner(BS, sim.world_size, LeaderClient(sim.endpoint), replica=replica)
    try:
        planner.add("r", tokens, EMPTY_SALT_HASH)
        hit = planner.lookup("r", 0)
        planner.load_after_alloc("r", [20, 21, 22, 23, 24], hit)
        assert hit == 4 * BS and planner.link.outstanding == 0 and planner.busy()  # queued, not sent
        plan = planner.step([])
        assert planner.link.outstanding == 1  # the pin went out with the step
        plan.extend(planner.settle(10))
        assert [(op.req_id, len(op.blocks)) for op in plan.loads] == [("r", 4)]
        # The lookup report went out before the pin on the same connection: counted already.
        assert planner.client.stats().counters.match_requests == idle.counters.match_requests + 1
        planner.client.release(plan.loads[0].op_id)  # no worker runs this load
    finally:
        planner.shutdown()
    assert sim.quiesce().host.pinned == 0


def test_planner_refuses_bad_sizes(sim: SimEngine) -> None:
    assert sim.client is not None
    with pytest.raises(ValueError, match="block_size must be > 0, got 0"):
        Planner(0, 1, sim.client)
    with pytest.raises(ValueError, match="world_size must be > 0, got -1"):
        Planner(BS, -1, sim.client)


def test_firm_lookup_promises_only_pinned_blocks(sim: SimEngine) -> None:
    """lookup_pinned (engines without a load-error path): a stale replica's claim is never
    promised; a promise becomes a ready load op; an unused pin is released at finish."""
    stored, never = random_prompts(1, 5 * BS, seed=5)[0], random_prompts(1, 5 * BS, seed=6)[0]
    sim.run([stored])
    sim.quiesce()
    replica = IndexReplica()
    replica.apply(_snapshot(sequence_hashes(stored, BS) + sequence_hashes(never, BS)))
    # A patient client: on a busy CI machine a 1 s reply timeout marks the leader down.
    planner = Planner(BS, sim.world_size, LeaderClient(sim.endpoint, timeout_s=10.0), replica=replica,
                      store_acks=False)
    try:
        _wait_ready(planner)
        planner.add("stale", never, EMPTY_SALT_HASH)
        assert planner.lookup_pinned("stale", 0, 5.0) == 0  # the replica claimed it; nothing pinned
        planner.add("r", stored, EMPTY_SALT_HASH)
        hit = planner.lookup_pinned("r", 0, 5.0)
        assert hit == 4 * BS, (planner.ready(), planner.counters, planner.client.stats())
        assert planner.client.stats().host.pinned == 4  # pinned before the answer
        planner.load_after_alloc("r", [20, 21, 22, 23, 24], hit)
        plan = planner.step([])
        assert [(op.req_id, op.blocks, op.failed_blocks) for op in plan.loads] == [("r", [20, 21, 22, 23], [])]
        assert plan.loads[0].op_id and len(plan.loads[0].slots) == 4
        planner.client.release(plan.loads[0].op_id)  # (the workers would copy it first)
        planner.add("unused", stored, EMPTY_SALT_HASH)
        assert planner.lookup_pinned("unused", BS, 5.0) == 3 * BS
        assert planner.finished("unused") is False  # never allocated: its pin is released
        planner.settle(5)
        stats = sim.quiesce()
        assert stats.host.pinned == 0 and stats.ops_in_flight == 0
    finally:
        planner.shutdown()


def _wait_ready(planner: Planner, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not planner.ready():
        assert time.monotonic() < deadline, "the leader did not become ready"
        planner.client.refresh()
        time.sleep(0.01)


def test_without_store_acks_finished_keeps_blocks_of_stored_requests(sim: SimEngine) -> None:
    planner = Planner(BS, sim.world_size, LeaderClient(sim.endpoint, timeout_s=10.0), store_acks=False)
    try:
        _wait_ready(planner)
        a, b = random_prompts(1, 3 * BS, seed=7)[0], random_prompts(1, 3 * BS, seed=8)[0]
        planner.add("a", a, EMPTY_SALT_HASH)
        planner.add("b", b, EMPTY_SALT_HASH)
        planner.step([ScheduledRequest("a", 0, len(a), [1, 2, 3], True)])
        plan = planner.settle(10)
        assert [op.req_id for op in plan.stores] == ["a"]
        planner.client.release(plan.stores[0].op_id)  # (the workers would copy it)
        assert planner.finished("a") is True  # a store was sent: the workers report it when done
        planner.step([ScheduledRequest("b", 0, len(b), [4, 5, 6], True)])
        assert planner.finished("b") is False  # its allocation is still posted: released, not sent
        plan = planner.settle(10)
        assert not plan.stores and not plan.delayed_free
        stats = sim.quiesce()
        assert stats.ops_in_flight == 0 and stats.host.writing == 0
    finally:
        planner.shutdown()


class _FixedMatch:
    """A leader client whose every Match finds the same blocks per tier (no leader behind it)."""

    endpoint = "ipc:///tmp/kvbm-planner-no-leader"
    timeout_s = 1.0
    index_seq = 0
    status = None

    def __init__(self, reply: m.MatchReply) -> None:
        self.reply = reply

    def is_ready(self) -> bool:
        return True

    def lookup(self, hashes: object, first_parent: int = 0) -> m.MatchReply:
        return self.reply

    def close(self) -> None:
        pass


def test_tier_blocks_split_a_shorter_load_nearest_tier_first() -> None:
    found = TierBlocks(host=2, disk=1, object=3)
    assert found.total == 6 and found.first(6) == found
    assert found.first(5) == TierBlocks(2, 1, 2) and found.first(3) == TierBlocks(2, 1, 0)
    assert found.first(1) == TierBlocks(1, 0, 0) and found.first(0) == TierBlocks()


def test_a_match_keeps_host_disk_and_object_apart() -> None:
    """G3 and G4 blocks are both staged through G2, but the planner reports them apart: the
    hold-back takes the farthest tier's block, hit sources and counters name each tier."""
    planner = Planner(BS, 1, _FixedMatch(m.MatchReply(host=2, disk=1, object=3)))  # type: ignore[arg-type]
    try:
        planner.add("a", random_prompts(1, 6 * BS, seed=9)[0], EMPTY_SALT_HASH)
        assert planner.lookup("a", 0) == 5 * BS  # the whole prompt matched: one G4 block held back
        assert planner.hit_sources("a", 5 * BS) == {Tier.HOST: 2 * BS, Tier.DISK: BS, Tier.OBJECT: 2 * BS}
        assert planner.hit_sources("a", 3 * BS + 4) == {Tier.HOST: 2 * BS, Tier.DISK: BS, Tier.OBJECT: 4}
        planner.load_after_alloc("a", list(range(6)), 5 * BS)
        c = planner.take_counters()
        assert (c.hit_host_tokens, c.hit_disk_tokens, c.hit_object_tokens) == (2 * BS, BS, 2 * BS)
        assert c.remote_lookups == 1 and c.lookup_tokens == 6 * BS
        assert planner.take_counters() == ConnectorCounters()  # taken: counting starts afresh
    finally:
        planner.shutdown()


def test_group_identities_and_sliding_windows() -> None:
    """Group 0 keeps the sequence hash (a single-group engine is unchanged); other groups' blocks
    get identities of their own; a window's first block is the first one vLLM does not free."""
    from kvbm.connector.planner import first_in_window, group_hash

    hashes = sequence_hashes(random_prompts(1, 4 * BS, seed=9)[0], BS, EMPTY_SALT_HASH)
    assert [group_hash(h, 0) for h in hashes] == hashes
    ids = {group_hash(h, g) for h in hashes for g in range(3)}
    assert len(ids) == 12 and 0 not in ids
    assert first_in_window(6, None, 16) == 0
    # Computing token 96 with a 40-token window reads tokens 57..95: blocks 3..5.
    assert first_in_window(6, 40, 16) == 3
    assert first_in_window(2, 40, 16) == 0
    assert first_in_window(9, 64, 32) == 7  # token 288 reads 225..287: blocks 7 and 8


def test_an_idle_step_waits_for_its_pin_and_emits_the_load_at_once(sim: SimEngine) -> None:
    """A step that computes nothing (vLLM: no token scheduled) passes ``wait_s``: the pin queued
    while scheduling it goes out and its grant comes back within the same step, so the load
    reaches the workers a step earlier than the non-waiting path does."""
    with _held_prompt(sim, seed=6) as (planner, hit):
        assert not planner.loads_pending()
        planner.load_after_alloc("r", [20, 21, 22, 23, 24], hit)
        assert planner.loads_pending() and planner.link.outstanding == 0  # queued for the step
        plan = planner.step([], wait_s=10.0)  # a generous bound: the grant ends the wait
        assert [(op.req_id, len(op.blocks)) for op in plan.loads] == [("r", 4)] and not planner.loads_pending()
        planner.client.release(plan.loads[0].op_id)  # no worker runs this load

"""A rank agent's own reports (adapters that copy on the engine's threads, like SGLang's) against
a real leader process: per-slot ``stored`` and ``flush``."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kvbm.leader.client import LeaderClient, TierBlocks
from kvbm.leader.spawn import spawn_leader
from kvbm.worker.agent import RankAgent, RankIdentity
from kvbm.worker.layout import EngineKV, KVLayout


@pytest.mark.slow  # a leader process
def test_reports_name_the_slots_stored_and_flush_means_applied(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    leader = spawn_leader(cfg, f"agent-{os.getpid()}")
    agents: list[RankAgent] = []
    client = LeaderClient(leader.endpoint)
    try:
        for rank in range(2):
            layout = KVLayout("pages", 1, 4, 1, 64, "uint8")
            kv = EngineKV(layout, [np.zeros((4, 1, 64), np.uint8)])
            agent = RankAgent(leader.endpoint, RankIdentity(rank, 2, 16, "fp"), kv, init_timeout_s=20)
            agent.start()
            agents.append(agent)
        assert all(a.wait_ready(20) for a in agents)
        hashes = [101, 102, 103]
        grant = client.allocate_store(hashes)
        assert grant.op_id and len(grant.slots) == 3
        agents[0].report(grant.op_id, True, "", grant.slots)  # rank 0 stored all three
        agents[1].report(grant.op_id, True, "", grant.slots[:2])  # rank 1 only the first two
        # Once each rank's flush returned, the leader applied both reports: no other wait.
        assert agents[0].flush(10) and agents[1].flush(10)
        assert client.match(hashes) == TierBlocks(host=2, disk=0, object=0)
        stats = client.stats()
        assert stats is not None and stats.host is not None
        assert stats.counters.blocks_stored == 2 and stats.host.writing == 0 and stats.ops_in_flight == 0
    finally:
        client.close()
        for agent in agents:
            agent.close()
        leader.stop()


@pytest.mark.slow  # a leader process
def test_take_finished_waits_for_a_copy_in_flight(make_config) -> None:
    """An engine step with nothing to compute waits on the agent for its load (the GIL released
    to the copy thread) instead of returning empty and spinning: the load comes back whole."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    leader = spawn_leader(cfg, f"agent-wait-{os.getpid()}")
    client = LeaderClient(leader.endpoint)
    layout = KVLayout("pages", 1, 4, 1, 64, "uint8")
    engine = np.zeros((4, 1, 64), np.uint8)
    agent = RankAgent(leader.endpoint, RankIdentity(0, 1, 16, "fp"), EngineKV(layout, [engine]), init_timeout_s=20)
    try:
        agent.start()
        assert agent.wait_ready(20)
        assert agent.take_finished(wait_s=0.01) == []  # nothing in flight: the wait just ends
        engine[1] = 7
        grant = client.allocate_store([201])
        agent.submit_store(grant.op_id, [1], grant.slots)
        (done,) = agent.take_finished(wait_s=10)
        assert done.op_id == grant.op_id and done.ok
        assert agent.flush(10) and client.match([201]).host == 1
        load = client.prepare_load([201])
        agent.submit_load(load.op_id, load.slots, [3])
        (done,) = agent.take_finished(wait_s=10)
        assert done.op_id == load.op_id and done.kind == "load" and done.ok
        assert (engine[3] == 7).all()
    finally:
        client.close()
        agent.close()
        leader.stop()

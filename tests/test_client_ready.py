"""LeaderClient.wait_ready: False while the leader waits for its ranks or is absent, True once
every rank registered, within the poll interval."""

from __future__ import annotations

import time

import pytest

from kvbm.ipc.stats import LeaderState
from kvbm.leader.client import LeaderClient
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel

pytestmark = pytest.mark.slow  # a leader process


def test_wait_ready_follows_the_leader_through_init(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16")
    sim = SimEngine(cfg, world_size=1, model=SimModel(num_layers=1, kv_heads=1, head_dim=32))
    try:
        sim.start_leader()
        client = LeaderClient(sim.endpoint)
        try:
            t0 = time.monotonic()
            assert not client.wait_ready(0.5)  # no rank yet: waiting
            assert 0.4 < time.monotonic() - t0 < 2.0
            assert client.status is not None and client.status.leader_state is LeaderState.WAITING
            sim.start_ranks()
            assert client.wait_ready(30)
            assert client.is_ready()
        finally:
            client.close()
    finally:
        sim.stop()


def test_wait_ready_without_a_leader_times_out(tmp_path) -> None:
    client = LeaderClient(f"ipc://{tmp_path}/nobody.sock")
    t0 = time.monotonic()
    assert not client.wait_ready(0.3)
    assert time.monotonic() - t0 < 1.5
    assert client.status is None
    client.close()

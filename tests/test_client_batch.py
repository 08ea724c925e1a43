"""LeaderClient.allocate_stores: several store allocations in one round trip (RpcClient.call_many)."""

from __future__ import annotations

import time

import pytest

from kvbm.leader.client import LeaderClient
from kvbm.testing.sim.engine import SimEngine
from kvbm.testing.sim.rank import SimModel

pytestmark = pytest.mark.slow  # a leader process


def test_allocate_stores_batches_and_isolates_errors(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16")
    with SimEngine(cfg, world_size=1, model=SimModel(num_layers=1, kv_heads=1, head_dim=32)) as sim:
        client = sim.client
        assert client is not None
        chains = [([11, 12, 13], 0), ([], 0), ([21, 22], 13), ([31, 31], 0), ([11, 41], 0)]
        grants = client.allocate_stores(chains)
        assert len(grants) == 5
        assert grants[0].op_id and grants[0].slots[:3] == grants[0].slots and len(set(grants[0].slots)) == 3
        assert grants[1].op_id == 0 and grants[1].slots == []  # nothing asked
        assert grants[2].op_id not in (0, grants[0].op_id) and len(grants[2].slots) == 2
        assert grants[3].op_id == 0 and grants[3].slots == []  # duplicate hashes: rejected alone
        assert grants[4].slots[0] == -1 and grants[4].slots[1] >= 0  # 11 is already being written
        # The single-chain form answers like one element of the batch.
        one = client.allocate_store([51, 52], 0)
        assert one.op_id and len(one.slots) == 2
        for g in (grants[0], grants[2], grants[4], one):
            client.release(g.op_id)
        assert sim.quiesce().host.writing == 0


def test_allocate_stores_without_a_leader_is_quick_and_empty(tmp_path) -> None:
    client = LeaderClient(f"ipc://{tmp_path}/nobody.sock")
    t0 = time.monotonic()
    grants = client.allocate_stores([([1, 2], 0), ([3], 2)])
    assert [g.op_id for g in grants] == [0, 0] and all(g.slots == [] for g in grants)
    assert time.monotonic() - t0 < 0.5
    client.close()

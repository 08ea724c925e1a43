"""LeaderClient.index_since against a real leader and real ranks: the stream mirrors what matches."""

from __future__ import annotations

import numpy as np

from kvbm.ipc.messages import BlockEventKind
from kvbm.leader.client import LeaderClient
from kvbm.leader.registry import Tier
from kvbm.sim.engine import SimEngine, chat_workload
from kvbm.sim.rank import SimModel


def test_index_stream_mirrors_the_leaders_matchable_set(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    with SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, kv_heads=1, head_dim=32)) as sim:
        client = sim.client
        assert client is not None
        first = client.index_since(0)
        assert first is not None and first.reset and first.hashes.size == 0
        view: set[int] = set()
        seq = first.next_seq
        for prompt in chat_workload(4, 2, system_tokens=64, turn_tokens=40, seed=3):
            sim.run([prompt])
            stats = sim.quiesce()
        assert stats["host_evictions"] > 0, str(stats)  # removals are part of the stream
        while True:
            d = client.index_since(seq)
            assert d is not None and not d.reset
            assert d.kinds.dtype == np.uint8 and d.tiers.dtype == np.uint8 and d.hashes.dtype == np.uint64
            for kind, tier, h in zip(d.kinds, d.tiers, d.hashes.tolist()):
                assert Tier(tier) is Tier.HOST
                if kind == BlockEventKind.STORED:
                    view.add(h)
                elif kind == BlockEventKind.REMOVED:
                    view.discard(h)
                else:
                    view.clear()
            if d.next_seq == seq:
                break
            seq = d.next_seq
        assert len(view) == stats["host_registered"]
        snap = client.index_since(0)
        assert snap is not None and snap.reset and set(snap.hashes.tolist()) == view and snap.next_seq == seq
        assert client.match(sorted(view)[:1]) == (1, 0)


def test_index_since_without_a_leader_is_none(tmp_path) -> None:
    client = LeaderClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.05)
    try:
        assert client.index_since(0) is None
    finally:
        client.close()

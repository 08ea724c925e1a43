"""Leader + TP ranks as real processes: shared pool, ZMQ, init sync, liveness, oracle-checked KV."""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq

from kvbm.ipc import messages as m
from kvbm.ipc.stats import LeaderState
from kvbm.ipc.transport import RpcClient
from kvbm.leader.client import TierBlocks
from kvbm.testing.sim.engine import SimEngine, SimError, chat_workload
from kvbm.testing.sim.rank import SimModel

pytestmark = pytest.mark.slow  # leader and rank processes


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    return list(chat_workload(n, 3, system_tokens=64, turn_tokens=40, seed=seed))


@pytest.mark.parametrize("world, layout", [(1, "kv_first"), (2, "kv_first"), (2, "block_first"), (4, "kv_first")])
def test_store_evict_match_load_is_byte_exact(make_config, world: int, layout: str) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="48")
    model = SimModel(num_layers=3, kv_heads=2, head_dim=32, num_gpu_blocks=40, layout=layout)
    with SimEngine(cfg, world_size=world, model=model) as sim:
        prompts = _prompts(6)
        sim.run(prompts)
        sim.quiesce()
        sim.reset_engine_cache()
        sim.run(prompts)  # second pass: external hits only (the engine forgot everything)
        st = sim.stats
        assert st.mismatches == 0
        assert st.blocks_stored > 0 and st.blocks_loaded > 0
        assert st.tokens_from_host > 0
        assert st.load_failures == st.store_failures == 0
        stats = sim.quiesce()
        # Eviction happened (the pool is smaller than the working set) and accounting is exact.
        assert stats.counters.host_evictions > 0
        assert stats.host.free + stats.host.registered == stats.host.capacity
        assert stats.host.pinned == stats.host.writing == stats.ops_in_flight == 0


def test_second_pass_loads_everything_but_the_last_block(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="256")
    model = SimModel(num_layers=2, kv_heads=1, head_dim=32, num_gpu_blocks=64)
    prompt = list(range(1, 16 * 10 + 1))  # exactly 10 full blocks
    with SimEngine(cfg, world_size=2, model=model) as sim:
        sim.run([prompt])
        sim.quiesce()  # stores are asynchronous: let the leader apply the ranks' acks
        sim.reset_engine_cache()
        sim.run([prompt])
        assert sim.stats.tokens_from_host == 16 * 9  # whole prompt matched: hold back one block
        assert sim.stats.mismatches == 0


def test_missing_rank_times_out_with_a_clear_error_on_both_sides(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="2")
    sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=32))
    try:
        sim.start(ranks=[0])  # rank 1 never comes
        t0 = time.monotonic()
        with pytest.raises(SimError) as err:
            sim.wait_ready(10)
        assert time.monotonic() - t0 < 6
        assert "rank(s) [1] did not register its layout" in str(err.value)
        assert "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=2" in str(err.value)
        status = sim.client.refresh() if sim.client else None
        assert status is not None and status.leader_state is LeaderState.FAILED
        assert "rank(s) [1] did not register" in status.error
    finally:
        sim.stop()


def test_rank_arriving_late_but_in_time_succeeds(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16", DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="8")
    sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=32))
    try:
        sim.start(ranks=[0])
        time.sleep(1.5)
        sim.start_ranks([1])
        sim.wait_ready(10)
        sim.run(_prompts(2))
        assert sim.stats.mismatches == 0
    finally:
        sim.stop()


def test_ranks_first_then_leader(make_config) -> None:
    """vLLM's order: workers register before the leader exists; they retry until it listens."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16")
    sim = SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=32))
    try:
        sim.start(spawn_leader_first=False)
        sim.wait_ready(15)
        sim.run(_prompts(2))
        assert sim.stats.mismatches == 0
    finally:
        sim.stop()


def test_mismatched_layouts_are_rejected(make_config) -> None:
    from kvbm.leader.spawn import spawn_leader

    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="16")
    leader = spawn_leader(cfg, f"sim-{os.getpid()}-mismatch")
    rpc0, rpc1 = RpcClient(leader.endpoint), RpcClient(leader.endpoint)
    try:
        base = dict(world_size=2, num_layers=4, slice_bytes=4096, dtype="float16", engine_layout="2x1024",
                    block_size=16, fingerprint="m", pid=1)
        rpc0.call(m.GetStatus(), 2.0, m.Status)  # connected
        rpc0.send(m.RegisterRank(rank=0, **base))
        bad = dict(base, dtype="bfloat16")
        with pytest.raises(Exception, match="dtype='bfloat16'.*rank 0 reports 'float16'"):
            rpc1.call(m.RegisterRank(rank=1, **bad), 2.0, m.PoolGrant)
    finally:
        rpc0.close()
        rpc1.close()
        leader.stop()


def test_malformed_messages_get_errors_and_change_nothing(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="32")
    with SimEngine(cfg, world_size=1, model=SimModel(num_layers=1, num_gpu_blocks=16)) as sim:
        sim.run(_prompts(2))
        before = sim.quiesce()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(sim.endpoint)
        try:
            for frame in [b"garbage", b"\x94\x01\xa5match\x01\x91\xa3abc", m.encode(m.Match(b"1234567"), 5),
                          m.encode(m.ReleaseOp(999), 6), m.encode(m.TransferDone(rank=0, op_id=12345), 7)]:
                sock.send(frame)
            replies = []
            while sock.poll(500):
                replies.append(m.decode(sock.recv())[1])
            assert len(replies) == 4 and all(isinstance(r, m.ErrorReply) for r in replies)
        finally:
            sock.close()
        after = sim.client.stats()
        assert (after.host, after.ops_in_flight, after.counters.blocks_stored) == \
            (before.host, before.ops_in_flight, before.counters.blocks_stored)
        sim.run(_prompts(2, seed=1))  # still serving
        assert sim.stats.mismatches == 0


def test_dead_rank_is_noticed_within_two_seconds(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="32")
    with SimEngine(cfg, world_size=2, model=SimModel(num_layers=1, num_gpu_blocks=16)) as sim:
        sim.run(_prompts(2))
        victim = sim.ranks[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        t0 = time.monotonic()
        while True:
            st = sim.client.refresh()
            if st is not None and st.dead_ranks == [1]:
                break
            assert time.monotonic() - t0 < 2.5, f"leader did not notice the dead rank: {st}"
            time.sleep(0.05)
        assert st.leader_state is LeaderState.DEGRADED
        assert sim.client.match([1, 2, 3]) == TierBlocks()  # degrades to 'no hits'
        del sim._rank_ids[1]


def test_dead_leader_is_noticed_and_segment_swept(make_config) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="32")
    with SimEngine(cfg, world_size=1, model=SimModel(num_layers=1, num_gpu_blocks=16)) as sim:
        sim.run(_prompts(2))
        segment = f"/dev/shm/kvbm-{sim.instance}-g2"
        assert os.path.exists(segment)
        assert sim.leader is not None and sim.leader.popen is not None
        sim.leader.popen.kill()
        sim.leader.popen.wait()
        t0 = time.monotonic()
        sim.client._status = None  # force a probe now
        sim.client._next_probe = 0
        assert not sim.client.is_ready()
        assert sim.client.match([1, 2]) == TierBlocks()
        assert time.monotonic() - t0 < 2.0
        assert os.path.exists(segment)  # a kill -9 leaves it ...
        from kvbm.ipc.shm import sweep_stale_segments

        assert f"kvbm-{sim.instance}-g2" in sweep_stale_segments()  # ... and the next sweep removes it
        assert not os.path.exists(segment)
        # Restarting works: a new leader for the instance; the ranks register again by themselves.
        sim.client.close()
        sim.start_leader()
        sim.wait_ready(15)
        sim.reset_engine_cache()
        prompts = _prompts(2, seed=3)
        sim.run(prompts)
        sim.quiesce()
        sim.reset_engine_cache()
        sim.run(prompts)
        assert sim.stats.tokens_from_host > 0
        assert sim.stats.mismatches == 0


@pytest.mark.parametrize("world", [1, 2])
def test_mla_world_stores_one_slice_that_every_rank_loads(make_config, world: int) -> None:
    """MLA: every rank holds the same latent KV; the host block is one slice whatever the TP
    size (half the bytes of two slices at TP=2), one rank writes it and every rank's load is
    checked against the oracle byte for byte."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="48")
    model = SimModel(num_layers=4, head_dim=64, num_gpu_blocks=40, layout="block_first", mla=True)
    assert model.slice_bytes == 8192  # 4 layers x 16 tokens x 64 x 2 B: page-aligned, no rounding
    with SimEngine(cfg, world_size=world, model=model) as sim:
        prompts = _prompts(6)
        sim.run(prompts)
        stored = sim.quiesce()
        assert stored.block_bytes == model.slice_bytes  # not world x slice_bytes
        assert stored.world_size == world
        sim.reset_engine_cache()
        sim.run(prompts)
        st = sim.stats
        assert st.mismatches == 0  # every rank's loaded blocks, against the one oracle
        assert st.blocks_loaded > 0 and st.tokens_from_host > 0
        assert st.load_failures == st.store_failures == 0
        stats = sim.quiesce()
        assert stats.counters.host_evictions > 0
        assert stats.host.free + stats.host.registered == stats.host.capacity
        assert stats.host.pinned == stats.host.writing == stats.ops_in_flight == 0

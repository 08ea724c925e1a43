"""DynamoConnector driven by the real vLLM 0.33 scheduler, KV verified byte for byte by the oracle.

Every test builds its engine through the ``make_engine`` fixture (tests/vllm/conftest.py),
which gives it a private kvbm run dir and checks afterwards that no shared-memory segment and
no leader process of the test is left.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvbm.vllm_integration.connector import DynamoConnector, DynamoConnectorMetadata  # noqa: E402
from kvbm.ipc.stats import LeaderState, LeaderStats  # noqa: E402
from kvbm.connector.bootstrap import KvbmNotReady, owned_leader  # noqa: E402
from kvbm.testing.vllm_harness import Engine, ProcWorker, gen_token  # noqa: E402
from kvbm.testing.support import random_prompts  # noqa: E402

VOCAB = 30_000  # prompts' token ids, below the test model's vocabulary (32000)

pytestmark = pytest.mark.vllm


def finish_clean(eng: Engine) -> LeaderStats:
    """The scheduler ends empty and the leader holds no pinned, half-written or in-flight slot."""
    eng.run()
    eng.assert_empty()
    st = eng.quiesce()
    assert st.host.pinned == 0 and st.host.writing == 0 and st.ops_in_flight == 0, st
    assert eng.stats.mismatches == 0
    return st


@pytest.mark.slow  # the engine spawns a leader process
@pytest.mark.parametrize("host_loads", ["auto", "async"])
@pytest.mark.parametrize("layout", ["kv_first", "block_first"])
def test_first_request_after_start_is_stored_and_the_second_loads(make_engine, kvbm_env, layout: str,
                                                                   host_loads: str) -> None:
    """No wait in the harness: the scheduler's connector waited for kvbm when vLLM built it
    (after every worker registered), so the very first request is stored, and the same prompt
    after a prefix-cache reset is loaded from kvbm, every loaded block checked by the oracle.
    ``auto`` is the default on this host-memory engine: a G2 hit loads synchronously, in the step
    that computes the request; ``async`` (the default on GPUs): the request waits a step for it."""
    kvbm_env(DYN_KVBM_HOST_LOADS=host_loads)
    eng = make_engine(layout=layout)
    status = eng.kvbm.client.status  # the last answer the connector's start-up wait got
    assert status is not None and status.leader_state is LeaderState.READY and status.world_size == 1
    p = random_prompts(1, 100, seed=1, vocab=VOCAB)[0]  # 6 full blocks + 4 tokens
    eng.store_and_forget("a", p)  # finishes in its first step: its stores are planned in it
    eng.add("b", p, max_tokens=3)
    idle_before = eng.stats.idle_steps
    eng.step()  # admission: 96 tokens found in kvbm
    req = eng.sched.requests["b"]
    if host_loads == "async":
        assert req.status.name == "WAITING_FOR_REMOTE_KVS"
        assert req.num_computed_tokens == 96
        # It computed nothing: the workers were told so (they wait briefly for the load in such a step).
        assert eng.stats.idle_steps == idle_before + 1
        eng.step_until(lambda: req.status.name == "RUNNING")
    else:  # loaded before this step's forward pass, which computed the 4 tokens past the hit
        assert req.status.name == "RUNNING" and req.num_computed_tokens == 100
        assert eng.stats.idle_steps == idle_before
    # Only the unmatched tail (4 prompt tokens) was scheduled once the load finished.
    assert eng.stats.checked_blocks == 6  # every loaded block checked against the oracle
    finish_clean(eng)
    assert eng.stats.external_hit_tokens == 96
    assert eng.stats.kv_stats["loaded_blocks"] == 6
    assert eng.stats.kv_stats["stored_blocks"] == 6
    # vLLM's own stats carry kvbm's counters (DynamoConnector.build_kv_connector_stats).
    assert eng.stats.sched_kv_stats["hit_host_tokens"] == 96
    assert DynamoConnector.build_kv_connector_stats(eng.stats.sched_kv_stats).reduce()["onboard_host_blocks"] == 6


@pytest.mark.slow  # the engine spawns a leader process
@pytest.mark.parametrize("host_loads", ["auto", "async"])
def test_whole_prompt_hit_holds_back_the_last_block(make_engine, kvbm_env, host_loads: str) -> None:
    kvbm_env(DYN_KVBM_HOST_LOADS=host_loads)
    eng = make_engine()
    p = random_prompts(1, 96, seed=2, vocab=VOCAB)[0]  # exactly 6 blocks
    eng.store_and_forget("a", p, max_tokens=2)
    eng.add("b", p, max_tokens=2)
    eng.step()
    # 5 blocks from kvbm: one is recomputed (with a synchronous load, in this very step)
    assert eng.sched.requests["b"].num_computed_tokens == (80 if host_loads == "async" else 96)
    assert eng.stats.external_hit_tokens == 80
    finish_clean(eng)
    assert eng.stats.external_hit_tokens == 80


@pytest.mark.slow  # the engine spawns a leader process
def test_cache_salt_separates_and_outputs_are_stored(make_engine) -> None:
    """Blocks are stored while a request runs (decode blocks too); another salt never hits."""
    eng = make_engine()
    p = random_prompts(1, 40, seed=3, vocab=VOCAB)[0]
    eng.add("a", p, max_tokens=60, cache_salt="tenant-1")  # 100 tokens: 6 blocks, 4 of them decode
    eng.run()
    eng.quiesce()
    assert eng.stats.kv_stats["stored_blocks"] == 6
    eng.sched.reset_prefix_cache()
    full = p + [gen_token("a", i) for i in range(40, 100)]
    eng.add("other-salt", full, max_tokens=1, cache_salt="tenant-2")
    eng.run()
    assert eng.stats.external_hit_tokens == 0
    eng.sched.reset_prefix_cache()
    eng.add("same-salt", full, max_tokens=1, cache_salt="tenant-1")
    finish_clean(eng)
    assert eng.stats.external_hit_tokens == 96  # all 6 blocks, 2 of them computed while decoding


@pytest.mark.slow  # the engine spawns a leader process
def test_a_rank_that_never_registers_fails_the_engine_start(make_engine, kvbm_env) -> None:
    """TP = 2 with rank 1's worker never started: building the scheduler raises KvbmNotReady at
    the init timeout, one line naming the variable, its value and the missing rank; the engine's
    workers and leader are stopped (make_engine checks no leader or segment is left)."""
    kvbm_env(DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="8")
    t0 = time.monotonic()
    with pytest.raises(KvbmNotReady) as err:
        make_engine(tp=2, ranks=[0])
    waited = time.monotonic() - t0
    line = str(err.value)
    assert "\n" not in line and "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=8 s" in line, line
    assert "rank(s) [1] did not register" in line, line
    assert 8 <= waited < 60, waited  # rank 0's process start is in it too


@pytest.mark.slow  # the engine spawns a leader process
def test_workers_first_worker_owns_the_leader(make_engine) -> None:
    eng = make_engine()
    worker = eng.workers[0].connector
    assert worker._owns_leader and not eng.sched.connector._owns_leader
    handle = owned_leader(eng.kvbm.settings.endpoint)
    assert handle is not None and handle.alive()
    eng.close()
    assert not handle.alive()


@pytest.mark.slow  # the engine spawns a leader process
def test_many_chats_with_preemption_and_chunked_prefill(make_engine) -> None:
    """Hundreds of steps, a small engine pool (preemption) and 64-token chunks; every block a
    request starts from is checked against the oracle, and nothing leaks."""
    eng = make_engine(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64)
    eng.run_chats(conversations=16, turns=4, max_tokens=24)
    finish_clean(eng)
    s = eng.stats
    assert s.steps > 200 and s.preemptions > 0
    assert s.external_hit_tokens > 2000, s
    assert s.kv_stats["loaded_blocks"] > 100
    assert s.checked_blocks > s.kv_stats["loaded_blocks"]


@pytest.mark.slow  # the engine spawns a leader process
def test_async_scheduling_with_disk_tier_and_slow_stores(make_engine, kvbm_env) -> None:
    """AsyncScheduler (updates one step late), block_first layout, a tiny host pool in front of
    a disk tier, and stores slowed down so preemptions and finishes overlap in-flight copies."""
    kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="24", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="512",
             DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
    eng = make_engine(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64, async_scheduling=True,
                      layout="block_first")
    slow_down_stores(eng, 0.002)
    eng.run_chats(conversations=12, turns=3, max_tokens=20, seed=1)
    st = finish_clean(eng)
    assert eng.stats.preemptions > 0
    assert eng.stats.sched_kv_stats.get("onboard_disk_blocks", 0) > 0, eng.stats.sched_kv_stats
    assert st.counters.blocks_loaded_from_disk > 0


def slow_down_stores(eng: Engine, seconds: float) -> None:
    """Fault injection: every store copy on rank 0 takes ``seconds`` longer."""
    agent = eng.workers[0].connector.worker.agent
    assert agent is not None and agent.engine is not None  # mapped before the leader was ready
    copy = agent.engine
    store = copy.store

    def slow_store(blocks: Any, slots: Any) -> None:
        time.sleep(seconds)
        store(blocks, slots)

    copy.store = slow_store


@pytest.mark.slow  # the engine spawns a leader process
def test_finish_while_store_in_flight_delays_the_free(make_engine) -> None:
    eng = make_engine()
    slow_down_stores(eng, 0.3)
    eng.add("a", random_prompts(1, 40, seed=6, vocab=VOCAB)[0], max_tokens=1)  # finishes in its prefill step
    eng.step()
    req = eng.sched.requests.get("a")
    assert req is not None and req.is_finished()  # finished, blocks still held for the store
    assert not eng.kvbm.planner.tracked("a")  # the planner forgot it; only the free waits
    finish_clean(eng)
    assert eng.stats.kv_stats["stored_blocks"] == 2


@pytest.mark.slow  # the engine spawns a leader process
def test_abort_while_waiting_for_the_load(make_engine, kvbm_env) -> None:
    from vllm.v1.request import RequestStatus

    kvbm_env(DYN_KVBM_HOST_LOADS="async")  # a synchronous load has no waiting to abort
    eng = make_engine()
    p = random_prompts(1, 80, seed=7, vocab=VOCAB)[0]
    eng.store_and_forget("a", p)
    eng.add("b", p, max_tokens=1)
    eng.step()
    assert eng.sched.requests["b"].status == RequestStatus.WAITING_FOR_REMOTE_KVS
    eng.sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    finish_clean(eng)


def test_head_split_reads_the_heads_and_their_order_from_the_tensor_shape() -> None:
    from kvbm.ipc.block_format import HeadSplit
    from kvbm.vllm_integration.connector.common import head_split

    # 8 KV heads at TP=2, rank 1: heads 4..7; fp16 dim 128 (256 B a head and token).
    assert head_split((2, 100, 16, 4, 128), 2, 16, 8, 2, 1) == HeadSplit(8, 4, 4, 256)  # [2, blocks, tokens, heads, dim]
    assert head_split((100, 2, 16, 4, 128), 2, 16, 8, 2, 1) == HeadSplit(8, 4, 4, 256)  # [blocks, 2, tokens, heads, dim]
    assert head_split((100, 4, 16, 256), 2, 16, 8, 2, 1) == HeadSplit(8, 4, 4, 512, head_major=True)  # [B, H, N, 2 x dim]
    assert head_split((2, 100, 16, 1, 128), 2, 16, 2, 4, 3) == HeadSplit(2, 1, 1, 256)  # a replicated head
    assert head_split((2, 100, 16, 16, 128), 2, 16, 32, 2, 0) is None  # as many heads as tokens: ambiguous
    assert head_split((2, 100, 16, 2, 128), 2, 16, 8, 2, 0) is None  # the shape does not show vLLM's split
    assert head_split((100, 16, 576), 2, 16, 0, 2, 0) is None  # MLA: no heads
    assert head_split((2, 100, 16, 3, 128), 2, 16, 6, 4, 0) is None  # 6 heads do not split over 4 ranks


@pytest.mark.slow  # the engine spawns a leader process
def test_a_disk_cache_written_at_tp2_serves_tp1(make_engine, kvbm_env) -> None:
    """The model's 2 KV heads at TP = 2 (one per rank process) under the real scheduler, with
    DYN_KVBM_BLOCK_FORMAT=heads: the ranks register their heads, so a block is the heads format,
    the same bytes as at TP = 1, and a TP = 1
    engine of the same model serves the TP = 2 engine's persistent disk cache, every loaded byte
    checked against the per-head oracle."""
    kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="24", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="256",
             DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1", DYN_KVBM_DISK_CACHE_PERSIST="1", DYN_KVBM_BLOCK_FORMAT="heads")
    p = random_prompts(1, 100, seed=12, vocab=VOCAB)[0]  # 6 full blocks + 4 tokens
    tp2 = make_engine(tp=2, kv_heads=1, num_blocks=40, max_num_batched_tokens=64)
    tp2.add("a", p, max_tokens=1)
    finish_clean(tp2)
    assert tp2.quiesce().disk_tier.counters.offloaded_blocks == 6
    tp2.close()
    [name] = os.listdir(os.environ["DYN_KVBM_DISK_CACHE_DIR"])
    tp1 = make_engine(kv_heads=2, num_blocks=40, max_num_batched_tokens=64)
    assert tp1.workers[0].connector.worker.agent.ident.heads.count == 2
    assert tp1.quiesce().disk.registered == 6  # the TP = 2 engine's file, re-indexed
    tp1.add("b", p, max_tokens=1)
    finish_clean(tp1)
    s = tp1.stats
    assert s.external_hit_tokens == 96 and s.checked_blocks == 6 and s.mismatches == 0
    assert os.listdir(os.environ["DYN_KVBM_DISK_CACHE_DIR"]) == [name]


@pytest.mark.slow  # the engine spawns a leader process
def test_load_errors_are_recomputed(make_engine, kvbm_env) -> None:
    """A disk block that fails its checksum on staging is reported through
    get_block_ids_with_load_errors and vLLM recomputes it: no wrong byte is ever served."""
    kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="256",
             DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
    eng = make_engine()
    p = random_prompts(1, 100, seed=8, vocab=VOCAB)[0]
    eng.add("a", p, max_tokens=1)
    eng.run()
    eng.quiesce()  # a's blocks written to disk (pinned in G2 until then, so not yet evictable)
    for i in range(4):  # push a's blocks out of the 8-block host pool, onto disk only
        eng.add(f"filler{i}", random_prompts(1, 96, seed=100 + i, vocab=VOCAB)[0], max_tokens=1)
    eng.run()
    eng.quiesce()
    disk_dir = os.environ["DYN_KVBM_DISK_CACHE_DIR"]
    for name in os.listdir(disk_dir):
        with open(os.path.join(disk_dir, name), "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            f.write(b"\xa5" * size)  # corrupt every block on disk
    eng.sched.reset_prefix_cache()
    eng.add("b", p, max_tokens=1)
    finish_clean(eng)
    assert eng.stats.sched_kv_stats.get("load_error_blocks", 0) > 0, eng.stats.sched_kv_stats


@pytest.mark.slow  # the engine spawns a leader process
def test_leader_killed_mid_run(make_engine) -> None:
    """The leader dies: the connector logs it once, reports no hits, and requests keep
    completing by recomputing, without stalling the scheduler."""
    eng = make_engine(num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64)
    leader = owned_leader(eng.kvbm.settings.endpoint)
    assert leader is not None and leader.popen is not None
    state = {"steps": 0}

    def kill_at_step_80(e: Engine) -> None:
        state["steps"] += 1
        if state["steps"] == 80:
            leader.popen.kill()
            leader.popen.wait()

    t0 = time.monotonic()
    eng.run_chats(conversations=10, turns=3, max_tokens=16, seed=2, on_step=kill_at_step_80)
    assert state["steps"] > 120
    eng.run()
    eng.assert_empty()
    assert eng.stats.mismatches == 0
    assert time.monotonic() - t0 < 60
    hits_before = eng.stats.external_hit_tokens
    eng.sched.reset_prefix_cache()
    eng.add("after", random_prompts(1, 64, seed=9, vocab=VOCAB)[0], max_tokens=2)
    eng.run()
    assert eng.stats.external_hit_tokens == hits_before


@pytest.mark.slow  # the engine spawns a leader process
def test_kv_events_carry_token_ids_and_reset_cache(make_engine) -> None:
    """The leader's events through vLLM's publisher: a prompt's stored blocks as one chained
    BlockStored with kvbm's sequence hashes and the blocks' tokens; a salted request's blocks
    without tokens (a router keys a block by its tokens alone); a reset is AllBlocksCleared."""
    from vllm.distributed.kv_events import AllBlocksCleared, BlockStored

    from kvbm.hashing import sequence_hashes

    eng = make_engine(kv_events=True)
    published: list[Any] = []
    eng.sched.kv_event_publisher.publish = lambda batch: published.extend(batch.events)
    p, salted = random_prompts(2, 64, seed=10, vocab=VOCAB)
    eng.add("a", p, max_tokens=1)
    eng.add("s", salted, max_tokens=1, cache_salt="tenant-1")
    eng.run()
    eng.quiesce()
    eng.add("tick", random_prompts(1, 8, seed=11, vocab=VOCAB)[0], max_tokens=1)  # one more step to collect the events
    eng.run()
    stored = [e for e in published if isinstance(e, BlockStored) and e.medium == "CPU"]
    assert all(e.block_size == 16 for e in stored)
    by_tokens = {tuple(e.token_ids): e for e in stored}
    assert set(by_tokens) == {tuple(p), ()}, by_tokens.keys()
    mine = by_tokens[tuple(p)]
    assert mine.block_hashes == sequence_hashes(p, 16) and mine.parent_block_hash is None
    assert len(by_tokens[()].block_hashes) == 4  # the salted prompt's blocks, announced without tokens
    assert eng.sched.reset_prefix_cache(reset_connector=True)
    eng.add("b", p, max_tokens=1)
    finish_clean(eng)
    assert eng.stats.external_hit_tokens == 0  # the kvbm cache was cleared too
    assert any(isinstance(e, AllBlocksCleared) for e in published)


@pytest.mark.slow  # the engine spawns a leader process; Dynamo's indexer process
def test_dynamos_indexer_fed_by_vllms_publisher_places_kvbms_blocks(make_engine, tmp_path) -> None:
    """vLLM's own ZMQ publisher, carrying the connector's events next to vLLM's G1 events, feeds
    Dynamo's indexer process: it places the prompt on the instance in the host tier (kvbm's
    ``CPU`` blocks), which only events with token ids achieve."""
    pytest.importorskip("dynamo.indexer", reason="Dynamo's indexer: pip install ai-dynamo-runtime==1.6.1")
    from vllm.distributed.kv_events import ZmqEventPublisher

    from kvbm.testing.indexer import Indexer
    from kvbm.testing.support import free_port

    eng = make_engine(kv_events=True)
    port = free_port()
    publisher = ZmqEventPublisher(0, endpoint=f"tcp://*:{port}")  # vLLM binds only a wildcard address
    eng.sched.kv_event_publisher = publisher
    try:
        with Indexer({"1": f"tcp://127.0.0.1:{port}"}, 16, tmp_path / "indexer.log") as idx:
            time.sleep(1.0)  # its subscription reaches the PUB socket
            p = random_prompts(1, 64, seed=12, vocab=VOCAB)[0]
            eng.add("a", p, max_tokens=1)
            eng.run()
            eng.quiesce()
            eng.add("tick", random_prompts(1, 8, seed=13, vocab=VOCAB)[0], max_tokens=1)
            eng.run()
            deadline = time.monotonic() + 15
            while idx.query(p)["instances"].get("1", {}).get("cpu", 0) < 64 and time.monotonic() < deadline:
                time.sleep(0.1)
            answer = idx.query(p)["instances"].get("1", {})
            assert answer.get("cpu") == 64 and answer.get("longest_matched") == 64, answer
    finally:
        publisher.shutdown()
    finish_clean(eng)


def test_metadata_is_plain_data() -> None:
    import pickle

    from kvbm.vllm_integration.connector.metadata import LoadOp, StoreOp

    meta = DynamoConnectorMetadata(loads=[LoadOp("r", 1, [3], [4], [5])], stores=[StoreOp("r", 2, [6], [7])],
                                   preempted=["x"], delayed_free=["y"])
    assert pickle.loads(pickle.dumps(meta)) == meta


@pytest.mark.slow  # the engine spawns a leader process
def test_tp2_two_worker_processes(make_engine) -> None:
    """TP = 2: two worker-role connectors in two processes (kv_connector_extra_config
    kvbm_rank / kvbm_world_size), each copying and checking its own slice of every block."""
    eng = make_engine(tp=2, num_blocks=40, max_num_seqs=8, max_num_batched_tokens=64)
    assert not eng.sched.connector._owns_leader  # rank 0's process spawned it and stops it
    status = eng.kvbm.client.status
    assert status.world_size == 2
    eng.run_chats(conversations=8, turns=3, max_tokens=16, seed=3)
    finish_clean(eng)
    s = eng.stats
    assert s.external_hit_tokens > 0 and s.preemptions > 0
    assert s.kv_stats["loaded_blocks"] == 2 * s.sched_kv_stats["onboard_host_blocks"]
    # Closing waits neither for the ranks' interpreter teardown nor for an answer a killed rank
    # process can never send (each cost 30 s).
    workers = list(eng.workers)
    assert all(isinstance(w, ProcWorker) for w in workers)
    workers[1].proc.kill()
    workers[1].proc.join()
    t0 = time.monotonic()
    eng.close()
    assert time.monotonic() - t0 < 5.0, f"closing took {time.monotonic() - t0:.1f} s"
    assert not any(w.proc.is_alive() for w in workers)



def test_tp2_mla_one_copy_every_rank_loads_it(make_engine, mla_model_dir) -> None:
    """An MLA model (model_config.use_mla, per-layer KV [num_blocks, block_size, latent]) at
    TP = 2 under the real scheduler: the ranks register one replicated slice, so the host block
    is one rank's bytes; rank 0 alone stores it and both ranks load it, every loaded block checked
    against the (rank-independent) oracle."""
    from kvbm.testing.vllm_harness import MLA_LATENT
    from kvbm.ipc.shm import align_up

    eng = make_engine(tp=2, model_dir=mla_model_dir, layout="mla", num_blocks=40, max_num_batched_tokens=64)
    assert eng.kvbm.client.status.world_size == 2
    p = random_prompts(1, 100, seed=3, vocab=VOCAB)[0]  # 6 full blocks + 4 tokens
    eng.add("a", p, max_tokens=1)
    eng.run()
    st = eng.quiesce()
    assert st.block_bytes == align_up(2 * 16 * MLA_LATENT * 2)  # 2 layers x 16 tokens x 40 x fp16: one slice
    assert eng.sched.reset_prefix_cache()
    eng.add("b", p, max_tokens=3)
    finish_clean(eng)
    s = eng.stats
    assert s.external_hit_tokens == 96 and s.checked_blocks == 6 and s.mismatches == 0  # checked on every rank
    assert s.kv_stats["loaded_blocks"] == 2 * 6  # both ranks loaded all 6
    assert s.kv_stats["stored_blocks"] == 6  # rank 0 alone copied them

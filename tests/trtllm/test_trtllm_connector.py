"""kvbm's TensorRT-LLM connector driven by an executor-like loop in TensorRT-LLM's call order,
every loaded byte checked against the KV oracle (see tests/trtllm/trt_executor.py)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from trt_executor import Executor  # noqa: E402

from kvbm.connector.bootstrap import owned_leader  # noqa: E402
from kvbm.connector.planner import ConnectorCounters  # noqa: E402
from kvbm.ipc.shm import sweep_stale_segments  # noqa: E402
from kvbm.testing.support import random_prompts

VOCAB = 1000  # the stand-in executor's token ids


@pytest.fixture
def executor(trt_env):
    made: list[Executor] = []

    def make(**kw) -> Executor:
        ex = Executor(**kw)  # ready when built: it ran wait_for_initialization
        made.append(ex)
        return ex

    yield make
    for ex in made:
        ex.close()


def counters(ex: Executor) -> ConnectorCounters:
    assert ex.scheduler.planner is not None
    return ex.scheduler.planner.take_counters()


@pytest.mark.slow  # the executor spawns a leader process
def test_hit_after_engine_cache_dropped(executor):
    ex = executor()
    batch = random_prompts(3, 16 * 4 + 5, seed=1, vocab=VOCAB, low=0)
    for p in batch:
        ex.submit(p)
    t = ex.run()
    assert t.errors == [] and t.external_tokens == 0
    assert counters(ex).offload_blocks == 3 * 4
    ex.drop_engine_cache()
    for p in batch:
        ex.submit(p)
    t = ex.run()
    assert t.errors == [], t.errors
    assert t.external_tokens == 3 * 4 * 16  # every full prompt block comes from kvbm
    assert counters(ex).hit_host_tokens == 3 * 4 * 16
    assert ex.load_failures() == 0


@pytest.mark.slow  # the executor spawns a leader process
def test_blocks_completed_by_decoding_are_stored(executor):
    ex = executor()
    rid = ex.submit(random_prompts(1, 16 * 2 + 4, seed=10, vocab=VOCAB, low=0)[0], max_tokens=30)
    ex.run()
    assert counters(ex).offload_blocks == 4  # 2 prompt blocks, 2 completed while decoding
    ex.drop_engine_cache()
    ex.submit(ex.outputs[rid][: 16 * 4 + 1])  # the conversation's next turn
    t = ex.run()
    assert t.errors == [] and t.external_tokens == 4 * 16


@pytest.mark.slow  # the executor spawns a leader process
def test_whole_prompt_hit_leaves_a_token(executor):
    ex = executor()
    p = random_prompts(1, 16 * 3, seed=2, vocab=VOCAB, low=0)[0]
    ex.submit(p)
    ex.run()
    ex.drop_engine_cache()
    ex.submit(p)
    t = ex.run()
    assert t.errors == [] and t.external_tokens == 2 * 16  # the last block is held back


@pytest.mark.slow  # the executor spawns a leader process
def test_churn_with_eviction_and_reloads(executor, trt_env):
    trt_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="24")
    ex = executor(num_blocks=32)
    rnd = random.Random(3)
    head = random_prompts(1, 16, seed=30, vocab=VOCAB, low=0)[0]  # the 10 prompts share one block
    pool = random_prompts(10, 16 * 2 + 7, seed=3, vocab=VOCAB, low=0, prefix=head)
    for _ in range(4):
        for p in rnd.sample(pool, 6):
            ex.submit(p, max_tokens=rnd.randrange(1, 20))
        ex.run()
        ex.drop_engine_cache()
    t = ex.totals
    assert t.errors == [], t.errors[:5]
    assert t.external_tokens > 0
    assert ex.load_failures() == 0


@pytest.mark.slow  # the executor spawns a leader process
def test_cache_salt_isolation(executor):
    ex = executor()
    p = random_prompts(1, 16 * 4 + 3, seed=4, vocab=VOCAB, low=0)[0]
    ex.submit(p, salt=7)
    ex.run()
    ex.drop_engine_cache()
    ex.submit(p, salt=8)  # another tenant: no hit
    ex.submit(p)  # no salt: no hit either
    t = ex.run()
    assert t.external_tokens == 0 and t.errors == []
    ex.drop_engine_cache()
    ex.submit(p, salt=7)
    t = ex.run()
    assert t.external_tokens == 4 * 16 and t.errors == []


@pytest.mark.slow  # the executor spawns a leader process
def test_multimodal_and_generation_only_do_no_lookup(executor):
    ex = executor()
    p = random_prompts(1, 16 * 3 + 1, seed=5, vocab=VOCAB, low=0)[0]
    ex.submit(p)
    ex.run()
    ex.drop_engine_cache()
    ex.submit(p, multimodal_positions=[0])
    ex.submit(p, is_generation_only_request=True)
    t = ex.run()
    assert t.external_tokens == 0 and t.errors == []


@pytest.mark.slow  # the executor spawns a leader process
def test_leader_death_mid_run(executor):
    ex = executor()
    batch = random_prompts(4, 16 * 3 + 4, seed=7, vocab=VOCAB, low=0)
    for p in batch:
        ex.submit(p)
    ex.run()
    ex.drop_engine_cache()
    leader = owned_leader(ex.scheduler.instance.endpoint)
    assert leader is not None and leader.popen is not None
    leader.popen.kill()
    leader.popen.wait()
    sweep_stale_segments()  # what the next leader's start does; a killed leader cannot unlink
    ex.drop_engine_cache(quiesce=False)
    before = ex.totals.external_tokens
    for p in batch + random_prompts(4, 16 * 3 + 4, seed=8, vocab=VOCAB, low=0):
        ex.submit(p, max_tokens=5)
        ex.step()  # some steps run while the client still thinks the leader is there
    t = ex.run()
    assert t.errors == [], t.errors[:5]
    assert ex.load_failures() == 0
    # Hits found before the death was noticed were pinned, so loaded; none after.
    ex.drop_engine_cache(quiesce=False)
    mark = t.external_tokens
    for p in batch:
        ex.submit(p)
    t = ex.run()
    assert t.external_tokens == mark and t.errors == []
    assert mark >= before


@pytest.mark.slow  # the executor spawns a leader process
def test_disk_tier_spill(executor, trt_env):
    trt_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="128",
            DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
    ex = executor(num_blocks=40)
    batch = random_prompts(8, 16 * 3 + 1, seed=9, vocab=VOCAB, low=0)
    for p in batch:
        ex.submit(p, max_tokens=1)
        ex.run()  # one at a time: the host pool (8 blocks) spills to disk
    assert ex.scheduler.planner is not None
    counters(ex)
    ex.drop_engine_cache()
    for p in batch[:4]:  # the oldest: long gone from the host pool
        ex.submit(p, max_tokens=1)
    t = ex.run()
    assert t.errors == [], t.errors[:5]
    c = counters(ex)
    assert c.hit_disk_tokens > 0, c
    assert ex.load_failures() == 0


def test_import_kvbm_stays_light():
    code = ("import sys, kvbm, kvbm.connector.planner, kvbm.worker.agent; "
            "bad = [m for m in ('torch', 'tensorrt_llm', 'vllm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_partial_reuse_is_refused_and_the_connector_stays_idle(trt_env, caplog):
    from tensorrt_llm.bindings.internal.batch_manager import LlmRequest
    from tensorrt_llm.llmapi.llm_args import KvCacheConfig, TorchLlmArgs

    from kvbm.trtllm_integration.connector import DynamoKVBMConnectorLeader, DynamoKVBMConnectorWorker

    args = TorchLlmArgs(kv_cache_config=KvCacheConfig(16, enable_partial_reuse=True))
    leader = DynamoKVBMConnectorLeader(args)
    worker = DynamoKVBMConnectorWorker(args)
    assert leader.planner is None and leader.instance is None
    assert "enable_partial_reuse: false" in caplog.text
    assert leader.get_num_new_matched_tokens(LlmRequest(1, list(range(40))), 0) == (0, False)
    assert worker.get_finished([1], []) == ([1], [])


@pytest.mark.slow  # the executor spawns a leader process
def test_a_page_outside_the_window_stops_storing_the_request(executor):
    from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import RequestData, SchedulerOutput

    ex = executor()
    rid = ex.submit(random_prompts(1, 16 * 2 + 4, seed=11, vocab=VOCAB, low=0)[0], max_tokens=30)
    ex.step()  # the context step: its 2 prompt blocks are stored
    # A report whose block ids hold -1 (a page that left the attention window).
    plan = ex.scheduler.build_connector_meta(SchedulerOutput(cached_requests=[RequestData(rid, [], [-1], 36, 1)]))
    assert plan.is_empty() and not ex.scheduler.planner.tracked(str(rid))
    t = ex.run()
    assert t.errors == [] and ex.load_failures() == 0
    assert counters(ex).offload_blocks == 2  # the blocks its decoding completed are not stored


def test_a_process_alone_names_each_engine_apart(trt_env, monkeypatch):
    from trt_executor import llm_args

    from kvbm.config import load_config
    from kvbm.trtllm_integration.connector.settings import agree_instance_name

    config = load_config()
    a, b = llm_args(16, 1, 0), llm_args(16, 1, 0)
    name = agree_instance_name(a, config)
    assert name.startswith("trtllm-") and f"-{os.getpid()}-" in name
    assert agree_instance_name(a, config) == name  # the engine's other role
    assert agree_instance_name(b, config) != name  # another engine in the same process
    monkeypatch.setenv("DYN_KVBM_LEADER_ENDPOINT", "tcp://127.0.0.1:5999")
    given = load_config()
    assert agree_instance_name(a, given) == agree_instance_name(b, given) != name  # named by the endpoint


def test_mla_pool_stores_one_slice(executor):
    """kv_factor 1 (MLA's K-only cache): the ranks register one replicated slice; the host block
    is that slice, and every loaded byte still matches the oracle."""
    from trt_executor import HEAD_ELEMS, LAYERS

    ex = executor(kv_factor=1)
    batch = random_prompts(2, 16 * 3 + 5, seed=21, vocab=VOCAB, low=0)
    for p in batch:
        ex.submit(p)
    assert ex.run().errors == []
    from kvbm.ipc.shm import align_up

    stats = ex.scheduler.planner.client.stats()
    assert stats is not None and stats.block_bytes == align_up(LAYERS * 1 * 16 * HEAD_ELEMS * 2)  # fp16, one slice
    inst = ex.ranks.host.worker.instance
    assert inst.replicated and "tp=replicated" in inst.fingerprint  # names no TP size
    ex.drop_engine_cache()
    for p in batch:
        ex.submit(p)
    t = ex.run()
    assert t.errors == [] and t.external_tokens == 2 * 3 * 16 and ex.load_failures() == 0


def test_layer_groups_of_one_window_fold_to_the_flat_forms(executor):
    """One window size is one layer group: the grouped calls serve it as the flat ones do."""
    ex = executor(windows=[1024, 1024])
    batch = random_prompts(2, 16 * 3 + 5, seed=22, vocab=VOCAB, low=0)
    for p in batch:
        ex.submit(p)
    assert ex.run().errors == []
    ex.drop_engine_cache()
    for p in batch:
        ex.submit(p)
    t = ex.run()
    assert t.errors == [] and t.external_tokens == 2 * 3 * 16 and ex.load_failures() == 0


def test_variable_sliding_window_model_starts_and_runs_with_kvbm_declining(executor, caplog):
    """VSWA: two window sizes, two layer groups with their own pages (-1 outside the window).
    The connector passes the bring-up check, declines to cache (logged) and the engine serves
    every request with its own KV (oracle-checked on reuse)."""
    ex = executor(windows=[32, 1024])
    assert ex.scheduler.planner is None and "variable sliding window" in caplog.text
    head = random_prompts(1, 16 * 2, seed=23, vocab=VOCAB, low=0)[0]
    batch = random_prompts(3, 16 * 2 + 5, seed=24, vocab=VOCAB, low=0, prefix=head)
    ex.submit(batch[0], max_tokens=20)
    ex.run()
    for p in batch[1:]:  # reuse the first one's head from the engine's own cache
        ex.submit(p, max_tokens=20)
    t = ex.run()
    assert t.errors == [] and t.finished == 3 and t.external_tokens == 0
    assert t.local_hit_tokens > 0  # the engine's own reuse of the shared head ran too


def test_a_flat_only_connector_is_rejected_for_several_layer_groups(trt_env):
    from tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector import (
        KvCacheConnectorScheduler, KvCacheConnectorWorker, check_layer_groups)

    from kvbm.trtllm_integration.connector import DynamoKVBMConnectorLeader, DynamoKVBMConnectorWorker

    class FlatScheduler(DynamoKVBMConnectorLeader):
        update_state_after_alloc_by_layer_group = KvCacheConnectorScheduler.update_state_after_alloc_by_layer_group
        request_finished_by_layer_group = KvCacheConnectorScheduler.request_finished_by_layer_group

    class FlatWorker(DynamoKVBMConnectorWorker):
        register_kv_cache_layout = KvCacheConnectorWorker.register_kv_cache_layout

    from trt_executor import llm_args

    args = llm_args(16, 1, 0, [32, 1024])
    sched, worker = DynamoKVBMConnectorLeader(args), DynamoKVBMConnectorWorker(args)
    check_layer_groups(sched, worker, 2)  # kvbm's connector implements the grouped forms
    with pytest.raises(ValueError, match="update_state_after_alloc_by_layer_group"):
        check_layer_groups(FlatScheduler(args), FlatWorker(args), 2)
    check_layer_groups(FlatScheduler(args), FlatWorker(args), 1)  # one group: the flat forms do


def test_context_parallelism_is_refused(trt_env):
    """cp_size > 1 splits a block's tokens across ranks (MLA's latent is then not the same on
    every rank): kvbm refuses it rather than store a rank's share as the block."""
    from types import SimpleNamespace

    from trt_executor import llm_args

    from kvbm.trtllm_integration.connector.settings import UnsupportedSetup, settings_for

    args = llm_args(16, 2, 0)
    mapping = SimpleNamespace(**vars(args.parallel_config.to_mapping()), cp_size=2)
    args.parallel_config = SimpleNamespace(to_mapping=lambda: mapping)
    with pytest.raises(UnsupportedSetup, match="context parallelism"):
        settings_for(args)

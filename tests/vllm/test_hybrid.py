"""DynamoConnector under vLLM's hybrid KV cache manager, driven by the real vLLM 0.33 scheduler.

Two KV cache groups whose layer i share KV tensor i, as vLLM lays out a hybrid model: full
attention + sliding window (kvbm offloads both, one kvbm block per (group, block)), and full
attention + SSM state (kvbm cannot restore SSM state: it stays out, the engine runs). The
oracle checks every block a (re)admitted request reads, in every attention group.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvbm.testing.vllm_harness import Engine, EngineSpec, gen_token, make_vllm_config  # noqa: E402
from kvbm.vllm_integration.connector import DynamoConnector  # noqa: E402

pytestmark = pytest.mark.vllm

BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # layers x K/V x block_size x kv_heads x head_dim x fp16


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30000) for _ in range(n)]


def test_kvbm_keeps_vllms_hybrid_kv_cache_manager_on(model_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM turns its hybrid KV cache manager off for a connector that is not SupportsHMA (and
    on a platform without it: this CPU build of vLLM stands in for a GPU one here)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "support_hybrid_kv_cache", lambda: True)
    vc = make_vllm_config(EngineSpec(model_dir=model_dir, engine_id="hma-check"))
    assert vc.kv_transfer_config is not None
    assert KVConnectorFactory.supports_hma_config(vc.kv_transfer_config)
    assert not vc.scheduler_config.disable_hybrid_kv_cache_manager


@pytest.mark.parametrize("layout", ["kv_first", "block_first"])
def test_sliding_window_model_hits_after_a_prefix_cache_reset(make_engine, layout: str) -> None:
    """Both groups are stored; after the engine's cache is reset the same prompt loads the full
    group's 6 blocks and the sliding-window group's 3 blocks inside the 40-token window of token
    96 (blocks 3..5), every one checked by the oracle; a longer prompt sharing that prefix hits
    too, and a decode run past the window keeps every group's KV right."""
    eng: Engine = make_engine(layout=layout, hybrid="sliding", sliding_window=40)
    assert eng.kvbm is not None and eng.kvbm.groups.windows == (None, 40)
    p = prompt(1, 100)  # 6 full blocks + 4 tokens
    eng.add("a", p, max_tokens=1)
    eng.run()
    eng.quiesce()
    assert eng.sched.reset_prefix_cache()
    eng.add("b", p, max_tokens=40)  # decodes past the window: sliding-window blocks are freed
    eng.step()
    req = eng.sched.requests["b"]
    assert req.num_computed_tokens == 96
    eng.step_until(lambda: req.status.name == "RUNNING")
    assert eng.stats.checked_blocks == 6 + 3
    eng.run()
    eng.assert_empty()
    st = eng.quiesce()
    assert st.host.pinned == 0 and st.host.writing == 0 and st.ops_in_flight == 0, st
    # A block's KV is one engine block of the 2 KV tensors both groups share (a single-group
    # model with the same 4 layers copies twice that); the host block rounds it up to 4 KiB.
    assert eng.workers[0].connector.worker.agent.kv.layout.slice_bytes == BLOCK_BYTES
    assert st.block_bytes == 4096
    assert eng.stats.mismatches == 0
    assert eng.stats.external_hit_tokens == 96
    assert eng.stats.kv_stats["loaded_blocks"] == 9
    # "b" stored the blocks its decode completed (sliding-window ones right after their step):
    # a follow-up turn (its 139 computed tokens + more) hits all 8 full blocks.
    assert eng.sched.reset_prefix_cache()
    follow = p + [gen_token("b", pos) for pos in range(100, 140)] + prompt(3, 30)
    eng.add("c", follow, max_tokens=2)
    eng.step()
    assert eng.sched.requests["c"].num_computed_tokens == 128
    eng.run()
    eng.assert_empty()
    assert eng.stats.mismatches == 0


def test_sliding_window_load_errors_recompute_the_request(make_engine, kvbm_env) -> None:
    """Corrupt disk blocks fail their staging: vLLM takes no block-level load errors from a
    multi-group model, so the request is reported as a failed receive and recomputed whole."""
    kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8", DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS="256",
             DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="1")
    eng: Engine = make_engine(hybrid="sliding", sliding_window=40)
    p = prompt(8, 100)
    eng.add("a", p, max_tokens=1)
    eng.run()
    eng.quiesce()
    for i in range(4):  # push a's blocks out of the 8-block host pool, onto disk only
        eng.add(f"filler{i}", prompt(100 + i, 96), max_tokens=1)
    eng.run()
    eng.quiesce()
    disk_dir = os.environ["DYN_KVBM_DISK_CACHE_DIR"]
    for name in os.listdir(disk_dir):
        with open(os.path.join(disk_dir, name), "r+b") as f:
            f.write(b"\xa5" * os.fstat(f.fileno()).st_size)  # corrupt every block on disk
    eng.sched.reset_prefix_cache()
    eng.add("b", p, max_tokens=1)
    eng.run()
    eng.assert_empty()
    assert eng.stats.mismatches == 0
    assert eng.stats.sched_kv_stats.get("load_error_blocks", 0) > 0, eng.stats.sched_kv_stats
    assert eng.stats.external_hit_tokens > 0  # promised at admission
    assert eng.stats.checked_blocks == 0  # and b was recomputed whole: it started from no block


def test_sliding_window_chats_with_preemption(make_engine) -> None:
    """Many conversations on a small engine (chunked prefill, preemption, async stores): every
    block any request reads, in both groups, is the oracle's."""
    eng: Engine = make_engine(hybrid="sliding", sliding_window=40, num_blocks=48, max_num_batched_tokens=64)
    eng.run_chats(conversations=4, turns=3, system=64, turn_len=40)
    eng.run()
    eng.assert_empty()
    st = eng.quiesce()
    assert st.host.pinned == 0 and st.host.writing == 0 and st.ops_in_flight == 0, st
    assert eng.stats.mismatches == 0
    assert eng.stats.checked_blocks > 0


@pytest.mark.parametrize("layout", ["kv_first", "block_first"])
def test_ssm_hybrid_model_runs_with_kvbm_out_of_the_way(make_engine, layout: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """kvbm cannot restore SSM state for tokens it would load: it offers nothing (its connector
    stays inactive, no leader starts) and the engine, hybrid manager on, runs correctly."""
    eng: Engine = make_engine(layout=layout, hybrid="mamba")
    connector: Any = eng.sched.connector
    assert isinstance(connector, DynamoConnector) and connector.scheduler is None
    assert "MambaSpec" in caplog.text
    p = prompt(5, 100)
    eng.add("a", p, max_tokens=3)
    eng.run()
    eng.add("b", p, max_tokens=3)
    eng.run()
    eng.assert_empty()
    assert eng.stats.mismatches == 0
    assert eng.stats.external_hit_tokens == 0


def test_groups_kvbm_offloads_and_those_it_stays_out_of(model_dir: str) -> None:
    """The planner gets a full-attention group first; a model kvbm cannot cover is refused."""
    import torch
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    from kvbm.testing.vllm_harness import make_kv_cache_config
    from kvbm.connector.setup import UnsupportedSetup
    from kvbm.vllm_integration.connector.common import kv_groups

    spec = EngineSpec(model_dir=model_dir, engine_id="groups", hybrid="sliding", sliding_window=40)
    cfg = make_kv_cache_config(spec)
    assert kv_groups(cfg).order == (0, 1) and kv_groups(cfg).windows == (None, 40)
    swapped = KVCacheConfig(num_blocks=cfg.num_blocks, kv_cache_tensors=[], kv_cache_groups=cfg.kv_cache_groups[::-1])
    groups = kv_groups(swapped)
    assert groups.order == (1, 0) and groups.windows == (None, 40)
    assert groups.pick(([0, 0, 7], [3, 4, 5])) == [[3, 4, 5], [-1, -1, 7]]  # the null block is no block
    assert kv_groups(make_kv_cache_config(EngineSpec(model_dir=model_dir, engine_id="one"))).order == (0,)
    sw_only = KVCacheConfig(num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["l0"], SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=8, dtype=torch.float16, sliding_window=40))])
    with pytest.raises(UnsupportedSetup, match="disable-hybrid-kv-cache-manager"):
        kv_groups(sw_only)
    with pytest.raises(UnsupportedSetup, match="MambaSpec"):
        kv_groups(make_kv_cache_config(EngineSpec(model_dir=model_dir, engine_id="ssm", hybrid="mamba")))


def test_shared_kv_tensors_are_copied_once_and_overlaps_refused() -> None:
    """A hybrid model's groups view the same KV tensors: each is copied once per block. Views of
    one memory with another shape would let a block id name different bytes: refused."""
    import torch

    from kvbm.vllm_integration.connector.worker_side import distinct_tensors
    from kvbm.worker.layout import LayoutError

    a, b = torch.zeros(2, 8, 16, 2, 8), torch.zeros(2, 8, 16, 2, 8)
    assert list(distinct_tensors({"full.0": a, "full.1": b, "sw.0": a, "sw.1": b})) == ["full.0", "full.1"]
    with pytest.raises(LayoutError, match="sw.0"):
        distinct_tensors({"full.0": a, "sw.0": a.view(8, 2, 16, 2, 8)})
    with pytest.raises(LayoutError, match="sw.0"):
        distinct_tensors({"full.0": a, "sw.0": a[1]})  # starts inside the first layer's memory

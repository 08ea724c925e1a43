"""DynamoConnector driven by the real vLLM 0.33 scheduler, KV verified byte for byte by the oracle."""

from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.vllm


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 30000) for _ in range(n)]


def test_store_then_load_after_prefix_cache_reset(make_engine) -> None:
    eng = make_engine()
    eng.wait_ready()
    p = prompt(1, 100)  # 6 full blocks + 4 tokens
    eng.add("a", p, max_tokens=3)
    eng.run()
    eng.quiesce()
    assert eng.sched.reset_prefix_cache()
    eng.add("b", p, max_tokens=3)
    eng.step()  # admission: 96 tokens found in kvbm, loaded asynchronously
    req = eng.sched.requests["b"]
    assert req.status.name == "WAITING_FOR_REMOTE_KVS"
    assert req.num_computed_tokens == 96
    eng.run()
    assert eng.stats.mismatches == 0
    assert eng.stats.external_hit_tokens == 96
    assert eng.stats.kv_stats.get("loaded_blocks") == 6
    eng.assert_empty()
    st = eng.quiesce()
    assert st["host_pinned"] == 0 and st["host_writing"] == 0

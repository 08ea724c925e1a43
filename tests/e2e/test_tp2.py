"""Tensor parallelism 2 on vLLM's CPU backend (two worker processes, one core each): both ranks
store their KV slices and load them back after ``reset_prefix_cache()``; greedy tokens equal."""

from __future__ import annotations

import pytest
from conftest import MAX_TOKENS, MODEL, expected_hit, kvbm_env, prompt_sets, settle

from kvbm.testing.cpu_engine import CpuEngine, EngineOptions


@pytest.mark.timeout(1200)
def test_tp2_tokens_equal_after_kvbm_hits() -> None:
    prompts = prompt_sets()["shared-prefix"]
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="256"):
        eng = CpuEngine(EngineOptions(model=MODEL, kvbm=True, max_model_len=2048, tensor_parallel_size=2))
        try:
            cold = eng.run(prompts, MAX_TOKENS)
            settle(eng)
            eng.reset_prefix_cache()
            warm = eng.run(prompts, MAX_TOKENS)
        finally:
            eng.close()
    # TP=2 sums partial results in another order than TP=1, so the reference is the cold TP=2 run.
    assert [c.tokens for c in warm] == [c.tokens for c in cold]
    assert [c.cached_tokens for c in warm] == [expected_hit(len(p)) for p in prompts]

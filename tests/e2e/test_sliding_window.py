"""A hybrid model (full + sliding-window attention, vLLM's hybrid KV cache manager on) under vLLM's
CPU backend with real forward passes: greedy tokens and logprobs equal to the same model without
kvbm, cold and after ``reset_prefix_cache()`` (when every hit must come from kvbm), and on a
multi-turn chat whose later turns hit past earlier turns' windows."""

from __future__ import annotations

from typing import Iterator

import pytest
from conftest import BLOCK, CHAT_REPLY, MAX_TOKENS, chat_users, expected_hit, kvbm_env, prompt_sets, settle

from kvbm.testing.cpu_engine import CpuEngine, EngineOptions, run_chats

pytestmark = pytest.mark.timeout(900)

MODEL = "tiny-sw"  # sliding window of 64 tokens on every other layer


@pytest.fixture(scope="module")
def plain() -> dict[str, list[list[int]] | list[list[float]]]:
    """Greedy tokens and logprobs of the model without a KV connector."""
    eng = CpuEngine(EngineOptions(model=MODEL, kvbm=False, max_model_len=2048))
    try:
        comps = eng.run(prompt_sets()["distinct"], MAX_TOKENS)
        chats = [[c.tokens for c in turn] for turn in run_chats(eng, chat_users(), CHAT_REPLY)]
        return {"tokens": [c.tokens for c in comps], "logprobs": [c.logprobs for c in comps], "chats": chats}
    finally:
        eng.close()


@pytest.fixture(scope="module")
def engine(plain: dict) -> Iterator[CpuEngine]:
    # After the plain engine: vLLM keeps one KV connector per process, the last engine's.
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="1024"):
        eng = CpuEngine(EngineOptions(model=MODEL, kvbm=True, max_model_len=2048, engine_blocks=256))
        try:
            yield eng
        finally:
            eng.close()


def test_kvbm_runs_under_the_hybrid_manager(engine: CpuEngine) -> None:
    groups = engine._core().scheduler.kv_cache_config.kv_cache_groups
    assert sorted(type(g.kv_cache_spec).__name__ for g in groups) == ["FullAttentionSpec", "SlidingWindowSpec"]
    kvbm = engine._kvbm().scheduler
    assert kvbm is not None and sorted(kvbm.groups.windows, key=str) == [64, None]
    # A host block: one engine block of the 2 KV tensors the groups' layers share (K and V,
    # 32 tokens, 2 KV heads of 64, float32), half that of the 4-layer model without a window.
    stats = kvbm.client.stats()
    assert stats is not None and stats.block_bytes == 2 * 2 * 32 * 2 * 64 * 4


def test_greedy_tokens_equal_cold_and_from_kvbm(engine: CpuEngine, plain: dict) -> None:
    prompts = prompt_sets()["distinct"]
    cold = engine.run(prompts, MAX_TOKENS)
    assert [c.tokens for c in cold] == plain["tokens"]
    settle(engine)
    engine.reset_prefix_cache()
    warm = engine.run(prompts, MAX_TOKENS)
    assert [c.tokens for c in warm] == plain["tokens"]
    # The engine's own cache was emptied: every cached token was loaded from kvbm, in both groups.
    assert [c.cached_tokens for c in warm] == [expected_hit(len(p)) for p in prompts]
    for got, want in zip((c.logprobs for c in warm), plain["logprobs"]):
        assert got == pytest.approx(want, abs=1e-3)


def test_multi_turn_chats_equal_and_served_by_kvbm(engine: CpuEngine, plain: dict) -> None:
    cold = run_chats(engine, chat_users(), CHAT_REPLY)
    assert [[c.tokens for c in turn] for turn in cold] == plain["chats"]
    settle(engine)
    engine.reset_prefix_cache()
    warm = run_chats(engine, chat_users(), CHAT_REPLY, batched=False)
    assert [[c.tokens for c in turn] for turn in warm] == plain["chats"]
    for turn in warm:
        for c in turn:
            assert c.cached_tokens >= expected_hit(c.prompt_len) - BLOCK, (c.cached_tokens, c.prompt_len)

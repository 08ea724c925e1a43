"""kvbm under vLLM's CPU backend with real forward passes: greedy tokens equal to an engine
without kvbm, before and after ``reset_prefix_cache()`` (when every hit must come from kvbm),
over several prompt sets and multi-turn chats; then the leader is killed mid-run."""

from __future__ import annotations

import os
import signal
from typing import Iterator

import pytest
from conftest import (
    BLOCK,
    CHAT_REPLY,
    MAX_TOKENS,
    MODEL,
    Baseline,
    chat_users,
    expected_hit,
    kvbm_env,
    prompt_sets,
    settle,
)

from kvbm.testing.cpu_engine import CpuEngine, EngineOptions, run_chats

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def engine() -> Iterator[CpuEngine]:
    # An engine pool of 96 blocks: one prompt set overflows it, so later prompts evict earlier ones.
    with kvbm_env(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="1024"):
        eng = CpuEngine(EngineOptions(model=MODEL, kvbm=True, max_model_len=2048, engine_blocks=96))
        try:
            yield eng
        finally:
            eng.close()


def test_the_model_output_depends_on_the_first_token(baseline: Baseline) -> None:
    assert baseline.perturbed != baseline.tokens["distinct"][0]


@pytest.mark.parametrize("name", list(prompt_sets()))
def test_greedy_tokens_equal_cold_and_from_kvbm(engine: CpuEngine, baseline: Baseline, name: str) -> None:
    prompts = prompt_sets()[name]
    cold = engine.run(prompts, MAX_TOKENS)
    assert [c.tokens for c in cold] == baseline.tokens[name]
    settle(engine)
    engine.reset_prefix_cache()
    warm = engine.run(prompts, MAX_TOKENS)
    assert [c.tokens for c in warm] == baseline.tokens[name]
    # The engine's own cache was emptied: every cached token was loaded from kvbm's host pool.
    assert [c.cached_tokens for c in warm] == [expected_hit(len(p)) for p in prompts]
    for got, want in zip((c.logprobs for c in warm), baseline.logprobs[name]):
        assert got == pytest.approx(want, abs=1e-3)


def test_multi_turn_chats_equal_and_served_by_kvbm(engine: CpuEngine, baseline: Baseline) -> None:
    cold = run_chats(engine, chat_users(), CHAT_REPLY)
    assert [[c.tokens for c in turn] for turn in cold] == baseline.chats
    settle(engine)
    engine.reset_prefix_cache()
    # Again, one request at a time: each turn's whole history comes back from kvbm.
    warm = run_chats(engine, chat_users(), CHAT_REPLY, batched=False)
    assert [[c.tokens for c in turn] for turn in warm] == baseline.chats
    for turn in warm:
        for c in turn:
            assert c.cached_tokens >= expected_hit(c.prompt_len) - BLOCK, (c.cached_tokens, c.prompt_len)


def test_leader_killed_mid_run_engine_keeps_serving(engine: CpuEngine, baseline: Baseline) -> None:
    """Runs last in this module: it leaves the engine without kvbm."""
    prompts = prompt_sets()["distinct"]
    settle(engine)
    engine.reset_prefix_cache()
    (leader,) = engine.leader_pids()

    def kill_at_second_step(n: int) -> None:
        if n == 2:  # loads and stores of this batch are in flight
            os.kill(leader, signal.SIGKILL)

    out = engine.run(prompts, MAX_TOKENS, on_step=kill_at_second_step)
    assert [c.tokens for c in out] == baseline.tokens["distinct"]
    assert engine.leader_pids() == []
    settle(engine)
    engine.reset_prefix_cache()
    again = engine.run(prompts, MAX_TOKENS)
    assert [c.tokens for c in again] == baseline.tokens["distinct"]
    assert all(c.cached_tokens == 0 for c in again)  # no leader: nothing from kvbm, all recomputed

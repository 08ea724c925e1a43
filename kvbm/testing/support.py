"""Helpers the test suites share (the main suite and the sub-suites that run in other venvs).

Fixtures built on them are in ``tests/conftest.py``; these are plain functions so that a
sub-suite's own ``conftest.py``, a test module and a harness can all call them.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

ENV_PREFIX = "DYN_KVBM_"


def random_prompts(n: int, length: int, *, seed: int, vocab: int = 50_000, low: int = 1,
                   prefix: Sequence[int] = ()) -> list[list[int]]:
    """``n`` prompts of ``prefix`` + ``length`` random token ids in [low, vocab), from ``seed``.

    Random tokens share no prefix beyond ``prefix``, so each prompt's blocks are its own.
    ``low`` > 0 keeps special ids out (a real model's BOS/EOS: 3 for the test models)."""
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(low, vocab) for _ in range(length)] for _ in range(n)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shm_segments(*parts: str) -> list[str]:
    """kvbm's shared-memory segments (``/dev/shm/kvbm-*``) whose name contains every one of ``parts``."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("kvbm-") and all(p in n for p in parts))


def assert_no_segments(*parts: str, within_s: float = 0.0) -> None:
    """Fail if a segment :func:`shm_segments` finds is still there after ``within_s`` seconds (a
    leader whose spawner was killed unlinks its segment when it notices, soon but not at once)."""
    deadline = time.monotonic() + within_s
    while (left := shm_segments(*parts)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"leaked shared-memory segments: {left}"


@contextmanager
def dyn_kvbm_env(**values: str) -> Iterator[None]:
    """Inside the block the process's ``DYN_KVBM_*`` variables are exactly ``values`` (plus any
    the block sets); after it, the caller's are back, whatever the block set or removed.

    kvbm's connectors read their configuration from the environment, so a test of one must not
    see the variables of the shell that started the suite, nor leave its own behind."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    _clear()
    os.environ.update(values)
    try:
        yield
    finally:
        _clear()
        os.environ.update(saved)


def _clear() -> None:
    for k in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        del os.environ[k]

"""Fixtures for the TensorRT-LLM connector tests: the stand-in package, a private run dir, leak checks."""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterator

import pytest

from kvbm.testing.support import assert_no_segments

STAND_IN = os.path.join(os.path.dirname(__file__), "stand_in")
if STAND_IN not in sys.path:
    sys.path.insert(0, STAND_IN)  # spawned rank processes inherit sys.path


@pytest.fixture
def trt_env(engine_env: Callable[[str, int, bool], Callable[..., str]]) -> Iterator[Callable[..., str]]:
    """DYN_KVBM_* for one test (private run dir, small host pool, no O_DIRECT); returns the setter
    of more (see ``engine_env``). After the test: no shared-memory segment of an instance this process named remains."""
    yield engine_env("kvbmt-", 60, False)
    # Instances rank 0 of this process named: trtllm-<host>-<pid>-<random>.
    assert_no_segments("kvbm-trtllm-", f"-{os.getpid()}-")

"""Fixtures for the TensorRT-LLM connector tests: the stand-in package, a private run dir, leak checks."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator

import pytest

STAND_IN = os.path.join(os.path.dirname(__file__), "stand_in")
if STAND_IN not in sys.path:
    sys.path.insert(0, STAND_IN)  # spawned rank processes inherit sys.path


def _segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith("kvbm-") and f"trtllm-{os.getpgrp()}" in n]


@pytest.fixture
def trt_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """DYN_KVBM_* for one test (private run dir, small host pool); returns a setter of more.

    After the test: no shared-memory segment of this process group remains.
    """
    run_dir = tempfile.mkdtemp(prefix="kvbmt-", dir="/tmp")  # short: ipc paths are <= 107 bytes
    for k in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DYN_KVBM_RUN_DIR", os.path.join(run_dir, "run"))
    monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "256")
    monkeypatch.setenv("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "60")
    monkeypatch.setenv("DYN_KVBM_LOG_LEVEL", "WARNING")

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        if "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS" in values:
            disk = os.path.join(run_dir, "disk")
            os.makedirs(disk, exist_ok=True)
            monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", disk)
            monkeypatch.setenv("DYN_KVBM_DISK_DISABLE_O_DIRECT", "1")

    yield set_env
    shutil.rmtree(run_dir, ignore_errors=True)
    assert _segments() == [], f"leaked shared-memory segments: {_segments()}"

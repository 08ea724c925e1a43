"""Shared fixtures: private run dirs, config builders, and the leak check."""

from __future__ import annotations

import os
import subprocess
from typing import Callable

import pytest

from kvbm.config import KvbmConfig, load_config


@pytest.fixture
def make_config(tmp_path) -> Callable[..., KvbmConfig]:
    """Build a config from DYN_KVBM_* values with a private run dir (not the real environment)."""

    def make(**env: str) -> KvbmConfig:
        full = {"DYN_KVBM_RUN_DIR": str(tmp_path / "run"), "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20"}
        full.update(env)
        return load_config(full)

    return make


def _our_segments() -> list[str]:
    # Simulated instances are named after the pid of the test process that made them.
    tag = f"kvbm-sim-{os.getpid()}-"
    return [n for n in os.listdir("/dev/shm") if n.startswith(tag)]


def _our_children() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if "kvbm" in line and "ps -o" not in line]


@pytest.fixture(autouse=True, scope="session")
def no_leaks():
    """After the suite: no shared-memory segment or kvbm process of ours is left."""
    yield
    assert _our_segments() == [], f"leaked shared-memory segments: {_our_segments()}"
    assert _our_children() == [], f"leaked processes: {_our_children()}"

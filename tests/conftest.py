"""Shared fixtures: private run dirs, config builders, and the leak check."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Callable, Iterator

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


def _o_direct_ok(path: str) -> bool:
    probe = os.path.join(path, ".odirect-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


EngineEnv = Callable[..., str]


@pytest.fixture
def engine_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, int, bool], EngineEnv]]:
    """DYN_KVBM_* for one engine-integration test, read by the engine's own connector code:
    ``engine_env(prefix, init_timeout_s, o_direct)`` clears the caller's DYN_KVBM_*, sets a
    private run dir (named ``prefix``...; ipc paths are <= 107 bytes) and a 256-block host pool,
    and returns a setter of more values; giving ``DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS`` also
    makes a disk dir, with O_DIRECT only if ``o_direct`` and the dir supports it. The setter
    returns the run dir, removed after the test."""
    dirs: list[str] = []

    def make(prefix: str, init_timeout_s: int, o_direct: bool) -> EngineEnv:
        run_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        dirs.append(run_dir)
        for k in [k for k in os.environ if k.startswith("DYN_KVBM_")]:
            monkeypatch.delenv(k)
        monkeypatch.setenv("DYN_KVBM_RUN_DIR", os.path.join(run_dir, "run"))
        monkeypatch.setenv("DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS", "256")
        monkeypatch.setenv("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", str(init_timeout_s))
        monkeypatch.setenv("DYN_KVBM_LOG_LEVEL", "WARNING")

        def set_env(**values: str) -> str:
            for k, v in values.items():
                monkeypatch.setenv(k, v)
            if "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS" in values:
                disk = os.path.join(run_dir, "disk")
                os.makedirs(disk, exist_ok=True)
                monkeypatch.setenv("DYN_KVBM_DISK_CACHE_DIR", disk)
                if not (o_direct and _o_direct_ok(disk)):
                    monkeypatch.setenv("DYN_KVBM_DISK_DISABLE_O_DIRECT", "1")
            return run_dir

        return set_env

    yield make
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


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

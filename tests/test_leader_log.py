"""The leader's log outlives the leader: the last one stopped is kept in the run dir."""

from __future__ import annotations

import logging
import os

import pytest

from kvbm.leader.spawn import LAST_LOG_NAME, spawn_leader

pytestmark = pytest.mark.slow  # leader processes


def test_stopped_leader_keeps_its_log_and_a_killed_one_is_reported(make_config, caplog) -> None:
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    kept = os.path.join(cfg.run_dir, LAST_LOG_NAME)
    leader = spawn_leader(cfg, f"logtest-{os.getpid()}")
    assert leader.popen is not None and leader.log_path == os.path.join(
        cfg.run_dir, f"logtest-{os.getpid()}.{os.getpid()}.log")
    leader.stop()
    with open(kept) as f:
        assert "listening on" in f.read()
    assert [n for n in os.listdir(cfg.run_dir) if n.endswith(".log")] == [LAST_LOG_NAME]

    leader = spawn_leader(cfg, f"logtest-{os.getpid()}")
    assert leader.popen is not None
    leader.popen.kill()
    leader.popen.wait()
    with caplog.at_level(logging.WARNING, logger="kvbm.leader.spawn"):
        leader.stop()
    assert f"exited with signal 9; its log: {kept}" in caplog.text
    assert [n for n in os.listdir(cfg.run_dir) if n.endswith(".log")] == [LAST_LOG_NAME]



def _libgomp() -> str | None:
    found = [p for p in ("/usr/lib/x86_64-linux-gnu/libgomp.so.1", "/usr/lib/aarch64-linux-gnu/libgomp.so.1")
             if os.path.exists(p)]
    return found[0] if found else None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to bind the spawner to one")
@pytest.mark.parametrize("binding", ["affinity", "openmp"])
def test_a_spawned_leader_is_not_confined_to_its_spawners_cpus(make_config, monkeypatch, binding) -> None:
    """An engine process bound to its compute cores spawns the leader: the leader runs on every
    CPU this process may use. ``openmp``: as vLLM's CPU worker also leaves it, libgomp preloaded
    and ``GOMP_CPU_AFFINITY`` naming the compute cores (libgomp binds the process at load)."""
    cfg = make_config(DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="8")
    ours = os.sched_getaffinity(0)
    if binding == "openmp":
        gomp = _libgomp()
        if gomp is None:
            pytest.skip("no libgomp on this machine")
        monkeypatch.setenv("LD_PRELOAD", gomp)
        monkeypatch.setenv("GOMP_CPU_AFFINITY", str(min(ours)))
    os.sched_setaffinity(0, {min(ours)})
    try:
        leader = spawn_leader(cfg, f"cpus-{os.getpid()}")  # returns once the leader answers
    finally:
        os.sched_setaffinity(0, ours)
    try:
        assert leader.popen is not None
        assert os.sched_getaffinity(leader.popen.pid) == ours
    finally:
        leader.stop()

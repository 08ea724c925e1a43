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

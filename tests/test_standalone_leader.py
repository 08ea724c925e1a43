"""A pool that outlives its engine: ``kvbm leader`` run on its own (a sidecar), engine processes
attached with ``DYN_KVBM_LEADER_ENDPOINT``. An engine that stored a prompt is killed with SIGKILL;
another engine's stores are cut by a rank killed mid-transfer; a new engine process is served the
first prompt from G2, every block checked against the oracle, and never a block of the cut store;
an engine of another layout is refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from kvbm.ipc.transport import instance_endpoint
from kvbm.leader.client import LeaderClient

pytestmark = pytest.mark.slow  # a leader and three engines, each with two rank processes

ENGINE = str(Path(__file__).with_name("standalone_engine.py"))
INSTANCE = "standalone-pool"  # standalone_engine.INSTANCE
BLOCK_SIZE = 16


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie waiting for its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Engine:
    """One engine process (tests/standalone_engine.py) and its two rank processes."""

    def __init__(self, mode: str, prompts: list[list[int]], env: dict[str, str]) -> None:
        self._err = tempfile.TemporaryFile()  # its stderr, for the failure message
        self.proc = subprocess.Popen([sys.executable, ENGINE, mode, json.dumps(prompts)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        hello = self._line()
        self.ranks: list[int] = hello["ranks"]
        self.spawned_leader: bool = hello["spawned"]

    def _line(self) -> dict[str, Any]:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        line = out.readline()
        if not line:
            self._err.seek(0)
            raise AssertionError(f"engine exited with {self.proc.wait()}: {self._err.read().decode()[-3000:]}")
        return dict(json.loads(line))

    def serve(self) -> None:
        """Let it serve its prompts (returns at once)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[str, Any]:
        """Its SimStats once it served the prompts."""
        return self._line()

    def kill(self) -> None:
        """SIGKILL the engine process; its ranks follow it (they watch their parent)."""
        self.proc.kill()
        self.proc.wait()
        _until(lambda: all(_gone(p) for p in self.ranks), 10, "the killed engine's ranks to exit")


def test_standalone_leader_serves_a_new_engine_after_sigkill_and_drops_a_cut_store(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    endpoint = instance_endpoint(run_dir, INSTANCE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    env.update({
        "DYN_KVBM_RUN_DIR": run_dir,
        "DYN_KVBM_LEADER_ENDPOINT": endpoint,
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "128",
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20",
        "DYN_KVBM_LOG_LEVEL": "INFO",
    })
    rng = random.Random(5)
    prompt = [rng.randrange(1, 50_000) for _ in range(16 * BLOCK_SIZE + 5)]
    full = len(prompt) // BLOCK_SIZE * BLOCK_SIZE
    cut = [rng.randrange(1, 50_000) for _ in range(12 * BLOCK_SIZE)]
    leader_log = tmp_path / "leader.log"
    with leader_log.open("wb") as log:
        leader = subprocess.Popen([sys.executable, "-m", "kvbm", "leader", "--instance", INSTANCE], env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    client = LeaderClient(endpoint)
    try:
        _until(lambda: leader.poll() is not None or client.refresh() is not None, 30, "the leader to listen")
        assert leader.poll() is None, leader_log.read_text()

        # Engine 1 stores the prompt, then dies with SIGKILL.
        first = Engine("hold", [prompt], env)
        assert not first.spawned_leader  # DYN_KVBM_LEADER_ENDPOINT names a running leader
        first.serve()
        s1 = first.stats()
        assert s1["tokens_from_host"] == 0 and s1["blocks_stored"] == full // BLOCK_SIZE
        first.kill()

        # Engine 2 attaches to the same pool; rank 1 is stopped before it copies its stores and
        # killed with the engine: a store that only rank 0 wrote.
        second = Engine("hold", [cut], env)
        os.kill(second.ranks[1], signal.SIGSTOP)
        before = client.stats()
        assert before is not None
        second.serve()

        def store_in_flight() -> bool:
            st = client.stats()
            return st is not None and st.ops_in_flight > 0

        _until(store_in_flight, 20, "engine 2's stores to be in flight")
        time.sleep(0.5)  # rank 0 copies its slices meanwhile
        os.kill(second.ranks[1], signal.SIGKILL)
        second.kill()

        def cut_store_dropped() -> bool:
            st = client.stats()
            return st is not None and st.ops_in_flight == 0

        _until(cut_store_dropped, 20, "the cut store to be dropped")
        after = client.stats()
        assert after is not None and after.counters.stores_aborted > before.counters.stores_aborted
        assert after.counters.stores_committed == before.counters.stores_committed

        # Engine 3, a new process with new ranks: all of the first prompt from G2, nothing of the
        # cut one, every loaded block byte-exact (the ranks check each against the oracle).
        third = Engine("exit", [prompt, cut], env)
        third.serve()
        s3 = third.stats()
        assert third.proc.wait(30) == 0
        assert s3["tokens_from_host"] == full, s3
        assert s3["mismatches"] == 0 and s3["load_failures"] == 0 and s3["store_failures"] == 0, s3
        assert leader.poll() is None  # the engines come and go; the pool stays

        # An engine of another layout is refused, with the reason; the pool is untouched.
        held = client.stats()
        other = subprocess.run([sys.executable, ENGINE, "exit", "[]", "64"], env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=120)
        assert other.returncode != 0 and other.stdout == ""
        assert "not part of this world" in other.stderr or "different layout" in other.stderr, other.stderr[-2000:]
        now = client.stats()
        assert held is not None and now is not None and leader.poll() is None
        assert now.host == held.host and now.counters.blocks_stored == held.counters.blocks_stored
    finally:
        client.close()
        leader.send_signal(signal.SIGTERM)
        code = leader.wait(15)
    assert code == 0, leader_log.read_text()[-3000:]


def _segments(instance: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"kvbm-{instance}")]


def test_engine_spawned_leader_keeps_the_pool_for_a_restart_within_the_grace_period(tmp_path: Path) -> None:
    """DYN_KVBM_LEADER_GRACE_SECS: the engine spawns its leader (the default deployment) and is
    killed with SIGKILL; an engine restarted within the grace period finds that leader (no second
    one) and is served the prompt from G2; once no engine is attached for the grace period the
    leader exits and frees its segment."""
    grace_s = 4.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    env.update({
        "DYN_KVBM_RUN_DIR": str(tmp_path / "run"),
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "128",
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20",
        "DYN_KVBM_LEADER_GRACE_SECS": str(grace_s),
    })
    rng = random.Random(6)
    prompt = [rng.randrange(1, 50_000) for _ in range(10 * BLOCK_SIZE + 3)]
    lock = tmp_path / "run" / f"{INSTANCE}.lock"

    first = Engine("hold", [prompt], env)
    assert first.spawned_leader
    leader_pid = int(lock.read_text())
    first.serve()
    assert first.stats()["blocks_stored"] == 10
    first.kill()
    assert not _gone(leader_pid) and _segments(INSTANCE)  # the pool waits

    second = Engine("exit", [prompt], env)
    assert not second.spawned_leader and int(lock.read_text()) == leader_pid  # never two leaders
    second.serve()
    s2 = second.stats()
    assert second.proc.wait(30) == 0
    assert s2["tokens_from_host"] == 10 * BLOCK_SIZE and s2["mismatches"] == 0, s2

    # Nobody attached any more: the leader goes after the grace period (plus the ~1.5 s it takes
    # to see the clean engine's ranks gone, if it did not see them leave), freeing the pool.
    _until(lambda: _gone(leader_pid), grace_s + 10, "the orphaned leader to exit")
    assert _segments(INSTANCE) == []

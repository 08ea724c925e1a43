"""Scheduler-side cost of the vLLM connector, and what it finds, on one chat workload.

The real vLLM 0.33 scheduler (CPU only, kvbm.testing.vllm_harness) runs the same
multi-turn chat workload in each configuration, with a small engine pool so the engine's own
prefix cache forgets earlier turns:

* no KV connector: the limit, what ``Scheduler.schedule()`` costs by itself;
* DynamoConnector (kvbm) with its leader and a worker-role connector copying real bytes,
  once with a host pool larger than anything the workload computes (the hit-token limit)
  and once with HOST_BLOCKS blocks, its planner answering lookups from a local index replica
  (kept current from the leader's index stream; the default); and once more without the
  replica ("no index replica": every lookup a leader Match);
* kvbm once more with G2 hits loaded synchronously (``DYN_KVBM_HOST_LOADS=sync``, the default on
  vLLM's CPU backend; the runs above use ``async``, kvbm's default on GPUs, where
  OffloadingConnector runs): its lookups pin on the scheduler thread;
* vLLM's built-in OffloadingConnector with the same CPU bytes (its CUDA copy worker cannot
  run here, so a stand-in worker completes every transfer within the step: this measures its
  scheduler side only). Run twice: its default (offload prompt blocks only) and with
  ``offload_prompt_only: false`` (prompt and output blocks, as kvbm does).

Figures: p50 / p99 of ``schedule()`` per engine step (and the time added per step over the
no-connector run), and external hit tokens next to those of the unbounded kvbm run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from kvbm.bench.common import BenchResult

BLOCK_SIZE = 16
HOST_BLOCKS = 512  # kvbm's host pool; OffloadingConnector gets the same bytes
UNBOUNDED_BLOCKS = 4096  # more than the workload ever computes: the hit-token limit
# kvbm runs with G2 loads asynchronous, its default where OffloadingConnector runs (GPUs); this
# run with them synchronous (the default on vLLM's CPU backend: one pin per hit on this thread).
SYNC_RUN = "kvbm (sync G2 loads)"
GEOMETRY = {"num_layers": 4, "kv_heads": 2, "head_dim": 64}  # 32 KiB per block: 4 KiB aligned


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _OffloadStandInWorker:
    """Completes every OffloadingConnector transfer job of a step at once (no copy)."""

    def step(self, work: Any) -> Any:
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
        from vllm.v1.outputs import KVConnectorOutput

        from kvbm.testing.vllm_harness import StepResult

        meta = work.meta
        done = {job_id: 1 for job_id in list(meta.load_jobs) + list(meta.store_jobs)}
        recving = {job.req_id for job in meta.load_jobs.values()}
        out = KVConnectorOutput(finished_recving=recving or None,
                                kv_connector_worker_meta=OffloadingWorkerMetadata(completed_jobs=done) if done else None)
        return StepResult(out, [])

    def close(self) -> None:
        return


def _time_calls(obj: Any, method: str, out: list[float]) -> None:
    """Record the wall time of every call of ``obj.method`` (a wait the scheduler thread makes)."""
    call = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            out.append(time.perf_counter() - t0)

    setattr(obj, method, timed)


def _bare_rtt(tmp: str, n: int) -> list[float]:
    """Round trips of a bare ZMQ ipc echo between two processes: the floor of one leader call."""
    import zmq

    from kvbm.bench.transfer import _ECHO

    ep = f"ipc://{tmp}/echo.sock"
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, ep])
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    payload = bytes(256)  # about a Match of a few dozen hashes
    times = []
    try:
        for i in range(n + 50):
            t0 = time.perf_counter()
            sock.send(payload)
            sock.recv()
            if i >= 50:
                times.append(time.perf_counter() - t0)
        sock.send(b"stop")
        echo.wait(10)
    finally:
        sock.close(0)
        if echo.poll() is None:
            echo.kill()
            echo.wait()
    return times


def _run_one(model_dir: str, name: str, connector: str | None, extra: dict[str, Any], quick: bool,
             host_blocks: int = HOST_BLOCKS, replica: bool = True, host_loads: str = "async") -> Any:
    from kvbm.testing.vllm_harness import Engine, EngineSpec

    os.environ["DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"] = str(host_blocks)
    os.environ["DYN_KVBM_INDEX_REPLICA"] = "1" if replica else "0"
    os.environ["DYN_KVBM_HOST_LOADS"] = host_loads

    spec = EngineSpec(model_dir=model_dir, engine_id=f"bench-{uuid.uuid4().hex[:8]}", block_size=BLOCK_SIZE,
                      num_blocks=160, max_num_seqs=16, max_num_batched_tokens=512, connector=connector,
                      module_path="kvbm.vllm_integration.connector" if connector == "DynamoConnector" else None,
                      extra=extra, **GEOMETRY)  # type: ignore[arg-type]
    factory = (lambda s: _OffloadStandInWorker()) if connector == "OffloadingConnector" else None
    # kvbm's worker runs in its own process (as with vLLM's multiprocess executor), so its CPU
    # copies do not compete with the scheduler for the GIL: schedule() times the scheduler side.
    eng = Engine(spec, worker_factory=factory, proc_workers=connector == "DynamoConnector")
    rtts: list[float] = []
    try:
        if connector == "DynamoConnector":
            # Every LeaderClient request goes through call_many; a replica catching up before
            # a lookup waits for one round of its follower (a leader round trip too).
            _time_calls(eng.kvbm.client._rpc, "call_many", rtts)
            if eng.kvbm.planner.replica is not None:
                _time_calls(eng.kvbm.planner.replica, "catch_up", rtts)
        eng.run_chats(conversations=12 if quick else 32, turns=3 if quick else 4, system=256, turn_len=64,
                      max_tokens=32, num_systems=4, seed=7, timeout_s=600)
        eng.run()
        assert eng.stats.mismatches == 0, f"{name}: loaded KV differs from what was stored"
        return eng.stats, rtts
    finally:
        eng.close()
        os.environ.pop("DYN_KVBM_INDEX_REPLICA", None)
        os.environ.pop("DYN_KVBM_HOST_LOADS", None)


def _run_all(model_dir: str, offload_extra: dict[str, Any], quick: bool) -> dict[str, Any]:
    return {
        "no connector": _run_one(model_dir, "none", None, {}, quick),
        "unbounded": _run_one(model_dir, "unbounded", "DynamoConnector", {}, quick, host_blocks=UNBOUNDED_BLOCKS),
        "kvbm": _run_one(model_dir, "kvbm", "DynamoConnector", {}, quick),
        "kvbm (no index replica)": _run_one(model_dir, "kvbm-match", "DynamoConnector", {}, quick, replica=False),
        SYNC_RUN: _run_one(model_dir, "kvbm-sync", "DynamoConnector", {}, quick, host_loads="sync"),
        "OffloadingConnector": _run_one(model_dir, "offload", "OffloadingConnector", offload_extra, quick),
        "OffloadingConnector (all blocks)": _run_one(
            model_dir, "offload-all", "OffloadingConnector", {**offload_extra, "offload_prompt_only": False}, quick),
    }


def run(quick: bool = False) -> list[BenchResult]:
    import vllm  # noqa: F401  (ImportError: `kvbm bench` skips this suite)

    tmp = tempfile.mkdtemp(prefix="kvbmb-", dir="/tmp")
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT")
        or os.path.join(tempfile.gettempdir(), f"kvbm-vllm-cache-{os.getuid()}"),
        "DYN_KVBM_RUN_DIR": os.path.join(tmp, "run"),
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(HOST_BLOCKS),  # set per run by _run_one
        "DYN_KVBM_LOG_LEVEL": "WARNING",
    }
    from kvbm.testing.vllm_harness import write_model_dir

    model_dir = write_model_dir(os.path.join(tmp, "model"))
    block_bytes = GEOMETRY["num_layers"] * 2 * BLOCK_SIZE * GEOMETRY["kv_heads"] * GEOMETRY["head_dim"] * 2
    cpu_bytes = HOST_BLOCKS * block_bytes
    offload_extra = {"cpu_bytes_to_use": cpu_bytes}
    with _env(env):
        try:
            runs = _run_all(model_dir, offload_extra, quick)
            bare = _bare_rtt(tmp, 500 if quick else 3000)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    (base, _), (unbounded, _) = runs.pop("no connector"), runs.pop("unbounded")
    b50 = _pct(base.schedule_seconds, 0.5) * 1e6
    b99 = _pct(base.schedule_seconds, 0.99) * 1e6
    out = [BenchResult("vLLM schedule() p50, no connector", b50, "us", None, "", None, "the limit below"),
           BenchResult("vLLM schedule() p99, no connector", b99, "us", None, "", None, "the limit below")]
    for name, (st, rtts) in runs.items():
        p50 = _pct(st.schedule_seconds, 0.5) * 1e6
        p99 = _pct(st.schedule_seconds, 0.99) * 1e6
        added = statistics.mean(st.schedule_seconds) * 1e6 - statistics.mean(base.schedule_seconds) * 1e6
        out += [
            BenchResult(f"{name}: schedule() p50", p50, "us", b50, "us (no connector)", p50 / b50, "< 2x"),
            BenchResult(f"{name}: schedule() p99", p99, "us", b99, "us (no connector)", p99 / b99, "< 2x"),
            BenchResult(f"{name}: mean time added per step", added, "us", None, "", None, "< 300 us"),
        ]
        if rtts:
            r50, bare50 = _pct(rtts, 0.5) * 1e6, _pct(bare, 0.5) * 1e6
            out += [
                BenchResult(f"{name}: leader round trips per step", len(rtts) / st.steps, "calls", None, "", None,
                            "match, prepare_load, poll, allocate_store"),
                BenchResult(f"{name}: leader round trip p50", r50, "us", bare50, "us bare ZMQ ipc echo", r50 / bare50,
                            "< 3x"),
                BenchResult(f"{name}: leader round trip p99", _pct(rtts, 0.99) * 1e6, "us", _pct(bare, 0.99) * 1e6,
                            "us bare ZMQ ipc echo", _pct(rtts, 0.99) / _pct(bare, 0.99), "< 3x"),
            ]
        if name == SYNC_RUN:  # another schedule (loads computed a step earlier): its hits are not comparable
            continue
        out.append(BenchResult(f"{name}: external hit tokens", st.external_hit_tokens, "tokens",
                               unbounded.external_hit_tokens, "tokens (kvbm, unbounded host pool)",
                               st.external_hit_tokens / max(1, unbounded.external_hit_tokens),
                               "kvbm >= OffloadingConnector"))
    return out


if __name__ == "__main__":
    from kvbm.bench.report import print_table

    print_table(run(quick="--quick" in sys.argv))

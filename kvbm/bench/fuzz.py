"""Benchmark: the leader fuzzer (:mod:`kvbm.testing.fuzz`) against a live leader.

``python -m kvbm.bench.fuzz [--quick] [--cases N]`` runs a simulated engine (TP=1, a real
leader and rank process), fills the cache, fuzzes, then serves again byte-exact; it prints
cases/s against the rate of a bare ZMQ echo in the same run, the leader's RSS before and
after, and whether the leader stayed alive with its state unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time

import zmq

from kvbm.bench.common import BenchResult
from kvbm.testing.fuzz import CaseGenerator, fuzz_leader


_ECHO = r"""
import sys, zmq
s = zmq.Context().socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    ident, *frames = s.recv_multipart()
    if frames == [b"stop"]: break
    s.send_multipart([ident, frames[0][:16]])
"""


def echo_rate(endpoint: str, frames: list[list[bytes]], batch: int) -> float:
    """Messages/s of a bare Python ZMQ ROUTER echo on the same frames, same batching: the limit."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        t0 = time.perf_counter()
        for i in range(0, len(frames), batch):
            chunk = frames[i:i + batch]
            for f in chunk:
                sock.send_multipart(f)
            for _ in chunk:
                sock.recv()
        return len(frames) / (time.perf_counter() - t0)
    finally:
        sock.send(b"stop")
        sock.close()


def run(quick: bool = False, num_cases: int | None = None, seed: int = 0) -> list[BenchResult]:
    """Fuzz a live leader (TP=1 simulated engine) and serve byte-exact afterwards."""
    from kvbm.config import load_config
    from kvbm.testing.sim.engine import SimEngine, chat_workload
    from kvbm.testing.sim.rank import SimModel

    n = num_cases if num_cases is not None else (5_000 if quick else 100_000)
    tmp = tempfile.mkdtemp(prefix="kvbm-fuzz-")
    try:
        cfg = load_config({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "256", "DYN_KVBM_RUN_DIR": f"{tmp}/run",
                           "DYN_KVBM_LOG_LEVEL": "ERROR"})
        prompts = list(chat_workload(8, 3, system_tokens=64, turn_tokens=48, seed=seed))
        with SimEngine(cfg, world_size=1, model=SimModel(num_layers=2, num_gpu_blocks=128)) as sim:
            assert sim.leader is not None and sim.leader.popen is not None
            pid = sim.leader.popen.pid
            sim.run(prompts)
            sim.quiesce()
            rep = fuzz_leader(sim.endpoint, n, seed=seed, leader_pid=pid)
            sim.reset_engine_cache()
            sim.run(prompts)  # still serving, from what it held before the fuzz
            st = sim.stats
            served_ok = st.mismatches == 0 and st.tokens_from_host > 0
        # The limit: a bare ZMQ echo (Python, separate process) on a sample of the same frames.
        ep = f"ipc://{tmp}/echo.sock"
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, ep])
        try:
            gen = CaseGenerator(seed + 1, huge_every=0)
            sample = [gen.next().frames for _ in range(min(n, 20_000))]
            limit = echo_rate(ep, sample, 256)
        finally:
            echo.wait(10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = rep.ok and served_ok
    rate = rep.cases_per_s
    return [
        BenchResult(f"fuzz cases against a live leader ({rep.cases} cases, {'ok' if ok else 'FAILED'})", rate,
                    "cases/s", limit, "msg/s bare ZMQ echo", rate / limit if limit else None,
                    "leader alive, state unchanged", ok),
        BenchResult("fuzz: ErrorReplies / expected", rep.errors, "replies", rep.expected_errors, "expected",
                    rep.errors / rep.expected_errors if rep.expected_errors else None, "= 1"),
        BenchResult("fuzz: leader RSS before", rep.rss_before_kib / 1024, "MiB", None, "", None, ""),
        BenchResult("fuzz: leader RSS after a tenth of the cases", rep.rss_warm_kib / 1024, "MiB", None, "", None,
                    ""),
        BenchResult("fuzz: leader RSS at the end", rep.rss_after_kib / 1024, "MiB", rep.rss_warm_kib / 1024,
                    "MiB after a tenth", rep.rss_after_kib / rep.rss_warm_kib if rep.rss_warm_kib else None,
                    "<= 1.05 (flat)"),
        BenchResult("fuzz: leader RSS high-water mark", rep.rss_peak_kib / 1024, "MiB", None, "", None, ""),
    ]


def _main(argv: list[str]) -> int:
    import argparse

    from kvbm.bench.report import print_table

    p = argparse.ArgumentParser(prog="python -m kvbm.bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5,000 cases instead of 100,000")
    p.add_argument("--cases", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    results = run(quick=a.quick, num_cases=a.cases, seed=a.seed)
    print_table(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

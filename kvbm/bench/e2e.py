"""Time to first token on a real vLLM engine (CPU backend): kvbm hit vs recompute vs engine hit.

One vLLM-CPU engine with kvbm (``kvbm.testing.cpu_engine``, a seeded random-weight
Llama model, greedy, one request at a time) runs the same prompts as

* **recompute**: the first time (nothing cached anywhere);
* **kvbm hit**: after ``reset_prefix_cache()`` emptied the engine's own cache, so every hit is
  loaded from kvbm's host pool (G2);
* **engine hit**: right after, the same prompt again, served by vLLM's own prefix cache (G1),
  the same KV the kvbm hit just loaded: the limit a kvbm hit is measured against.

The kvbm-hit time is split by engine step: the steps that scheduled no token (the request waited
for an asynchronous load; none with ``DYN_KVBM_HOST_LOADS=auto`` on this CPU backend, where a G2
hit is pinned at lookup and copied before the forward pass of the step that computes it) and
the step that computed the last block and sampled; the load's bytes are also timed as a plain
memory copy in the same run (the copy's physical limit). A last round repeats the kvbm and
engine hits with a 0.2 ms GIL switch interval instead of Python's 5 ms: the load copies run on a
thread of the engine's process, and this figure shows how much of the gap waiting for the GIL is.

Run from the CPU venv (``scripts/setup_vllm_cpu.sh``), or from any venv: without ``vllm-cpu`` here
it re-runs itself with the CPU venv's interpreter. ``python -m kvbm.bench.e2e [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from kvbm.bench.common import BenchResult
from kvbm.testing import cpu_env


@dataclass(frozen=True)
class Workload:
    model: str
    prompts: int
    prompt_len: int
    rounds: int


QUICK = Workload("tiny", prompts=2, prompt_len=512, rounds=2)
FULL = Workload("small", prompts=3, prompt_len=2048, rounds=3)


def _memcpy_seconds(nbytes: int, reps: int = 5) -> float:
    """Best time of one plain memory copy of ``nbytes`` (warm buffers): the copy's limit."""
    import numpy as np

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class _Samples:
    recompute: list[float]
    kvbm: list[float]
    engine: list[float]
    kvbm_steps: list[int]
    engine_steps: list[int]
    kvbm_wait: list[float]  # steps before the one that produced the first token
    kvbm_compute: list[float]  # the step that produced it
    engine_compute: list[float]
    hit_tokens: int
    prompt_tokens: int
    kvbm_fast_switch: list[float]  # kvbm hits with FAST_SWITCH_S as the GIL switch interval
    engine_fast_switch: list[float]


# The diagnostic run's GIL switch interval (Python's default is 5 ms): kvbm's load copies run on
# the rank agent's thread, which waits for the GIL while the engine loop runs idle steps.
FAST_SWITCH_S = 0.0002


def _measure(w: Workload, tmp: str) -> _Samples:
    from kvbm.testing.tiny_model import MODELS
    from kvbm.testing.cpu_engine import CpuEngine, EngineOptions
    from kvbm.testing.support import random_prompts
    from kvbm.testing.tiny_model import FIRST_WORD

    spec = MODELS[w.model]
    bs = 32
    blocks = w.prompts * (-(-w.prompt_len // bs) + 1) + 64
    os.environ.update({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(blocks), "DYN_KVBM_RUN_DIR": f"{tmp}/run",
                       "DYN_KVBM_LOG_LEVEL": "WARNING"})
    for var in ("DYN_KVBM_CPU_CACHE_GB", "DYN_KVBM_DISK_CACHE_GB", "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"):
        os.environ.pop(var, None)
    eng = CpuEngine(EngineOptions(model=w.model, kvbm=True, block_size=bs, max_model_len=w.prompt_len + 64,
                                  engine_blocks=blocks, max_num_batched_tokens=w.prompt_len + 64))
    try:
        prompts = random_prompts(w.prompts, w.prompt_len, vocab=spec.vocab, low=FIRST_WORD, seed=11)
        warm = random_prompts(1, w.prompt_len, vocab=spec.vocab, low=FIRST_WORD, seed=99)
        # Warm-up: first forward passes and the first kvbm load pay one-time costs.
        eng.run(warm, 1)
        eng.settle_kvbm()
        eng.reset_prefix_cache()
        eng.run(warm, 1)
        s = _Samples([], [], [], [], [], [], [], [], 0, 0, [], [])
        s.recompute = [eng.run([p], 1)[0].ttft_s for p in prompts]
        for _ in range(w.rounds):
            eng.settle_kvbm()  # the last stores land in the host pool
            eng.reset_prefix_cache()
            for prompt in prompts:
                k = eng.run([prompt], 1)[0]
                e = eng.run([prompt], 1)[0]
                s.kvbm.append(k.ttft_s)
                s.engine.append(e.ttft_s)
                s.kvbm_steps.append(k.steps_to_first_token)
                s.engine_steps.append(e.steps_to_first_token)
                s.kvbm_wait.append(sum(k.step_seconds[:-1]))
                s.kvbm_compute.append(k.step_seconds[-1])
                s.engine_compute.append(e.step_seconds[-1])
                s.hit_tokens += k.cached_tokens
                s.prompt_tokens += k.prompt_len
        default_switch = sys.getswitchinterval()
        sys.setswitchinterval(FAST_SWITCH_S)
        try:
            eng.settle_kvbm()
            eng.reset_prefix_cache()
            for prompt in prompts:
                s.kvbm_fast_switch.append(eng.run([prompt], 1)[0].ttft_s)
                s.engine_fast_switch.append(eng.run([prompt], 1)[0].ttft_s)
        finally:
            sys.setswitchinterval(default_switch)
        return s
    finally:
        eng.close()


def _results(w: Workload, s: _Samples) -> list[BenchResult]:
    from kvbm.testing.tiny_model import MODELS

    med = statistics.median
    spec = MODELS[w.model]
    tag = f"{w.model} model, {w.prompt_len}-token prompts"
    loaded = s.hit_tokens / max(1, len(s.kvbm))
    copy_limit = _memcpy_seconds(int(loaded * spec.kv_bytes_per_token()))
    rec, kv, en = med(s.recompute), med(s.kvbm), med(s.engine)
    return [
        BenchResult(f"e2e TTFT recompute ({tag})", rec * 1e3, "ms", None, "", None, "-"),
        BenchResult("e2e TTFT engine prefix-cache hit (same KV)", en * 1e3, "ms", None, "", None, "the limit below"),
        BenchResult("e2e TTFT kvbm hit (after reset_prefix_cache)", kv * 1e3, "ms", en * 1e3, "ms engine hit",
                    kv / en, "< 1.5x"),
        BenchResult("e2e TTFT kvbm hit vs recompute", kv * 1e3, "ms", rec * 1e3, "ms recompute", kv / rec, "< 0.5x"),
        BenchResult("e2e kvbm hit tokens / prompt tokens", s.hit_tokens / max(1, s.prompt_tokens) * 100, "%",
                    None, "", None, "all but the last block"),
        BenchResult("e2e kvbm hit: engine steps to first token", med(s.kvbm_steps), "steps", med(s.engine_steps),
                    "steps (engine hit)", med(s.kvbm_steps) / med(s.engine_steps), "-"),
        BenchResult("e2e kvbm hit: time in steps waiting for the load", med(s.kvbm_wait) * 1e3, "ms",
                    copy_limit * 1e3, "ms memcpy of the loaded KV", med(s.kvbm_wait) / max(copy_limit, 1e-9), "-"),
        BenchResult("e2e kvbm hit: the computing step", med(s.kvbm_compute) * 1e3, "ms", med(s.engine_compute) * 1e3,
                    "ms (engine hit)", med(s.kvbm_compute) / med(s.engine_compute), "~1x"),
        BenchResult(f"e2e TTFT kvbm hit, {FAST_SWITCH_S * 1e3:g} ms GIL switch interval", med(s.kvbm_fast_switch) * 1e3,
                    "ms", med(s.engine_fast_switch) * 1e3, "ms engine hit (same interval)",
                    med(s.kvbm_fast_switch) / med(s.engine_fast_switch), "diagnostic: the GIL wait"),
    ]


def run(quick: bool = False) -> list[BenchResult]:
    """The figures; re-runs in the CPU venv when this interpreter has no vllm-cpu.

    ``kvbm bench`` skips the suite when no CPU vLLM is available (report.py checks first)."""
    if not cpu_env.runs_here():
        return _run_elsewhere(quick)
    w = QUICK if quick else FULL
    tmp = tempfile.mkdtemp(prefix="kvbm-e2e-")
    try:
        return _results(w, _measure(w, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_elsewhere(quick: bool) -> list[BenchResult]:
    py = cpu_env.venv_python()
    if py is None:
        raise RuntimeError(cpu_env.missing_reason())
    with tempfile.TemporaryDirectory(prefix="kvbm-e2e-json-") as d:
        out = os.path.join(d, "e2e.json")
        cmd = [str(py), "-m", "kvbm.bench.e2e", "--json", out] + (["--quick"] if quick else [])
        env = {**os.environ, "PYTHONPATH": str(cpu_env.repo_root())}
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the e2e benchmark failed in {py} (exit status {proc.returncode})")
        with open(out) as f:
            return [BenchResult(**r) for r in json.load(f)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvbm.bench.e2e", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny model, short prompts")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    results = run(quick=args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    else:
        from kvbm.bench.report import print_table

        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

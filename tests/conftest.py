"""Shared fixtures: private run dirs and environments, config builders, S3 servers, the runner of
the sub-suites in other venvs, and the leak check."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import pytest

from kvbm.config import KvbmConfig, load_config
from kvbm.testing.support import assert_no_segments, dyn_kvbm_env

if TYPE_CHECKING:
    from kvbm.testing.s3server import S3Server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def make_config(tmp_path) -> Callable[..., KvbmConfig]:
    """Build a config from DYN_KVBM_* values with a private run dir (not the real environment)."""

    def make(**env: str) -> KvbmConfig:
        full = {"DYN_KVBM_RUN_DIR": str(tmp_path / "run"), "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "20"}
        full.update(env)
        return load_config(full)

    return make


def _o_direct_ok(path: str) -> bool:
    probe = os.path.join(path, ".odirect-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


EngineEnv = Callable[..., str]


@pytest.fixture
def engine_env() -> Iterator[Callable[[str, int, bool], EngineEnv]]:
    """DYN_KVBM_* for one engine-integration test, read by the engine's own connector code:
    ``engine_env(prefix, init_timeout_s, o_direct)`` replaces the caller's DYN_KVBM_* with a
    private run dir (named ``prefix``...; ipc paths are <= 107 bytes) and a 256-block host pool,
    and returns a setter of more values; giving ``DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS`` also
    makes a disk dir, with O_DIRECT only if ``o_direct`` and the dir supports it. The setter
    returns the run dir, removed after the test, when the caller's DYN_KVBM_* are back."""
    with contextlib.ExitStack() as stack:

        def make(prefix: str, init_timeout_s: int, o_direct: bool) -> EngineEnv:
            run_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
            stack.enter_context(dyn_kvbm_env(
                DYN_KVBM_RUN_DIR=os.path.join(run_dir, "run"), DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS="256",
                DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS=str(init_timeout_s), DYN_KVBM_LOG_LEVEL="WARNING"))

            def set_env(**values: str) -> str:
                os.environ.update(values)
                if "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS" in values:
                    disk = os.path.join(run_dir, "disk")
                    os.makedirs(disk, exist_ok=True)
                    os.environ["DYN_KVBM_DISK_CACHE_DIR"] = disk
                    if not (o_direct and _o_direct_ok(disk)):
                        os.environ["DYN_KVBM_DISK_DISABLE_O_DIRECT"] = "1"
                return run_dir

            return set_env

        yield make


def _s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    from kvbm.testing.s3server import S3Server

    with S3Server(request.module.S3_BUCKET) as srv:
        yield srv


# moto's S3 server on 127.0.0.1 with the bucket the test module names in ``S3_BUCKET``: a fresh
# one per test (a test may kill it or leave objects that would change the next one's lookups),
# or one per module where its tests keep to their own keys.
s3_server = pytest.fixture(_s3_server)
s3_module_server = pytest.fixture(scope="module")(_s3_server)


VenvSuite = Callable[..., None]


@pytest.fixture
def venv_suite(tmp_path: Path) -> VenvSuite:
    """Run a directory of tests with another venv's interpreter, as one test of this suite:
    ``venv_suite(python, suite, require_env=..., missing=..., timeout_s=..., extra_args=())``.

    Engines that cannot share this venv (vLLM's CPU build, SGLang) get their own; their suites
    import kvbm from this checkout. ``python`` None means that venv is absent: the test is
    skipped with ``missing`` (how to build it), or fails where ``$require_env`` is 1 (CI builds
    the venv, so a skip there would hide a broken setup). The suite must pass with nothing
    skipped."""

    def run(python: Path | str | None, suite: str, *, require_env: str, missing: str, timeout_s: float,
            extra_args: Sequence[str] = ()) -> None:
        if python is None:
            if os.environ.get(require_env) == "1":
                pytest.fail(f"{require_env}=1 but {missing}")
            pytest.skip(missing)
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS" and not k.startswith("DYN_KVBM_")}
        env["PYTHONPATH"] = str(ROOT)
        report = tmp_path / f"{Path(suite).name}.xml"
        proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra_args,
                               f"--junitxml={report}", str(ROOT / suite)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
        print(f"{suite} in {python}: {' '.join(summary)}", file=sys.stderr)
        assert proc.returncode == 0, f"{suite} failed in {python}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        assert "passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]

    return run


def _our_children() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if "kvbm" in line and "ps -o" not in line]


@pytest.fixture(autouse=True, scope="session")
def no_leaks():
    """After the suite: no shared-memory segment or kvbm process of ours is left."""
    yield
    # Simulated instances are named after the pid of the test process that made them.
    assert_no_segments(f"kvbm-sim-{os.getpid()}-")
    assert _our_children() == [], f"leaked processes: {_our_children()}"

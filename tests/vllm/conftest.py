"""Fixtures for the vLLM connector tests: offline vLLM, a private kvbm run dir, leak checks.

vLLM is imported lazily (by the fixtures), so this file loads without it; the test modules
skip with ``pytest.importorskip("vllm")``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid
from typing import TYPE_CHECKING, Callable, Iterator

import pytest

from kvbm.testing.support import assert_no_segments

# Set before vLLM is imported: no network, and vLLM's model-inspection cache in a stable
# per-user temporary directory (the first inspection of a model class takes ~25 s).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), f"kvbm-vllm-cache-{os.getuid()}"))

if TYPE_CHECKING:
    from kvbm.testing.vllm_harness import Engine


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kvbm.testing.vllm_harness import write_model_dir

    return write_model_dir(str(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="session")
def mla_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from kvbm.testing.vllm_harness import write_model_dir

    return write_model_dir(str(tmp_path_factory.mktemp("mla_model")), mla=True)


def _leaders(tag: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "kvbm.leader" in line and tag in line]


@pytest.fixture
def kvbm_env(engine_env: Callable[[str, int, bool], Callable[..., str]]) -> Callable[..., str]:
    """DYN_KVBM_* for one test (private run dir, small host pool); returns the setter of more
    (see ``engine_env``). The leak check is ``make_engine``'s."""
    return engine_env("kvbmv-", 90, True)


@pytest.fixture
def make_engine(model_dir: str, kvbm_env: Callable[..., str]) -> Iterator[Callable[..., "Engine"]]:
    """Build engines with unique engine ids; closes them and checks for leaks afterwards."""
    from kvbm.testing.vllm_harness import Engine, EngineSpec

    engines: list[Engine] = []
    tags: list[str] = []

    def make(*, tp: int = 1, ranks: list[int] | None = None, proc_workers: bool = False,
             **spec_kw: object) -> "Engine":
        engine_id = f"t{uuid.uuid4().hex[:10]}"
        tags.append(engine_id)  # checked for leaks also when the engine fails to start
        # spec_kw may name another model_dir (an MLA model).
        spec = EngineSpec(**{"model_dir": model_dir, **spec_kw, "engine_id": engine_id})  # type: ignore[arg-type]
        eng = Engine(spec, tp=tp, ranks=ranks, proc_workers=proc_workers)
        engines.append(eng)
        return eng

    yield make
    from kvbm.ipc.shm import sweep_stale_segments

    for eng in engines:
        eng.close()
    sweep_stale_segments()  # segments of a leader a test killed
    for tag in tags:
        assert_no_segments(tag)
        assert _leaders(tag) == [], f"leader process left behind: {_leaders(tag)}"

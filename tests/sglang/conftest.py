"""kvbm as SGLang's HiCache storage backend, against SGLang's real classes (sglang 0.5.23, CPU).

These tests need SGLang, which lives in its own venv (``scripts/setup_sglang_cpu.sh``);
``tests/test_sglang.py`` runs this directory with that venv's interpreter. Elsewhere nothing
here is collected.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from kvbm.testing.support import assert_no_segments


def _has_sglang() -> bool:
    # Not find_spec("sglang"): pytest puts tests/ on sys.path, where this directory is a
    # namespace package of that name.
    try:
        return importlib.util.find_spec("sglang.srt") is not None
    except ImportError:
        return False


if not _has_sglang():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def no_kvbm_leaks():
    """After each test: no segment of this process's instances (named ``sgl-<pid>-...``, or
    agreed by the ranks for a model named so) in /dev/shm."""
    yield
    assert_no_segments(f"sgl-{os.getpid()}-", within_s=15)  # a leader whose spawner was killed exits soon

"""Where vLLM's CPU backend lives: this interpreter, or the venv ``scripts/setup_vllm_cpu.sh`` builds.

kvbm's test extra installs the CUDA build of vLLM 0.33, which cannot run a forward pass on a
machine without a GPU; real forward passes on CPU need ``vllm-cpu`` (0.32), which cannot share a
venv with it. So the real-engine tests, ``kvbm bench e2e`` and ``kvbm demo --engine vllm`` run
in a second venv, found here. Light: imports nothing heavy.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

VENV_ENV = "KVBM_VLLM_CPU_VENV"
SETUP_SCRIPT = "scripts/setup_vllm_cpu.sh"


def repo_root() -> Path:
    """The source tree kvbm was imported from (an editable install or a checkout)."""
    return Path(__file__).resolve().parents[2]


def venv_dir() -> Path:
    """$KVBM_VLLM_CPU_VENV, else ``<repo>/.venv-vllm-cpu``."""
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else repo_root() / ".venv-vllm-cpu"


def runs_here() -> bool:
    """True when this interpreter has vLLM's CPU build (``vllm-cpu``)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def venv_python() -> Path | None:
    """The CPU venv's interpreter, if it has been built."""
    py = venv_dir() / "bin" / "python"
    return py if py.exists() else None


def interpreter() -> str | None:
    """An interpreter that can run vLLM on CPU: this one, else the CPU venv's, else None."""
    if runs_here():
        return sys.executable
    py = venv_python()
    return str(py) if py is not None else None


def missing_reason() -> str:
    """One line: why no CPU vLLM is available and how to get it."""
    return (f"vLLM's CPU backend is not installed: no 'vllm-cpu' in {sys.executable} and no venv at "
            f"{venv_dir()} (${VENV_ENV}); build it with {repo_root() / SETUP_SCRIPT}")

#!/usr/bin/env bash
# Builds the environment for kvbm's SGLang tests: sglang 0.5.23 on CPU torch, with only the
# pure-Python packages that SGLang's storage, host-pool and cache-controller modules import, and
# kvbm installed editable.
#
# Usage, from anywhere:  scripts/setup_sglang_cpu.sh [VENV]
#   VENV  where to build it (default: $KVBM_SGLANG_VENV, else <repo>/.venv-sglang)
# Idempotent: a venv whose stamp matches this script and that imports SGLang's storage classes
# and kvbm is kept. Takes ~3-5 min and ~2.5 GB the first time.
#
# Why not 'pip install sglang': its requirements pin CUDA-only wheels (sglang-kernel, flashinfer,
# flash-attn, nvidia-*) and torch==2.14.1, a multi-GB CUDA build. sglang itself is pure Python;
# it goes in with --no-deps beside CPU torch 2.13.0. PyPI's torchvision is built against CUDA
# torch and fails to import beside CPU torch, yet SGLang's config package and transformers import
# it at load time (multimodal paths only): an empty stand-in takes its place (below).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${KVBM_SGLANG_VENV:-$ROOT/.venv-sglang}}"
PY="$VENV/bin/python"
STAMP="$VENV/.kvbm-sglang-stamp"
WANT="$(sha256sum "$0" | cut -c1-16)"
log() { echo "setup_sglang_cpu: $*" >&2; }
CHECK='import sglang.srt.mem_cache.storage.backend_factory, sglang.srt.mem_cache.memory_pool_host, sglang.srt.mem_cache.memory_pool, sglang.srt.managers.cache_controller, kvbm'

if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && "$PY" -c "$CHECK" 2>/dev/null; then
    log "reusing $VENV"
    exit 0
fi
log "building $VENV"
start=$(date +%s)
rm -f "$STAMP"
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# CPU torch first, pinned in every later install: otherwise a plain 'torch' requirement of a
# dependency pulls a multi-GB CUDA build.
"$PY" -m pip install -q 'torch==2.13.0'
"$PY" -m pip install -q --no-deps 'sglang==0.5.23'
# What those modules import, at SGLang's own pins where it pins one. triton is imported by
# sglang.srt.utils at load time (never run here).
"$PY" -m pip install -q 'torch==2.13.0' numpy orjson psutil pybase64 requests packaging pillow \
    starlette msgspec pydantic pyzmq tqdm IPython aiohttp dill gguf 'triton==3.9.0' \
    'transformers==5.19.0' 'apache-tvm-ffi==0.1.11' 'sentencepiece==0.2.1' 'compressed-tensors==0.18.0'
# The torchvision stand-in: every torchvision.* module imports, every name in it is a
# placeholder that raises when used.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -m pip uninstall -q -y torchvision 2>/dev/null || true
mkdir -p "$SITE/torchvision"
cat > "$SITE/torchvision/__init__.py" <<'PY'
"""Stand-in for torchvision in kvbm's SGLang test environment (scripts/setup_sglang_cpu.sh).

PyPI's torchvision is built against CUDA torch and fails to import beside CPU torch; SGLang and
transformers only use it on multimodal paths, which this environment never runs. Every
``torchvision.*`` module imports, and every name in one is a placeholder that raises when used.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+kvbm.stand.in"


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")


def _placeholder(name):
    def fail(*args, **kwargs):
        raise RuntimeError(f"torchvision stand-in: {name} is not available in this environment")

    return _PlaceholderMeta(name, (), {"__new__": fail, "__call__": fail})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Finder())
sys.modules[__name__].__class__ = _StandInModule
PY
# The project (core dependencies only) and the test runner.
"$PY" -m pip install -q -e "$ROOT" 'torch==2.13.0' 'pytest>=8' 'pytest-timeout>=2.2'
"$PY" -c "$CHECK; import sglang, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
log "ready: $VENV ($(( $(date +%s) - start )) s)"

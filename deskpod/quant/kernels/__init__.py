"""Compiled CPU kernels, built on first use with the machine's C++ compiler and cached.

When no compiler is available the engine still runs: the loader falls back to float32 weights."""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def _build_dir(tag: str) -> Path:
    root = Path(os.environ.get("DESKPOD_KERNEL_CACHE") or Path.home() / ".cache" / "deskpod" / "kernels")
    path = root / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


# at::parallel_for splits work over threads only when the extension is compiled with OpenMP.
OPENMP = ["-fopenmp"]


def _openmp_runtime(torch) -> list[str]:
    """Link the OpenMP runtime torch itself loaded: a second runtime would bring a second thread pool,
    whose spinning threads would fight torch's for the same cores."""
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return [str(bundled[0])] if bundled else ["-fopenmp"]


def _cpu_features() -> bytes:
    """What this CPU can run: its model and instruction-set flags (Linux), else the platform's description."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor().encode() + platform.machine().encode()
    keep = [line for line in info.splitlines() if line.startswith(("flags", "Features", "model name", "CPU part"))]
    return "\n".join(sorted(set(keep))).encode()


def _build(name: str):
    """Compile (or load the cached build of) kernels/<name>.cpp for this machine; None when that fails here
    or DESKPOD_NO_KERNELS is set (the reason is logged once per module: callers cache)."""
    if os.environ.get("DESKPOD_NO_KERNELS"):
        return None
    import torch
    from torch.utils.cpp_extension import load

    source = HERE / f"{name}.cpp"
    cflags, ldflags = ["-O3", "-march=native", "-fopenmp-simd", *OPENMP], _openmp_runtime(torch)
    # -march=native builds for this CPU's instruction sets: the cache is keyed by them too, so a home folder
    # shared with another machine (or baked into an image) never hands it a build its CPU cannot run
    key = source.read_bytes() + torch.__version__.encode() + repr(cflags + ldflags).encode() + _cpu_features()
    tag = hashlib.sha256(key).hexdigest()[:16]
    build_dir = _build_dir(tag)
    if not any(build_dir.glob("*.so")):
        log.info("deskpod: building the %s kernels for this machine (once, about a minute)...", name)
    try:
        return load(
            name=f"deskpod_{name}_{tag}",
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: run without kernels
        log.warning("deskpod: %s kernels unavailable (%s); weights will be expanded to float32", name, e)
        return None


@cache
def cpu_ops():
    """The engine's fused CPU operations (rms_norm, paged decode attention), or None."""
    return _build("cpu_ops")


@cache
def ggml_blocks():
    """Matmul and dequantization over GGUF's block types as stored (Q4_0 ... Q8_0, Q4_K, Q5_K, Q6_K), or None."""
    return _build("ggml_blocks")


@cache
def lowbit_cpu():
    """The FP4 (NVFP4, MXFP4) and FP8 (E4M3, E5M2) weight kernels, or None."""
    return _build("lowbit_cpu")

"""Compiled CPU kernels, built on first use with the machine's C++ compiler and cached.

When no compiler is available the engine still runs: the loader falls back to float32 weights."""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("ggml_cpu.cpp")


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


@cache
def ggml_cpu():
    """The kernel module, or None when it cannot be built here (the reason is logged once)."""
    if os.environ.get("DESKPOD_NO_KERNELS"):
        return None
    import torch
    from torch.utils.cpp_extension import load

    cflags, ldflags = ["-O3", "-march=native", "-fopenmp-simd", *OPENMP], _openmp_runtime(torch)
    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + repr(cflags + ldflags).encode()).hexdigest()[:16]
    build_dir = _build_dir(tag)
    if not any(build_dir.glob("*.so")):
        log.info("deskpod: building the CPU kernels for this machine (once, about a minute)...")
    try:
        return load(
            name=f"deskpod_ggml_cpu_{tag}",
            sources=[str(SOURCE)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: run without kernels
        log.warning("deskpod: CPU kernels unavailable (%s); weights will be expanded to float32", e)
        return None

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


@cache
def ggml_cpu():
    """The kernel module, or None when it cannot be built here (the reason is logged once)."""
    if os.environ.get("DESKPOD_NO_KERNELS"):
        return None
    import torch
    from torch.utils.cpp_extension import load

    tag = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    build_dir = _build_dir(tag)
    if not any(build_dir.glob("*.so")):
        log.info("deskpod: building the CPU kernels for this machine (once, about a minute)...")
    try:
        return load(
            name=f"deskpod_ggml_cpu_{tag}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp-simd"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, headers missing: run without kernels
        log.warning("deskpod: CPU kernels unavailable (%s); weights will be expanded to float32", e)
        return None

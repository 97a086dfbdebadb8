"""Compiled CPU kernels: the prebuilt ones an image carries ($DESKPOD_PREBUILT_KERNELS, see build.py), else
built on first use with the machine's C++ compiler and cached.

When neither works the engine still runs: the loader falls back to float32 weights."""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

from deskpod.quant.kernels.build import compile_kernel, load_prebuilt, native_tag

log = logging.getLogger(__name__)


def _build_dir(tag: str) -> Path:
    root = Path(os.environ.get("DESKPOD_KERNEL_CACHE") or Path.home() / ".cache" / "deskpod" / "kernels")
    return root / tag


def _build(name: str):
    """The kernels of kernels/<name>.cpp for this machine: prebuilt, cached or compiled now; None when that
    fails here or DESKPOD_NO_KERNELS is set (the reason is logged once per module: callers cache)."""
    if os.environ.get("DESKPOD_NO_KERNELS"):
        return None
    try:
        prebuilt = load_prebuilt(name)
        if prebuilt is not None:
            return prebuilt
        tag = native_tag(name)
        build_dir = _build_dir(tag)
        if not any(build_dir.glob("*.so")):
            log.info("deskpod: building the %s kernels for this machine (once, about a minute)...", name)
        return compile_kernel(name, ("-march=native",), build_dir, f"deskpod_{name}_{tag}")
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

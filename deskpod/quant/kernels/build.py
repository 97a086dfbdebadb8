"""Compiling the CPU kernels: for this machine at first use (-march=native), or ahead of time for the
instruction-set levels a container image may meet (prebuild.py), so that the image needs no compiler.

At run time `load_prebuilt` takes, from the folder $DESKPOD_PREBUILT_KERNELS names, the best level this CPU
can run; the machine's own build is the fallback when none fits (or the folder was built for another torch)."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
KERNELS = ("cpu_ops", "ggml_blocks", "lowbit_cpu")
PREBUILT_ENV = "DESKPOD_PREBUILT_KERNELS"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Target:
    """An instruction-set level: the compiler's flags for it and the CPU flags (/proc/cpuinfo) it needs."""

    name: str
    march: tuple[str, ...]
    requires: frozenset[str] = frozenset()


_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# Best first. The kernels pick their paths by the compiler's macros (__AVX2__, __AVX512VNNI__, ...), so each
# level is a build of its own; the portable one runs anywhere (x86-64-v2 and plain x86-64 CPUs included).
TARGETS: dict[str, tuple[Target, ...]] = {
    "x86_64": (
        # Sapphire Rapids, Zen 4 and later: FP8's bfloat16 kernels (lowbit_cpu.cpp) besides VNNI
        Target("x86-64-v4-bf16", ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mavx512vbmi"),
               _V4 | {"avx512_vnni", "avx512_bf16", "avx512vbmi"}),
        Target("x86-64-v4-vnni", ("-march=x86-64-v4", "-mavx512vnni"), _V4 | {"avx512_vnni"}),
        Target("x86-64-v4", ("-march=x86-64-v4",), _V4),
        Target("x86-64-v3-vnni", ("-march=x86-64-v3", "-mavxvnni"), _V3 | {"avx_vnni"}),
        Target("x86-64-v3", ("-march=x86-64-v3",), _V3),
        Target("x86-64", ("-march=x86-64",)),
    ),
    "aarch64": (
        Target("armv8.2-a-dotprod", ("-march=armv8.2-a+dotprod+fp16",), frozenset({"asimddp", "asimdhp"})),
        Target("armv8-a", ("-march=armv8-a",)),
    ),
}


def cpu_description() -> str:
    """What this CPU can run: its model and instruction-set flags (Linux), else the platform's description."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("flags", "Features", "model name", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def cpu_flags() -> frozenset[str]:
    flags = set()
    for line in cpu_description().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.partition(":")[2].split())
    return frozenset(flags)


def runnable(targets: tuple[Target, ...], flags: frozenset[str]) -> list[Target]:
    return [t for t in targets if t.requires <= flags]


def _compile_flags(march: tuple[str, ...]) -> tuple[list[str], list[str]]:
    import torch

    # at::parallel_for splits work over threads only when the extension is compiled with OpenMP; linking the
    # OpenMP runtime torch itself loaded avoids a second thread pool spinning on the same cores
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return ["-O3", *march, "-fopenmp-simd", "-fopenmp"], [str(bundled[0])] if bundled else ["-fopenmp"]


def _ninja_on_path() -> None:
    """torch looks for `ninja` on PATH: the one the ninja package put beside this Python is not there when
    deskpod runs from a virtual environment that was never activated (/opt/deskpod/bin/deskpod serve)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def compile_kernel(name: str, march: tuple[str, ...], build_dir: Path, module_name: str):
    """Compile kernels/<name>.cpp into build_dir (or load the build already there) and import it."""
    from torch.utils.cpp_extension import load

    _ninja_on_path()
    cflags, ldflags = _compile_flags(march)
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(name=module_name, sources=[str(HERE / f"{name}.cpp")], extra_cflags=cflags,
                extra_ldflags=ldflags, build_directory=str(build_dir), verbose=False)


def native_tag(name: str) -> str:
    """The cache key of this machine's own build: source, torch, flags and the CPU (so a home folder shared
    with another machine, or baked into an image, never hands it a build its CPU cannot run)."""
    import torch

    cflags, ldflags = _compile_flags(("-march=native",))
    key = ((HERE / f"{name}.cpp").read_bytes() + torch.__version__.encode() + repr(cflags + ldflags).encode()
           + cpu_description().encode())
    return hashlib.sha256(key).hexdigest()[:16]


def module_name(name: str, target: Target) -> str:
    return f"deskpod_{name}_{target.name.replace('-', '_').replace('.', '_')}"


@cache
def _prebuilt_manifest() -> tuple[Path, dict] | None:
    folder = os.environ.get(PREBUILT_ENV)
    if not folder:
        return None
    import torch

    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        log.warning("deskpod: %s=%s holds no readable kernel manifest (%s); building for this machine", PREBUILT_ENV, folder, e)
        return None
    if manifest.get("torch") != torch.__version__:
        log.warning("deskpod: the kernels in %s were built for torch %s, this is %s; building for this machine",
                    folder, manifest.get("torch"), torch.__version__)
        return None
    return Path(folder), manifest


def load_prebuilt(name: str):
    """The best prebuilt build of kernel `name` this CPU can run, or None."""
    found = _prebuilt_manifest()
    if found is None:
        return None
    folder, manifest = found
    for target in runnable(TARGETS.get(platform.machine(), ()), cpu_flags()):
        file = manifest["targets"].get(target.name, {}).get(name)
        if not file:
            continue
        dotted = module_name(name, target)
        try:
            loader = importlib.machinery.ExtensionFileLoader(dotted, str(folder / file))
            spec = importlib.util.spec_from_file_location(dotted, folder / file, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
        except (ImportError, OSError) as e:  # a missing or damaged file: the next level down may do
            log.warning("deskpod: the prebuilt %s build of the %s kernels does not load (%s)", target.name, name, e)
            continue
        log.info("deskpod: %s kernels: the prebuilt %s build", name, target.name)
        return module
    return None

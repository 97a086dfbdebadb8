"""Kernels built ahead of time (an image's build stage): the level picked by the CPU's flags, a build loaded
where no compiler is, and a folder built for another torch passed over with a warning."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from deskpod.quant.kernels.build import TARGETS, runnable

X86 = TARGETS["x86_64"]


@pytest.mark.parametrize(
    ("flags", "best"),
    [
        ({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq",
          "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi"}, "x86-64-v4-bf16"),
        ({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512bw", "avx512cd", "avx512dq",
          "avx512vl", "avx512_vnni", "avx512_bf16"}, "x86-64-v4-vnni"),
        ({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx_vnni"}, "x86-64-v3-vnni"),
        ({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}, "x86-64-v3"),
        ({"sse4_2", "popcnt"}, "x86-64"),
    ],
)
def test_the_best_level_the_cpu_runs_is_picked(flags, best):
    assert runnable(X86, frozenset(flags))[0].name == best


PROBE = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from deskpod.quant.kernels import cpu_ops
ops = cpu_ops()
x, w = torch.randn(3, 64), torch.randn(64)
expected = torch.nn.functional.rms_norm(x, (64,), w, 1e-6)
print("MATCH" if ops is not None and torch.allclose(ops.rms_norm(x, w, 1e-6), expected, atol=1e-5) else "NONE")
"""


def probe(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env})


@pytest.mark.skipif(platform.machine() not in TARGETS, reason=f"no prebuilt levels for {platform.machine()}")
def test_a_prebuilt_kernel_loads_where_no_compiler_is(tmp_path):
    portable = TARGETS[platform.machine()][-1].name
    built = subprocess.run([sys.executable, "-m", "deskpod.quant.kernels.prebuild", "--out", str(tmp_path / "kernels"),
                            "--targets", portable, "--kernels", "cpu_ops"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    no_compiler = {"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc", "DESKPOD_KERNEL_CACHE": str(tmp_path / "cache")}
    ran = probe({**no_compiler, "DESKPOD_PREBUILT_KERNELS": str(tmp_path / "kernels")})
    assert ran.stdout.strip() == "MATCH", ran.stderr
    assert f"the prebuilt {portable} build" in ran.stderr
    assert not any((tmp_path / "cache").glob("*/*.so"))  # nothing compiled here

    # built for another torch: passed over, named; with no compiler either, the engine runs without kernels
    manifest = tmp_path / "kernels" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "torch": "0.0.1"}))
    ran = probe({**no_compiler, "DESKPOD_PREBUILT_KERNELS": str(tmp_path / "kernels")})
    assert ran.stdout.strip() == "NONE"
    assert "built for torch 0.0.1" in ran.stderr and "kernels unavailable" in ran.stderr


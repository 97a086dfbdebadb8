"""Hardware profiles: memory, bandwidth, compute and link of the boxes deskpod plans for.

Peak compute is dense (no 2:4 sparsity). Where a vendor quotes only a sparse FP4 figure, the dense
FP4, FP8 and BF16 rates are that figure halved, halved again and again (Blackwell's ratios).

The two efficiency factors turn peaks into what a good engine reaches; they were calibrated against
the published measurements in benchmarks/plan_accuracy.py:

- `decode_efficiency`, the share of peak memory bandwidth a decode step streams weights and KV at:
  0.70 on GB10, the middle of what llama.cpp (0.65–0.80 on five GGUF models) and SGLang (0.63 on
  Llama 3.1 8B FP8, 0.71 on 70B FP8) reach; 0.60 on discrete GPUs (NIM/TensorRT-LLM Llama 70B FP8 on
  two H100s: 0.61; vLLM Llama 3.1 8B at batch 8 on H200: 0.48).
- `prefill_efficiency`, the share of peak tensor throughput a long prompt runs at: 0.50 (SGLang FP8
  Llama 3.1 8B on GB10 reaches 128 TFLOPS of 250; TensorRT-LLM FP8 on H100 about the same).
  Mixture-of-experts prefill gets a further factor (deskpod.plan.speed.MOE_PREFILL_FACTOR).

`available_memory_bytes()` is what admission control asks: the memory free right now.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from deskpod.plan.shape import InvalidPlanInput

GB = 10**9
GiB = 2**30
MiB = 2**20
MB = 10**6


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    memory_bytes: int  # per box, as the OS or driver reports it
    bandwidth: float  # bytes/s per box
    flops: tuple[tuple[str, float], ...]  # dense peak FLOP/s per box by compute class
    reserved_bytes: int = 0  # per box, held by the OS, desktop and driver; never ours
    runtime_overhead_bytes: int = 1 * GB  # per box: CUDA context, cuBLAS workspace, torch itself
    nodes: int = 1  # boxes linked together in this profile
    tensor_parallel: bool = False  # split each layer across boxes (NVLink) rather than pipeline the layers
    link_bandwidth: float = 0.0  # bytes/s between two boxes
    link_latency: float = 0.0  # seconds for one hop of one message
    unified: bool = False  # CPU and GPU share the memory
    decode_efficiency: float = 0.60
    prefill_efficiency: float = 0.50
    source: str = ""

    @property
    def usable_bytes(self) -> int:
        """Per box: what deskpod may fill with weights, KV cache, activations and runtime."""
        return self.memory_bytes - self.reserved_bytes

    def peak_flops(self, compute: str) -> float:
        """The rate for `compute`, or the next wider one the hardware has (FP4 → FP8 → BF16)."""
        rates = dict(self.flops)
        for kind in FALLBACK[FALLBACK.index(compute):]:
            if kind in rates:
                return rates[kind]
        return min(rates.values())


FALLBACK = ("fp4", "fp8", "bf16", "f32")

_SPARK = "https://www.nvidia.com/en-us/products/workstations/dgx-spark/ (GB10: 128 GB LPDDR5x, 273 GB/s, 1 PFLOP FP4 sparse, ConnectX-7 200 Gb/s)"
_DIGITS = Hardware(
    name="digits",
    description="NVIDIA DGX Spark / Project DIGITS (GB10), 128 GB unified",
    memory_bytes=128 * GB,
    reserved_bytes=4 * GB,
    bandwidth=273 * GB,
    flops=(("fp4", 500e12), ("fp8", 250e12), ("bf16", 125e12)),
    unified=True,
    decode_efficiency=0.70,
    prefill_efficiency=0.50,
    link_bandwidth=200e9 / 8,  # ConnectX-7, 200 Gb/s
    link_latency=30e-6,  # assumed: one RoCE send/recv through torch.distributed
    source=_SPARK,
)

HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        _DIGITS,
        replace(_DIGITS, name="digits-x2", nodes=2,
                description="two DGX Sparks linked by ConnectX-7 (200 Gb/s), pipeline split"),
        Hardware(
            name="rtx-5090",
            description="NVIDIA GeForce RTX 5090, 32 GB GDDR7",
            memory_bytes=32 * GiB,
            reserved_bytes=1 * GiB,  # the desktop's framebuffer
            bandwidth=1792 * GB,
            # GeForce: FP8 and BF16 with FP32 accumulation run at half the FP16-accumulate rate.
            flops=(("fp4", 1676e12), ("fp8", 419e12), ("bf16", 209.5e12)),
            link_bandwidth=64 * GB,  # PCIe 5.0 x16
            link_latency=10e-6,
            source="https://www.nvidia.com/en-us/geforce/graphics-cards/50-series/rtx-5090/ "
                   "(32 GB, 1792 GB/s, 3352 AI TOPS FP4 sparse)",
        ),
        Hardware(
            name="h100",
            description="NVIDIA H100 SXM 80 GB",
            memory_bytes=81_559 * MiB,
            reserved_bytes=0,
            bandwidth=3.35e12,
            flops=(("fp8", 1979e12), ("bf16", 989.5e12)),
            link_bandwidth=450 * GB,  # NVLink 4, 900 GB/s both ways
            link_latency=5e-6,
            tensor_parallel=True,
            source="https://www.nvidia.com/en-us/data-center/h100/ (SXM: 80 GB, 3.35 TB/s, "
                   "FP8 3958 / BF16 1979 TFLOPS sparse)",
        ),
        Hardware(
            name="h200",
            description="NVIDIA H200 SXM 141 GB",
            memory_bytes=143_771 * MiB,
            reserved_bytes=0,
            bandwidth=4.8e12,
            flops=(("fp8", 1979e12), ("bf16", 989.5e12)),
            link_bandwidth=450 * GB,
            link_latency=5e-6,
            tensor_parallel=True,
            source="https://www.nvidia.com/en-us/data-center/h200/ (141 GB, 4.8 TB/s, "
                   "FP8 3958 / BF16 1979 TFLOPS sparse)",
        ),
    )
}


def get_hardware(name: str) -> Hardware:
    """A built-in profile, `this` (this machine, probed), or a profile file (.json / .toml)."""
    if name == "this":
        return this_machine()
    if name in HARDWARE:
        return HARDWARE[name]
    path = Path(name).expanduser()
    if path.suffix in (".json", ".toml") or path.is_file():
        return load_profile(path)
    raise InvalidPlanInput(
        f"unknown hardware {name!r}; choose one of: {', '.join([*HARDWARE, 'this'])}, or a profile file"
    )


# -- profile files ------------------------------------------------------------------------------

# File keys in human units → (Hardware field, factor).
PROFILE_KEYS = {
    "memory_gb": ("memory_bytes", GB),
    "reserved_gb": ("reserved_bytes", GB),
    "runtime_overhead_gb": ("runtime_overhead_bytes", GB),
    "bandwidth_gb_s": ("bandwidth", GB),
    "link_gbit_s": ("link_bandwidth", GB / 8),
    "link_latency_us": ("link_latency", 1e-6),
}
PROFILE_REQUIRED = ("name", "memory_gb", "bandwidth_gb_s", "tflops", "source")


def load_profile(path: Path) -> Hardware:
    """A profile file, e.g. {"name": "my-box", "memory_gb": 96, "bandwidth_gb_s": 400,
    "tflops": {"bf16": 100}, "source": "vendor datasheet URL"} (see PROFILE_KEYS for the rest)."""
    if not path.is_file():
        raise InvalidPlanInput(f"hardware profile {path} does not exist")
    data = _read_profile(path)
    missing = [k for k in PROFILE_REQUIRED if k not in data]
    if missing:
        raise InvalidPlanInput(f"hardware profile {path} is missing {', '.join(missing)}")
    values: dict = {"name": str(data["name"]), "description": str(data.get("description", path.name)),
                    "source": str(data["source"])}
    for key, (field, factor) in PROFILE_KEYS.items():
        if key in data:
            values[field] = type(getattr(_DIGITS, field))(float(data[key]) * factor)
    values["flops"] = tuple((k, float(v) * 1e12) for k, v in dict(data["tflops"]).items())
    for key in ("nodes", "unified", "tensor_parallel", "decode_efficiency", "prefill_efficiency"):
        if key in data:
            values[key] = data[key]
    hardware = Hardware(**values)
    if hardware.memory_bytes <= 0 or hardware.bandwidth <= 0 or not hardware.flops:
        raise InvalidPlanInput(f"hardware profile {path}: memory, bandwidth and tflops must be positive")
    return hardware


def _read_profile(path: Path) -> dict:
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, ImportError) as err:
        raise InvalidPlanInput(f"cannot read hardware profile {path}: {err}") from err


# -- this machine -------------------------------------------------------------------------------


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} off Linux)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    info = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def available_memory_bytes(cuda: bool | None = None) -> int:
    """Memory free for a new model right now.

    On a CUDA device: its free memory (`torch.cuda.mem_get_info`). Otherwise MemAvailable from
    /proc/meminfo. `cuda=None` asks CUDA only when torch is already loaded in this process (the
    engine's case), so the planner itself never pays for importing torch.
    """
    free = _cuda_free_bytes() if cuda or (cuda is None and "torch" in sys.modules) else None
    if free is None:
        info = meminfo()
        free = info.get("MemAvailable") or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = memory_limit_bytes()
    return min(free, limit) if limit else free


def memory_limit_bytes() -> int | None:
    """$DESKPOD_MEMORY_LIMIT: the most memory deskpod may plan to use (bytes, or with a KB/MB/GB/TB
    suffix), for sharing a box with other work. None when unset."""
    text = os.environ.get("DESKPOD_MEMORY_LIMIT", "").strip().upper()
    if not text:
        return None
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    unit = next((u for u in units if text.endswith(u)), "B")
    number = text[: len(text) - len(unit)] if text.endswith(unit) else text
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise InvalidPlanInput(f"DESKPOD_MEMORY_LIMIT={text!r}: give bytes or a size such as 16GB") from None
    if value <= 0:
        raise InvalidPlanInput(f"DESKPOD_MEMORY_LIMIT={text!r}: must be positive")
    return int(value)


def _cuda_free_bytes() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


@functools.cache
def this_machine() -> Hardware:
    """This CPU host: total memory from /proc/meminfo, and bandwidth and compute probed once."""
    info = meminfo()
    total = info.get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = info.get("MemAvailable", total)
    bandwidth, flops = probe_bandwidth(), probe_flops()
    gemm = gemm_type()
    cores = os.cpu_count() or 1
    return Hardware(
        name="this",
        description=f"this machine: {cores} cores, {total / GiB:.1f} GiB RAM, "
                    f"{bandwidth / GB:.1f} GB/s measured, {flops / 1e9:.0f} GFLOPS measured ({gemm})",
        memory_bytes=total,
        reserved_bytes=total - available,  # what other processes hold now
        # Measured RSS with deskpod's engine and its CPU kernels imported and built: 248 MB (torch's CPU runtime
        # ≈ 230 MB of it); the tokenizer's tables are counted per model (capacity.runtime_bytes)
        runtime_overhead_bytes=250 * MB,
        bandwidth=bandwidth,
        flops=((gemm, flops),),
        unified=True,
        link_bandwidth=10e9,  # loopback
        link_latency=50e-6,
        # A few CPU cores decoding block-quantized weights are bound by unpacking them, not by DRAM:
        # on SmolLM2 Q4_1 with 2 threads (benchmarks/decode.py), deskpod streamed weights at 0.31 and
        # llama.cpp at 0.43 of the probed copy bandwidth.
        decode_efficiency=0.35,
        prefill_efficiency=0.50,
        source="/proc/meminfo; a numpy copy and a torch matmul probe",
    )


def probe_bandwidth(nbytes: int = 256 * MiB, repeats: int = 3) -> float:
    """Memory bandwidth in bytes/s: the best of a few numpy copies (reads + writes counted)."""
    import numpy as np

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def gemm_type() -> str:
    """"bf16" or "f32": the type a prompt's GEMM runs in on this CPU (deskpod.quant.ggml.GEMM_DTYPE)."""
    import torch

    from deskpod.quant.ggml import GEMM_DTYPE

    return "bf16" if GEMM_DTYPE == torch.bfloat16 else "f32"


def probe_flops(n: int = 1024, repeats: int = 5) -> float:
    """Matmul throughput in FLOP/s on all cores, in the type a prompt's GEMM runs in here (bfloat16 on CPUs
    with AMX tiles, float32 elsewhere: deskpod.quant.ggml.GEMM_DTYPE)."""
    import torch

    from deskpod.quant.ggml import GEMM_DTYPE

    a = torch.rand(n, n, generator=torch.Generator().manual_seed(0)).to(GEMM_DTYPE)
    a @ a  # warm the GEMM's threads
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * n**3 / (time.perf_counter() - start)

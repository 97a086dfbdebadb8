"""EngineConfig: everything about how one model is run, checked once at construction — the form its
weights are held in, where and in what precision, how long a request may be, how requests share the
engine, and how much memory its KV cache may take. Light (no torch): `deskpod --help` imports it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from deskpod.errors import DeskpodError

# "compact" keeps quantized weights in their stored form and runs them with deskpod's kernels; "float32"
# expands every weight (the reference the correctness tests compare with).
WEIGHT_MODES = ("compact", "float32")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEVICE_HELP = "cpu, cuda or cuda:N; auto: the first CUDA GPU torch sees, else the CPU (default: %(default)s)"


def resolve_device(device: str) -> str:
    """`auto` → "cuda" when torch sees a GPU, else "cpu"; a CUDA device torch cannot see is refused by name."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise DeskpodError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device == "cpu":
        return device
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda" if visible else "cpu"
    index = int(device.partition(":")[2] or 0)
    if index >= visible:
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise DeskpodError(f"--device {device}: torch {torch.__version__} ({build}) sees {visible} CUDA device(s)")
    return device


@dataclass(frozen=True)
class EngineConfig:
    weights: str = "compact"  # one of WEIGHT_MODES
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "float32"  # activations, float weights and the KV cache; the CPU kernels compute in float32
    threads: int | None = None  # CPU threads (default: PyTorch's, one per core)
    context: int | None = None  # most tokens per request, prompt and reply (default: the model's)
    max_num_seqs: int = 32  # requests decoded together
    max_num_batched_tokens: int = 512  # tokens computed per step: the prefill chunk budget
    max_waiting: int = 256  # queued requests before QueueFull (the server's 429)
    block_size: int = 16  # tokens per KV block
    memory_fraction: float | None = None  # share of free memory for the KV pool
    kv_cache_gb: float | None = None  # or an absolute size

    def __post_init__(self) -> None:
        checks = [
            (self.weights in WEIGHT_MODES, f"weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (bool(re.fullmatch(r"cpu|cuda(:\d+)?", self.device)), f"device must be cpu, cuda or cuda:N, got {self.device!r}"),
            (self.threads is None or self.threads >= 1, f"threads must be at least 1, got {self.threads}"),
            (self.context is None or self.context >= 2, f"the context must be at least 2 tokens, got {self.context}"),
            (self.max_num_seqs >= 1 and self.max_waiting >= 1, "--max-num-seqs and --max-waiting must be at least 1"),
            (self.max_num_batched_tokens >= 1 and self.block_size >= 1, "the batch token budget and block size must be at least 1"),
            (self.memory_fraction is None or self.kv_cache_gb is None, "give --memory-fraction or --kv-cache-gb, not both"),
            (self.memory_fraction is None or 0 < self.memory_fraction <= 1, f"--memory-fraction must be in (0, 1], got {self.memory_fraction}"),
            (self.kv_cache_gb is None or self.kv_cache_gb > 0, f"--kv-cache-gb must be more than 0, got {self.kv_cache_gb}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DeskpodError(message)

    def context_for(self, max_context: int) -> int:
        """The per-request limit for a model trained on `max_context` tokens."""
        return min(self.context or max_context, max_context)

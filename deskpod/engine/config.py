"""EngineConfig: everything about how one model is run, checked once at construction — the form its
weights are held in, where and in what precision, how long a request may be, how requests share the
engine, and how much memory its KV cache may take. Light (no torch): `deskpod --help` imports it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields

from deskpod.errors import DeskpodError

# "compact" keeps quantized weights in their stored form and runs them with deskpod's kernels; "float32"
# expands every weight (the reference the correctness tests compare with).
WEIGHT_MODES = ("compact", "float32")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The KV cache's element type. auto: float16 on the CPU with compact weights (half the bytes attention reads at
# long contexts, where reading the keys and values is most of a step; llama.cpp keeps them so too), else `dtype`:
# the float32 reference path (`--weights float32`) stays float32 throughout.
KV_CACHE_DTYPES = ("auto", *DTYPES)
KV_CACHE_DTYPE_HELP = ("element type of the KV cache: auto (float16 on the CPU with compact weights, else the "
                       "activations' type), float32, float16 or bfloat16 (default: %(default)s)")
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


SPECULATIVE_METHODS = ("ngram", "draft_model")
SPECULATIVE_HELP = ("speculative decoding, vLLM's JSON: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                    "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (each key optional) guesses the next "
                    "tokens from earlier text, '{\"model\": \"qwen2.5-coder-0.5b\", \"num_speculative_tokens\": 4}' "
                    "has a smaller model with the same tokenizer guess them (a store name or a path); each step checks "
                    "the guesses at once: the same replies, faster when the guesses are often right")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: guesses at a request's next tokens, which one forward pass of the model checks all at
    once. `ngram` (vLLM's prompt lookup) needs no second model: the tokens that followed the latest earlier
    occurrence of the sequence's last n tokens are the guesses. `draft_model`: a smaller model with the same
    tokenizer (`model`: a store name or a path) guesses greedily. Either way the reply is exactly what decoding
    token by token gives, sampled or greedy."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most tokens proposed per step
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up (the longest that occurs wins)
    prompt_lookup_min: int = 2  # ngram: the shortest; shorter matches propose too often to pay for their checking
    disable_by_batch_size: int | None = None  # propose nothing while this many requests or more are running
    model: str | None = None  # draft_model: the draft (a store name, a .gguf file or a model folder)

    def __post_init__(self) -> None:
        checks = [
            (self.method in SPECULATIVE_METHODS, f"method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}"),
            ((self.method == "draft_model") == (self.model is not None),
             "method draft_model needs a model (a store name or a path), and only it takes one"),
            (self.model is None or (isinstance(self.model, str) and self.model.strip() != ""),
             f"model must be a store name or a path, got {self.model!r}"),
            (_is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= 64,
             f"num_speculative_tokens must be an integer from 1 to 64, got {self.num_speculative_tokens!r}"),
            (_is_int(self.prompt_lookup_min) and self.prompt_lookup_min >= 1,
             f"prompt_lookup_min must be an integer, at least 1, got {self.prompt_lookup_min!r}"),
            (_is_int(self.prompt_lookup_max) and _is_int(self.prompt_lookup_min) and self.prompt_lookup_max >= self.prompt_lookup_min,
             f"prompt_lookup_max must be an integer, at least prompt_lookup_min ({self.prompt_lookup_min}), got {self.prompt_lookup_max!r}"),
            (self.disable_by_batch_size is None or (_is_int(self.disable_by_batch_size) and self.disable_by_batch_size >= 1),
             f"disable_by_batch_size must be an integer, at least 1, got {self.disable_by_batch_size!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DeskpodError(f"--speculative-config: {message}")

    @classmethod
    def from_json(cls, text: str | None) -> SpeculativeConfig | None:
        """vLLM's --speculative-config: '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'.
        A key deskpod does not know is refused by name, never ignored. None (the option not given): None."""
        if text is None:
            return None
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as e:
            raise DeskpodError(f"--speculative-config is not JSON ({e}): write it as "
                               "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'") from None
        if not isinstance(settings, dict):
            raise DeskpodError("--speculative-config must be a JSON object, e.g. '{\"method\": \"ngram\"}'")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise DeskpodError(f"--speculative-config: unknown key(s) {', '.join(map(repr, unknown))}; "
                               f"deskpod reads {', '.join(known)}")
        if "model" in settings and "method" not in settings:  # as vLLM reads it: a model given is a draft model
            settings = {**settings, "method": "draft_model"}
        lookup = sorted(k for k in settings if k.startswith("prompt_lookup_"))
        if settings.get("method") == "draft_model" and lookup:
            raise DeskpodError(f"--speculative-config: {', '.join(lookup)} apply to method ngram, not draft_model")
        return cls(**settings)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    speculative: SpeculativeConfig | None = None  # propose and check several tokens a step (None: one a step)
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        checks = [
            (self.weights in WEIGHT_MODES, f"weights must be one of {', '.join(WEIGHT_MODES)}, got {self.weights!r}"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"),
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

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type, `auto` resolved."""
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        on_cpu_compact = self.device == "cpu" and self.weights == "compact" and self.dtype == "float32"
        return "float16" if on_cpu_compact else self.dtype

    def context_for(self, max_context: int) -> int:
        """The per-request limit for a model trained on `max_context` tokens."""
        return min(self.context or max_context, max_context)

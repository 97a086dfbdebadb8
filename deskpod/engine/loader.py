"""Loads any model the engine runs, from a .gguf file or a Hugging Face safetensors folder:

    open_weights(path)          the file as tensors by canonical name, and its ModelSpec
    check_runnable(spec)        the architecture that builds it; refused if it uses a feature that one lacks
    admit(...)                  the planner's verdict on memory, before any weight is read
    architecture.build(...)     the model, its weights in the form the config asks for
    check_all_used(source)      refused if the file holds tensors the model did not take

so a checkpoint deskpod does not fully understand is refused by name, never run wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deskpod.engine.config import EngineConfig
from deskpod.engine.models import architecture, check_runnable
from deskpod.engine.models.builder import ModelBuilder
from deskpod.engine.models.layers import DecoderLM
from deskpod.engine.tokenizer import Tokenizer
from deskpod.errors import CorruptModel, UnsupportedModel
from deskpod.formats.spec import ModelSpec
from deskpod.formats.weights import WeightSource, declared_architecture, open_weights
from deskpod.link.share import Share
from deskpod.plan.capacity import MemoryPlan, check_fits
from deskpod.quant.kernels import cpu_ops
from deskpod.plan.devices import available_memory_bytes
from deskpod.plan.shape import ModelShape
from deskpod.quant.linear import WeightOptions, resident_bytes
from deskpod.quant.pages import return_freed_heap

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Unused tensors whose names say what they are: the feature the message names.
UNUSED_FEATURES = {"_exps.": "Mixture-of-Experts experts", "_shexp.": "a shared expert", "ffn_gate_inp.": "a MoE router",
                   "attn_sinks.": "attention sinks"}


@dataclass
class LoadedModel:
    model: DecoderLM
    tokenizer: Tokenizer
    spec: ModelSpec
    path: Path
    label: str  # the model as the user named it
    context: int  # the most tokens a request may hold here (the model's, or less if the config asks)
    weights: str = "compact"  # how its weights are held (EngineConfig.weights when it was loaded)
    # speculative decoding's draft models loaded for it, by name: every engine over this model shares them
    drafts: dict[str, LoadedModel] = field(default_factory=dict, repr=False, compare=False)

    def weight_bytes(self) -> int:
        """Resident bytes of the weights (buffers and parameters; the rotary frequencies excluded)."""
        tensors = [*self.model.parameters(), *(b for n, b in self.model.named_buffers() if not n.endswith("inv_freq"))]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def weight_options(config: EngineConfig) -> WeightOptions:
    return WeightOptions(config.weights == "compact", config.device, TORCH_DTYPES[config.dtype])


def kv_torch_dtype(config: EngineConfig) -> torch.dtype:
    """The KV cache's element type under these settings (`auto` resolved)."""
    return TORCH_DTYPES[config.kv_dtype]


def kv_dtype_bytes(config: EngineConfig) -> int:
    return kv_torch_dtype(config).itemsize


def model_shape(spec: ModelSpec, name: str) -> ModelShape:
    """The planner's view of a model about to be loaded."""
    return ModelShape.from_spec(spec, name)


def planned_weight_bytes(source: WeightSource, config: EngineConfig, share: Share | None = None) -> int:
    """What the weights will take once loaded with this config, known before reading any of them; with a
    `share`, what this box of a link holds."""
    options = weight_options(config)
    if share is None:
        return sum(resident_bytes(t, options) for t in source.tensors())
    return sum(round(resident_bytes(t, options) * share_fraction(share, source.spec, t.name))
               for t in source.tensors() if share.owns(t.name))


def share_fraction(share: Share, spec: ModelSpec, name: str) -> float:
    """The part of an owned tensor a box holds: its heads' or columns' under tensor parallel, else all."""
    if not share.tensor or "norm" in name or "ffn_gate_inp" in name or name.startswith("rope_freqs"):
        return 1.0
    if name.startswith(("token_embd.", "output.")):
        return (share.vocab_end - share.vocab_start) / spec.vocab_size
    if any(part in name for part in ("ffn_gate", "ffn_up", "ffn_down")):
        return (share.ffn_end - share.ffn_start) / spec.intermediate_size
    return (share.kv_end - share.kv_start) / spec.num_kv_heads


def admit(source: WeightSource, config: EngineConfig, context: int, share: Share | None = None) -> MemoryPlan:
    """Refuses (DoesNotFit, with the breakdown and the ways out) a model that cannot fit in the memory free
    right now, with the same functions `deskpod plan` uses (for a linked box: its share and KV cache)."""
    shape = model_shape(source.spec, source.label)
    free = available_memory_bytes(cuda=config.device.startswith("cuda"))
    weights, nodes = planned_weight_bytes(source, config, share), share.world if share else 1
    # check_fits divides the weights by the number of boxes; this box's share is known exactly
    return check_fits(shape, weights * nodes, context, free, kv_dtype_bytes=kv_dtype_bytes(config), nodes=nodes)


def _gguf_tokenizer(source: WeightSource) -> Tokenizer:
    return Tokenizer.from_gguf(source.gguf)


def _folder_tokenizer(source: WeightSource) -> Tokenizer:
    return Tokenizer.from_folder(source.folder.path)


TOKENIZERS: dict[str, Callable[[WeightSource], Tokenizer]] = {"gguf": _gguf_tokenizer, "safetensors": _folder_tokenizer}


def load_model(path: str | Path, config: EngineConfig = EngineConfig(), name: str | None = None,
               share: Share | None = None, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LoadedModel:
    """The model in a .gguf file or a Hugging Face folder, with its tokenizer; refused with DoesNotFit when it
    cannot fit at the config's context (default: the model's full context). `name` is how errors call it.
    `share`: only this box's part of the model, for a link (deskpod.link); `reduce` sums tensor-parallel parts."""
    if config.threads:
        torch.set_num_threads(config.threads)
    source = _open(path, name)
    arch = check_runnable(source.spec, source.label)
    context = config.context_for(source.spec.max_context)
    admit(source, config, context, share)
    tokenizer = TOKENIZERS[source.format](source)
    model = arch.build(ModelBuilder(source, weight_options(config), share, reduce))
    return_freed_heap()
    check_all_used(source, arch.name, share)
    weights = config.weights
    # the kernels built (once per machine) now, not in the middle of the first request; without them (not
    # buildable here, or DESKPOD_NO_KERNELS) compact weights were expanded, and the model runs as float32
    if config.device == "cpu" and config.dtype == "float32" and cpu_ops() is None:
        weights = "float32"
    return LoadedModel(model, tokenizer, source.spec, Path(path), source.label, context, weights)


def _open(path: str | Path, name: str | None) -> WeightSource:
    """The weight source; for a file whose metadata deskpod cannot read, the architecture it names is checked
    first, so that a model of an unsupported kind says so rather than that its metadata is incomplete."""
    try:
        return open_weights(path, name)
    except CorruptModel:
        declared = declared_architecture(path)
        if declared is not None:
            architecture(declared, name or str(path))  # UnsupportedModel listing what deskpod runs
        raise


def check_all_used(source: WeightSource, architecture: str, share: Share | None = None) -> None:
    """UnsupportedModel naming the tensors the model did not take: parts of the checkpoint deskpod does not run.
    A linked box checks the tensors of its share (each tensor is some box's, so the link checks them all)."""
    unused = [name for name in source.unused() if share is None or share.owns(name)]
    if not unused:
        return
    features = {text for name in unused for key, text in UNUSED_FEATURES.items() if key in name}
    what = f" ({', '.join(sorted(features))})" if features else ""
    names = [source.info(name).file_name for name in unused]  # as the file calls them
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise UnsupportedModel(
        f"{source.label}: {len(unused)} tensor{'s' * (len(unused) > 1)} of this {source.spec.architecture} model "
        f"{'are' if len(unused) > 1 else 'is'} not used by deskpod's {architecture} implementation{what}: {shown}. "
        "Running without them would give wrong output"
    )

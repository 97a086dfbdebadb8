"""One plan: a model at a precision, context and batch, on a hardware profile."""

from __future__ import annotations

from dataclasses import dataclass

from deskpod.plan import capacity, speed
from deskpod.plan.devices import Hardware
from deskpod.plan.precision import SCHEMES, get_scheme
from deskpod.plan.shape import InvalidPlanInput
from deskpod.plan.source import ModelSource
from deskpod.plan.weights import WeightBytes, weight_bytes

DEFAULT_CONTEXT = 8192  # when --context is not given (capped by the model's maximum)
DEFAULT_PROMPT = 2048  # the prompt behind TTFT and the prefill rate (capped by the context)


@dataclass(frozen=True)
class Plan:
    source: ModelSource
    hardware: Hardware
    precision: str
    weights: WeightBytes
    memory: capacity.MemoryPlan  # per box, over the profile's boxes
    nodes_needed: int  # boxes like these the model needs; 0 = more than MAX_NODES
    max_context: int
    max_batch: int
    speed: speed.SpeedEstimate  # on the profile's boxes, or on `nodes_needed` when it does not fit
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def memory_totals(self) -> dict[str, int]:
        """Bytes by part over all the profile's boxes."""
        n = self.memory.nodes
        return {
            "weights": self.weights.total,
            "kv_cache": self.memory.kv_per_token * self.memory.context * self.memory.batch,
            "activations": self.memory.activations * n,
            "runtime_overhead": self.memory.overhead * n,
        }

    def to_json(self) -> dict:
        shape, memory, est = self.source.shape, self.memory, self.speed
        totals = self.memory_totals()
        return {
            "model": shape.name,
            "origin": self.source.origin,
            "hardware": self.hardware.name,
            "boxes": self.hardware.nodes,
            "precision": self.precision,
            "context": memory.context,
            "batch": memory.batch,
            "params_total": shape.total_params,
            "params_active": shape.active_params,
            "fits": self.fits,
            "nodes_needed": self.nodes_needed,
            "memory": {
                **totals,
                "total_bytes": sum(totals.values()),
                "available_bytes": memory.available * memory.nodes,
                "kv_cache_per_token": memory.kv_per_token,
                "per_box": {**memory.parts(), "total_bytes": memory.total, "available_bytes": memory.available},
            },
            "max_context": self.max_context,
            "max_batch": self.max_batch,
            "prompt_tokens": est.prompt_tokens,
            "prefill_tokens_per_s": est.prefill_tokens_per_s,
            "time_to_first_token_s": est.ttft_s,
            "decode_tokens_per_s": est.decode_tokens_per_s,
            "decode_throughput_tokens_per_s": est.decode_throughput,
            "decode_bytes_per_token": est.decode_bytes_per_token,
            "link_s_per_token": est.link_s_per_token,
            "notes": list(self.notes),
        }


def make_plan(
    source: ModelSource,
    hardware: Hardware,
    *,
    precision: str | None = None,
    context: int | None = None,
    batch: int = 1,
    kv_dtype_bytes: int = 2,
    force: bool = False,
) -> Plan:
    shape = source.shape
    context = check_context(shape.max_context, context, force)
    if batch <= 0:
        raise InvalidPlanInput(f"batch must be a positive number of sequences, got {batch}")
    label, weights, scheme = _weights(source, precision)
    notes = []
    if source.weights is not None and weights is source.weights:
        notes.append(f"weights: the file's own tensors ({label}), {capacity.gb(weights.total)}")
    sizing = dict(kv_dtype_bytes=kv_dtype_bytes, overhead_bytes=capacity.runtime_bytes(shape, hardware))
    usable = hardware.usable_bytes
    memory = capacity.memory_plan(shape, weights.total, context, usable, batch, nodes=hardware.nodes, **sizing)
    needed = capacity.nodes_needed(shape, weights.total, context, usable, batch, **sizing)
    limit = None if force else shape.max_context or None
    longest = capacity.max_context(shape, weights.total, usable, batch, nodes=hardware.nodes, limit=limit, **sizing)
    most = capacity.max_batch(shape, weights.total, context, usable, nodes=hardware.nodes, **sizing)
    nodes = hardware.nodes if memory.fits or not needed else needed
    if not memory.fits and needed:
        boxes = "one box" if hardware.nodes == 1 else f"{hardware.nodes} boxes"
        notes.append(f"does not fit on {boxes}; speeds are for {needed} linked boxes")
    est = speed.estimate(shape, weights, hardware, scheme, prompt=min(DEFAULT_PROMPT, context),
                         batch=batch, nodes=nodes, kv_dtype_bytes=kv_dtype_bytes)
    return Plan(source, hardware, label, weights, memory, needed, longest, most, est, tuple(notes))


def check_context(model_max: int, context: int | None, force: bool) -> int:
    if context is None:
        return min(DEFAULT_CONTEXT, model_max) if model_max else DEFAULT_CONTEXT
    if context <= 0:
        raise InvalidPlanInput(f"context must be a positive number of tokens, got {context}")
    if model_max and context > model_max and not force:
        raise InvalidPlanInput(f"context {context:,} exceeds the model's maximum of {model_max:,} tokens; "
                               "pass --force to plan it anyway")
    return context


def _weights(source: ModelSource, precision: str | None):
    """(label, weight bytes, scheme for compute): the file's own tensors unless asked otherwise."""
    wanted = get_scheme(precision) if precision else None
    if source.weights is not None and (wanted is None or wanted.name == source.precision):
        scheme = SCHEMES[source.precision] if source.precision else SCHEMES["bf16"]
        return source.file_type or scheme.name, source.weights, scheme
    scheme = wanted or SCHEMES[source.precision or "bf16"]
    return scheme.name, weight_bytes(source.shape, scheme), scheme

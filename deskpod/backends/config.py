"""A model's config: Triton's own ModelConfig protobuf, read from config.pbtxt (text format) or a JSON override,
completed from the model file where the format allows (ONNX), and checked before anything is loaded.

Every error names the file and the field to fix, e.g. "models/add/config.pbtxt: input[1].dims: ...".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import CorruptModel, UnsupportedModel

from . import datatypes

# platform (Triton's older way to name a backend) -> backend
PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "ensemble": "ensemble",
}
# backend -> the platform Triton reports in metadata
BACKEND_PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "pytorch": "pytorch_libtorch",
    "python": "python",
    "ensemble": "ensemble",
}
DEFAULT_MODEL_FILENAMES = {"onnxruntime": "model.onnx", "pytorch": "model.pt", "python": "model.py"}
# Triton's auto-complete gives a batching model this max_batch_size (its --backend-config default-max-batch-size)
DEFAULT_MAX_BATCH_SIZE = 4
CONFIG_FILENAME = "config.pbtxt"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a model file declares it: shape with -1 for every dynamic dimension."""

    name: str
    datatype: str  # v2 name
    shape: tuple[int, ...]


def read_config(model_dir: Path, config_json: str | None = None) -> tuple[mc.ModelConfig, set[str]]:
    """The config as written (config.pbtxt, or `config_json` when given, as Triton's load API allows), and
    the top-level fields it sets explicitly (proto3 cannot tell `max_batch_size: 0` from no field)."""
    config = mc.ModelConfig()
    if config_json is not None:
        source = "the config given to load"
        try:
            json_format.Parse(config_json, config)
            fields = set(json.loads(config_json))
        except (json_format.ParseError, ValueError) as e:
            raise CorruptModel(f"{source}: not a valid ModelConfig JSON: {e}") from None
        return config, fields
    path = model_dir / CONFIG_FILENAME
    if not path.is_file():
        return config, set()
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise CorruptModel(f"{path}: {e} (config.pbtxt is Triton's ModelConfig in protobuf text format)") from None
    fields = set(re.findall(r"^\s*([a-z_]+)\s*[:{\[]", text, re.MULTILINE))
    return config, fields


def resolve_backend(config: mc.ModelConfig, model_dir: Path, versions: Iterable[Path], source: str) -> None:
    """Fill `backend` (and `platform`) from whichever the config names, or from the model files present."""
    if config.platform and not config.backend:
        backend = PLATFORM_BACKENDS.get(config.platform)
        if backend is None:
            raise UnsupportedModel(
                f"{source}: platform: {config.platform!r} is not supported; "
                f"use one of {', '.join(PLATFORM_BACKENDS)} or a backend: {', '.join(BACKEND_PLATFORMS)}"
            )
        config.backend = backend
    if not config.backend:
        config.backend = _backend_from_files(model_dir, versions, source)
    if config.backend not in BACKEND_PLATFORMS:
        raise UnsupportedModel(
            f"{source}: backend: {config.backend!r} is not supported; use one of {', '.join(BACKEND_PLATFORMS)}"
        )
    if not config.platform and config.backend != "python":
        config.platform = BACKEND_PLATFORMS[config.backend]


def _backend_from_files(model_dir: Path, versions: Iterable[Path], source: str) -> str:
    for version_dir in versions:
        for backend, filename in DEFAULT_MODEL_FILENAMES.items():
            if (version_dir / filename).exists():
                return backend
    raise UnsupportedModel(
        f"{source}: no backend or platform, and no {' / '.join(DEFAULT_MODEL_FILENAMES.values())} in a version "
        f"folder of {model_dir} to tell it from; set backend: \"onnxruntime\" | \"pytorch\" | \"python\""
    )


def model_filename(config: mc.ModelConfig) -> str:
    return config.default_model_filename or DEFAULT_MODEL_FILENAMES.get(config.backend, "")


def autocomplete(config: mc.ModelConfig, fields: set[str], described: tuple[Sequence[TensorSpec], Sequence[TensorSpec]]) -> None:
    """Fill what config.pbtxt leaves out from the model file, as Triton's auto-complete does: inputs and
    outputs, and max_batch_size (4, with dynamic batching on) when every tensor's first dimension is dynamic."""
    inputs, outputs = described
    tensors = [*inputs, *outputs]
    batching = bool(tensors) and all(len(t.shape) >= 1 and t.shape[0] == -1 for t in tensors)
    if "max_batch_size" not in fields and not config.input and not config.output and batching:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        if not config.HasField("dynamic_batching") and not config.HasField("sequence_batching"):
            config.dynamic_batching.SetInParent()
    skip = 1 if config.max_batch_size > 0 else 0
    if not config.input:
        for t in inputs:
            config.input.add(name=t.name, data_type=datatypes.config_enum(t.datatype), dims=t.shape[skip:])
    if not config.output:
        for t in outputs:
            config.output.add(name=t.name, data_type=datatypes.config_enum(t.datatype), dims=t.shape[skip:])


def validate(config: mc.ModelConfig, source: str) -> None:
    """Reject a config the server could not serve faithfully; the message names `source` and the field."""
    if config.max_batch_size < 0:
        raise CorruptModel(f"{source}: max_batch_size: {config.max_batch_size} must be >= 0 (0 = no batching)")
    if config.backend != "ensemble" and not config.input:
        raise CorruptModel(f"{source}: input: the model declares no inputs; add input [ {{ name, data_type, dims }} ]")
    if not config.output:
        raise CorruptModel(f"{source}: output: the model declares no outputs; add output [ {{ name, data_type, dims }} ]")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        _validate_tensors(kind, tensors, source)
    if config.HasField("sequence_batching"):
        from deskpod.backends.sequence import check_config

        check_config(config, source)
    if config.model_transaction_policy.decoupled and config.backend != "python":
        raise UnsupportedModel(
            f"{source}: model_transaction_policy.decoupled: only Python models (with response senders) can send "
            f"several responses per request; the {config.backend} backend answers each request once"
        )
    if config.model_transaction_policy.decoupled and config.HasField("sequence_batching"):
        raise UnsupportedModel(
            f"{source}: model_transaction_policy.decoupled: a decoupled model with sequence_batching is not "
            f"supported; keep one of them"
        )
    batching = config.dynamic_batching
    for size in batching.preferred_batch_size:
        if size < 1 or size > max(config.max_batch_size, 1):
            raise CorruptModel(
                f"{source}: dynamic_batching.preferred_batch_size: {size} must be between 1 and "
                f"max_batch_size ({config.max_batch_size})"
            )
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            raise CorruptModel(f"{source}: instance_group[{i}].count: {group.count} must be >= 1")
    _validate_version_policy(config, source)


def _validate_tensors(kind: str, tensors: Sequence[Message], source: str) -> None:
    seen: set[str] = set()
    for i, t in enumerate(tensors):
        where = f"{source}: {kind}[{i}]"
        if not t.name:
            raise CorruptModel(f"{where}.name: every {kind} needs a name")
        if t.name in seen:
            raise CorruptModel(f"{where}.name: {t.name!r} appears twice")
        seen.add(t.name)
        if t.data_type not in datatypes.BY_ENUM:
            raise CorruptModel(f"{where}.data_type: {kind} {t.name!r} needs a data_type such as TYPE_FP32")
        if not t.dims:
            raise CorruptModel(f"{where}.dims: {kind} {t.name!r} needs dims (use [ 1 ] for a scalar, -1 for any size)")
        if any(d == 0 or d < -1 for d in t.dims):
            raise CorruptModel(f"{where}.dims: {list(t.dims)} for {t.name!r}: each dim is > 0, or -1 for any size")
        fixed = t.HasField("reshape") and -1 not in t.dims and -1 not in t.reshape.shape
        if fixed and math.prod(t.dims) != math.prod(t.reshape.shape):
            raise CorruptModel(
                f"{where}.reshape: shape {list(t.reshape.shape)} has a different element count than "
                f"dims {list(t.dims)} for {t.name!r}"
            )


def _validate_version_policy(config: mc.ModelConfig, source: str) -> None:
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "latest" and policy.latest.num_versions < 1:
        raise CorruptModel(f"{source}: version_policy.latest.num_versions: must be >= 1")
    if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
        raise CorruptModel(f"{source}: version_policy.specific.versions: list at least one version")


def validate_ensemble(config: mc.ModelConfig, source: str) -> None:
    """Every step's input is an ensemble input or another step's output; every ensemble output is produced."""
    steps = config.ensemble_scheduling.step
    if not steps:
        raise CorruptModel(f"{source}: ensemble_scheduling.step: an ensemble needs at least one step")
    produced = {t.name for t in config.input}
    for i, step in enumerate(steps):
        if not step.model_name:
            raise CorruptModel(f"{source}: ensemble_scheduling.step[{i}].model_name: name the model this step runs")
        for name in step.output_map.values():
            if name in produced:
                raise CorruptModel(
                    f"{source}: ensemble_scheduling.step[{i}].output_map: tensor {name!r} is produced twice"
                )
            produced.add(name)
    for i, step in enumerate(steps):
        for name in step.input_map.values():
            if name not in produced:
                raise CorruptModel(
                    f"{source}: ensemble_scheduling.step[{i}].input_map: tensor {name!r} is neither an ensemble "
                    f"input nor any step's output"
                )
    for t in config.output:
        if t.name not in produced:
            raise CorruptModel(f"{source}: output: ensemble output {t.name!r} is not produced by any step's output_map")


def instance_count(config: mc.ModelConfig) -> int:
    """How many instances to run: the sum of instance_group counts (a group without count means 1)."""
    return sum(max(group.count, 1) for group in config.instance_group) or 1


def config_to_dict(config: mc.ModelConfig, defaults: bool = True) -> dict:
    """The config as Triton's JSON: field names as in config.pbtxt, enums by name, 64-bit ints as numbers;
    fields left at their defaults are written too unless `defaults` is False."""
    data = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=defaults
    )
    return _ints_as_numbers(config, data)


def config_to_json(config: mc.ModelConfig) -> str:
    return json.dumps(config_to_dict(config))


_INT64 = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64}


def _ints_as_numbers(message: Message, data: dict) -> dict:
    """protobuf's JSON writes int64 as strings; Triton (and Python models reading dims) expect numbers."""
    for field in message.DESCRIPTOR.fields:
        key = field.name
        if key not in data:
            continue
        value = getattr(message, key)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                data[key] = {k: _ints_as_numbers(value[k], v) for k, v in data[key].items()}
        elif field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            if field.label == FieldDescriptor.LABEL_REPEATED:
                data[key] = [_ints_as_numbers(m, d) for m, d in zip(value, data[key])]
            else:
                data[key] = _ints_as_numbers(value, data[key])
        elif field.cpp_type in _INT64:
            data[key] = [int(x) for x in data[key]] if isinstance(data[key], list) else int(data[key])
    return data

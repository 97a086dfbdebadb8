"""The onnxruntime backend: one InferenceSession per instance, executing merged batches.

Threads: the box's cores are shared by the instances (intra-op threads = cores // instance count, at least
1), unless the config's parameters set Triton's onnxruntime keys `intra_op_thread_count` /
`inter_op_thread_count`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import CorruptModel, UnsupportedModel

from . import datatypes
from .base import ModelContext, Outputs, TensorInstance
from .config import TensorSpec, autocomplete

# ORT logs to stderr at warning level by default (e.g. about unused initializers); errors are raised anyway
ort.set_default_logger_severity(3)


def _session(path: Path, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for unreadable models
        raise CorruptModel(f"{path}: onnxruntime cannot load it: {e}") from None


def _spec(arg: ort.NodeArg, path: Path) -> TensorSpec:
    datatype = datatypes.BY_ORT.get(arg.type)
    if datatype is None:
        raise UnsupportedModel(f"{path}: tensor {arg.name!r} has type {arg.type}, which has no tensor datatype")
    # symbolic ("batch") and unknown (None) dimensions are dynamic
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype.name, shape)


def describe(path: Path) -> tuple[Sequence[TensorSpec], Sequence[TensorSpec]]:
    """The model's inputs and outputs as its file declares them (for config auto-complete)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only read, never run
    session = _session(path, options)
    return [_spec(a, path) for a in session.get_inputs()], [_spec(a, path) for a in session.get_outputs()]


def complete_config(config: mc.ModelConfig, fields: set[str], path: Path, backend_config: Mapping[str, str]) -> None:
    """Fill what config.pbtxt leaves out (inputs, outputs, max_batch_size) from the model file."""
    if not config.input or not config.output:
        autocomplete(config, fields, describe(path))


def _options(config: mc.ModelConfig, context: ModelContext) -> ort.SessionOptions:
    options = ort.SessionOptions()
    params = config.parameters
    default_intra = max(1, (os.cpu_count() or 1) // context.instance_count)
    intra = params["intra_op_thread_count"].string_value if "intra_op_thread_count" in params else ""
    inter = params["inter_op_thread_count"].string_value if "inter_op_thread_count" in params else ""
    options.intra_op_num_threads = int(intra or default_intra)
    options.inter_op_num_threads = int(inter or 1)
    return options


class OnnxInstance(TensorInstance):
    def __init__(self, config: mc.ModelConfig, path: Path, context: ModelContext) -> None:
        super().__init__(config)
        self.session = _session(path, _options(config, context))
        self._check_config(path)

    def _check_config(self, path: Path) -> None:
        """Config and file must agree on names and datatypes (the config may narrow shapes)."""
        for kind, declared, args in (
            ("input", self.config.input, self.session.get_inputs()),
            ("output", self.config.output, self.session.get_outputs()),
        ):
            actual = {a.name: _spec(a, path) for a in args}
            for i, t in enumerate(declared):
                if t.name not in actual:
                    raise CorruptModel(
                        f"config of {self.config.name!r}: {kind}[{i}].name: {t.name!r} is not an {kind} of {path} "
                        f"(its {kind}s: {', '.join(actual)})"
                    )
                if datatypes.v2_name(t.data_type) != actual[t.name].datatype:
                    raise CorruptModel(
                        f"config of {self.config.name!r}: {kind}[{i}].data_type: {t.name!r} is "
                        f"{datatypes.v2_name(t.data_type)} in the config but {actual[t.name].datatype} in {path}"
                    )
        self.bytes_outputs = {t.name for t in self.config.output if t.data_type == mc.TYPE_STRING}

    def run(self, inputs: dict[str, np.ndarray]) -> Outputs:
        # onnxruntime takes string tensors as str arrays; BYTES travel as bytes
        feed = {n: np.char.decode(v.astype(np.bytes_), "utf-8") if v.dtype == np.object_ else v for n, v in inputs.items()}
        values = self.session.run(list(self.output_names), feed)
        outputs = dict(zip(self.output_names, values))
        for name in self.bytes_outputs:
            outputs[name] = datatypes.as_bytes_array(outputs[name])
        return outputs


def create_instance(config: mc.ModelConfig, path: Path, context: ModelContext) -> OnnxInstance:
    return OnnxInstance(config, path, context)

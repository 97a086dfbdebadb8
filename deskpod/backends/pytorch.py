"""The pytorch backend: a TorchScript archive (model.pt, written by torch.jit.save) loaded with
torch.jit.load, never a pickled module. Inputs go to forward() by position: in the order of their `__<index>`
suffix when every name has one (Triton's INPUT__0, INPUT__1 convention), else in the config's order. Outputs
(a tensor, or a tuple/list of them) are named the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import BackendError, CorruptModel, UnsupportedModel

from .base import ModelContext, Outputs, TensorInstance

_INDEXED = re.compile(r"__(\d+)$")


def positional_order(names: Sequence[str]) -> list[str]:
    """Names in forward()'s argument order: by their __<index> suffix when all have one, else as given."""
    matches = [_INDEXED.search(n) for n in names]
    indices = [int(m.group(1)) for m in matches if m is not None]
    if names and len(indices) == len(names):
        return [n for _, n in sorted(zip(indices, names))]
    return list(names)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16 torch knows: move the bits
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class TorchInstance(TensorInstance):
    def __init__(self, config: mc.ModelConfig, path: Path, context: ModelContext) -> None:
        super().__init__(config)
        for t in [*config.input, *config.output]:
            if t.data_type == mc.TYPE_STRING:
                raise UnsupportedModel(
                    f"config of {config.name!r}: {t.name!r} is TYPE_STRING; TorchScript models take tensors only"
                )
        try:
            self.module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError for non-archives
            raise CorruptModel(
                f"{path}: not a TorchScript archive ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"save the model with torch.jit.save(torch.jit.script(model) or torch.jit.trace(...)) - "
                f"pickled modules are never loaded"
            ) from None
        self.module.eval()
        # a stateful model also takes the sequence batcher's control and state inputs, and returns its state
        sequence = config.sequence_batching
        controls = [c.name for c in sequence.control_input]
        states_in, states_out = [s.input_name for s in sequence.state], [s.output_name for s in sequence.state]
        self.input_order = positional_order([t.name for t in config.input] + controls + states_in)
        self.output_order = positional_order([t.name for t in config.output] + states_out)

    def run(self, inputs: dict[str, np.ndarray]) -> Outputs:
        args = [_to_torch(inputs[name]) for name in self.input_order if name in inputs]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, dict):
            return {name: _to_numpy(result[name]) for name in self.output_names if name in result}
        values = list(result) if isinstance(result, list | tuple) else [result]
        if len(values) != len(self.output_order):
            raise BackendError(
                f"model {self.config.name!r} returned {len(values)} tensors; its config declares "
                f"{len(self.output_order)} outputs ({', '.join(self.output_order)})"
            )
        return {name: _to_numpy(value) for name, value in zip(self.output_order, values)}


def create_instance(config: mc.ModelConfig, path: Path, context: ModelContext) -> TorchInstance:
    return TorchInstance(config, path, context)

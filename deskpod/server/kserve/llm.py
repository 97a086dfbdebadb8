"""The server's LLMs (AsyncLLM engines in deskpod.server.registry) as v2 models: one BYTES input
`text_input`, one BYTES output `text_output`, sampling settings in the request's parameters. Used by the
generate extension (/v2/models/{m}/generate[_stream]), by plain infer, and by gRPC's ModelStreamInfer,
where each new piece of text is one response (a decoupled model, in Triton's words)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from deskpod.backends.types import InferRequest, InferResponse
from deskpod.errors import InvalidRequest
from deskpod.server.metrics import ServerMetrics
from deskpod.server.openai.generation import Generation
from deskpod.server.openai.protocol import random_id
from deskpod.server.registry import LLM, ModelRegistry

if TYPE_CHECKING:
    from deskpod.engine.async_engine import AsyncLLM, RequestOutput
    from deskpod.engine.sampler import SamplingParams

VERSION = "1"
PLATFORM = "deskpod_llm"
TEXT_INPUT, TEXT_OUTPUT = "text_input", "text_output"
DEFAULT_MAX_TOKENS = 256

# request parameter -> (SamplingParams field, accepted python types); other parameters are ignored, as
# Triton's LLM backends do (clients add their own, e.g. triton_enable_empty_final_response)
SAMPLING = {
    "max_tokens": ("max_tokens", (int,)),
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)),
    "seed": ("seed", (int,)),
    "ignore_eos": ("ignore_eos", (bool,)),
    "stop": ("stop", (str, list)),
}


def sampling_params(parameters: Mapping[str, Any], room: int) -> SamplingParams:
    """The engine's settings from request parameters; `room` is what the context leaves for the reply."""
    from deskpod.engine.sampler import SamplingParams

    values: dict[str, Any] = {"max_tokens": min(DEFAULT_MAX_TOKENS, max(room, 1))}
    for key, (field, kinds) in SAMPLING.items():
        if key not in parameters:
            continue
        value = parameters[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise InvalidRequest(f"parameter `{key}` must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        values[field] = tuple([value] if isinstance(value, str) else value) if key == "stop" else value
    return SamplingParams(**values)


def text_of(request: InferRequest) -> str:
    """The prompt: the one element of `text_input`."""
    unknown = sorted(set(request.inputs) - {TEXT_INPUT})
    if unknown:
        raise InvalidRequest(f"unknown input {', '.join(unknown)}: `{request.model}` takes only `{TEXT_INPUT}`")
    if TEXT_INPUT not in request.inputs:
        raise InvalidRequest(f"missing input `{TEXT_INPUT}` (BYTES, shape [1]): the prompt")
    array = request.inputs[TEXT_INPUT]
    if array.dtype != object or array.size != 1:
        raise InvalidRequest(f"input `{TEXT_INPUT}` must be one BYTES element, got {array.size} of {array.dtype}")
    item = array.ravel()[0]
    try:
        return item.decode() if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError:
        raise InvalidRequest(f"input `{TEXT_INPUT}` must be UTF-8 text") from None


def text_tensor(text: str) -> np.ndarray:
    out = np.empty(1, dtype=object)
    out[0] = text.encode()
    return out


class LLMModels:
    """The LLMs of a ModelRegistry, found by name or alias."""

    def __init__(self, registry: ModelRegistry, metrics: ServerMetrics):
        self.registry = registry
        self.metrics = metrics

    def get(self, name: str) -> AsyncLLM | None:
        model = self.registry.models.get(self.registry.aliases.get(name, name))
        return model.runner if model is not None and model.kind == LLM else None

    def names(self) -> list[str]:
        return [name for name, _ in self.registry.llms()]

    def metadata(self, name: str) -> dict:
        tensor = {"datatype": "BYTES", "shape": [1]}
        return {
            "name": name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [{"name": TEXT_INPUT, **tensor}],
            "outputs": [{"name": TEXT_OUTPUT, **tensor}],
        }

    def config(self, name: str) -> mc.ModelConfig:
        return mc.ModelConfig(
            name=name,
            backend=PLATFORM,
            platform=PLATFORM,
            max_batch_size=0,
            input=[mc.ModelInput(name=TEXT_INPUT, data_type=mc.TYPE_STRING, dims=[1])],
            output=[mc.ModelOutput(name=TEXT_OUTPUT, data_type=mc.TYPE_STRING, dims=[1])],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        )

    def index(self) -> list[dict]:
        return [{"name": name, "version": VERSION, "state": "READY", "reason": ""} for name in self.names()]

    async def start(self, name: str, engine: AsyncLLM, text: str, parameters: Mapping[str, Any]) -> Generation:
        """The request submitted and its first output awaited (refusals raise here, before any reply)."""
        ids = await asyncio.to_thread(engine.tokenizer.encode, text)  # off the event loop
        params = sampling_params(parameters, engine.max_context - len(ids))
        timer = self.metrics.timer(name)
        return await Generation.start(engine, ids, params, random_id("gen"), timer, TEXT_INPUT)

    async def infer(self, engine: AsyncLLM, request: InferRequest) -> InferResponse:
        generation = await self.start(request.model, engine, text_of(request), request.parameters)
        text = "".join(out.text for out in await generation.collect())
        return self._response(request, text)

    async def infer_stream(self, engine: AsyncLLM, request: InferRequest) -> AsyncIterator[InferResponse]:
        """One response per output that carries text or the finish; the last says triton_final_response."""
        generation = await self.start(request.model, engine, text_of(request), request.parameters)
        async for out in generation:
            if out.text or out.finish_reason:
                yield self._response(request, out.text, out)

    def _response(self, request: InferRequest, text: str, out: RequestOutput | None = None) -> InferResponse:
        parameters: dict[str, Any] = {}
        if out is not None:
            parameters["triton_final_response"] = out.finish_reason is not None
            if out.finish_reason is not None:
                parameters["finish_reason"] = out.finish_reason
        return InferResponse(
            model=request.model, version=VERSION, id=request.id, outputs={TEXT_OUTPUT: text_tensor(text)},
            parameters=parameters, final=out is None or out.finish_reason is not None,
        )

"""Triton's generate extension for the server's LLMs:

POST /v2/models/{m}/generate         {"text_input": "...", "parameters": {"max_tokens": 32, ...}}
                                     -> {"model_name", "model_version", "text_output"}
POST /v2/models/{m}/generate_stream  the same request -> server-sent events `data: {...}`, one per new
                                     piece of text; an error after the first event is an event {"error"}

Sampling settings may also sit at the top level of the body, beside text_input, as Triton allows. A repository
model is served too, its inputs and outputs as JSON fields (generate_tensors); generate_stream then gives a
decoupled model's responses as it sends them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from deskpod.backends.types import InferResponse
from deskpod.errors import InvalidRequest
from deskpod.server.kserve.generate_tensors import tensor_event, tensor_request
from deskpod.server.kserve.errors import classify
from deskpod.server.kserve.http_router import TritonRoute, read_json, serving
from deskpod.server.kserve.llm import SAMPLING, TEXT_INPUT, VERSION
from deskpod.server.openai.generation import ClosingEventStream, Generation, cancel_on_disconnect

log = logging.getLogger("deskpod.server")
router = APIRouter(route_class=TritonRoute)


async def start(model: str, version: str, raw: Request, body: dict) -> Generation:
    text = body.get(TEXT_INPUT)
    if not isinstance(text, str):
        raise InvalidRequest(f"the body needs `{TEXT_INPUT}`: the prompt, as a string")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidRequest("`parameters` must be a JSON object")
    top_level = {key: value for key, value in body.items() if key in SAMPLING}
    kserve = serving(raw)
    engine = kserve.llm_engine(model, version)
    return await kserve.llms.start(model, engine, text, {**top_level, **parameters})


def event(model: str, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model_name": model, "model_version": VERSION, "text_output": text}
    if finish_reason is not None:
        body["finish_reason"] = finish_reason
    return body


@router.post("/v2/models/{model}/generate")
@router.post("/v2/models/{model}/versions/{version}/generate")
async def generate(model: str, raw: Request, version: str = "") -> Response:
    body = await read_json(raw)  # before watching for a disconnect, which reads the same channel
    kserve = serving(raw)
    if kserve.in_repository(model):
        request = tensor_request(kserve.model_config(model, version), model, version, body)

        async def answer() -> Response:
            responses = [r async for r in kserve.infer_stream(request) if r.outputs]
            if len(responses) != 1:
                raise InvalidRequest(f"model `{model}` sent {len(responses)} responses: generate returns exactly "
                                     f"one; use POST /v2/models/{model}/generate_stream")
            return JSONResponse(tensor_event(responses[0]))

        return await cancel_on_disconnect(raw, answer)

    async def run() -> Response:
        outputs = await (await start(model, version, raw, body)).collect()
        return JSONResponse(event(model, "".join(o.text for o in outputs), outputs[-1].finish_reason))

    return await cancel_on_disconnect(raw, run)


@router.post("/v2/models/{model}/generate_stream")
@router.post("/v2/models/{model}/versions/{version}/generate_stream")
async def generate_stream(model: str, raw: Request, version: str = "") -> Response:
    body, kserve = await read_json(raw), serving(raw)
    if kserve.in_repository(model):
        request = tensor_request(kserve.model_config(model, version), model, version, body)
        responses = kserve.infer_stream(request)
        first = await anext(responses)  # a refusal is still an HTTP status here
        # the request is cancelled however the response ends (a decoupled model then sees is_cancelled())
        return ClosingEventStream(tensor_events(first, responses), responses.aclose)
    generation = await start(model, version, raw, body)
    return ClosingEventStream(generation_events(generation, model), generation.close)


async def tensor_events(first: InferResponse, rest: AsyncIterator[InferResponse]) -> AsyncIterator[str]:
    """A repository model's responses as server-sent events; an error after the first is an event {"error"}."""
    try:
        if first.outputs:
            yield f"data: {json.dumps(tensor_event(first))}\n\n"
        async for response in rest:
            if response.outputs:
                yield f"data: {json.dumps(tensor_event(response))}\n\n"
    except Exception as e:  # the status line is sent: say it in the stream
        log.warning("a stream of %s failed: %s", first.model, e)
        yield f"data: {json.dumps({'error': classify(e)[2]})}\n\n"
    finally:
        await rest.aclose()  # at once when the client leaves mid-stream


async def generation_events(generation: Generation, model: str) -> AsyncIterator[str]:
    """One generation's new text as server-sent events; an error after the first is an event {"error"}."""
    try:
        async for out in generation:
            if out.text or out.finish_reason:
                yield f"data: {json.dumps(event(model, out.text, out.finish_reason))}\n\n"
    except Exception as e:  # the status line is sent: say it in the stream
        log.exception("generation %s failed while streaming", generation.request_id)
        yield f"data: {json.dumps({'error': classify(e)[2]})}\n\n"

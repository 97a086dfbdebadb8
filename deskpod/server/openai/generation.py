"""One engine request as the server sees it, shared by chat and text completions.

`Generation.start` awaits the first output, so the engine's refusals (queue full, prompt too long, bad
parameters) become HTTP errors before any byte of a response is sent. The request is aborted, and its
KV blocks freed, whenever the server stops reading it early: a client gone mid-stream, a cancelled
handler, an error while streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from deskpod.errors import DeskpodError, InvalidRequest, ModelNotReady
from deskpod.server.errors import error_body, from_engine_error
from deskpod.server.metrics import RequestTimer

if TYPE_CHECKING:
    from deskpod.engine.async_engine import AsyncLLM, RequestOutput
    from deskpod.engine.sampler import SamplingParams

log = logging.getLogger("deskpod.server")

CLIENT_CLOSED = 499  # nginx's status for "the client closed the request"; only the metrics see it


class Generation:
    def __init__(self, engine: AsyncLLM, request_id: str, outputs: AsyncIterator[RequestOutput], timer: RequestTimer):
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self._timer = timer
        self._pending: RequestOutput | None = None
        self.finished = False

    @classmethod
    async def start(
        cls,
        engine: AsyncLLM,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        timer: RequestTimer,
        prompt_field: str,
    ) -> Generation:
        """Submit the request and wait for its first output; `prompt_field` is the field that a refused
        prompt (too long, a token outside the vocabulary) is blamed on."""
        generation = cls(engine, request_id, engine.generate(prompt_ids, params, request_id), timer)
        await generation.first(prompt_field)
        return generation

    async def first(self, prompt_field: str) -> None:
        """Wait for the first output (submitting the request); the engine's refusal as an APIError."""
        try:
            self._pending = await self._next()
        except DeskpodError as e:  # refused before it was queued: nothing to abort
            self.finished = True
            await self.close()
            raise from_engine_error(e, _blamed(e, prompt_field)) from e
        except BaseException:
            await self.close()
            raise

    async def _next(self) -> RequestOutput:
        out = await anext(self._outputs)
        self._timer.output(out)
        self.finished = out.finish_reason is not None
        return out

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            if self._pending is not None:
                out, self._pending = self._pending, None
                yield out
            while not self.finished:
                yield await self._next()
        finally:
            await self.close()

    async def collect(self) -> list[RequestOutput]:
        return [out async for out in self]

    async def close(self) -> None:
        """Abort the request unless it finished; safe to call twice."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
            self._timer.aborted()
        await self._outputs.aclose()  # type: ignore[attr-defined]


def _blamed(error: DeskpodError, prompt_field: str) -> str | None:
    """The request field an engine refusal is about: the one it names, else the prompt's."""
    if not isinstance(error, InvalidRequest):
        return None
    named = str(error).split(":", 1)[0]
    return named if named in TOKEN_ID_FIELDS else prompt_field


TOKEN_ID_FIELDS = ("stop_token_ids", "logit_bias", "allowed_token_ids")


class Choices:
    """The engine requests behind one API request: each prompt `n` times. They are submitted together (the
    n copies of a prompt share its computed KV blocks), read as one stream of (choice index, output), and
    all aborted if the client goes or one of them is refused."""

    def __init__(self, generations: list[Generation]):
        self.generations = generations

    @classmethod
    async def start(cls, engine: AsyncLLM, prompts: list[list[int]], n: int, params: Callable[[int, int], SamplingParams],
                    request_id: str, timer: Callable[[], RequestTimer], prompt_field: str) -> Choices:
        """`params(prompt index, choice index)`: each choice's settings (a seed differs per choice)."""
        generations = []
        for p, ids in enumerate(prompts):
            leader = None
            for j in range(n):
                index = p * n + j
                rid = request_id if len(prompts) * n == 1 else f"{request_id}-{index}"
                generations.append(Generation(engine, rid, engine.generate(ids, params(p, index), rid, after=leader), timer()))
                leader = leader or rid
        choices = cls(generations)
        firsts = await asyncio.gather(*(g.first(prompt_field) for g in generations), return_exceptions=True)
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failure is not None:
            await choices.close()
            raise failure
        return choices

    async def collect(self) -> list[list[RequestOutput]]:
        """Each choice's outputs, by index."""
        return list(await asyncio.gather(*(g.collect() for g in self.generations)))

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as they come; closing it aborts whatever is still running."""
        if len(self.generations) == 1:
            async for out in self.generations[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, generation: Generation) -> None:
            try:
                async for out in generation:
                    queue.put_nowait((index, out))
            except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
                queue.put_nowait((index, e))
            finally:
                queue.put_nowait((index, done))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.generations)]
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is done:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await self.close()

    async def close(self) -> None:
        for generation in self.generations:
            await generation.close()


def sse(payload: Any) -> str:
    """One server-sent event; `payload` is a pydantic model, a dict, or the final "[DONE]"."""
    if isinstance(payload, str):
        return f"data: {payload}\n\n"
    text = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {text}\n\n"


async def sse_stream(generation: Generation | Choices, events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """The events as SSE, then [DONE]; an engine failure mid-stream becomes an error event, not a cut."""
    try:
        async for event in events:
            yield sse(event)
    except InvalidRequest as e:  # the request's own settings, refused once generating (an impossible mask...)
        yield sse(error_body(str(e), "invalid_request_error"))
    except ModelNotReady as e:  # a linked box went away: said as the 503 a new request would get
        yield sse(error_body(str(e), "server_error", code="model_not_ready"))
    except Exception as e:  # the status line is sent: all we can do is say it in the stream
        log.exception("a request failed while streaming")
        yield sse(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))
    yield sse("[DONE]")


class ClosingEventStream(StreamingResponse):
    """Server-sent events that run `close` however the response ends, even if the client left before the first
    byte (Starlette then never starts the body iterator, so only this can clean up): an aborted generation, a
    cancelled request."""

    def __init__(self, events: AsyncIterator[str], close: Callable[[], Awaitable[Any]]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()


def generation_stream(generation: Generation | Choices, events: AsyncIterator[Any]) -> ClosingEventStream:
    """The SSE of an OpenAI route's chunks, its generations aborted however it ends."""
    return ClosingEventStream(sse_stream(generation, events), generation.close)


async def cancel_on_disconnect(request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
    """Run `handler`, cancelling it if the client disconnects first (so a request waiting in the queue or
    generating a plain response is aborted; a streaming response watches for itself once returned)."""
    work = asyncio.ensure_future(handler())
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work  # let its clean-up (the abort) run before we answer
    if work.cancelled():
        return Response(status_code=CLIENT_CLOSED)
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

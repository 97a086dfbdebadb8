"""The engine for servers: its loop on a background thread, each request an async stream of outputs.

One thread owns the engine and runs steps while there is work; request handlers on the event loop send it
requests and aborts and read each request's outputs from an asyncio queue. A failing step fails the
requests in it, never the loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
from dataclasses import replace
from typing import AsyncIterator, Callable

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import EngineStats, LLMEngine, RequestOutput
from deskpod.engine.llm import resolve_model_file
from deskpod.engine.loader import load_model
from deskpod.engine.runner import TokenLogprob
from deskpod.engine.sampler import SamplingParams
from deskpod.errors import GenerationFailed, InvalidRequest, LinkLost

__all__ = ["AsyncLLM", "RequestOutput", "TokenLogprob"]
log = logging.getLogger(__name__)


class AsyncLLM:
    """Requests and aborts are queued for the engine thread, which applies them between steps, so the
    event loop never waits for a forward pass; `stats()` reads the snapshot taken after the last step."""

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], model_name: str):
        """`engine`, or a function that builds it: then it is built on the engine thread (see _start)."""
        self.model_name = model_name
        self._inbox: collections.deque = collections.deque()  # ("add", ...) and ("abort", id) for the engine thread
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self._ids = itertools.count()
        self._stopping = False
        build = engine if callable(engine) else lambda: engine
        self._thread = threading.Thread(target=self._start, args=(build,), name="deskpod-engine", daemon=True)
        self._ready, self._failure = threading.Event(), None
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        self.tokenizer = self.engine.tokenizer
        self.max_context = self.engine.context

    @classmethod
    def from_model(cls, name_or_path: str, config: EngineConfig = EngineConfig(), **settings) -> AsyncLLM:
        """The engine for a store model or a model file; `settings` override fields of `config`."""
        config = replace(config, **settings)
        path = resolve_model_file(name_or_path)
        return cls(lambda: LLMEngine(load_model(path, config, name=name_or_path), config), name_or_path)

    def chat_prompt(self, messages: list[dict], **options) -> list[int]:
        """Tokenizer.apply_chat_template: reads only the tokenizer, safe beside a running step."""
        return self.engine.chat_prompt(messages, **options)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       after: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs as the request advances; closing the iterator early aborts the request. Errors in
        taking the request (QueueFull, InvalidRequest...) are raised where the first output would be.
        `after`: a request with the same prompt whose computed blocks this one shares (LLMEngine.add_request)."""
        request_id = request_id or f"req-{next(self._ids)}"
        # a structured output's grammar is compiled here, in a worker thread: never on the engine's
        constraint = await asyncio.to_thread(self.engine.structured.constraint, params.structured) if params.structured else None
        queue: asyncio.Queue = asyncio.Queue()
        self._send(("add", request_id, list(prompt_ids), params, after, constraint, asyncio.get_running_loop(), queue))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:  # the client went away, or the caller stopped reading
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def link(self):
        """The LinkHead when this model runs across linked boxes (deskpod.link), else None."""
        return self.engine.link

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10)
        if self.link is not None:  # the other boxes of a linked model stop too
            await asyncio.to_thread(self.link.close)

    def _send(self, message: tuple) -> None:
        self._inbox.append(message)
        self._wake.set()

    # --- the engine thread ------------------------------------------------------------------------

    def _start(self, build: Callable[[], LLMEngine]) -> None:
        # Every tensor operation of this engine, loading included, runs on this one thread. GNU OpenMP
        # gives each thread that starts parallel work its own team of workers, and once a process has
        # more of them than cores it stops spinning between parallel regions: two threads doing tensor
        # work would halve decode speed on a 2-core box.
        try:
            self.engine = build()
            self._stats = self.engine.stats()
        except BaseException as e:
            self._failure = e
        self._ready.set()
        if self._failure is None:
            self._loop()

    def _loop(self) -> None:
        while not self._stopping:
            self._apply_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except LinkLost as e:  # a linked box went away: what was running ends with 503
                log.error("%s", e)
                self._fail_running(e)
                continue
            except Exception as e:  # a bug or a bad batch: fail what was running, keep serving
                log.exception("engine step failed")
                self._fail_running(e)
                continue
            self._stats = self.engine.stats()  # before delivering: a finished request sees itself counted out
            for out in outputs:
                failure = _failure(out) if out.error else None
                self._deliver(out.request_id, failure or out)
                if out.finish_reason is not None:
                    self._streams.pop(out.request_id, None)

    def _apply_inbox(self) -> None:
        while self._inbox:
            kind, request_id, *rest = self._inbox.popleft()
            if kind == "abort":
                self._streams.pop(request_id, None)
                self.engine.abort(request_id)
                continue
            prompt_ids, params, after, constraint, loop, queue = rest
            self._streams[request_id] = (loop, queue)
            try:
                self.engine.add_request(prompt_ids, params, request_id, after, constraint)
            except Exception as e:  # QueueFull, InvalidRequest...: the caller raises it
                self._deliver(request_id, e)
                self._streams.pop(request_id, None)
        self._stats = self.engine.stats()

    def _fail_running(self, error: Exception) -> None:
        """A step failed outside any one request's share (the runner isolates those): a bug in the engine's
        own bookkeeping. What it held cannot be trusted, so its requests end with the error."""
        for request_id in list(self.engine.scheduler.requests):
            self.engine.abort(request_id)
            failure = error if isinstance(error, LinkLost) else \
                GenerationFailed(f"the engine failed: {type(error).__name__}: {error}")
            self._deliver(request_id, failure)
            self._streams.pop(request_id, None)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)


def _failure(out: RequestOutput) -> Exception:
    """The exception a failed request's reader gets: the refusal of its settings (400), or the engine's failure."""
    if out.input_fault:
        return InvalidRequest(out.error)
    return GenerationFailed(f"generation failed for this request: {out.error}")

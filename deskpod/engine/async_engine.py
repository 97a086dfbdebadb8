"""The engine for servers: its loop on a background thread, each request an async stream of outputs.

One thread owns the engine and runs steps while there is work; request handlers on the event loop add
requests and read their outputs from a queue. A failing step fails the requests in it, never the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from deskpod.engine.engine import EngineConfig, EngineStats, LLMEngine, RequestOutput
from deskpod.engine.llm import resolve_model_file
from deskpod.engine.loader import load_gguf
from deskpod.engine.runner import TokenLogprob
from deskpod.engine.sampler import SamplingParams

__all__ = ["AsyncLLM", "RequestOutput", "TokenLogprob"]
log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer
        self.max_context = engine.context
        self._lock = threading.Lock()  # the engine is not thread-safe: one caller at a time
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="deskpod-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, name_or_path: str, *, memory_fraction: float | None = None, kv_cache_gb: float | None = None,
                   max_num_seqs: int = 32, max_waiting: int = 256, context: int | None = None,
                   max_num_batched_tokens: int = 512) -> AsyncLLM:
        loaded = load_gguf(resolve_model_file(name_or_path), context=context, name=name_or_path)
        config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_waiting=max_waiting,
                              memory_fraction=memory_fraction, kv_cache_gb=kv_cache_gb, context=context)
        return cls(LLMEngine(loaded, config), name_or_path)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.engine.chat_prompt(messages)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs as the request advances; closing the iterator early aborts the request."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            request_id = self.engine.add_request(prompt_ids, params, request_id)  # QueueFull, InvalidRequest...
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finish_reason is not None
                yield out
        finally:
            if not finished:  # the client went away, or the caller stopped reading
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        with self._lock:
            return self.engine.stats()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10)

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_work()
            if not busy:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            with self._lock:
                try:
                    outputs = self.engine.step()
                except Exception as e:  # a bug or a bad batch: fail what was running, keep serving
                    log.exception("engine step failed")
                    self._fail_running(e)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)
                    if out.finish_reason is not None:
                        self._streams.pop(out.request_id, None)

    def _fail_running(self, error: Exception) -> None:
        for request_id in list(self.engine.scheduler.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"the engine failed on this request: {error}"))
            self._streams.pop(request_id, None)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

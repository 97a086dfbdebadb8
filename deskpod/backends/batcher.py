"""The scheduler between `infer` and a model's instances: a dynamic batcher on the server's event loop.

One dispatcher coroutine waits for a free instance, then gathers queued requests into a batch for it: up to
max_batch_size (counting each request's batch dimension), stopping early at a preferred batch size, and
waiting at most max_queue_delay_microseconds (from the oldest request's arrival) for more to come. While all
instances are busy requests pile up, so batches grow with load. Only requests whose non-batch shapes agree
are merged. A model without dynamic_batching runs one request per execution. Each instance executes on its
own worker thread, so `instance_group { count: N }` gives N executions in parallel.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import inspect
import itertools
import threading
import time
from collections.abc import Sequence

from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import ModelNotReady

from .base import Execution, Instance, Outputs, Pending, Result
from .stats import ExecutionTimes, ModelStats

DRAIN_TIMEOUT_S = 30.0  # unload waits this long for queued and running requests to finish


class _Worker:
    """An instance and the one thread it executes on (a model's code may keep per-thread state)."""

    def __init__(self, instance: Instance, name: str) -> None:
        self.instance = instance
        self.thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def close(self) -> None:
        self.thread.submit(self.instance.close).result()
        self.thread.shutdown(wait=True)


class Batcher:
    def __init__(self, config: mc.ModelConfig, instances: Sequence[Instance], stats: ModelStats) -> None:
        batching = config.HasField("dynamic_batching") and config.max_batch_size > 0
        self.max_batch_size = config.max_batch_size if batching else 0
        self.preferred = frozenset(config.dynamic_batching.preferred_batch_size)
        self.delay_ns = config.dynamic_batching.max_queue_delay_microseconds * 1000
        self.stats = stats
        self.workers = [_Worker(inst, f"{config.name}-{i}") for i, inst in enumerate(instances)]
        self._queue: collections.deque[Pending] = collections.deque()
        self._lock = threading.Lock()  # guards (re)binding to an event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # --- the caller's side --------------------------------------------------------------------------

    async def submit(self, pending: Pending) -> Outputs:
        """Queue a validated request; its outputs when the execution that took it is done."""
        if self._closing:
            raise ModelNotReady(f"model {pending.request.model!r} is unloading")
        self._bind(asyncio.get_running_loop())
        pending.future = asyncio.get_running_loop().create_future()
        self._queue.append(pending)
        self._wakeup.set()
        return await pending.future

    def cancel(self, pending: Pending) -> None:
        """The caller gave up: a queued request is skipped; one a decoupled model still answers is told so."""
        if not pending.future.done():
            pending.future.cancel()
        for worker in self.workers:
            cancel = getattr(worker.instance, "cancel", None)
            if cancel is not None:
                cancel(pending)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the dispatcher on the loop requests come from (the server's; a new one after a restart)."""
        if self._loop is loop:
            return
        with self._lock:
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
            for worker in self.workers:
                self._idle.put_nowait(worker)
            self._running: set[asyncio.Task] = set()
            self._dispatcher = loop.create_task(self._dispatch())

    # --- the dispatcher -----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            worker = await self._idle.get()
            batch = await self._gather()
            task = asyncio.get_running_loop().create_task(self._execute(worker, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _gather(self) -> list[Pending]:
        batch = [await self._next()]
        if self.max_batch_size == 0:
            return batch
        deadline = batch[0].arrival_ns + self.delay_ns
        target = max(self.preferred, default=self.max_batch_size)
        while True:
            if self._take_compatible(batch, target) >= target or self._trim_to_preferred(batch):
                return batch
            remaining = deadline - time.perf_counter_ns()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining / 1e9)
            except TimeoutError:
                break
        # the oldest request has waited max_queue_delay: send the largest batch there is
        self._take_compatible(batch, self.max_batch_size)
        return batch

    def _trim_to_preferred(self, batch: list[Pending]) -> bool:
        """When a prefix of `batch` makes a preferred batch size, keep the largest such prefix (the rest goes
        back to the front of the queue) and say so: it is dispatched without waiting."""
        sizes = list(itertools.accumulate(p.batch_size for p in batch))
        cut = max((i + 1 for i, size in enumerate(sizes) if size in self.preferred), default=0)
        if not cut:
            return False
        self._queue.extendleft(reversed(batch[cut:]))
        del batch[cut:]
        return True

    async def _next(self) -> Pending:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            pending = self._queue.popleft()
            if not pending.future.done():  # a caller that gave up (cancelled) is skipped
                return pending

    def _take_compatible(self, batch: list[Pending], limit: int) -> int:
        """Move queued requests that fit (same non-batch shapes, total batch within `limit`) into `batch`;
        the batch's total size."""
        key = batch[0].batch_key
        size = sum(p.batch_size for p in batch)
        kept: collections.deque[Pending] = collections.deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():
                continue
            if pending.batch_key == key and size + pending.batch_size <= limit:
                batch.append(pending)
                size += pending.batch_size
            else:
                kept.append(pending)
        self._queue.extendleft(reversed(kept))
        return size

    async def _execute(self, worker: _Worker, batch: list[Pending]) -> None:
        start = time.perf_counter_ns()
        for pending in batch:
            pending.queue_ns = start - pending.arrival_ns
        execution = Execution(asyncio.get_running_loop())
        try:
            if inspect.iscoroutinefunction(worker.instance.execute):  # it waits on another process: no thread
                results: list[Result] = _checked(await _run_async(worker.instance, batch, execution), batch)
            else:
                results = await asyncio.get_running_loop().run_in_executor(
                    worker.thread, _run, worker.instance, batch, execution
                )
        finally:
            self._idle.put_nowait(worker)
        size = sum(p.batch_size for p in batch)
        ns = execution.ns
        self.stats.record_execution(
            ExecutionTimes(size, len(batch), ns["compute_input"], ns["compute_infer"], ns["compute_output"])
        )
        for pending, result in zip(batch, results):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    # --- unload -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop taking requests, let queued and running ones finish (up to DRAIN_TIMEOUT_S), then close the
        instances (a Python model's finalize runs here). Called from any thread but the loop's own."""
        self._closing = True
        loop = self._loop
        if loop is not None and loop.is_running() and not _in_loop(loop):
            asyncio.run_coroutine_threadsafe(self._drain(), loop).result(DRAIN_TIMEOUT_S + 5)
        for worker in self.workers:
            worker.close()

    async def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while (self._queue or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self._dispatcher.cancel()
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(ModelNotReady(f"model {pending.request.model!r} was unloaded"))
        self._queue.clear()
        if self._running:
            await asyncio.wait(self._running)


def _run(instance: Instance, batch: Sequence[Pending], execution: Execution) -> list[Result]:
    """On the instance's thread: an exception from the backend fails this execution's requests only."""
    try:
        results = instance.execute(batch, execution)
    except Exception as e:  # noqa: BLE001 - the model's own code; reported to the callers, not raised here
        return [e] * len(batch)
    except SystemExit as e:  # a model calling exit() fails its requests, not the server
        return [RuntimeError(f"the model's code called exit({e.code})")] * len(batch)
    return _checked(results, batch)


async def _run_async(instance: Instance, batch: Sequence[Pending], execution: Execution) -> list[Result]:
    try:
        return await instance.execute(batch, execution)
    except Exception as e:  # noqa: BLE001 - reported to the callers, not raised here
        return [e] * len(batch)


def _checked(results: list[Result], batch: Sequence[Pending]) -> list[Result]:
    if len(results) != len(batch):
        error = RuntimeError(f"the backend returned {len(results)} results for {len(batch)} requests")
        return [error] * len(batch)
    return results


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False

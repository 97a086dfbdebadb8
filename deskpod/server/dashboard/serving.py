"""What the dashboard's routes answer: the box's memory as the planner counts it beside what the process
holds, CPU and disk; the store, the loaded models and the repository's; pulls with their progress; plans."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from deskpod.errors import DeskpodError
from deskpod.server.errors import APIError
from deskpod.server.registry import LLM, ModelRegistry
from deskpod.store import Store
from deskpod.store.catalog import CATALOG
from deskpod.store.names import format_ref, parse_name
from deskpod.store.pull import catalog_key, looks_like_path

if TYPE_CHECKING:
    from deskpod.backends.repository import ModelRepository

log = logging.getLogger("deskpod.server")
PULL_REPORTS_PER_S = 8  # progress events a pull sends at most (extraction reports every chunk)


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_times() -> tuple[float, float]:
    """(busy, total) seconds of every CPU since boot, from /proc/stat."""
    values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / ticks, sum(values) / ticks


@dataclass
class _CpuSample:
    at: float = field(default_factory=time.monotonic)
    process: float = field(default_factory=lambda: sum(os.times()[:2]))
    machine: tuple[float, float] = field(default_factory=_cpu_times)


class DashboardServing:
    def __init__(self, registry: ModelRegistry, repository: ModelRepository | None):
        self.registry, self.repository = registry, repository
        self._cpu = _CpuSample()

    # -- the box ----------------------------------------------------------------------------------

    def box(self) -> dict:
        from deskpod.plan.devices import available_memory_bytes, meminfo

        info = meminfo()
        store = Store()
        disk = shutil.disk_usage(store.home)
        return {
            "memory": {
                "total_bytes": info.get("MemTotal", 0),
                "available_bytes": available_memory_bytes(cuda=False),
                "process_rss_bytes": _status_kb("VmRSS"),
                "process_peak_bytes": _status_kb("VmHWM"),
                "models": [self._model_memory(name) for name in self.registry.models],
            },
            "cpu": self._cpu_use(),
            "gpu": _gpu(),
            "disk": {"path": str(store.home), "total_bytes": disk.total, "free_bytes": disk.free,
                     "store_bytes": sum(m.size for m in store.list())},
        }

    def _model_memory(self, name: str) -> dict:
        """A loaded model's weights and KV pool, as the engine holds them (the planner's parts)."""
        served = self.registry.models[name]
        if served.kind != LLM:
            weights = sum(p.numel() * p.element_size() for p in served.runner.model.parameters())
            return {"name": name, "kind": served.kind, "weights_bytes": weights, "kv_cache_bytes": 0}
        from deskpod.engine.loader import kv_dtype_bytes, model_shape
        from deskpod.plan.capacity import kv_bytes_per_token

        engine = served.runner.engine
        per_token = kv_bytes_per_token(model_shape(engine.loaded.spec, name), kv_dtype_bytes(engine.config))
        blocks = engine.scheduler.config.num_blocks
        return {"name": name, "kind": LLM, "weights_bytes": engine.loaded.weight_bytes(),
                "kv_cache_bytes": blocks * engine.config.block_size * per_token}

    def _cpu_use(self) -> dict:
        """Shares of the machine's CPUs since the previous call (the page polls every few seconds)."""
        now, last = _CpuSample(), self._cpu
        self._cpu = now
        busy, total = now.machine[0] - last.machine[0], now.machine[1] - last.machine[1]
        wall = max(now.at - last.at, 1e-6)
        return {"cores": os.cpu_count(), "machine_percent": 100 * busy / total if total > 0 else 0.0,
                "process_percent": 100 * (now.process - last.process) / wall / (os.cpu_count() or 1)}

    # -- models -----------------------------------------------------------------------------------

    def models(self) -> dict:
        from deskpod.plan.builtins import builtin_names
        from deskpod.plan.devices import HARDWARE
        from deskpod.plan.precision import SCHEMES

        loaded = [{"name": m.name, "kind": m.kind, "max_context": m.max_context} for m in self.registry.models.values()]
        repository = []
        if self.repository is not None:
            stats = {(s["name"], s["version"]): s for s in self.repository.statistics()}
            repository = [{**m, "stats": stats.get((m["name"], m.get("version", "")))} for m in self.repository.index()]
        return {"store": [m.to_dict() for m in Store().list()], "loaded": loaded, "repository": repository,
                "catalog": list(CATALOG), "builtins": builtin_names(), "hardware": list(HARDWARE),
                "precisions": list(SCHEMES)}

    def remove(self, name: str) -> None:
        served = {format_ref(*parse_name(n)) for n in self.registry.models}
        if format_ref(*parse_name(name)) in served:
            raise APIError(409, f"{name} is being served: stop the server (or serve without it) before removing it")
        Store().remove(name)

    def verify(self, name: str) -> list[str]:
        return Store().verify(name)

    @staticmethod
    def check_pullable(name: str) -> None:
        """Catalog models only: a path would let the page import any file the server can read."""
        if catalog_key(name) is None:
            raise APIError(400, f"{name!r} is not a catalog model ({', '.join(CATALOG)}): the dashboard pulls from "
                                "the catalog only; use `deskpod pull PATH` on the box for files")

    async def pull(self, name: str) -> AsyncIterator[dict]:
        """Progress events ({"what", "done", "total"}), then {"pulled": manifest} or {"error": message}."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        last = [0.0]

        def report(what: str, done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= 1 / PULL_REPORTS_PER_S or (total is not None and done >= total):
                last[0] = now
                loop.call_soon_threadsafe(queue.put_nowait, {"what": what, "done": done, "total": total})

        async def run() -> None:
            try:
                manifest = await asyncio.to_thread(Store().pull, name, None, report)
                queue.put_nowait({"pulled": manifest.to_dict()})
            except DeskpodError as e:
                queue.put_nowait({"error": str(e)})
            except Exception as e:  # disk full, a damaged download...: the page must hear of it, not wait
                log.exception("dashboard pull of %s failed", name)
                queue.put_nowait({"error": f"{type(e).__name__}: {e}"})

        task = asyncio.create_task(run())
        try:
            while True:
                event = await queue.get()
                yield event
                if "pulled" in event or "error" in event:
                    return
        finally:
            await asyncio.shield(task)  # a closed page does not leave a half-done pull behind: it completes

    # -- planner ----------------------------------------------------------------------------------

    def plan(self, model: str, hardware: list[str], precision: str | None, context: int | None) -> list[dict]:
        from deskpod.plan.devices import get_hardware
        from deskpod.plan.planner import make_plan
        from deskpod.plan.source import resolve

        if looks_like_path(model) or model.endswith(".json"):  # (a config.json the planner would read)
            raise APIError(400, f"{model!r}: the dashboard plans store models, built-in names and sizes, not files")
        source = resolve(model)
        return [make_plan(source, get_hardware(h), precision=precision, context=context).to_json() for h in hardware]


def _gpu() -> list[dict]:
    import sys

    if "torch" not in sys.modules:  # an ONNX-only server never imported torch: it has no GPU work either
        return []
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # never start CUDA just to report it
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append({"name": torch.cuda.get_device_name(index), "total_bytes": total, "free_bytes": free})
    return gpus

"""A Triton-style model repository: `ROOT/<model>/config.pbtxt` and `ROOT/<model>/<version>/<file>`.

Each model has a lock (load and unload of one model never interleave) and, per version, a state: LOADING,
READY, UNLOADING or UNAVAILABLE with the reason. `infer` is a coroutine for the server's event loop; load,
unload and load_all block (seconds) and are called from a thread.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc

from deskpod.errors import (
    BackendError,
    CorruptModel,
    DeskpodError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
)

from . import config as cfg
from . import datatypes
from .base import ModelContext
from .batcher import Batcher
from .sequence import SequenceBatcher
from .stats import ModelStats
from .types import InferRequest, InferResponse
from .validate import Validator, expected_shape

log = logging.getLogger(__name__)

# backend -> the module that runs it (imported on first use: torch is slow to import)
BACKENDS = {
    "onnxruntime": "deskpod.backends.onnxruntime",
    "pytorch": "deskpod.backends.pytorch",
    "python": "deskpod.backends.python",
    "ensemble": "deskpod.backends.ensemble",
}

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class LoadedVersion:
    config: mc.ModelConfig
    version: str
    runner: Any  # Batcher, or the ensemble's scheduler: `async submit(pending)`, `close()`
    stats: ModelStats
    validator: Validator = field(init=False)
    sequence: SequenceBatcher | None = field(init=False)  # a stateful model's (sequence_batching)

    def __post_init__(self) -> None:
        self.sequence = SequenceBatcher(self.config) if self.config.HasField("sequence_batching") else None
        self.validator = Validator(self.config, self.sequence)


@dataclass
class _Model:
    name: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: dict[str, LoadedVersion] = field(default_factory=dict)
    states: dict[str, tuple[str, str]] = field(default_factory=dict)  # version ("" = the model) -> (state, reason)


class ModelRepository:
    def __init__(self, root: str | Path, backend_config: Mapping[str, Mapping[str, str]] | None = None) -> None:
        """`backend_config`: settings per backend (Triton's --backend-config BACKEND,KEY=VALUE)."""
        self.root = Path(root)
        self.backend_config = {name: dict(values) for name, values in (backend_config or {}).items()}
        if not self.root.is_dir():
            raise ModelNotFound(f"model repository {self.root} is not a folder")
        self._models: dict[str, _Model] = {}
        self._models_lock = threading.Lock()
        self._scanned: tuple[int, list[str]] | None = None  # (root's mtime, model folder names)

    # --- model control (blocking) --------------------------------------------------------------------

    def load_all(self) -> None:
        """Load every model folder; one that fails is UNAVAILABLE with its reason and the others still load."""
        for name in self._scan():
            try:
                self.load(name)
            except Exception as e:  # noqa: BLE001 - a bad model must not stop the others; its reason is kept
                log.warning("model %s is unavailable: %s", name, e)

    def load(self, name: str, config_json: str | None = None) -> None:
        """Load (or reload) a model: the versions its version_policy selects. On failure the reason is kept in
        the index and raised; versions already serving keep serving."""
        model_dir = self._model_dir(name)
        model = self._model(name)
        with model.lock:
            try:
                config, versions = self._read(name, model_dir, config_json)
            except Exception as e:
                self._fail(model, "", e)
                raise
            new = self._load_versions(model, model_dir, config, versions)
            old = model.versions
            model.versions = new
            model.states = {v: (UNAVAILABLE, "unloaded") for v in old if v not in new}
            model.states.update({v: (READY, "") for v in new})
            for loaded in old.values():
                self._close(loaded)

    def unload(self, name: str) -> None:
        """Stop serving a model: new requests are refused, queued and running ones finish, then it is closed."""
        model = self._models.get(name)
        if model is None:
            self._model_dir(name)  # ModelNotFound when there is no such model at all
            return
        with model.lock:
            versions, model.versions = model.versions, {}
            for version in versions:
                model.states[version] = (UNLOADING, "")
            for version, loaded in versions.items():
                self._close(loaded)
                model.states[version] = (UNAVAILABLE, "unloaded")

    def close(self) -> None:
        """Unload everything (Python models' finalize runs, sessions are released)."""
        for name in list(self._models):
            self.unload(name)

    # --- what is there -------------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: one entry per model version (a model never loaded has version "")."""
        entries = []
        for name in sorted(set(self._scan()) | set(self._models)):
            model = self._models.get(name)
            states = dict(model.states) if model else {}
            if not states:
                states = {"": ("", "")}
            for version, (state, reason) in sorted(states.items(), key=lambda kv: _version_key(kv[0])):
                if ready_only and state != READY:
                    continue
                entries.append({"name": name, "version": version, "state": state, "reason": reason})
        return entries

    def __contains__(self, name: str) -> bool:
        """Whether the repository has a model of this name, loaded or not (cheap: no folder scan)."""
        if name in self._models:
            return True
        try:
            self._model_dir(name)
        except ModelNotFound:
            return False
        return True

    def ready(self, name: str, version: str = "") -> bool:
        try:
            self._loaded(name, version)
        except DeskpodError:
            return False
        return True

    def config(self, name: str, version: str = "") -> mc.ModelConfig:
        return self._loaded(name, version).config

    def metadata(self, name: str, version: str = "") -> dict:
        """KServe v2 model metadata: name, ready versions, platform, inputs and outputs with shapes."""
        loaded = self._loaded(name, version)
        config = loaded.config
        model = self._models[name]

        def tensors(specs: Sequence[Any]) -> list[dict]:
            return [
                {"name": t.name, "datatype": datatypes.v2_name(t.data_type), "shape": expected_shape(config, t)}
                for t in specs
            ]

        return {
            "name": name,
            "versions": sorted(model.versions, key=_version_key),
            "platform": config.platform or config.backend,
            "inputs": tensors(config.input),
            "outputs": tensors(config.output),
        }

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        """Triton's model_stats entries for every loaded version (of `name`, or all models)."""
        if name:
            if version:
                return [self._loaded(name, version).stats.as_dict()]
            model = self._models.get(name)
            if model is None:
                self._model_dir(name)  # ModelNotFound when there is no such model at all
            versions = list(model.versions.values()) if model else []
            if not versions:
                raise ModelNotReady(f"model {name!r} is not loaded")
            return [v.stats.as_dict() for v in sorted(versions, key=lambda v: _version_key(v.version))]
        return [
            loaded.stats.as_dict()
            for model_name in sorted(self._models)
            for loaded in sorted(self._models[model_name].versions.values(), key=lambda v: _version_key(v.version))
        ]

    # --- inference ------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Run one request. InvalidRequest (400) when it does not match the config, ModelNotFound (404),
        ModelNotReady (503), BackendError (500) when the model's execution fails (other requests go on)."""
        loaded = self._loaded(request.model, request.version)
        if loaded.config.model_transaction_policy.decoupled:
            # Triton's words; a decoupled model may answer any number of times, which one reply cannot carry
            raise InvalidRequest(
                f"model {request.model!r} is decoupled (it may send several responses per request): this endpoint "
                f"doesn't support models with decoupled transaction policy; use the gRPC stream (ModelStreamInfer) "
                f"or POST /v2/models/{request.model}/generate_stream"
            )
        if loaded.sequence is not None:
            return await loaded.sequence.infer(request, lambda r: self._infer(loaded, r))
        return (await self._infer(loaded, request))[0]

    async def _infer(self, loaded: LoadedVersion, request: InferRequest) -> tuple[InferResponse, dict]:
        """(the response, every output the model produced: a sequence's state outputs too)."""
        start = time.perf_counter_ns()
        pending = None
        try:
            pending = loaded.validator.prepare(request)
            outputs = await loaded.runner.submit(pending)
            missing = [n for n in pending.outputs if n not in outputs]
            if missing:
                raise BackendError(f"model {request.model!r} did not produce output(s) {', '.join(missing)}")
        except Exception as e:
            queue_ns = pending.queue_ns if pending else None
            loaded.stats.record_request(False, 0, time.perf_counter_ns() - start, queue_ns)
            if isinstance(e, DeskpodError):
                raise
            raise BackendError(f"model {request.model!r} failed: {type(e).__name__}: {e}") from e
        loaded.stats.record_request(True, pending.batch_size, time.perf_counter_ns() - start, pending.queue_ns)
        hidden = loaded.sequence.state_outputs if loaded.sequence else ()  # kept by the batcher, not sent back
        ordered = {n: outputs[n] for n in pending.outputs if n not in hidden}
        return InferResponse(request.model, loaded.version, request.id, ordered), outputs

    async def infer_stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """A decoupled model's responses as it sends them (the last has `final`); any other model's one."""
        loaded = self._loaded(request.model, request.version)
        if not loaded.config.model_transaction_policy.decoupled:
            yield await self.infer(request)
            return
        start = time.perf_counter_ns()
        responses: asyncio.Queue[tuple[Any, bool]] = asyncio.Queue()
        pending = loaded.validator.prepare(request)
        pending.sink = lambda result, final: responses.put_nowait((result, final))
        execution = asyncio.ensure_future(loaded.runner.submit(pending))
        # an execution that fails fails the stream; one that returns leaves it to the model's response sender
        execution.add_done_callback(
            lambda done: done.cancelled() or done.exception() is None or responses.put_nowait((done.exception(), True)))
        ok = False
        try:
            while True:
                result, final = await responses.get()
                if isinstance(result, BaseException):
                    raise result if isinstance(result, DeskpodError) else BackendError(
                        f"model {request.model!r} failed: {type(result).__name__}: {result}")
                outputs = {n: result[n] for n in pending.outputs if n in (result or {})}
                yield InferResponse(request.model, loaded.version, request.id, outputs, final=final)
                if final:
                    ok = True
                    return
        finally:
            if not ok:
                loaded.runner.cancel(pending)
            loaded.stats.record_request(ok, pending.batch_size, time.perf_counter_ns() - start, pending.queue_ns)

    def names(self) -> list[str]:
        """The model folders in the repository now."""
        return list(self._scan())

    # --- internals ------------------------------------------------------------------------------------

    def _scan(self) -> list[str]:
        """The model folders, re-read only when the root folder changed (index() may be on a hot path)."""
        mtime = self.root.stat().st_mtime_ns
        if self._scanned is None or self._scanned[0] != mtime:
            names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            self._scanned = (mtime, names)
        return self._scanned[1]

    def _model_dir(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ModelNotFound(f"{name!r} is not a model name")
        path = self.root / name
        if not path.is_dir():
            raise ModelNotFound(f"no model {name!r} in the repository {self.root}")
        return path

    def _model(self, name: str) -> _Model:
        with self._models_lock:
            return self._models.setdefault(name, _Model(name))

    def _loaded(self, name: str, version: str) -> LoadedVersion:
        model = self._models.get(name)
        if model is None:
            self._model_dir(name)
            raise ModelNotReady(f"model {name!r} is not loaded; load it through the repository API")
        versions = model.versions
        if version:
            if version in versions:
                return versions[version]
            state, reason = model.states.get(version, ("", ""))
            if state:
                raise ModelNotReady(f"model {name!r} version {version} is {state}" + (f": {reason}" if reason else ""))
            raise ModelNotFound(f"model {name!r} has no version {version}; ready: {', '.join(versions) or 'none'}")
        if versions:
            return versions[max(versions, key=_version_key)]
        state, reason = model.states.get("", (UNAVAILABLE, ""))
        reasons = reason or "; ".join(r for _, r in model.states.values() if r)
        raise ModelNotReady(f"model {name!r} is not ready" + (f": {reasons}" if reasons else ""))

    def _read(self, name: str, model_dir: Path, config_json: str | None) -> tuple[mc.ModelConfig, list[str]]:
        source = str(model_dir / cfg.CONFIG_FILENAME) if config_json is None else f"the config given to load {name!r}"
        config, fields = cfg.read_config(model_dir, config_json)
        if config.name and config.name != name:
            raise CorruptModel(f"{source}: name: {config.name!r} differs from the folder name {name!r}")
        config.name = name
        all_versions = sorted((p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=int)
        cfg.resolve_backend(config, model_dir, [model_dir / v for v in reversed(all_versions)], source)
        versions = _select_versions(config, all_versions)
        if not versions and config.backend != "ensemble":
            raise CorruptModel(
                f"{model_dir}: no version folder selected by version_policy (found: {', '.join(all_versions) or 'none'}); "
                f"put the model file in {model_dir}/1/"
            )
        if config.backend == "ensemble" and not versions:
            versions = ["1"]  # an ensemble has no files; Triton still expects a version folder, we do not
        module = self._backend(config.backend)
        complete = getattr(module, "complete_config", None)
        if complete is not None:  # from the newest version's file, as Triton's auto-complete does
            newest = model_dir / versions[-1] / cfg.model_filename(config)
            _require_file(newest)
            complete(config, fields, newest, self.backend_config.get(config.backend, {}))
        cfg.validate(config, source)
        if config.backend == "ensemble":
            self._validate_ensemble(config, source)
        return config, versions

    def _validate_ensemble(self, config: mc.ModelConfig, source: str) -> None:
        """The tensor wiring, and every step naming a model of this repository (it may load later)."""
        cfg.validate_ensemble(config, source)
        for i, step in enumerate(config.ensemble_scheduling.step):
            if not (self.root / step.model_name).is_dir():
                raise CorruptModel(
                    f"{source}: ensemble_scheduling.step[{i}].model_name: no model {step.model_name!r} "
                    f"in the repository {self.root}"
                )

    def _load_versions(self, model: _Model, model_dir: Path, config: mc.ModelConfig, versions: list[str]) -> dict:
        module = self._backend(config.backend)
        loaded: dict[str, LoadedVersion] = {}
        for version in versions:
            model.states.setdefault(version, (LOADING, ""))
            if model.states[version][0] != READY:
                model.states[version] = (LOADING, "")
            try:
                loaded[version] = self._load_version(module, model_dir, config, version)
            except Exception as e:
                for done in loaded.values():
                    self._close(done)
                self._fail(model, version, e)
                raise
        return loaded

    def _load_version(self, module: Any, model_dir: Path, config: mc.ModelConfig, version: str) -> LoadedVersion:
        stats = ModelStats(config.name, version)
        if config.backend == "ensemble":
            return LoadedVersion(config, version, module.EnsembleScheduler(config, self.infer, stats), stats)
        path = model_dir / version / cfg.model_filename(config)
        _require_file(path)
        count = cfg.instance_count(config)
        instances = []
        try:
            for i in range(count):
                context = ModelContext(
                    config.name, version, self.root, f"{config.name}_0_{i}", i, count, infer=self.infer,
                    infer_stream=self.infer_stream, backend_config=self.backend_config.get(config.backend, {}),
                    unavailable=partial(self._failed_while_serving, config.name, version),
                )
                instances.append(module.create_instance(config, path, context))
        except Exception:
            for instance in instances:
                instance.close()
            raise
        return LoadedVersion(config, version, Batcher(config, instances, stats), stats)

    def _fail(self, model: _Model, version: str, error: Exception) -> None:
        """Keep why a load failed: on the versions it was loading, or on the model when its config is bad.
        A failed reload leaves the serving versions as they are."""
        reason = str(error) if isinstance(error, DeskpodError) else f"{type(error).__name__}: {error}"
        if not version:
            if not model.versions:
                model.states = {"": (UNAVAILABLE, reason)}
            return
        for v, (state, _) in list(model.states.items()):
            if state == LOADING:
                model.states[v] = (UNAVAILABLE, reason if v == version else f"version {version} failed: {reason}")

    def _failed_while_serving(self, name: str, version: str, reason: str) -> None:
        """An instance can serve no more (its process died and cannot start again): the version is UNAVAILABLE
        with that reason and is unloaded, in the background (this is called from the instance's own threads)."""
        log.error("model %s version %s is unavailable: %s", name, version, reason)

        def unload() -> None:
            model = self._models.get(name)
            if model is None:
                return
            with model.lock:
                loaded = model.versions.pop(version, None)
                model.states[version] = (UNAVAILABLE, reason)
            if loaded is not None:
                self._close(loaded)

        threading.Thread(target=unload, name=f"unload-{name}", daemon=True).start()

    @staticmethod
    def _backend(backend: str) -> Any:
        return importlib.import_module(BACKENDS[backend])

    @staticmethod
    def _close(loaded: LoadedVersion) -> None:
        try:
            loaded.runner.close()
        except Exception as e:  # noqa: BLE001 - a finalize that fails must not keep the model half-unloaded
            log.warning("closing %s version %s: %s", loaded.config.name, loaded.version, e)


def _select_versions(config: mc.ModelConfig, versions: list[str]) -> list[str]:
    """The versions to serve, per version_policy: latest N (default 1), all, or specific ones present."""
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice") or "latest"
    if choice == "all":
        return versions
    if choice == "specific":
        wanted = {str(v) for v in policy.specific.versions}
        return [v for v in versions if v in wanted]
    return versions[-max(policy.latest.num_versions, 1) :] if versions else []


def _require_file(path: Path) -> None:
    if not path.exists():
        raise CorruptModel(f"{path} is missing (the model file for this version)")


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)

"""The one core both protocols call: a v2 operation -> the model repository or the server's LLMs.

Repository models are looked up first, then LLMs; a name in neither is ModelNotFound (404 / NOT_FOUND).
Blocking repository calls (load, unload) run in a worker thread; `infer` runs on the event loop, where
the repository's batcher queues requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tritonclient.grpc import model_config_pb2 as mc

from deskpod import __version__
from deskpod.backends.config import config_to_dict
from deskpod.backends.types import InferRequest, InferResponse
from deskpod.backends.control import allow_api
from deskpod.errors import DeskpodError, InvalidRequest, ModelNotFound
from deskpod.server.kserve.classification import classify, read_labels
from deskpod.server.kserve.llm import VERSION as LLM_VERSION
from deskpod.server.kserve.shared_memory import SystemSharedMemory
from deskpod.server.kserve.llm import LLMModels

if TYPE_CHECKING:
    from deskpod.backends.repository import ModelRepository
    from deskpod.engine.async_engine import AsyncLLM

SERVER_NAME = "deskpod"
EXTENSIONS = ("binary_tensor_data", "classification", "model_repository", "model_configuration", "statistics",
              "parameters", "generate", "system_shared_memory")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = 64 << 20  # a body over this is refused with 413 (HTTP) / RESOURCE_EXHAUSTED (gRPC)


class KServeServing:
    def __init__(self, repository: ModelRepository | None, llms: LLMModels, limits: Limits | None = None,
                 model_control_mode: str | None = None):
        """`model_control_mode`: Triton's (deskpod.backends.control); None lets the API load and unload."""
        self.repository = repository
        self.llms = llms
        self.limits = limits or Limits()
        self.model_control_mode = model_control_mode
        self.shared_memory = SystemSharedMemory()  # regions clients on this machine registered
        self._label_cache: dict[tuple[str, str], list[str]] = {}

    # --- server ---------------------------------------------------------------------------------

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    # --- lookup ---------------------------------------------------------------------------------

    def in_repository(self, name: str) -> bool:
        return self.repository is not None and name in self.repository

    def _llm(self, name: str, version: str = "") -> AsyncLLM | None:
        """The LLM called `name` unless the repository has that name; ModelNotFound if neither does."""
        if self.in_repository(name):
            return None
        engine = self.llms.get(name)
        if engine is None:
            # Triton's words, which its clients and examples look for
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found (GET /v2/repository/index "
                                "lists the models served)")
        if version not in ("", LLM_VERSION):
            raise ModelNotFound(f"model `{name}` has no version {version}: it has version {LLM_VERSION} only")
        return engine

    def require(self, name: str, version: str = "") -> None:
        """ModelNotFound unless a model `name` is served (before reading a body that may not matter)."""
        self._llm(name, version)

    def _repo(self) -> ModelRepository:
        assert self.repository is not None  # _llm returned None: the name is in the repository
        return self.repository

    # --- models ---------------------------------------------------------------------------------

    def model_ready(self, name: str, version: str = "") -> bool:
        if self._llm(name, version) is not None:
            return True
        return self._repo().ready(name, version)

    def why_not_ready(self, name: str, version: str = "") -> str:
        """A sentence for a model that is not ready, with the repository's reason when it has one."""
        reasons = [
            f"{e['state'] or 'not loaded'}{': ' + e['reason'] if e['reason'] else ''}"
            for e in self.index()
            if e["name"] == name and (not version or e["version"] in ("", version))
        ]
        return f"model `{name}` is not ready" + (f" ({'; '.join(reasons)})" if reasons else "")

    def model_metadata(self, name: str, version: str = "") -> dict:
        if self._llm(name, version) is not None:
            return self.llms.metadata(name)
        return self._repo().metadata(name, version)

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        if self._llm(name, version) is not None:
            return self.llms.config(name)
        return self._repo().config(name, version)

    def statistics(self, name: str = "", version: str = "") -> list[dict]:
        if name and self._llm(name, version) is not None:
            raise InvalidRequest(f"`{name}` is an LLM: its statistics are the deskpod_* series of GET /metrics")
        return self.repository.statistics(name, version) if self.repository is not None else []

    # --- repository -----------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict]:
        models = self.repository.index(ready_only) if self.repository is not None else []
        return models + self.llms.index()

    async def load(self, name: str, config_json: str | None = None) -> None:
        self._refuse_llm(name, "loaded")
        allow_api(self.model_control_mode)
        self._label_cache.clear()  # a model loaded again may name other labels
        try:
            await asyncio.to_thread(self._need_repository().load, name, config_json)
        except DeskpodError as e:  # Triton's words first: its clients look for them
            e.args = (f"failed to load '{name}': {e}", *e.args[1:])
            raise

    async def unload(self, name: str) -> None:
        self._refuse_llm(name, "unloaded")
        allow_api(self.model_control_mode)
        await asyncio.to_thread(self._need_repository().unload, name)

    def _refuse_llm(self, name: str, what: str) -> None:
        if not self.in_repository(name) and self.llms.get(name) is not None:
            raise InvalidRequest(f"`{name}` is an LLM served by `deskpod serve {name}`: it cannot be {what} here")

    def _need_repository(self) -> ModelRepository:
        if self.repository is None:
            raise InvalidRequest("this server has no model repository: start it with --model-repository DIR")
        return self.repository

    # --- inference ------------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        engine = self._llm(request.model, request.version)
        if engine is not None:
            if request.classification:
                raise InvalidRequest(f"`{request.model}` is an LLM: its outputs are text, not class scores")
            return await self.llms.infer(engine, request)
        response = await self._repo().infer(request)
        return self._classified(request, response) if request.classification else response

    def _classified(self, request: InferRequest, response: InferResponse) -> InferResponse:
        """The classification extension: the outputs asked for as top-k classes, labelled from the files
        the config's outputs name (read once per model and file)."""
        config = self.model_config(request.model, request.version)
        labels = {}
        for output in config.output:
            if output.name in request.classification and output.label_filename:
                labels[output.name] = self._labels(request.model, output.label_filename)
        return classify(response, request.classification, config.max_batch_size > 0, labels)

    def _labels(self, model: str, file_name: str) -> list[str]:
        key = (model, file_name)
        if key not in self._label_cache:
            path = (self.repository.root / model / file_name).resolve()
            if not path.is_relative_to((self.repository.root / model).resolve()) or not path.is_file():
                raise InvalidRequest(f"model `{model}`: its label_filename {file_name!r} is not a file in its folder")
            self._label_cache[key] = read_labels(path)
        return self._label_cache[key]

    async def infer_stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        """An LLM's responses as the text grows, a decoupled model's as it sends them (the last `final`, maybe
        empty); any other model's one response."""
        engine = self._llm(request.model, request.version)
        if engine is None:
            if request.classification:
                yield await self.infer(request)
                return
            async for response in self._repo().infer_stream(request):
                yield response
            return
        async for response in self.llms.infer_stream(engine, request):
            yield response

    def llm_engine(self, name: str, version: str = "") -> AsyncLLM:
        """For the generate extension: the LLM `name` (a repository model cannot generate text)."""
        engine = self._llm(name, version)
        if engine is None:
            raise InvalidRequest(
                f"`{name}` is a repository model: send it tensors with POST /v2/models/{name}/infer"
            )
        return engine

    def config_dict(self, name: str, version: str = "") -> dict[str, Any]:
        # every field, those at their defaults too (`max_batch_size: 0`, ...), as Triton writes it: its clients
        # read them without checking
        return config_to_dict(self.model_config(name, version))

"""The models a server holds, by name: LLMs run by the engine, embedding models run by deskpod.embed.

Which runs a model is decided by its manifest's (format, architecture) in `LOADERS`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deskpod.engine.config import EngineConfig
from deskpod.errors import UnsupportedModel
from deskpod.link.config import LinkConfig
from deskpod.server.errors import APIError
from deskpod.store import Manifest, Store

if TYPE_CHECKING:
    from deskpod.embed.embedder import SentenceEmbedder
    from deskpod.engine.async_engine import AsyncLLM

log = logging.getLogger("deskpod.server")

LLM, EMBEDDING = "llm", "embedding"
KIND_WORDS = {
    LLM: "a language model (/v1/chat/completions, /v1/completions)",
    EMBEDDING: "an embedding model (/v1/embeddings)",
}


@dataclass(frozen=True)
class ServedModel:
    name: str
    kind: str  # LLM or EMBEDDING
    runner: Any  # an AsyncLLM or a SentenceEmbedder
    created: int  # Unix time it was loaded
    max_context: int


def _load_llm(name: str, manifest: Manifest, options: EngineConfig) -> ServedModel:
    from deskpod.engine.async_engine import AsyncLLM

    engine = AsyncLLM.from_model(name, options)
    return ServedModel(name, LLM, engine, int(time.time()), engine.max_context)


def _load_linked_llm(name: str, manifest: Manifest, options: EngineConfig, link: LinkConfig) -> ServedModel:
    """The model across linked boxes: waits for them to join (deskpod.link.serve)."""
    import sys

    from deskpod.engine.async_engine import AsyncLLM
    from deskpod.link.serve import linked_engine

    path = Store().model_file(manifest) if manifest.format == "gguf" else Store().model_dir(manifest)
    progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    engine = AsyncLLM(lambda: linked_engine(name, path, options, link, manifest.digest, progress), name)
    return ServedModel(name, LLM, engine, int(time.time()), engine.max_context)


def _load_embedder(name: str, manifest: Manifest, options: EngineConfig) -> ServedModel:
    from deskpod.embed.embedder import SentenceEmbedder

    embedder = SentenceEmbedder(Store().model_dir(manifest))
    return ServedModel(name, EMBEDDING, embedder, int(time.time()), embedder.max_tokens)


# (format, architecture) -> loader; "*" matches any architecture (the engine refuses the ones it cannot run)
LOADERS: dict[tuple[str, str], Callable[[str, Manifest, EngineConfig], ServedModel]] = {
    ("gguf", "*"): _load_llm,
    ("safetensors", "bert"): _load_embedder,
    ("safetensors", "*"): _load_llm,
}


def loader_for(manifest: Manifest) -> Callable[[str, Manifest, EngineConfig], ServedModel]:
    found = LOADERS.get((manifest.format, manifest.architecture)) or LOADERS.get((manifest.format, "*"))
    if found is None:
        known = ", ".join(f"{f}/{a}" for f, a in LOADERS)
        raise UnsupportedModel(
            f"{manifest.ref} is a {manifest.format} {manifest.architecture} model; `deskpod serve` serves {known}"
        )
    return found


class ModelRegistry:
    def __init__(self, models: list[ServedModel], aliases: dict[str, str] | None = None):
        self.models = {m.name: m for m in models}
        self.aliases = {alias: name for alias, name in (aliases or {}).items() if name in self.models}

    @classmethod
    def load(cls, names: list[str], options: EngineConfig, link: LinkConfig | None = None) -> ModelRegistry:
        """Load the stored models `names` (pull them first with Store().ensure); with `link`, the one model
        across linked boxes."""
        store, models, aliases = Store(), [], {}
        for name in names:
            manifest = store.get(name)
            log.info("loading %s (%s %s)", name, manifest.format, manifest.architecture)
            if link is not None:
                if loader_for(manifest) is not _load_llm:
                    raise UnsupportedModel(f"{manifest.ref}: only LLMs can be served across linked boxes")
                models.append(_load_linked_llm(name, manifest, options, link))
            else:
                models.append(loader_for(manifest)(name, manifest, options))
            aliases[manifest.ref] = name  # "smollm2:latest" finds "smollm2" too
        return cls(models, aliases)

    def served(self, name: str) -> ServedModel:
        """The model called `name` (or one of its aliases); 404 in OpenAI's words if there is none."""
        model = self.models.get(self.aliases.get(name, name))
        if model is None:
            raise APIError(
                404,
                f"the model `{name}` does not exist: GET /v1/models lists those served",
                param="model",
                code="model_not_found",
            )
        return model

    def get(self, name: str, kind: str) -> Any:
        """The runner of model `name`, which must be of `kind` (400 otherwise)."""
        model = self.served(name)
        if model.kind != kind:
            raise APIError(
                400,
                f"`{name}` is {KIND_WORDS[model.kind]}, not {KIND_WORDS[kind]}",
                param="model",
                code="wrong_model_kind",
            )
        return model.runner

    def llm(self, name: str) -> AsyncLLM:
        return self.get(name, LLM)

    def embedder(self, name: str) -> SentenceEmbedder:
        return self.get(name, EMBEDDING)

    def llms(self) -> Iterator[tuple[str, AsyncLLM]]:
        return ((m.name, m.runner) for m in self.models.values() if m.kind == LLM)

    async def shutdown(self) -> None:
        for _, engine in self.llms():
            await engine.shutdown()

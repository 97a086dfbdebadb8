"""The in-process Python API: `deskpod.LLM("smollm2").generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from deskpod.engine.config import EngineConfig
from deskpod.engine.generate import Completion, generate, generate_batch, stream
from deskpod.engine.loader import LoadedModel, load_model
from deskpod.engine.sampler import SamplingParams
from deskpod.errors import UnsupportedModel

# Store formats the LLM engine runs -> how to find the model in the store: its file, or its folder.
ENGINE_FORMATS = {"gguf": "model_file", "safetensors": "model_dir"}


def resolve_model_file(model: str, progress: bool = False) -> Path:
    """A .gguf file or model folder as given, or a store model's GGUF file or safetensors folder (pulled
    first when it is a catalog name)."""
    path = Path(model)
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return path
    from deskpod.store import Store

    store = Store()
    manifest = store.ensure(model, progress=progress)
    if manifest.format not in ENGINE_FORMATS:
        raise UnsupportedModel(f"{manifest.ref} is a {manifest.format} model; the LLM engine runs GGUF and safetensors models")
    return getattr(store, ENGINE_FORMATS[manifest.format])(manifest)


class LLM:
    def __init__(self, model: str, config: EngineConfig = EngineConfig(), **settings):
        """A store model (pulled first when it is a catalog name) or a model file, loaded now; `settings` override
        fields of `config` (LLM("smollm2", weights="float32", context=2048))."""
        self.config = replace(config, **settings)
        self.loaded: LoadedModel = load_model(resolve_model_file(model), self.config, name=model)
        self.tokenizer = self.loaded.tokenizer

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages)

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def generate(self, prompts: str | list[int] | list, params: SamplingParams | None = None) -> list[Completion]:
        """Completions for one prompt or a list of them (text or token ids), in order."""
        params = params or SamplingParams()
        batch = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)
        return generate_batch(self.loaded, [self.prompt_ids(p) for p in batch], params, self.config)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> Completion:
        return generate(self.loaded, self.chat_prompt(messages), params or SamplingParams(), self.config)

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        return stream(self.loaded, prompt_ids, params, self.config)


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)

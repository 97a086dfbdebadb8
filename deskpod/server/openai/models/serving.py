"""/v1/models from the registry."""

from __future__ import annotations

from deskpod.server.openai.models.protocol import ModelCard, ModelList
from deskpod.server.registry import ModelRegistry, ServedModel


def card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, max_model_len=model.max_context)


class OpenAIServingModels:
    def __init__(self, models: ModelRegistry):
        self.models = models

    def list(self) -> ModelList:
        return ModelList(data=[card(m) for m in self.models.models.values()])

    def retrieve(self, name: str) -> ModelCard:
        return card(self.models.served(name))

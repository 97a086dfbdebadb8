"""Triton-style model repositories: config, backends (onnxruntime, pytorch, python, ensemble), dynamic
batching, instance groups and statistics, below the KServe v2 protocol servers. Everything is numpy here."""

from .repository import ModelRepository
from .types import InferRequest, InferResponse

__all__ = ["InferRequest", "InferResponse", "ModelRepository"]

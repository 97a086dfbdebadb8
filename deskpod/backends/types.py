"""The values that cross the boundary between the protocol servers and the repository: numpy in, numpy out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class InferRequest:
    """One inference request. `version` "" means the newest ready version; `outputs` None means all outputs."""

    model: str
    inputs: dict[str, np.ndarray]
    version: str = ""
    id: str = ""
    outputs: tuple[str, ...] | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    classification: Mapping[str, int] = field(default_factory=dict)  # output -> top k classes (Triton's extension)


@dataclass(frozen=True)
class InferResponse:
    """The answer: `outputs` in the config's output order, filtered to the requested ones."""

    model: str
    version: str
    id: str
    outputs: dict[str, np.ndarray]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    # False on all but a decoupled model's last response; that last one may be empty (a final flag only)
    final: bool = True

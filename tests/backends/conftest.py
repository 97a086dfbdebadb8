"""Fixtures for tests/backends: a temp repository root, the add_sub ONNX model, repositories closed after use."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from backend_models import ADD_SUB_CONFIG, add_sub_onnx, write_model

from deskpod.backends import ModelRepository


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def add_sub_root(root: Path) -> Path:
    write_model(root, "add_sub", ADD_SUB_CONFIG)
    add_sub_onnx(root / "add_sub" / "1" / "model.onnx")
    return root


@pytest.fixture
def repo_factory() -> Iterator:
    """Build repositories that are closed after the test (Python models' finalize, sessions released)."""
    made: list[ModelRepository] = []

    def make(root: Path, load: bool = True, backend_config: dict | None = None) -> ModelRepository:
        repo = ModelRepository(root, backend_config)
        made.append(repo)
        if load:
            repo.load_all()
        return repo

    yield make
    for repo in made:
        repo.close()


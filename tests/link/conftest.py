"""Fixtures of the link tests: the links a test starts (stopped after it), and a second box's store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.linking import Box, Link, start_link

from deskpod.store import Store


@pytest.fixture
def linked(tmp_path) -> Iterator:
    """start_link(...), stopped after the test."""
    links: list[Link] = []

    def start(*args, **kwargs) -> Link:
        links.append(start_link(*args, logs=tmp_path / f"link{len(links)}", **kwargs))
        return links[-1]

    yield start
    for link in links:
        link.stop()


@pytest.fixture(scope="session")
def worker_home(tmp_path_factory, smollm2_gguf) -> Path:
    """A second box's store, with SmolLM2 pulled from the catalog as the head's was (the same digest)."""
    home = tmp_path_factory.mktemp("worker_home")
    Store(home).pull("smollm2", progress=False)
    return home


@pytest.fixture
def two_boxes(store_home, worker_home) -> list[Box]:
    return [Box(store_home), Box(worker_home)]

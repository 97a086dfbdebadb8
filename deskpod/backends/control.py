"""Triton's model control modes, for a repository served by `deskpod serve --model-repository`:

    none      every model loaded at start; the repository API may not load or unload
    poll      the same, and the repository is watched: a model folder added, changed or removed is
              loaded, reloaded or unloaded within --repository-poll-secs
    explicit  only the --load-model models at start ("*": all); the repository API loads and unloads

Without --model-control-mode, deskpod loads every model and lets the API load and unload too.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from deskpod.errors import ModelNotReady

if TYPE_CHECKING:
    from deskpod.backends.repository import ModelRepository

log = logging.getLogger(__name__)
# Triton's words (UNAVAILABLE): its clients and examples look for them
NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"


def allow_api(mode: str | None) -> None:
    """ModelNotReady (503 / UNAVAILABLE) with Triton's message where the API may not load or unload."""
    if mode in ("none", "poll"):
        raise ModelNotReady(NOT_ALLOWED)


def load_at_start(repository: ModelRepository, mode: str | None, load_models: tuple[str, ...] = ()) -> None:
    """Every model, or in explicit mode the ones named; one that fails is UNAVAILABLE with its reason."""
    if mode != "explicit" or "*" in load_models:
        repository.load_all()
        return
    for name in load_models:
        try:
            repository.load(name)
        except Exception as e:  # noqa: BLE001 - the others still load; its reason is in the index
            log.warning("model %s is unavailable: %s", name, e)


def fingerprint(folder: Path) -> tuple:
    """What a model folder holds: every file's path, size and modification time."""
    entries = []
    for dirpath, _, files in os.walk(folder):
        for file in files:
            path = Path(dirpath) / file
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


class RepositoryPoller:
    """poll mode: every `seconds`, load the model folders that appeared or changed, unload the ones removed."""

    def __init__(self, repository: ModelRepository, seconds: float):
        self.repository, self.seconds = repository, seconds
        self._seen = {name: fingerprint(repository.root / name) for name in repository.names()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deskpod-repository-poll", daemon=True)

    def start(self) -> RepositoryPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a bad scan must not end the polling
                log.exception("polling the model repository failed")

    def poll(self) -> None:
        now = {name: fingerprint(self.repository.root / name) for name in self.repository.names()}
        for name in sorted(set(self._seen) - set(now)):
            log.info("model %s was removed from the repository: unloading it", name)
            self.repository.unload(name)
        for name, print_ in sorted(now.items()):
            if self._seen.get(name) != print_:
                log.info("model %s %s: loading it", name, "changed" if name in self._seen else "appeared")
                try:
                    self.repository.load(name)
                except Exception as e:  # noqa: BLE001 - its reason is in the index
                    log.warning("model %s is unavailable: %s", name, e)
        self._seen = now

"""Crash-safe file operations: hashing copies, fsync, atomic replace, and flock locks.

A file becomes visible under its final name only by `os.replace` after its bytes are on disk,
so a process killed at any moment leaves either the old state or the new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

CHUNK = 1 << 20  # 1 MiB reads: large enough for full disk speed, small enough for smooth progress


class HashingWriter:
    """Writes a new file while hashing it; on close the bytes are flushed and fsynced."""

    def __init__(self, path: Path, advance: Callable[[int], object] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.size = 0
        self._hash = hashlib.sha256()
        self._advance = advance
        self._file = path.open("xb")

    def copy_from(self, src: IO[bytes]) -> None:
        while block := src.read(CHUNK):
            self._file.write(block)
            self._hash.update(block)
            self.size += len(block)
            if self._advance:
                self._advance(len(block))

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, scratch: Path) -> None:
    """Write `data` to `path` through a temp file in `scratch` (same filesystem): all or nothing."""
    tmp = scratch / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextmanager
def flocked(path: Path, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on `path` (created if missing); yields False if non-blocking and already held.

    The kernel drops the lock when the process dies, so a killed holder never wedges the store.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)

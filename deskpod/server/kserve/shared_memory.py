"""Triton's system shared memory extension: a client on the same machine registers a POSIX shared memory
object (shm_open's key, e.g. "/input_simple") under a region name, then names regions instead of sending
tensors — `shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset` in an input's or output's
parameters. Inputs are read from the region, outputs written into it and answered with their shape and
datatype only. Every access is bounds-checked against the registered window; CUDA shared memory is refused
on a machine without a GPU.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deskpod.errors import InvalidRequest, ModelNotFound

SHM_DIR = "/dev/shm"  # where Linux keeps shm_open's objects
_KEY = re.compile(r"/[A-Za-z0-9_.\-]+")
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


class RegionExists(InvalidRequest):
    pass


@dataclass(frozen=True)
class SharedRef:
    """Where a tensor lies: `byte_size` bytes at `offset` within region `region`."""

    region: str
    byte_size: int
    offset: int = 0


def shared_ref(what: str, params: Mapping[str, Any]) -> SharedRef | None:
    """The region a tensor's parameters name, or None; InvalidRequest for a malformed one."""
    if REGION not in params:
        return None
    region, size, offset = params[REGION], params.get(BYTE_SIZE), params.get(OFFSET, 0)
    if not isinstance(region, str) or not region:
        raise InvalidRequest(f"{what}: {REGION} must be a region name")
    for name, value in ((BYTE_SIZE, size), (OFFSET, offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"{what}: {name} must be an integer >= 0, got {value!r}")
    return SharedRef(region, size, offset)


@dataclass
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    memory: mmap.mmap

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SystemSharedMemory:
    def __init__(self):
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidRequest("a shared memory region needs a name")
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key in ("/.", "/.."):
            raise InvalidRequest(f"shared memory key {key!r} must be a POSIX shared memory name like \"/input0\"")
        for label, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequest(f"shared memory region '{name}': {label} must be an integer >= 0")
        with self._lock:
            if name in self._regions:  # Triton's words
                raise RegionExists(f"shared memory region '{name}' already in manager")
            path = os.path.join(SHM_DIR, key[1:])
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                raise InvalidRequest(f"Unable to open shared memory region: '{key}' ({e.strerror})") from None
            try:
                size = os.fstat(fd).st_size
                if offset + byte_size > size or byte_size == 0:
                    raise InvalidRequest(f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                                         f"does not fit in '{key}' ({size} bytes)")
                memory = mmap.mmap(fd, offset + byte_size)
            finally:
                os.close(fd)
            self._regions[name] = _Region(name, key, offset, byte_size, memory)

    def unregister(self, name: str | None = None) -> None:
        """One region, or every region (name None); an unknown name is no error, as in Triton."""
        with self._lock:
            names = list(self._regions) if name is None else [name] if name in self._regions else []
            for each in names:
                self._regions.pop(each).memory.close()

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if name is None:
                return [r.status() for r in self._regions.values()]
            return [self._region(name).status()]

    def read(self, what: str, ref: SharedRef) -> bytes:
        with self._lock:
            region = self._region(ref.region)
            start = self._window(what, region, ref, ref.byte_size)
            return bytes(region.memory[start : start + ref.byte_size])

    def write(self, what: str, ref: SharedRef, data: bytes) -> None:
        if len(data) > ref.byte_size:  # Triton's words
            raise InvalidRequest(f"shared memory size specified with the request for {what} ({ref.byte_size} bytes) "
                                 f"should be at least {len(data)} bytes to hold the results")
        with self._lock:
            region = self._region(ref.region)
            start = self._window(what, region, ref, len(data))
            region.memory[start : start + len(data)] = data

    def close(self) -> None:
        self.unregister()

    def _region(self, name: str) -> _Region:
        try:
            return self._regions[name]
        except KeyError:
            raise ModelNotFound(f"Unable to find system shared memory region: '{name}'") from None

    @staticmethod
    def _window(what: str, region: _Region, ref: SharedRef, size: int) -> int:
        """The mapping's index of the tensor's first byte; InvalidRequest when it reaches past the region."""
        if ref.offset + size > region.byte_size:
            raise InvalidRequest(f"{what}: {size} bytes at offset {ref.offset} reach past the end of shared memory "
                                 f"region '{region.name}' ({region.byte_size} bytes)")
        return region.offset + ref.offset


CUDA_REFUSAL = ("CUDA shared memory is not available: this server has no CUDA GPU (use system shared memory, "
                "/v2/systemsharedmemory)")

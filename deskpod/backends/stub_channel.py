"""The channel between the server and a Python model's own process (its stub): JSON messages over a Unix socket,
their tensors through shared memory.

Each direction has an arena: an anonymous shared-memory file (memfd: no name to leak, not counted against a
container's small /dev/shm) used as a ring. The sender copies a message's tensors into free space and sends the
header, which says where they lie; the receiver's one reader thread copies them out before it reads the next
message, then publishes how far it has read in the arena's first 8 bytes, freeing that space. A message larger
than the arena first replaces it with one twice its size (up to MAX_ARENA_BYTES; the new file's descriptor goes
over the socket): arenas grow to what the model's tensors need. A message that does not fit the free space of
a busy ring sends its tensors inline after the header instead, so nothing waits for space.

Nothing is ever unpickled: headers are JSON, tensors are raw bytes with a dtype and shape (BYTES tensors in
Triton's length-prefixed form).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from . import datatypes

ARENA_BYTES = 1 << 20  # per direction, to start with
MAX_ARENA_BYTES = 1 << 30  # beyond this a message's tensors go inline
_HEAD = 64  # the arena's header: the receiver's read position (u64), then padding to a cache line
_FRAME = struct.Struct("<II")  # header length, inline payload length
_BYTES = "BYTES"  # (a datatypes v2 name, sent in its serialized form)


class ChannelClosed(ConnectionError):
    """The other process has gone (it crashed, was killed, or closed the channel)."""


def make_arena(size: int = ARENA_BYTES) -> int:
    """A new anonymous shared-memory file of `size` data bytes; its fd is passed to the other process."""
    fd = os.memfd_create("deskpod-stub-arena", 0)
    os.ftruncate(fd, _HEAD + size)
    return fd


class Channel:
    """One end: `send(header, arrays)` from any thread, `receive()` from one reader thread only."""

    def __init__(self, sock: socket.socket, send_arena_fd: int, receive_arena_fd: int) -> None:
        self.sock = sock
        self._out = mmap.mmap(send_arena_fd, 0)
        self._in = mmap.mmap(receive_arena_fd, 0)
        self._out_size = len(self._out) - _HEAD
        self._in_size = len(self._in) - _HEAD
        self._written = 0  # bytes of the outgoing ring handed out so far (monotonic)
        self._send_lock = threading.Lock()
        self._received = bytearray()  # read from the socket, not yet taken
        self._fds: list[int] = []  # descriptors that came with it (a new arena's)

    # --- sending ------------------------------------------------------------------------------------

    def send(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
        blobs = [_encode(a) for a in arrays]
        with self._send_lock:
            total = sum(len(data) for _, data in blobs)
            if self._out_size < 2 * total <= 2 * MAX_ARENA_BYTES:  # room for two such messages in flight
                self._grow(total)
            placed, inline = self._place(blobs)
            header = {**header, "_arrays": placed}
            text = json.dumps(header, separators=(",", ":")).encode()
            try:
                self.sock.sendall(_FRAME.pack(len(text), len(inline)) + text + inline)
            except OSError as e:
                raise ChannelClosed(f"the channel is closed: {e}") from e

    def _grow(self, needed: int) -> None:
        """Replace the outgoing arena by one that holds `needed` bytes twice over (a power of two). The
        receiver has copied out everything before this message by the time it maps the new one."""
        size = min(1 << math.ceil(math.log2(2 * needed)), MAX_ARENA_BYTES)
        fd = make_arena(size)
        try:
            header = json.dumps({"_arena": size}).encode()
            socket.send_fds(self.sock, [_FRAME.pack(len(header), 0) + header], [fd])
            arena = mmap.mmap(fd, 0)
        except OSError as e:
            raise ChannelClosed(f"the channel is closed: {e}") from e
        finally:
            os.close(fd)
        self._out.close()
        self._out, self._out_size, self._written = arena, size, 0

    def _place(self, blobs: list[tuple[dict, memoryview]]) -> tuple[list[dict], bytes]:
        """Copy the tensors into the arena when they fit the free space, else return them as inline bytes."""
        total = sum(len(data) for _, data in blobs)
        start = self._reserve(total) if total else None
        placed, inline = [], bytearray()
        for meta, data in blobs:
            if start is None:
                meta = {**meta, "inline": len(inline)}
                inline += data
            else:
                offset = _HEAD + start % self._out_size
                self._out[offset : offset + len(data)] = data
                meta = {**meta, "at": start}
                start += len(data)
            placed.append({**meta, "nbytes": len(data)})
        if start is not None:
            placed.append({"end": self._written})  # how far the receiver may free once it has copied them
        return placed, bytes(inline)

    def _reserve(self, n: int) -> int | None:
        """A contiguous run of n bytes of the ring (skipping a tail too short for it), or None when full."""
        if n > self._out_size:
            return None
        read = struct.unpack_from("<Q", self._out, 0)[0]
        start = self._written
        if start % self._out_size + n > self._out_size:
            start += self._out_size - start % self._out_size  # wrap: the tail is skipped
        if start + n - read > self._out_size:
            return None
        self._written = start + n
        return start

    # --- receiving ----------------------------------------------------------------------------------

    def receive(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        frame = self._read_exactly(_FRAME.size)
        text_length, inline_length = _FRAME.unpack(frame)
        header = json.loads(self._read_exactly(text_length))
        if "_arena" in header:  # the sender's arena grew: map the new one and read on
            if not self._fds:
                raise ChannelClosed("a new arena was announced without its file")
            fd = self._fds.pop(0)
            self._in.close()
            self._in, self._in_size = mmap.mmap(fd, 0), header["_arena"]
            os.close(fd)
            return self.receive()
        inline = self._read_exactly(inline_length) if inline_length else b""
        arrays, end = [], None
        for meta in header.pop("_arrays", []):
            if "end" in meta:
                end = meta["end"]
                continue
            if "at" in meta:
                offset = _HEAD + meta["at"] % self._in_size
                data = memoryview(self._in)[offset : offset + meta["nbytes"]]
            else:
                data = memoryview(inline)[meta["inline"] : meta["inline"] + meta["nbytes"]]
            arrays.append(_decode(meta, data))  # a copy: the arena's space is freed below
            data.release()
        if end is not None:
            struct.pack_into("<Q", self._in, 0, end)
        return header, arrays

    def _read_exactly(self, n: int) -> bytes:
        while len(self._received) < n:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, max(n - len(self._received), 1 << 16), 4)
            except OSError as e:
                raise ChannelClosed(f"the channel is closed: {e}") from e
            if not data:
                raise ChannelClosed("the other process closed the channel")
            self._fds.extend(fds)
            self._received += data
        taken = bytes(self._received[:n])
        del self._received[:n]
        return taken

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _encode(array: np.ndarray) -> tuple[dict, memoryview]:
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        serialized = serialize_byte_tensor(array)  # Triton's form: a 4-byte length before each element
        data = serialized.item() if serialized.size else b""  # (a 0-d object array holding the bytes)
        return {"dtype": _BYTES, "shape": list(array.shape)}, memoryview(data)
    name = datatypes.v2_name_of(array)  # bfloat16 too, which numpy's own dtype strings cannot name
    array = np.ascontiguousarray(array)
    return {"dtype": name, "shape": list(array.shape)}, memoryview(array.reshape(-1).view(np.uint8))


def _decode(meta: dict, data: memoryview) -> np.ndarray:
    shape = tuple(meta["shape"])
    if meta["dtype"] == _BYTES:
        if not len(data):
            return np.empty(shape, dtype=np.object_)
        return deserialize_bytes_tensor(bytes(data)).reshape(shape)
    return np.frombuffer(data, dtype=datatypes.numpy_dtype(meta["dtype"])).reshape(shape).copy()

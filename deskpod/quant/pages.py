"""Memory for weights that decoding streams from RAM, in 2 MB pages where the system gives them.

A decode step that reads a Mixture-of-Experts' chosen experts touches a new 4 KB page every 4 KB of weights,
and each one costs a TLB miss and a page-table walk. Linux backs memory with 2 MB pages ("transparent huge
pages") where a program asks for them (madvise), and most distributions ship that setting: reading interleaved
Q4_0 matrices of 0.4 MB from memory ran 1.26x faster from such pages than from 4 KB ones (22.8 against
18.0 GB/s, 2 threads). Weights are carved from 64 MB chunks, since a page of 2 MB can only serve a range
that large. Elsewhere (other systems, huge pages switched off) the chunks are ordinary memory.
"""

from __future__ import annotations

import ctypes
import mmap
import threading

import numpy as np
import torch

CHUNK = 64 << 20  # bytes a chunk holds: at most this much is left unused at a chunk's end
ALIGN = 64  # every piece starts on a cache line


class HugePages:
    """Hands out uint8 tensors carved from chunks of anonymous memory advised to be huge pages. A chunk is freed
    once no tensor carved from it is left (each holds the chunk's mapping)."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk_bytes = chunk
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self._lock = threading.Lock()  # models may load on several threads at once

    def take(self, nbytes: int) -> torch.Tensor:
        """A new uint8 [nbytes] tensor (contents undefined)."""
        if nbytes > self.chunk_bytes // 4:  # a large tensor gets chunks of its own, not a neighbour's leftovers
            return _mapped(nbytes)[:nbytes]
        with self._lock:
            if self._chunk is None or self._used + nbytes > len(self._chunk):
                self._chunk, self._used = _mapped(self.chunk_bytes), 0
            piece = self._chunk[self._used : self._used + nbytes]
            self._used += -(-nbytes // ALIGN) * ALIGN
            return piece


def _mapped(nbytes: int) -> torch.Tensor:
    """nbytes of private anonymous memory, as huge pages where the system has them."""
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no anonymous private mappings here (Windows)
        return torch.empty(size, dtype=torch.uint8)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    return torch.frombuffer(memory, dtype=torch.uint8)  # the tensor keeps the mapping alive


HUGE_PAGES = HugePages()
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)  # 4 is Linux's value, where the module lacks the name


def release_file_pages(array: np.ndarray) -> None:
    """Stop counting a memory-mapped file's pages under `array` as this process's memory once its bytes have been
    copied: the whole pages inside it are unmapped from the process (they stay in the page cache, and are read
    again should anything touch them). Loading copies each weight into huge pages; without this, a load's peak
    memory held every weight twice. Nothing for an array that is not a view of a mapped file."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, mmap.mmap) or array.nbytes == 0 or not array.flags.c_contiguous:
        return
    start = array.ctypes.data
    first, end = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        _libc_call("madvise", ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_DONTNEED)


def return_freed_heap() -> None:
    """Hand the heap's free memory back to the system. Loading copies weights (BlockWeight), and glibc keeps what
    the copies freed for reuse: 0.16 GB more resident for a 0.53 GB MoE. A no-op on other C libraries."""
    _libc_call("malloc_trim", 0)


def _libc_call(name: str, *args) -> None:
    """C library function `name` on args, where the C library has it (else nothing: the memory stays counted)."""
    try:
        getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError):
        pass

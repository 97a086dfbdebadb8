"""deskpod.quant.pages: the memory interleaved weights are carved from."""

from __future__ import annotations

import torch

from deskpod.quant.pages import ALIGN, HugePages


def test_pieces_are_aligned_apart_and_outlive_their_chunk():
    pages = HugePages(chunk=1 << 16)
    pieces = [pages.take(n) for n in (100, 3000, 64, 5000, 7)]
    assert [len(p) for p in pieces] == [100, 3000, 64, 5000, 7]
    starts = [p.data_ptr() for p in pieces]
    assert all(s % ALIGN == 0 for s in starts)
    for value, piece in enumerate(pieces):
        piece.fill_(value)
    assert all(bool((piece == value).all()) for value, piece in enumerate(pieces))  # no piece overlaps another
    spans = sorted((p.data_ptr(), p.data_ptr() + len(p)) for p in pieces)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_a_full_chunk_starts_another_and_large_pieces_get_their_own():
    pages = HugePages(chunk=1 << 16)
    pieces = [pages.take(15_000) for _ in range(5)]  # four fit a chunk of 65,536 bytes; the fifth starts another
    for value, piece in enumerate(pieces):
        piece.fill_(value)
    assert all(bool((piece == value).all()) for value, piece in enumerate(pieces))
    assert pieces[1].data_ptr() - pieces[0].data_ptr() == 15_040  # 15,000 rounded up to whole cache lines
    assert not 0 <= pieces[4].data_ptr() - pieces[0].data_ptr() < 1 << 16
    large = pages.take(1 << 17)  # larger than a chunk
    assert len(large) == 1 << 17 and large.dtype == torch.uint8
    large.fill_(7)
    assert int(large.sum()) == 7 << 17

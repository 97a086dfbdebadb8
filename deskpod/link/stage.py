"""One step of a linked model, as each box runs its share of it.

    head:    send the step's ids and layout to every box
    tensor:  every box embeds and runs all layers over its heads and columns, summing partials per sub-layer
    pipeline: box 0 embeds and runs its layers, hands the activations to box 1, ... the last box hands the
             rows that need logits back to the head
    head:    final norm, LM head, sampling (the runner's, as on one box)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deskpod.engine.attention import AttentionBatch, PagedKVCache
from deskpod.engine.models.layers import DecoderLM
from deskpod.link.group import LinkGroup, LinkLost
from deskpod.link.share import Share


def run_share(model: DecoderLM, share: Share, group: LinkGroup, ids: torch.Tensor, batch: AttentionBatch,
              cache: PagedKVCache, vocab_widths: list[int] = ()) -> torch.Tensor | None:
    """This box's part of the step (the head's under tensor parallel, a worker's in both modes); the head
    gets the logits of the logit rows, the others None.
    `vocab_widths`: (head, tensor parallel) how many of the vocabulary's logits each box computes."""
    if share.tensor:  # every box: its slice of the vocabulary's logits, gathered on the head
        logits = model.logits(model.run_blocks(model.embed(ids), batch, cache)[batch.logit_rows])
        if not share.is_head:
            group.send(logits, 0)
            return None
        return torch.cat([logits] + [group.receive((len(logits), width), logits.dtype, rank)
                                     for rank, width in enumerate(vocab_widths[1:], start=1)], dim=-1)
    # a pipeline's later box (the head's part is LinkedModel.start_batch / finish_batch): the previous box's
    # activations in, its own layers, on to the next box — or, from the last, the logit rows back to the head
    x = group.receive((len(ids), model.spec.hidden_size), model.dtype, share.rank - 1)
    x = model.run_blocks(x, batch, cache)
    if share.rank < share.world - 1:
        group.send(x, share.rank + 1)
    else:
        group.send(x[batch.logit_rows], 0)
    return None


class LinkedModel:
    """The head's view of a linked model, with the interface ModelRunner uses of a DecoderLM: a step sent to
    every box and run by all, logits back. `link` supplies the current group (None while a box is missing)."""

    def __init__(self, model: DecoderLM, share: Share, link):
        self.model, self.share, self.link = model, share, link
        self.spec, self.blocks, self.kv_heads = model.spec, model.blocks, model.kv_heads
        self.parameters, self.named_buffers = model.parameters, model.named_buffers  # the head's own weights
        self.vocab_widths = [s.vocab_end - s.vocab_start for s in link.shares]

    def forward_batch(self, ids: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache) -> torch.Tensor:
        return self.finish_batch(self.start_batch(ids, batch, cache))

    def start_batch(self, ids: torch.Tensor, batch: AttentionBatch, cache: PagedKVCache):
        """Send the step to every box and run the head's part. In a pipeline the head's activations go on to the
        next box without waiting, and finish_batch() collects the last box's; meanwhile the engine can start
        another lane's step, so the boxes work at once."""
        group = self._group()
        try:
            if self.share.tensor:
                group.send_step(ids, batch)
                with torch.inference_mode():
                    return run_share(self.model, self.share, group, ids, batch, cache, self.vocab_widths)
            works = group.post_step(ids, batch)
            with torch.inference_mode():
                x = self.model.run_blocks(self.model.embed(ids), batch, cache)
            works.append(group.post_send(x, 1))
            return _InFlight(group, works, len(batch.logit_rows), x)
        except LinkLost as e:
            self.link.lost(group, str(e))
            raise

    def finish_batch(self, handle) -> torch.Tensor:
        if isinstance(handle, torch.Tensor):  # tensor parallel: done in start_batch
            return handle
        try:
            handle.group.wait(handle.works)
            hidden = handle.group.receive((handle.rows, self.spec.hidden_size), self.model.dtype, self.share.world - 1)
        except LinkLost as e:
            self.link.lost(handle.group, str(e))
            raise
        with torch.inference_mode():
            return self.model.logits(hidden)

    def _group(self) -> LinkGroup:
        group = self.link.group
        if group is None:
            raise LinkLost(self.link.unavailable_reason())
        return group


@dataclass
class _InFlight:
    group: LinkGroup
    works: list  # the step's messages still being sent
    rows: int  # logit rows the last box sends back
    activations: torch.Tensor  # kept alive until sent

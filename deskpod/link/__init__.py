"""Linked boxes: one model served across several machines over torch.distributed (see deskpod.link.head)."""

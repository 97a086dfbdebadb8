"""The head's engine for a model served across linked boxes: wait for the boxes, split the model by the
planner's rules, load the head's share, form the group — then an LLMEngine like any other, whose model
runs each step on every box."""

from __future__ import annotations

import dataclasses

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import LLMEngine, kv_pool_blocks
from deskpod.engine.loader import load_model
from deskpod.formats.weights import WeightSource, open_weights
from deskpod.link.config import LinkConfig
from deskpod.link.head import LinkHead
from deskpod.link.share import LAYER, Share, pipeline_shares, tensor_shares
from deskpod.link.stage import LinkedModel
from deskpod.plan.devices import available_memory_bytes

# what every box loads and sizes its KV cache with (each box its own budget); the rest are the head's alone
SHARED_SETTINGS = ("weights", "dtype", "context", "block_size", "kv_cache_gb", "memory_fraction", "max_num_seqs")


def plan_shares(source: WeightSource, parallel: str, memory: list[int]) -> list[Share]:
    """Each box's part: by heads and columns (tensor), or layers in proportion to each box's free memory."""
    if parallel == "tensor":
        return tensor_shares(source.spec, len(memory), qk_norm_whole=source.has("blk.0.attn_q_norm.weight")
                             and source.info("blk.0.attn_q_norm.weight").shape[0] != source.spec.head_dim)
    # by parameters, as the planner splits a model over boxes: with one precision they are its bytes, and they
    # are the work of a step (a file's mixed types — a Q8_0 embedding beside Q4 layers — would put the
    # tied LM head's work on the head box and most layers on the other)
    layers, fixed = [0] * source.spec.num_layers, 0
    for tensor in source.tensors():
        size = tensor.n_elements
        match = LAYER.match(tensor.name)
        if match:
            layers[int(match.group(1))] += size
        else:
            fixed += size
    return pipeline_shares(source.spec, layers, memory, fixed)


def linked_engine(name: str, path, config: EngineConfig, link: LinkConfig, digest: str, progress=print) -> LLMEngine:
    """The engine of `name` (at `path` in the head's store) across `link.nodes` boxes."""
    # the KV cache's type resolved here: every box holds the same element type, whatever its own device
    settings = {k: getattr(config, k) for k in SHARED_SETTINGS} | {"kv_cache_dtype": config.kv_dtype}
    head = LinkHead(link, name, digest, settings)
    head.memory = available_memory_bytes(cuda=config.device.startswith("cuda"))
    head.listen()
    try:
        memory = head.gather(progress)
        shares = plan_shares(open_weights(path, name), link.parallel, memory)
        head.assign(shares)
        loaded = load_model(path, config, name=name, share=shares[0], reduce=head.reduce)
        head.weight_bytes = loaded.weight_bytes()
        progress(f"node 0 (head) loaded {shares[0].describe(loaded.spec)}: {loaded.weight_bytes() / 1e6:.1f} MB")
        num_blocks = head.wait_loaded(kv_pool_blocks(loaded, config))
        head.form_group()
    except BaseException:
        head.close()
        raise
    linked = dataclasses.replace(loaded, model=LinkedModel(loaded.model, shares[0], head))
    progress(f"{link.nodes} boxes linked, {link.parallel} parallel: {num_blocks} KV blocks of {config.block_size} tokens")
    return LLMEngine(linked, config, num_blocks, link=head)

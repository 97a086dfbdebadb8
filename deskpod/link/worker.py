"""`deskpod join ADDR:PORT`: a box that runs its share of the head's model.

    connect, prove the token       refused before anything else without it
    learn the model                from the head; loaded from this box's own store (pulled if a catalog
                                   model is missing), its digest checked by the head
    load the share                 only this box's layers, or heads and columns
    serve steps                    until the head stops the link; if the group breaks (another box lost)
                                   wait for the head to form a new one

Exits non-zero, saying why, when the head cannot be reached, refuses the box, or goes away.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from deskpod.engine.config import EngineConfig
from deskpod.engine.engine import kv_pool_blocks
from deskpod.engine.loader import load_model
from deskpod.engine.runner import kv_cache_for
from deskpod.errors import DeskpodError
from deskpod.link.group import LinkGroup, LinkLost, PartialSums
from deskpod.link.rendezvous import Connection, WorkerStore, bind_address_of, connect, hostname
from deskpod.link.share import Share
from deskpod.link.stage import run_share
from deskpod.plan.devices import available_memory_bytes

log = logging.getLogger(__name__)


class HeadGone(DeskpodError):
    pass


def join(address: str, port: int, token: str, config: EngineConfig, progress=print, wait: float = 0.0) -> None:
    """Serve the head's model until the head ends the link; DeskpodError when it cannot. `wait`: seconds to
    keep trying while the head is not listening yet."""
    conn = connect(address, port, token, timeout=30, wait=wait, progress=progress)
    try:
        _serve(conn, config, progress)
    except (ConnectionError, OSError) as e:
        raise HeadGone(f"the head ({address}:{port}) went away: {e}") from None
    finally:
        conn.close()


def _serve(conn: Connection, config: EngineConfig, progress) -> None:
    conn.send({"join": {"host": hostname(), "memory": available_memory_bytes(cuda=config.device.startswith("cuda"))}})
    welcome = conn.expect("welcome")
    rank, world, model = int(welcome["rank"]), int(welcome["world"]), str(welcome["model"])
    progress(f"joined the link at {conn.peer} as node {rank} of {world}: {model}, {welcome['parallel']} parallel")
    try:
        path, digest = _resolve(model)
    except DeskpodError as e:
        conn.refuse(f"node {rank} cannot serve {model}: {e}")
        raise
    conn.send({"model": {"name": model, "digest": digest}})
    order = conn.expect("load")
    share = Share(**order["share"])
    settings = {k: v for k, v in order["engine"].items() if k in EngineConfig.__dataclass_fields__}
    config = replace(config, **settings)
    reduce = PartialSums()
    try:
        loaded = load_model(path, config, name=model, share=share, reduce=reduce)
    except DeskpodError as e:
        conn.refuse(f"node {rank} cannot load its share of {model}: {e}")
        raise
    kv_blocks = kv_pool_blocks(loaded, config)
    progress(f"loaded {share.describe(loaded.spec)}: {loaded.weight_bytes() / 1e6:.1f} MB of weights")
    conn.send({"loaded": {"share": share.describe(loaded.spec), "weight_bytes": loaded.weight_bytes(),
                          "kv_blocks": kv_blocks}})
    cache = None
    while True:
        start = conn.expect("start")  # a new group: at first, and after any box of the link came back
        num_blocks = int(start["num_blocks"])
        if cache is None or cache.num_blocks != num_blocks:
            cache = kv_cache_for(loaded, num_blocks, config)
        group = LinkGroup.create(WorkerStore(conn, f"gen{start['generation']}/", 60), rank, world,
                                 bind_address_of(conn), float(welcome["timeout"]))
        reduce.group = group
        progress(f"linked (generation {start['generation']}): serving")
        try:
            while (step := group.receive_step()) is not None:
                ids, batch = step
                with torch.inference_mode():
                    run_share(loaded.model, share, group, ids, batch, cache)
            progress("the head ended the link")
            return
        except LinkLost as e:
            progress(f"the link broke ({e}); waiting for the head to form it again")
        finally:
            reduce.group = None


def _resolve(model: str):
    """The model's file on this box and its store digest (pulled first when a catalog model is missing)."""
    from deskpod.engine.llm import ENGINE_FORMATS
    from deskpod.store import Store

    store = Store()
    manifest = store.ensure(model, progress=True)
    return getattr(store, ENGINE_FORMATS[manifest.format])(manifest), manifest.digest

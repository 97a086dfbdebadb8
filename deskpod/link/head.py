"""The head of a link: it runs the API server, the scheduler and the sampler, and its own share of the model;
the other boxes join it (deskpod.link.worker) and run theirs.

    listen()        bind the link address (that address only)
    gather()        wait for the other boxes: each proves the token, names the model it holds (refused when its
                    digest differs from the head's) and its free memory
    assign(shares)  each box's part of the model; they load it from their own stores
    wait_loaded()   every box loaded; the KV pool all of them can hold
    form_group()    the torch.distributed group of this generation of the link

A box that goes away (its connection ends, or a collective times out) makes the link degraded: the steps in
flight fail with LinkLost (HTTP 503), /health says which box is missing, and a box that joins again gets the
same share and a new group is formed — the head keeps running and keeps its own share loaded.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from deskpod.errors import DeskpodError
from deskpod.link.config import LinkConfig
from deskpod.link.group import LinkGroup, LinkLost, LinkTimings, PartialSums
from deskpod.link.rendezvous import (
    Connection,
    HeadStore,
    KeyValues,
    LinkRefused,
    authenticate_worker,
)
from deskpod.link.share import Share

log = logging.getLogger(__name__)


@dataclass
class Node:
    """A box that joined (or joins again) the link."""

    rank: int
    address: str
    host: str
    memory: int
    conn: Connection
    loaded: dict[str, Any] | None = None  # what it reported after loading its share
    state: str = "checking"  # checking (its model) -> joined -> loaded -> linked; "lost" once gone

    def name(self) -> str:
        return f"node {self.rank} ({self.address})"


@dataclass
class LinkStatus:
    state: str  # "waiting" | "ok" | "degraded"
    reason: str
    nodes: list[dict[str, Any]] = field(default_factory=list)


class LinkHead:
    def __init__(self, config: LinkConfig, model: str, digest: str, engine_settings: dict[str, Any]):
        self.config, self.model, self.digest = config, model, digest
        self.engine_settings = engine_settings  # what every box loads with: weights, dtype, context
        self.memory = 0  # the head's free memory, for the split
        self.weight_bytes = 0  # what the head's own share holds
        self.nodes: dict[int, Node] = {}
        self.shares: list[Share] | None = None
        self.num_blocks = 0
        self.group: LinkGroup | None = None
        self.reduce = PartialSums()
        self.timings = LinkTimings()  # across the groups of every generation
        self.generation = 0
        self._keys = KeyValues()
        self._changed = threading.Condition()
        self._reason = "waiting for the other boxes to join"
        self._server: socket.socket | None = None
        self._closing = False

    @property
    def pipeline_depth(self) -> int:
        """How many batches can be in flight at once: one per box of a pipeline, one for tensor parallel."""
        return self.config.nodes if self.config.parallel == "pipeline" else 1

    # --- joining --------------------------------------------------------------------------------------

    def listen(self) -> None:
        try:
            self._server = socket.create_server((self.config.address, self.config.port), backlog=16)
        except OSError as e:
            raise DeskpodError(f"cannot listen for the link on {self.config.endpoint}: {e.strerror or e}") from None
        threading.Thread(target=self._accept_loop, name="deskpod-link-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, (address, *_) = self._server.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve_node, args=(sock, address), daemon=True,
                             name=f"deskpod-link-{address}").start()

    def _serve_node(self, sock: socket.socket, address: str) -> None:
        conn = Connection(sock, address)
        node = None
        try:
            authenticate_worker(conn, self.config.token, self.config.timeout)
            node = self._admit(conn, address, conn.expect("join"))
            node = self._check_model(node)
            self._load(node)
            while True:  # the rendezvous keys while a group forms; then quiet until the box goes away
                self._keys.serve(conn, conn.receive(), self.config.timeout)
        except (LinkRefused, ConnectionError, OSError, ValueError, KeyError) as e:
            if node is not None and node.state in ("loaded", "linked"):
                self._lost(node, f"{node.name()} lost: {e}")
            else:  # it never served: its place is free again
                log.warning("link: the join from %s failed: %s", address, e)
                if node is not None:
                    with self._changed:
                        if self.nodes.get(node.rank) is node:
                            del self.nodes[node.rank]
                        self._changed.notify_all()
            conn.close()

    def _admit(self, conn: Connection, address: str, join: dict[str, Any]) -> Node:
        """A rank for a box that proved the token, once it shows it holds the head's model."""
        with self._changed:
            free = [r for r in range(1, self.config.nodes) if r not in self.nodes or self.nodes[r].state == "lost"]
            if not free:
                conn.refuse(f"refused: the link already has its {self.config.nodes} boxes")
                raise LinkRefused(f"{address}: refused, the link is full")
            rank = free[0]
            self.nodes[rank] = node = Node(rank, address, str(join.get("host", address)), int(join.get("memory", 0)), conn)
        conn.send({"welcome": {"rank": rank, "world": self.config.nodes, "model": self.model, "digest": self.digest,
                               "parallel": self.config.parallel, "timeout": self.config.timeout}})
        return node

    def _check_model(self, node: Node) -> Node:
        """The box must hold the head's model: the same store digest."""
        conn = node.conn
        held = conn.expect("model")
        if held.get("digest") != self.digest:
            reason = (f"refused: {node.name()} holds {held.get('name')} ({held.get('digest')}), the head serves "
                      f"{self.model} ({self.digest}); pull the same model on every box")
            conn.refuse(reason)
            raise LinkRefused(reason)
        log.info("link: %s (%s) joined", node.name(), node.host)
        with self._changed:
            node.state = "joined"
            self._changed.notify_all()
        return node

    def gather(self, progress=print) -> list[int]:
        """Wait until every box has joined; their free memory, by rank (the head's first)."""
        waiting = -1
        with self._changed:
            while (joined := sum(n.state not in ("checking", "lost") for n in self.nodes.values())) < self.config.nodes - 1:
                if joined != waiting:
                    waiting = joined
                    left = self.config.nodes - 1 - joined
                    progress(f"waiting for {left} more box{'es' * (left > 1)} to join at {self.config.endpoint} "
                             f"(on each: deskpod join {self.config.endpoint} --link-token ...)")
                self._changed.wait(1.0)
            return [self.memory] + [self.nodes[r].memory for r in range(1, self.config.nodes)]

    def assign(self, shares: list[Share]) -> None:
        with self._changed:
            self.shares = shares
            self._changed.notify_all()

    def _load(self, node: Node) -> None:
        """Send the box its share once the split is known; wait until it has loaded it."""
        with self._changed:
            self._changed.wait_for(lambda: self.shares is not None)
            share = self.shares[node.rank]
        node.conn.send({"load": {"share": asdict(share), "engine": self.engine_settings, "num_blocks": self.num_blocks}})
        node.loaded = node.conn.expect("loaded")
        log.info("link: %s loaded %s (%.1f MB)", node.name(), node.loaded.get("share"),
                 node.loaded.get("weight_bytes", 0) / 1e6)
        with self._changed:
            node.state = "loaded"
            self._changed.notify_all()
        if self.generation:  # a box joining again: the link was formed before, form it anew
            threading.Thread(target=self._regroup, daemon=True, name="deskpod-link-regroup").start()

    def wait_loaded(self, head_blocks: int) -> int:
        """Wait until every box has loaded its share; the KV blocks every box can hold (the head's pool)."""
        with self._changed:
            self._changed.wait_for(lambda: all(self.nodes.get(r) and self.nodes[r].state == "loaded"
                                               for r in range(1, self.config.nodes)))
            self.num_blocks = min([head_blocks] + [int(self.nodes[r].loaded["kv_blocks"])
                                                   for r in range(1, self.config.nodes)])
            return self.num_blocks

    # --- the process group ----------------------------------------------------------------------------

    def form_group(self) -> None:
        """A new generation of the group, with every box loaded; the boxes create their side on 'start'."""
        with self._changed:
            self.generation += 1
            generation = self.generation
            nodes = [self.nodes[r] for r in range(1, self.config.nodes)]
        for node in nodes:
            node.conn.send({"start": {"generation": generation, "num_blocks": self.num_blocks}})
        group = LinkGroup.create(HeadStore(self._keys, f"gen{generation}/", self.config.timeout), 0,
                                 self.config.nodes, self.config.address, self.config.timeout,
                                 describe_failure=self._describe_failure, timings=self.timings)
        with self._changed:
            for node in nodes:
                node.state = "linked"
            self.group = self.reduce.group = group
            self._reason = ""
            self._changed.notify_all()
        log.info("link: %d boxes linked (generation %d, %s parallel)", self.config.nodes, generation,
                 self.config.parallel)

    def _regroup(self) -> None:
        with self._changed:
            ready = all(self.nodes.get(r) and self.nodes[r].state in ("loaded", "linked")
                        for r in range(1, self.config.nodes))
        if ready and self.group is None:
            try:
                self.form_group()
            except Exception as e:  # noqa: BLE001 - a failed regroup leaves the link degraded, the head serving
                log.warning("link: forming the group again failed: %s", e)

    # --- losing a box ---------------------------------------------------------------------------------

    def _describe_failure(self, error: Exception) -> str:
        """Which box a failed collective lost: the one whose connection ended (given a moment to notice)."""
        deadline = time.monotonic() + 2.0
        with self._changed:
            while True:
                gone = [n for n in self.nodes.values() if n.state == "lost"]
                if gone or time.monotonic() > deadline:
                    break
                self._changed.wait(0.1)
        if gone:
            return "; ".join(f"{n.name()} lost" for n in gone)
        first = str(error).splitlines()[0][-200:]
        return f"a linked box stopped answering within {self.config.timeout:g} s ({first})"

    def _lost(self, node: Node, reason: str) -> None:
        with self._changed:
            if node.state == "lost":
                return
            node.state = "lost"
            self._reason = reason
            self.group = self.reduce.group = None
            self._changed.notify_all()
        log.error("link: %s; requests in flight fail until it joins again", reason)

    def lost(self, group: LinkGroup, reason: str) -> None:
        """A step failed on `group`: it is not used again (a box joining again forms a new one)."""
        with self._changed:
            if self.group is group:
                self.group = self.reduce.group = None
                self._reason = self._reason or reason

    def unavailable_reason(self) -> str:
        return f"the linked model is unavailable: {self._reason or 'the link is forming'}"

    def status(self) -> LinkStatus:
        with self._changed:
            nodes = [{"node": 0, "address": self.config.address, "role": "head", "state": "up",
                      "weight_bytes": self.weight_bytes}]
            for rank in range(1, self.config.nodes):
                node = self.nodes.get(rank)
                nodes.append({"node": rank, "address": node.address if node else None, "role": "worker",
                              "state": node.state if node else "missing",
                              "weight_bytes": (node.loaded or {}).get("weight_bytes") if node else None})
            state = "ok" if self.group is not None else ("degraded" if self.generation else "waiting")
            return LinkStatus(state, self._reason, nodes)

    def close(self) -> None:
        """End the link: the boxes are told to stop (and exit 0), the link port closes."""
        self._closing = True
        if self.group is not None:
            try:
                self.group.send_stop()
            except LinkLost:
                pass
        if self._server is not None:
            self._server.close()
        for node in list(self.nodes.values()):
            node.conn.close()

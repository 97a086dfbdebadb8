"""LinkConfig: how boxes link — how many, where the head listens, the shared token, the parallel mode and
how long a collective may wait. Light (no torch): the CLI's --help imports it."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from deskpod.errors import DeskpodError

PARALLEL_MODES = ("pipeline", "tensor")
TOKEN_ENV = "DESKPOD_LINK_TOKEN"
MIN_TOKEN_LENGTH = 8
DEFAULT_LINK_PORT = 29500  # torchrun's


@dataclass(frozen=True)
class LinkConfig:
    nodes: int  # boxes in the link, the head included
    address: str  # the head's link address (it binds this one only)
    port: int
    token: str
    parallel: str = "pipeline"
    timeout: float = 30.0  # seconds a collective may wait for a box before that box is declared lost

    def __post_init__(self) -> None:
        if self.nodes < 2:
            raise DeskpodError(f"--nodes must be at least 2 to link boxes, got {self.nodes}")
        if self.parallel not in PARALLEL_MODES:
            raise DeskpodError(f"--parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        if len(self.token) < MIN_TOKEN_LENGTH:
            raise DeskpodError(f"a link needs a token of at least {MIN_TOKEN_LENGTH} characters (--link-token or "
                               f"${TOKEN_ENV}): every box proves it holds it before any tensor is exchanged")
        if not 0 < self.timeout <= 3600:
            raise DeskpodError(f"--link-timeout must be in (0, 3600] seconds, got {self.timeout}")

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


def parse_endpoint(text: str | None) -> tuple[str, int]:
    """ADDR:PORT (or [v6]:PORT); torchrun's MASTER_ADDR / MASTER_PORT when not given."""
    text = text or _torchrun_endpoint()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeskpodError(f"the link address must be ADDR:PORT, got {text!r}")
    if host in ("0.0.0.0", "::"):
        raise DeskpodError("give the link the address of the interface the boxes share, not a wildcard: the link "
                           "port binds only that address")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass  # a host name: resolved when binding / connecting
    return host, int(port)


def _torchrun_endpoint() -> str:
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        raise DeskpodError("give the link address: --link ADDR:PORT (or set MASTER_ADDR and MASTER_PORT)")
    return f"{addr}:{os.environ.get('MASTER_PORT', DEFAULT_LINK_PORT)}"


def token_from(given: str | None) -> str:
    return given or os.environ.get(TOKEN_ENV, "")


def nodes_from(given: int | None) -> int | None:
    """--nodes, else torchrun's WORLD_SIZE."""
    if given is not None:
        return given
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world and world.isdigit() else None

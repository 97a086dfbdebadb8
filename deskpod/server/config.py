"""What `deskpod serve` was asked for, checked once at construction. Light: `deskpod --help` imports it."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from deskpod.errors import DeskpodError

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class EngineOptions:
    """How each LLM engine is sized (None: the engine's planner decides)."""

    memory_fraction: float | None = None
    kv_cache_gb: float | None = None
    max_num_seqs: int = 32
    max_waiting: int = 256
    context: int | None = None  # per-request token limit (None: the model's)

    def __post_init__(self) -> None:
        if self.memory_fraction is not None and self.kv_cache_gb is not None:
            raise DeskpodError("give --memory-fraction or --kv-cache-gb, not both")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise DeskpodError(f"--memory-fraction must be in (0, 1], got {self.memory_fraction}")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise DeskpodError(f"--kv-cache-gb must be more than 0, got {self.kv_cache_gb}")
        if self.max_num_seqs < 1 or self.max_waiting < 1:
            raise DeskpodError("--max-num-seqs and --max-waiting must be at least 1")


@dataclass(frozen=True)
class ServerConfig:
    """Refuses a non-loopback host without an API key (unless `insecure`) at construction."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)

    def __post_init__(self) -> None:
        if not self.models:
            raise DeskpodError("name at least one model to serve")
        check_exposure(self.host, self.api_key, self.insecure)


def is_loopback(host: str) -> bool:
    """True when `host` (a name or an address) only ever reaches this machine."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without a key, unless the user said --insecure."""
    if api_key is None and not insecure and not is_loopback(host):
        raise DeskpodError(
            f"refusing to listen on {host} without an API key: anyone who can reach it could use the models."
            " Set --api-key (or DESKPOD_API_KEY), or pass --insecure to serve without one."
        )

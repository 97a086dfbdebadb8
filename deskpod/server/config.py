"""What `deskpod serve` was asked for, checked once at construction. Light: `deskpod --help` imports it."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from deskpod.engine.config import EngineConfig
from deskpod.errors import DeskpodError
from deskpod.link.config import LinkConfig

MODEL_CONTROL_MODES = ("none", "poll", "explicit")

DEFAULT_MODEL = "smollm2"
DEFAULT_GRPC_PORT = 8001  # Triton's
DEFAULT_MAX_REQUEST_MB = 64.0


@dataclass(frozen=True)
class ServerConfig:
    """Refuses a non-loopback host without an API key (unless `insecure`) at construction.

    `model_repository`: a Triton-style repository served over KServe v2 beside the store models (which may
    then be none); `grpc_port`: where the v2 gRPC service listens, on `host` (None: no gRPC);
    `max_request_mb`: the largest request body (/v1 and /v2) or gRPC message accepted (413 / RESOURCE_EXHAUSTED)."""

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)
    model_repository: str | None = None
    grpc_port: int | None = None
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB
    allowed_origins: tuple[str, ...] = ()  # CORS: web pages from these origins may call the API ("*": any)
    link: LinkConfig | None = None  # serve the one model across linked boxes
    model_control_mode: str | None = None  # Triton's none / poll / explicit (deskpod.backends.control)
    load_models: tuple[str, ...] = ()  # explicit mode: the models loaded at start ("*": all)
    repository_poll_secs: float = 15.0  # poll mode's interval
    metrics_port: int | None = None  # /metrics also on this port of `host` (Triton: 8002)
    backend_config: dict[str, dict[str, str]] = field(default_factory=dict)  # --backend-config BACKEND,KEY=VALUE

    def __post_init__(self) -> None:
        if not self.models and self.model_repository is None:
            raise DeskpodError("name at least one model to serve, or a --model-repository")
        if self.grpc_port is not None and not 0 < self.grpc_port < 65536:
            raise DeskpodError(f"--grpc-port must be a port number (1-65535), got {self.grpc_port}")
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise DeskpodError(f"--grpc-port and --port are both {self.port}: give them different ports")
        if not self.max_request_mb > 0:
            raise DeskpodError(f"--max-request-mb must be more than 0, got {self.max_request_mb}")
        check_control_options(self.model_control_mode, self.load_models)
        if self.metrics_port is not None and (not 0 < self.metrics_port < 65536
                                              or self.metrics_port in (self.port, self.grpc_port)):
            raise DeskpodError(f"--metrics-port must be a free port number other than --port and --grpc-port, "
                               f"got {self.metrics_port}")
        unknown = set(self.backend_config) - {"python"}
        if unknown:
            raise DeskpodError(f"--backend-config: {', '.join(sorted(unknown))} takes no settings; python does")
        if "python" in self.backend_config:
            from deskpod.backends.python import settings

            settings(self.backend_config["python"])  # refuses an unknown key or a value that is not a number
        if self.repository_poll_secs <= 0:
            raise DeskpodError(f"--repository-poll-secs must be more than 0, got {self.repository_poll_secs}")
        if self.link is not None and len(self.models) != 1:
            raise DeskpodError(f"a link serves one model; {len(self.models)} were named")
        check_exposure(self.host, self.api_key, self.insecure)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


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


def check_control_options(mode: str | None, load_models: tuple[str, ...]) -> None:
    """Triton's model control options, checked before anything loads."""
    if mode is not None and mode not in MODEL_CONTROL_MODES:
        raise DeskpodError(f"--model-control-mode must be one of {', '.join(MODEL_CONTROL_MODES)}, got {mode!r}")
    if load_models and mode != "explicit":
        raise DeskpodError("--load-model is for --model-control-mode explicit (the other modes load every model)")


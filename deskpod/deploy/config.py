"""DeployConfig: what the user chose for one deployment, checked once (names Kubernetes accepts, counts that
make sense). Light: no torch, no Kubernetes client."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deskpod import __version__
from deskpod.errors import DeskpodError

AUTOSCALERS = ("keda", "hpa")
# RFC 1123 labels: what a namespace may be called; a Service's name starts with a letter, and a StatefulSet's
# leaves 11 characters for the controller-revision-hash label's suffix
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MAX_NAME = 52
DNS_NAME = re.compile(rf"[a-z]([-a-z0-9]{{0,{MAX_NAME - 2}}}[a-z0-9])?")
DEFAULT_IMAGE = "docker.io/deskpod/deskpod"


@dataclass(frozen=True)
class DeployConfig:
    model: str
    name: str  # of the workload, its Service, PVCs and monitors
    namespace: str = "deskpod"
    image: str | None = None  # default: DEFAULT_IMAGE:<version>, -cuda with gpu
    gpu: bool = False
    hardware: str = "digits"  # the planner's profile for one box
    precision: str | None = None
    context: int | None = None
    batch: int = 1  # sequences at full context the KV cache holds
    replicas: int = 1
    max_replicas: int | None = None  # autoscaling up to this many, on queue depth
    autoscaler: str = "keda"
    queue_per_replica: int = 4  # waiting requests per replica the autoscaler aims for
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"  # where KEDA asks
    kserve: bool = False  # a KServe ServingRuntime + InferenceService instead of the plain workload
    api_key_secret: str | None = None  # default: <name>-api-key, key "api-key"
    storage_class: str | None = None
    monitor: bool = True  # a ServiceMonitor / PodMonitor (needs the Prometheus Operator's CRDs)
    monitor_labels: dict = field(default_factory=dict)  # what the cluster's Prometheus selects monitors by

    def __post_init__(self) -> None:
        checks = [
            (bool(DNS_NAME.fullmatch(self.name)), f"--name {self.name!r}: Kubernetes wants lowercase letters, "
                                                   f"digits and '-', at most {MAX_NAME}, starting with a letter"),
            (bool(DNS_LABEL.fullmatch(self.namespace)), f"--namespace {self.namespace!r} is not a valid namespace name"),
            (self.replicas >= 1, f"--replicas must be at least 1, got {self.replicas}"),
            (self.max_replicas is None or self.max_replicas >= self.replicas,
             f"--max-replicas ({self.max_replicas}) must be at least --replicas ({self.replicas})"),
            (self.autoscaler in AUTOSCALERS, f"--autoscaler must be one of {', '.join(AUTOSCALERS)}"),
            (self.queue_per_replica >= 1, "--queue-per-replica must be at least 1"),
            (self.batch >= 1, f"--batch must be at least 1, got {self.batch}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DeskpodError(message)

    @property
    def image_ref(self) -> str:
        return self.image or f"{DEFAULT_IMAGE}:{__version__}{'-cuda' if self.gpu else ''}"

    @property
    def secret_name(self) -> str:
        return self.api_key_secret or f"{self.name}-api-key"

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None and self.max_replicas > self.replicas


def default_name(model: str) -> str:
    """A workload name from a model name: 'qwen2.5-coder-0.5b' → 'qwen2-5-coder-0-5b'."""
    name = re.sub(r"[^a-z0-9-]+", "-", model.lower().rsplit("/", 1)[-1]).strip("-")
    name = name if name[:1].isalpha() else f"deskpod-{name}"
    return name[:MAX_NAME].strip("-") or "deskpod"

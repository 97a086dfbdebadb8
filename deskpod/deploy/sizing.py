"""Sizing: what one deployment asks of the cluster, from the planner's figures for the model on the chosen box
— memory per pod, the KV cache and context the server is told to use (so the pod's limit holds what the engine
allocates), boxes per replica, GPUs, and the store's volume."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from deskpod.deploy.config import DeployConfig
from deskpod.engine.config import DTYPE_BYTES, EngineConfig
from deskpod.errors import DeskpodError

MiB, GiB = 2**20, 2**30
HEADROOM = 1.10  # over the plan's total: allocator slack, the HTTP server's buffers
# A catalog pull holds the downloaded package beside the extracted blob until it is verified
STORE_FACTOR = 2.0


@dataclass(frozen=True)
class Sizing:
    nodes: int  # boxes per replica (a LeaderWorkerSet group when more than one)
    memory_mib: int  # per pod
    kv_cache_gb: float  # per pod: --kv-cache-gb
    context: int  # --ctx
    gpus: int  # per pod
    storage_gib: int  # per pod's store
    summary: str  # one line for humans: what the plan said


def size(config: DeployConfig) -> Sizing:
    """The plan for the model on `config.hardware`, as Kubernetes quantities; refuses what cannot fit."""
    from deskpod.plan.devices import HARDWARE, get_hardware
    from deskpod.plan.planner import make_plan
    from deskpod.plan.source import resolve

    source = resolve(config.model)

    def plan_on(hardware):
        # the KV cache in the element type the server keeps it in on the GPU, not the planner's default
        return make_plan(source, hardware, precision=config.precision, context=config.context, batch=config.batch,
                         kv_dtype_bytes=DTYPE_BYTES[EngineConfig(device="cuda").kv_dtype])

    hardware = get_hardware(config.hardware)
    plan = plan_on(hardware)
    if plan.nodes_needed == 0:
        raise DeskpodError(f"{config.model} at {plan.precision} does not fit on any number of {hardware.name} boxes "
                           "deskpod can link: choose a lower --precision, a shorter --context or a larger --hardware")
    if plan.nodes_needed > hardware.nodes:
        linked = f"{hardware.name}-x{plan.nodes_needed}"
        hint = f"--hardware {linked}" if linked in HARDWARE else "a profile of linked boxes (a --hardware file with nodes)"
        raise DeskpodError(f"{config.model} at {plan.precision} needs {plan.nodes_needed} {hardware.name} boxes, the "
                           f"profile has {hardware.nodes}: choose {hint}, or a lower --precision")
    if plan.nodes_needed < hardware.nodes:  # fits on fewer of the profile's boxes: link no more than needed
        hardware = replace(hardware, nodes=plan.nodes_needed)
        plan = plan_on(hardware)
    nodes = plan.nodes_needed
    memory = plan.memory
    # the pod's memory: the plan's total and some slack, but never more than the box has to give
    memory_bytes = min(memory.total * HEADROOM, hardware.usable_bytes)
    return Sizing(
        nodes=nodes,
        memory_mib=math.ceil(memory_bytes / MiB),
        kv_cache_gb=math.ceil(memory.kv_cache / 1e7) / 100,  # GB, rounded up to 10 MB
        context=memory.context,
        gpus=1 if config.gpu else 0,
        storage_gib=max(1, math.ceil(plan.weights.total * STORE_FACTOR / GiB)),  # each box's store holds the file
        summary=f"{config.model}: {plan.precision}, {memory.context:,}-token context, {nodes} box(es) ({hardware.name}), "
                f"{memory.total / 1e9:.1f} GB per box ({memory.weights / 1e9:.1f} GB weights, "
                f"{memory.kv_cache / 1e9:.2f} GB KV cache)",
    )

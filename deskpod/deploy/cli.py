"""`deskpod deploy MODEL`: Kubernetes manifests sized by the planner, printed or written, or applied."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from deskpod.deploy.config import AUTOSCALERS, DeployConfig, default_name
from deskpod.errors import DeskpodError


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "deploy", help="Kubernetes manifests for a model, sized by the planner (--apply hands them to kubectl)",
        description="Render the manifests that run MODEL on Kubernetes, in an existing namespace: a StatefulSet "
                    "(one box per replica) or a LeaderWorkerSet (linked boxes), its Service, NetworkPolicy and "
                    "ServiceMonitor, autoscaling on the queue "
                    "depth, or a KServe ServingRuntime + InferenceService. Memory, GPUs, boxes, context and KV "
                    "cache come from `deskpod plan` for the model on --hardware. The pods read their API key "
                    "from the Secret NAME-api-key (key api-key); linked boxes their link token from "
                    "NAME-link-token (key token): create them first.",
    )
    p.add_argument("model", help="a catalog model (pulled by each pod into its volume) or a store model's name")
    p.add_argument("--name", help="the workload's name (default: from the model's)")
    p.add_argument("--namespace", default="deskpod", help="(default: %(default)s)")
    p.add_argument("--image", help="the deskpod image (default: docker.io/deskpod/deskpod:VERSION, -cuda with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one NVIDIA GPU per box, through the GPU Operator's runtime class")
    p.add_argument("--hardware", "-H", default="digits", help="the planner's profile of one box, or of linked boxes "
                   "(digits-x2) (default: %(default)s)")
    p.add_argument("--precision", "-p", help="weights' precision (default: the model file's own)")
    p.add_argument("--context", "-c", type=int, help="tokens per request (default: the planner's)")
    p.add_argument("--batch", "-b", type=int, default=1, help="full-context sequences the KV cache holds (default: 1)")
    p.add_argument("--replicas", type=int, default=1, help="(default: 1)")
    p.add_argument("--max-replicas", type=int, help="autoscale on the queue depth up to this many replicas")
    p.add_argument("--autoscaler", choices=AUTOSCALERS, default="keda",
                   help="keda (a ScaledObject querying Prometheus) or hpa (through the Prometheus adapter) (default: keda)")
    p.add_argument("--queue-per-replica", type=int, default=4, help="waiting requests per replica to aim for (default: 4)")
    p.add_argument("--prometheus-url", default=DeployConfig.prometheus_url, help="where KEDA asks (default: %(default)s)")
    p.add_argument("--kserve", action="store_true", help="a KServe ServingRuntime + InferenceService instead")
    p.add_argument("--storage-class", help="for the store's volumes (default: the cluster's default)")
    p.add_argument("--no-monitor", action="store_true", help="no ServiceMonitor / PodMonitor (a cluster without the "
                   "Prometheus Operator)")
    p.add_argument("--monitor-label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label the cluster's Prometheus selects monitors by, e.g. release=kube-prometheus-stack")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", type=Path, help="write the manifests to this file instead of printing them")
    out.add_argument("--apply", action="store_true", help="kubectl apply them (to kubectl's current context)")
    p.set_defaults(func=deploy)
    return p


def _labels(pairs: list[str]) -> dict[str, str]:
    bad = [p for p in pairs if "=" not in p or not p.partition("=")[0]]
    if bad:
        raise DeskpodError(f"--monitor-label wants KEY=VALUE, got {', '.join(map(repr, bad))}")
    return dict(p.split("=", 1) for p in pairs)


def deploy(args: argparse.Namespace) -> int:
    import yaml

    from deskpod.deploy.manifests import render
    from deskpod.deploy.sizing import size

    config = DeployConfig(
        model=args.model, name=args.name or default_name(args.model), namespace=args.namespace, image=args.image,
        gpu=args.gpu, hardware=args.hardware, precision=args.precision, context=args.context, batch=args.batch,
        replicas=args.replicas, max_replicas=args.max_replicas, autoscaler=args.autoscaler,
        queue_per_replica=args.queue_per_replica, prometheus_url=args.prometheus_url, kserve=args.kserve,
        storage_class=args.storage_class, monitor=not args.no_monitor, monitor_labels=_labels(args.monitor_label),
    )
    sizing = size(config)
    if sizing.nodes > 1 and config.kserve:
        raise DeskpodError(f"{config.model} needs {sizing.nodes} linked boxes: KServe's InferenceService runs one pod "
                           "per replica here; deploy it without --kserve (a LeaderWorkerSet)")
    text = yaml.safe_dump_all(render(config, sizing), sort_keys=False)
    print(f"# {sizing.summary}", file=sys.stderr)
    secrets = [f"kubectl -n {config.namespace} create secret generic {config.secret_name} --from-literal=api-key=..."]
    if sizing.nodes > 1:
        secrets.append(f"kubectl -n {config.namespace} create secret generic {config.name}-link-token "
                       "--from-literal=token=...")
    print("# the pods need: " + "; ".join(secrets), file=sys.stderr)
    from deskpod.store.catalog import CATALOG

    if config.model not in CATALOG:  # a pod pulls catalog models by itself, nothing else
        print(f"# {config.model} is not in deskpod's catalog ({', '.join(CATALOG)}): put it into each pod's store "
              f"volume (/models) first, e.g. kubectl cp the file in and run deskpod pull inside the pod", file=sys.stderr)
    if args.output:
        args.output.write_text(text)
        print(f"# written to {args.output}", file=sys.stderr)
    elif args.apply:
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise DeskpodError("--apply needs kubectl on PATH; or write the manifests with --output and apply them yourself")
        return subprocess.run([kubectl, "apply", "-f", "-"], input=text, text=True).returncode
    else:
        sys.stdout.write(text)
    return 0

"""The Kubernetes objects of one deployment, as plain dicts (rendered to YAML by the CLI):

- one box per replica: a StatefulSet (each pod its own store volume) and its Service;
- a model that needs linked boxes: a LeaderWorkerSet, the head serving and the workers joining it;
- with --kserve: a KServe ServingRuntime (deskpod as the runtime) and an InferenceService using it;
- a Prometheus ServiceMonitor (PodMonitor for KServe) for /metrics with the key, and with --max-replicas
  autoscaling on the queue depth (a KEDA ScaledObject, or an HPA through the Prometheus metrics adapter).

The pods run the image's entrypoint (`deskpod serve --host 0.0.0.0 --port 8000`) with the model and the
planner's context and KV cache as arguments; the API key comes from a Secret the user creates; the probes ask
the KServe health routes, which need no key."""

from __future__ import annotations

from deskpod import __version__
from deskpod.deploy.config import DeployConfig
from deskpod.deploy.sizing import Sizing

HTTP_PORT, GRPC_PORT, LINK_PORT = 8000, 8001, 29500
STORE = "/models"
UID = 10001  # the image's user (above the host's own users' range)
CPU_LIMIT = 8  # cores per pod: decode is bound by memory bandwidth, which a few cores saturate
QUEUE_METRIC = "deskpod_num_requests_waiting"
# What the GPU Operator sets up: the runtime class of the NVIDIA container runtime, the label its GPU feature
# discovery puts on GPU nodes, and the taint GPU node pools commonly carry.
GPU_RUNTIME_CLASS = "nvidia"
GPU_NODE_LABEL = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def kserve_pods(config: DeployConfig) -> dict:
    """The label KServe puts on an InferenceService's pods."""
    return {"serving.kserve.io/inferenceservice": config.name}


def render(config: DeployConfig, sizing: Sizing) -> list[dict]:
    """The objects, in the order they can be applied. The namespace is the user's (kubectl create namespace):
    deleting these manifests must not take it, and its other tenants, along."""
    if config.kserve:
        objects = [serving_runtime(config, sizing), inference_service(config, sizing), network_policy(config, sizing)]
        if config.monitor:
            objects.append(pod_monitor(config))
        return objects
    workload = leader_worker_set(config, sizing) if sizing.nodes > 1 else stateful_set(config, sizing)
    objects = [workload, service(config, sizing), network_policy(config, sizing)]
    if config.monitor:
        objects.append(service_monitor(config))
    if config.autoscaling:
        objects.append(scaled_object(config, workload) if config.autoscaler == "keda" else hpa(config, workload))
    return objects


# -- pieces ---------------------------------------------------------------------------------------


def _meta(config: DeployConfig, name: str | None = None, **extra) -> dict:
    return {"name": name or config.name, "namespace": config.namespace, "labels": _labels(config), **extra}


def _labels(config: DeployConfig) -> dict:
    return {"app.kubernetes.io/name": "deskpod", "app.kubernetes.io/instance": config.name,
            "app.kubernetes.io/version": __version__, "app.kubernetes.io/managed-by": "deskpod-deploy"}


def _selector(config: DeployConfig) -> dict:
    return {"app.kubernetes.io/name": "deskpod", "app.kubernetes.io/instance": config.name}


def serve_args(config: DeployConfig, sizing: Sizing) -> list[str]:
    """The arguments after the image's `deskpod serve --host 0.0.0.0 --port 8000`."""
    return [config.model, "--ctx", str(sizing.context), "--kv-cache-gb", f"{sizing.kv_cache_gb:g}",
            "--grpc-port", str(GRPC_PORT), "--device", "cuda" if config.gpu else "cpu"]


def _probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def container(config: DeployConfig, sizing: Sizing, args: list[str], command: list[str] | None = None,
              name: str = "deskpod", env: list[dict] = ()) -> dict:
    memory = f"{sizing.memory_mib}Mi"
    limits = {"cpu": str(CPU_LIMIT), "memory": memory, **({"nvidia.com/gpu": str(sizing.gpus)} if sizing.gpus else {})}
    return {
        "name": name,
        "image": config.image_ref,
        "imagePullPolicy": "IfNotPresent",
        **({"command": command} if command else {}),
        "args": args,
        "env": [{"name": "DESKPOD_API_KEY", "valueFrom": {"secretKeyRef": _api_key(config)}},
                # torch starts a thread per core of the node, not of the pod's CPU limit: oversubscribed,
                # throttled by the quota, decode would stall
                {"name": "OMP_NUM_THREADS", "value": str(CPU_LIMIT)},
                *env],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "2", "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "models", "mountPath": STORE}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "home", "mountPath": "/home/deskpod"}],
        # the first start pulls the model into the volume and loads it: up to an hour before it answers
        "startupProbe": _probe("/v2/health/ready", 10, 360),
        "readinessProbe": _probe("/v2/health/ready", 10, 3),
        "livenessProbe": _probe("/v2/health/live", 20, 3),
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": UID, "runAsGroup": UID, "capabilities": {"drop": ["ALL"]}},
    }


def pod_spec(config: DeployConfig, containers: list[dict], store_volume: bool = False) -> dict:
    """`store_volume`: the store is an emptyDir of the pod's own (where no claim template can give one)."""
    spec = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "containers": containers,
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "home", "emptyDir": {}},
                    *([{"name": "models", "emptyDir": {}}] if store_volume else [])],
    }
    if config.gpu:
        spec |= {"runtimeClassName": GPU_RUNTIME_CLASS, "nodeSelector": GPU_NODE_LABEL, "tolerations": [GPU_TOLERATION]}
    return spec


def _replicas(config: DeployConfig) -> dict:
    """Left to the autoscaler when there is one: a `replicas` here would reset its count at every apply."""
    return {} if config.autoscaling else {"replicas": config.replicas}


def store_claim(config: DeployConfig, sizing: Sizing) -> dict:
    return {"metadata": {"name": "models", "labels": _labels(config)},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": f"{sizing.storage_gib}Gi"}},
                     **({"storageClassName": config.storage_class} if config.storage_class else {})}}


# -- objects --------------------------------------------------------------------------------------


def stateful_set(config: DeployConfig, sizing: Sizing) -> dict:
    pod = pod_spec(config, [container(config, sizing, serve_args(config, sizing))])
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(config),
        "spec": {
            "serviceName": config.name,
            **_replicas(config),
            "selector": {"matchLabels": _selector(config)},
            "template": {"metadata": {"labels": _labels(config)}, "spec": pod},
            "volumeClaimTemplates": [store_claim(config, sizing)],
        },
    }


# Read by scanners (checkov) on the worker pods, and by whoever reads the manifest.
WORKER_SCAN_NOTES = {
    "checkov.io/skip1": "CKV_K8S_8=a linked worker serves no HTTP; the group restarts when its process exits",
    "checkov.io/skip2": "CKV_K8S_9=a linked worker takes no traffic of its own; the head's readiness stands for the group",
}


def leader_worker_set(config: DeployConfig, sizing: Sizing) -> dict:
    """One replica = one group of `sizing.nodes` boxes: the head (`deskpod serve --nodes N`) and workers that
    join it over the link port with the token from a Secret (<name>-link-token)."""
    token = {"name": "DESKPOD_LINK_TOKEN", "valueFrom": {"secretKeyRef": {"name": f"{config.name}-link-token", "key": "token"}}}
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    head_args = [*serve_args(config, sizing), "--nodes", str(sizing.nodes), "--link", f"$(POD_IP):{LINK_PORT}",
                 "--link-token", "$(DESKPOD_LINK_TOKEN)"]
    head = container(config, sizing, head_args, env=[token, pod_ip])
    head["ports"].append({"name": "link", "containerPort": LINK_PORT, "protocol": "TCP"})
    worker = container(config, sizing, ["join", f"$(LWS_LEADER_ADDRESS):{LINK_PORT}", "--link-token", "$(DESKPOD_LINK_TOKEN)"],
                       command=["deskpod"], env=[token])
    # a worker serves no HTTP: it is alive while its process runs, and ready once the head answers
    worker["ports"] = []
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        worker.pop(probe)
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "metadata": _meta(config),
        "spec": {
            **_replicas(config),
            # the workers start with the head, not once it is ready: it becomes ready only after they join
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": sizing.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",  # one box lost: the whole group starts again
                "leaderTemplate": {"metadata": {"labels": _labels(config)}, "spec": pod_spec(config, [head])},
                "workerTemplate": {"metadata": {"labels": _labels(config), "annotations": WORKER_SCAN_NOTES},
                                   "spec": pod_spec(config, [worker])},
                "volumeClaimTemplates": [store_claim(config, sizing)],
            },
        },
    }


def service(config: DeployConfig, sizing: Sizing) -> dict:
    selector = _selector(config)
    if sizing.nodes > 1:  # only the heads answer requests
        selector = {**selector, "leaderworkerset.sigs.k8s.io/worker-index": "0"}
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(config),
        "spec": {"selector": selector,
                 "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                           {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}]},
    }


def network_policy(config: DeployConfig, sizing: Sizing) -> dict:
    """Traffic in: the API ports from anywhere the cluster routes (the key guards them); the link port only
    from the deployment's own pods. Traffic out stays open: a catalog model is pulled from PyPI."""
    pods = kserve_pods(config) if config.kserve else _selector(config)
    ingress = [{"ports": [{"port": HTTP_PORT, "protocol": "TCP"}, {"port": GRPC_PORT, "protocol": "TCP"}]}]
    if sizing.nodes > 1:
        ingress.append({"from": [{"podSelector": {"matchLabels": _selector(config)}}],
                        "ports": [{"port": LINK_PORT, "protocol": "TCP"}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(config),
        "spec": {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def service_monitor(config: DeployConfig) -> dict:
    """Prometheus scrapes /metrics with the API key (the route needs it)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": _monitor_meta(config),
        "spec": {
            "selector": {"matchLabels": _selector(config)},
            "endpoints": [_scrape(config)],
        },
    }


def pod_monitor(config: DeployConfig) -> dict:
    """KServe makes the pods and their Service: Prometheus finds the pods by KServe's label, with the key."""
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": _monitor_meta(config),
        "spec": {
            "selector": {"matchLabels": kserve_pods(config)},
            "podMetricsEndpoints": [_scrape(config)],
        },
    }


def _api_key(config: DeployConfig) -> dict:
    """The Secret key holding the API key: the pods read it, Prometheus sends it."""
    return {"name": config.secret_name, "key": "api-key"}


def _scrape(config: DeployConfig) -> dict:
    """A monitor's endpoint: /metrics on the http port, with the key (the route needs it)."""
    return {"port": "http", "path": "/metrics", "interval": "15s",
            "authorization": {"type": "Bearer", "credentials": _api_key(config)}}


def _monitor_meta(config: DeployConfig) -> dict:
    """With the labels the user's Prometheus selects monitors by (kube-prometheus-stack: release=<its name>)."""
    meta = _meta(config)
    meta["labels"] = {**meta["labels"], **config.monitor_labels}
    return meta


def _queue_query(config: DeployConfig) -> str:
    if config.kserve:  # the pods of the InferenceService, as the PodMonitor labels their series
        return f'sum({QUEUE_METRIC}{{namespace="{config.namespace}", pod=~"{config.name}-predictor-.*"}})'
    return f'sum({QUEUE_METRIC}{{namespace="{config.namespace}", service="{config.name}"}})'


def scaled_object(config: DeployConfig, workload: dict) -> dict:
    """KEDA: as many replicas as the queue needs, `queue_per_replica` waiting requests each."""
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(config),
        "spec": {
            "scaleTargetRef": {"apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": config.name},
            "minReplicaCount": config.replicas,
            "maxReplicaCount": config.max_replicas,
            # a replica takes minutes to pull and load a model: do not drop one at a five-minute lull
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}},
            "triggers": [{"type": "prometheus", "metadata": {
                "serverAddress": config.prometheus_url, "query": _queue_query(config),
                "threshold": str(config.queue_per_replica)}}],
        },
    }


def hpa(config: DeployConfig, workload: dict) -> dict:
    """An HPA on the pods' own queue depth, which the Prometheus adapter serves as a custom metric."""
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(config),
        "spec": {
            "scaleTargetRef": {"apiVersion": workload["apiVersion"], "kind": workload["kind"], "name": config.name},
            "minReplicas": config.replicas,
            "maxReplicas": config.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": QUEUE_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(config.queue_per_replica)}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def serving_runtime(config: DeployConfig, sizing: Sizing) -> dict:
    """deskpod as a KServe runtime: KServe fills {{.Name}} with the InferenceService's name; the model to serve is
    the runtime's argument, from the store (a catalog model is pulled into the pod's volume)."""
    runtime = container(config, sizing, serve_args(config, sizing), name="kserve-container")
    spec = pod_spec(config, [runtime], store_volume=True)  # KServe makes the pods: no claim of their own
    return {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "metadata": _meta(config, f"{config.name}-runtime"),
        "spec": {
            "supportedModelFormats": [{"name": "deskpod", "version": "1", "autoSelect": True}],
            "protocolVersions": ["v2"],
            "multiModel": False,
            "containers": spec["containers"],
            "volumes": spec["volumes"],
            **({k: spec[k] for k in ("nodeSelector", "tolerations") if k in spec}),
        },
    }


def inference_service(config: DeployConfig, sizing: Sizing) -> dict:
    annotations = {"serving.kserve.io/deploymentMode": "RawDeployment"}  # metrics: the PodMonitor, with the key
    predictor: dict = {
        "model": {"modelFormat": {"name": "deskpod"}, "runtime": f"{config.name}-runtime", "protocolVersion": "v2"},
        "minReplicas": config.replicas,
        "maxReplicas": config.max_replicas or config.replicas,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
    }
    if config.gpu:
        predictor["runtimeClassName"] = GPU_RUNTIME_CLASS
    if config.autoscaling:
        annotations["serving.kserve.io/autoscalerClass"] = "keda"
        predictor["autoScaling"] = {"metrics": [{"type": "External", "external": {
            "metric": {"backend": "prometheus", "serverAddress": config.prometheus_url,
                       "query": _queue_query(config)},
            "target": {"type": "Value", "value": str(config.queue_per_replica)}}}]}
    return {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
        "metadata": _meta(config, annotations=annotations),
        "spec": {"predictor": predictor},
    }

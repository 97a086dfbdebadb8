"""`deskpod deploy`: the rendered manifests against the schemas Kubernetes and the operators publish (strictly:
a misspelt field is an error here, where a cluster would drop it), scanned with checkov and sized by the
planner. Their probes are asked of a real server in tests/e2e/test_deploy_probes.py."""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import jsonschema
import pytest
import yaml

from deskpod.deploy.cli import register  # noqa: F401  (the CLI module imports cleanly)
from deskpod.deploy.config import DeployConfig
from deskpod.deploy.manifests import render, serve_args
from deskpod.deploy.sizing import size
from deskpod.errors import DeskpodError

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (a test dependency) is not installed")

KUBERNETES = "1.33.0"
CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"
CORE_GROUPS = {"v1", "apps/v1", "autoscaling/v2", "networking.k8s.io/v1"}


def crd_schemas() -> dict[tuple[str, str], dict]:
    found = {}
    for file in CRD_SCHEMAS.glob("*.json.gz"):
        doc = json.loads(gzip.decompress(file.read_bytes()))
        found[(doc["apiVersion"], doc["kind"])] = strict(doc["schema"])
    return found


def strict(schema: dict) -> dict:
    """The CRD's schema with unknown fields refused, as `kubectl apply --validate=strict` does (the API server
    would prune them silently), except where the schema keeps unknown fields on purpose."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


SCHEMAS = crd_schemas()


def validate(objects: list[dict]) -> None:
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if obj["apiVersion"] in CORE_GROUPS:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        else:
            assert key in SCHEMAS, f"no published schema for {key}"
            # metadata is the API server's ObjectMeta, which a CRD's schema leaves open
            jsonschema.validate({k: v for k, v in obj.items() if k != "metadata"} | {"metadata": {}}, SCHEMAS[key])
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}, KUBERNETES, strict=True)


def rendered(**options) -> list[dict]:
    config = DeployConfig(**{"name": "smollm2", **options})
    return render(config, size(config))


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in objects}


VARIANTS = {
    "cpu": {"model": "smollm2"},
    "gpu-autoscaled-keda": {"model": "smollm2", "gpu": True, "replicas": 1, "max_replicas": 4},
    "gpu-autoscaled-hpa": {"model": "smollm2", "gpu": True, "max_replicas": 4, "autoscaler": "hpa"},
    "kserve": {"model": "smollm2", "kserve": True, "max_replicas": 3},
    "linked-405b": {"model": "llama-3.1-405b", "name": "llama-405b", "precision": "nvfp4", "hardware": "digits-x2",
                    "gpu": True},
}


@pytest.fixture(autouse=True)
def _empty_store(tmp_path, monkeypatch):
    # the planner reads the built-in configs, not a store the developer happens to have
    monkeypatch.setenv("DESKPOD_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_the_published_schemas(variant):
    validate(rendered(**VARIANTS[variant]))


def test_a_misspelt_field_would_be_caught():
    objects = rendered(**VARIANTS["linked-405b"])
    lws = by_kind(objects)["LeaderWorkerSet"]
    lws["spec"]["leaderWorkerTemplate"]["sise"] = 2
    with pytest.raises(jsonschema.ValidationError, match="sise"):
        validate([lws])
    sts = by_kind(rendered(model="smollm2"))["StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["resorces"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([sts])


def test_one_box_is_a_stateful_set_sized_by_the_planner():
    objects = by_kind(rendered(model="smollm2"))
    assert set(objects) == {"StatefulSet", "Service", "NetworkPolicy", "ServiceMonitor"}
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    [server] = pod["containers"]
    config = DeployConfig(model="smollm2", name="smollm2")
    sizing = size(config)
    assert server["args"] == serve_args(config, sizing)
    assert server["resources"]["limits"]["memory"] == f"{sizing.memory_mib}Mi"
    assert "nvidia.com/gpu" not in server["resources"]["limits"] and "runtimeClassName" not in pod
    claim = objects["StatefulSet"]["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == f"{sizing.storage_gib}Gi"
    assert [p["port"] for p in objects["Service"]["spec"]["ports"]] == [8000, 8001]


def test_gpu_pods_ask_the_gpu_operator():
    pod = by_kind(rendered(model="smollm2", gpu=True))["StatefulSet"]["spec"]["template"]["spec"]
    [server] = pod["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["runtimeClassName"] == "nvidia" and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert server["image"].endswith("-cuda") and server["args"][-2:] == ["--device", "cuda"]


def test_405b_on_two_boxes_is_a_two_node_leader_worker_set():
    objects = by_kind(rendered(**VARIANTS["linked-405b"]))
    template = objects["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    head = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    assert head["args"][head["args"].index("--nodes") + 1] == "2"
    assert worker["command"] == ["deskpod"] and worker["args"][0] == "join"
    # both command lines are ones deskpod takes (Kubernetes fills in $(POD_IP) and the other variables)
    from deskpod.cli import build_parser
    from deskpod.link.cli import link_config

    filled = {"$(POD_IP)": "10.0.0.5", "$(LWS_LEADER_ADDRESS)": "head.deskpod", "$(DESKPOD_LINK_TOKEN)": "s3cret-token"}
    entrypoint = ["deskpod", "serve", "--host", "0.0.0.0", "--port", "8000"]  # deploy/Containerfile's
    command = head.get("command", entrypoint)[1:] + head["args"]
    head_args = build_parser().parse_args([filled.get(a, a).replace("$(POD_IP)", "10.0.0.5") for a in command])
    link = link_config(head_args)
    assert (link.nodes, link.address, link.port) == (2, "10.0.0.5", 29500)
    join_args = build_parser().parse_args([filled.get(a, a).replace("$(LWS_LEADER_ADDRESS)", "head.deskpod")
                                           for a in worker["args"]])
    assert join_args.func.__name__ == "cmd_join" and join_args.endpoint == "head.deskpod:29500"
    # each box holds its share of 405B parameters at ~4.5 bits: well over 100 GB, under DIGITS' 128
    memory_gib = int(head["resources"]["limits"]["memory"].removesuffix("Mi")) / 1024
    assert 100 < memory_gib < 120
    assert objects["Service"]["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"


def test_autoscaling_follows_the_queue_depth_metric_the_server_exports():
    keda = by_kind(rendered(model="smollm2", max_replicas=4))["ScaledObject"]
    query = keda["spec"]["triggers"][0]["metadata"]["query"]
    hpa = by_kind(rendered(model="smollm2", max_replicas=4, autoscaler="hpa"))["HorizontalPodAutoscaler"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    from deskpod.server.metrics import ENGINE_STATS

    assert metric == ENGINE_STATS["num_waiting"][0] and query.startswith(f"sum({metric}{{")
    assert (keda["spec"]["minReplicaCount"], keda["spec"]["maxReplicaCount"]) == (1, 4)
    # the autoscaler owns the count: a re-apply must not reset it
    assert "replicas" not in by_kind(rendered(model="smollm2", max_replicas=4))["StatefulSet"]["spec"]


def test_what_cannot_fit_is_refused_with_what_would():
    with pytest.raises(DeskpodError, match="needs 2 digits boxes.*--hardware digits-x2"):
        rendered(model="llama-3.1-405b", precision="nvfp4")
    with pytest.raises(DeskpodError, match="--name"):
        DeployConfig(model="smollm2", name="Not_A_Name")


def test_deploy_cli_prints_yaml_and_what_the_pods_need(tmp_path):
    env = {**os.environ, "DESKPOD_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-m", "deskpod.cli", "deploy", "smollm2", "--gpu"], capture_output=True,
                          text=True, env=env, check=True)
    kinds = [doc["kind"] for doc in yaml.safe_load_all(done.stdout)]
    assert kinds == ["StatefulSet", "Service", "NetworkPolicy", "ServiceMonitor"]
    assert "create secret generic smollm2-api-key" in done.stderr


# -- checkov --------------------------------------------------------------------------------------

# What the scan reports that these manifests leave to the cluster's owner, and why.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "images by digest: the image is the user's build, tagged by version; they pin it with --image",
    "CKV_K8S_15": "imagePullPolicy Always: IfNotPresent keeps a multi-GB image from being pulled at every restart",
    "CKV_K8S_35": "secrets as files: deskpod reads its key from DESKPOD_API_KEY, the one way it takes one",
}


@pytest.fixture(scope="session")
def checkov() -> str:
    """checkov in an environment of its own: it pins releases (packaging<24) that pytest itself cannot use."""
    found = shutil.which("checkov")
    if found:
        return found
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deskpod-tests" / "checkov"
    binary = home / "bin" / "checkov"
    if not binary.exists():
        venv.create(home, with_pip=True)
        done = subprocess.run([str(home / "bin" / "pip"), "install", "-q", "checkov>=3,<4"], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(home, ignore_errors=True)
            pytest.skip(f"checkov could not be installed from PyPI: {done.stderr.strip()[-300:]}")
    return str(binary)


def pods_inside(obj: dict, objects: list[dict]) -> list[dict]:
    """checkov reads the pods of core kinds only: the pod templates inside the operators' kinds, as Pods."""
    def pod(name, spec, labels, annotations=None):
        metadata = {"name": name, "namespace": obj["metadata"]["namespace"], "labels": labels,
                    "annotations": annotations or {}}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}

    name = obj["metadata"]["name"]
    if obj["kind"] == "LeaderWorkerSet":
        template = obj["spec"]["leaderWorkerTemplate"]
        return [pod(f"{name}-{part}", template[f"{part}Template"]["spec"], **template[f"{part}Template"]["metadata"])
                for part in ("leader", "worker")]
    if obj["kind"] == "ServingRuntime":  # KServe's pod: the runtime's containers, the predictor's pod settings
        isvc = by_kind(objects)["InferenceService"]
        predictor = isvc["spec"]["predictor"]
        spec = {k: v for k, v in obj["spec"].items() if k in ("containers", "volumes", "nodeSelector", "tolerations")}
        spec |= {k: v for k, v in predictor.items() if k in ("securityContext", "automountServiceAccountToken", "runtimeClassName")}
        return [pod(name, spec, {**obj["metadata"]["labels"], "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]})]
    return []


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkov_finds_nothing_left_open(variant, checkov, tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    objects = rendered(**VARIANTS[variant])
    scanned = [*objects, *(pod for obj in objects for pod in pods_inside(obj, objects))]
    (folder / "deskpod.yaml").write_text(yaml.safe_dump_all(scanned, sort_keys=False))
    done = subprocess.run([checkov, "-d", str(folder), "--framework", "kubernetes", "--output", "json",
                           "--skip-check", ",".join(CHECKOV_SKIPS)], capture_output=True, text=True,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})  # no calls to Prisma Cloud's API
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    results = [r["results"] for r in reports if "results" in r]
    failed = [(c["check_id"], c["check_name"], c["resource"]) for r in results for c in r["failed_checks"]]
    assert failed == [], failed
    pods_checked = {c["resource"] for r in results for c in r["passed_checks"]
                    if c["resource"].split(".")[0] in ("StatefulSet", "Pod")}
    assert pods_checked, "checkov scanned no pod"  # the scan really read the workloads


def test_a_small_model_on_a_linked_profile_takes_one_box():
    objects = by_kind(rendered(model="smollm2", hardware="digits-x2"))
    assert "StatefulSet" in objects and "LeaderWorkerSet" not in objects


def test_kserve_is_scraped_with_the_key_and_scaled_on_its_own_queue():
    objects = by_kind(rendered(model="smollm2", kserve=True, max_replicas=3))
    monitor = objects["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "smollm2"}
    assert monitor["podMetricsEndpoints"][0]["authorization"]["credentials"]["name"] == "smollm2-api-key"
    query = objects["InferenceService"]["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
    assert 'pod=~"smollm2-predictor-.*"' in query


def test_monitors_are_optional_and_carry_the_cluster_s_labels():
    assert "ServiceMonitor" not in by_kind(rendered(model="smollm2", monitor=False))
    monitor = by_kind(rendered(model="smollm2", monitor_labels={"release": "kube-prometheus-stack"}))["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_names_kubernetes_would_refuse_are_refused_here():
    for name in ("9lives", "x" * 53, "Upper"):
        with pytest.raises(DeskpodError, match="--name"):
            DeployConfig(model="smollm2", name=name)

"""The probes and ports `deskpod deploy` renders, asked of a real `deskpod serve` started with the pod's own
command line (the image's entrypoint and the rendered arguments; the gRPC port moved to a free one)."""

from __future__ import annotations

import re

import httpx
from support.ports import free_port

from deskpod.deploy.config import DeployConfig
from deskpod.deploy.manifests import GRPC_PORT, render
from deskpod.deploy.sizing import size


def test_the_probes_and_metrics_answer_on_a_server_run_with_the_rendered_arguments(serve):
    config = DeployConfig(model="smollm2", name="smollm2")
    objects = {obj["kind"]: obj for obj in render(config, size(config))}
    [server] = objects["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    args = [str(free_port()) if a == str(GRPC_PORT) else a for a in server["args"]]
    running = serve(args, api_key="probe-key")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # no key: kubelet sends none
        path = server[probe]["httpGet"]["path"]
        assert httpx.get(running.url + path).status_code == 200, path
    endpoint = objects["ServiceMonitor"]["spec"]["endpoints"][0]
    assert httpx.get(running.url + endpoint["path"]).status_code == 401  # hence the monitor's bearer token
    scraped = httpx.get(running.url + endpoint["path"], headers={"Authorization": "Bearer probe-key"})
    assert re.search(r"^deskpod_num_requests_waiting\{", scraped.text, re.M)

"""Triton's model control modes with the official client: explicit (only --load-model at start, the API loads
and unloads, a bad load says "failed to load"), none (the API may not), poll (folders added, changed and
removed are picked up)."""

from __future__ import annotations

import shutil
import time

import httpx
import tritonclient.http as httpclient
from kserve_models import build_repository, refused
from support.ports import free_port

NOT_ALLOWED = "explicit model load / unload is not allowed if polling is enabled"


def start(serve, tmp_path_factory, *args: str):
    root = build_repository(tmp_path_factory.mktemp("control_repository"))
    server = serve(["--model-repository", str(root), "--grpc-port", str(free_port()), *args])
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    return root, client


def ready(client) -> set[str]:
    return {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}


def test_explicit_loads_only_what_it_is_told(serve, tmp_path_factory):
    _, client = start(serve, tmp_path_factory, "--model-control-mode", "explicit", "--load-model", "add_sub")
    try:
        assert ready(client) == {"add_sub"}
        client.load_model("linear")
        assert ready(client) == {"add_sub", "linear"}
        client.unload_model("add_sub")
        assert ready(client) == {"linear"}
        error = refused(lambda: client.load_model("linear", config='{"max_batch_size": "many"'))
        assert "failed to load 'linear'" in error.message()
    finally:
        client.close()


def test_none_refuses_the_repository_api_in_tritons_words(serve, tmp_path_factory):
    metrics_port = free_port()
    _, client = start(serve, tmp_path_factory, "--model-control-mode", "none", "--metrics-port", str(metrics_port))
    try:
        # Triton's separate metrics port (8002 there) answers the same series
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert "nv_inference_count" in text and "deskpod_requests_total" in text
        assert {"add_sub", "linear", "double"} <= ready(client)
        for call in (lambda: client.load_model("linear"), lambda: client.unload_model("linear")):
            error = refused(call)
            assert NOT_ALLOWED in error.message() and error.status() == "503"
        assert "linear" in ready(client)
    finally:
        client.close()


def test_poll_picks_up_what_changes_in_the_repository(serve, tmp_path_factory):
    root, client = start(serve, tmp_path_factory, "--model-control-mode", "poll", "--repository-poll-secs", "0.3")
    try:
        assert "double" in ready(client)
        shutil.copytree(root / "double", root / "double_copy")
        (root / "double_copy" / "config.pbtxt").write_text(
            (root / "double" / "config.pbtxt").read_text().replace('name: "double"', 'name: "double_copy"'))
        shutil.rmtree(root / "linear")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not ("double_copy" in ready(client) and "linear" not in ready(client)):
            time.sleep(0.2)
        assert "double_copy" in ready(client) and "linear" not in ready(client)
        assert NOT_ALLOWED in refused(lambda: client.load_model("double")).message()
    finally:
        client.close()


def test_load_model_needs_explicit_mode(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "deskpod.cli", "serve", "--model-repository", str(tmp_path),
                             "--load-model", "x"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--load-model is for --model-control-mode explicit" in result.stderr



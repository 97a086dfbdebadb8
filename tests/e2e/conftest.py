"""Real servers: `python -m deskpod.server.cli` in a subprocess on a free port, with the real SmolLM2 and
all-MiniLM-L6-v2 from the session store; tests call them with the official `openai` client and httpx."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ports import free_port

API_KEY = "e2e-secret"
STARTUP_TIMEOUT_S = 600  # the first start on a machine compiles the CPU kernels (about a minute)


@dataclass
class Server:
    url: str
    api_key: str | None
    log: Path
    process: subprocess.Popen
    clients: list[openai.OpenAI] = field(default_factory=list)

    def client(self, **kwargs) -> openai.OpenAI:
        """An official client for this server (closed when the server stops)."""
        self.clients.append(openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", **kwargs))
        return self.clients[-1]

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value} (parsed by prometheus_client)."""
        with self.http() as http:
            text = http.get("/metrics").text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples


def start_server(args: list[str], log: Path, api_key: str | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "deskpod.server.cli", *args, "--port", str(port)]
    if api_key:
        cmd += ["--api-key", api_key]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    server = Server(f"http://127.0.0.1:{port}", api_key, log, process)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"the server did not answer /health in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    for client in server.clients:
        client.close()
    server.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown: the engines shut down too
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def serve(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, minilm_dir: Path
) -> Iterator[Callable[..., Server]]:
    """start(args, api_key=None) -> a running Server, stopped at the end of the session."""
    started: list[Server] = []

    def start(args: list[str], api_key: str | None = None) -> Server:
        log = tmp_path_factory.mktemp("server") / "server.log"
        started.append(start_server(args, log, api_key))
        return started[-1]

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture(scope="session")
def server(serve: Callable[..., Server]) -> Server:
    """SmolLM2 and MiniLM behind an API key; a 1 GB KV pool."""
    return serve(["smollm2", "minilm", "--kv-cache-gb", "1"], api_key=API_KEY)

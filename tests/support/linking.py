"""Linked boxes for real (tests/link): `deskpod serve --nodes N` and `deskpod join` as separate processes, each with its own
store, linked over loopback or across network namespaces; tests call the head with the official `openai`
client, and compare with the same model run on one box in this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
from support.ports import free_port

from deskpod.engine.config import EngineConfig
from deskpod.engine.generate import generate_batch
from deskpod.engine.loader import load_model
from deskpod.engine.sampler import SamplingParams
from deskpod.store import Store


TOKEN = "link-test-token"
API_KEY = "link-test-key"
START_TIMEOUT_S = 240


@dataclass
class Box:
    """One machine of a link: its own store, and its network namespace (None: this one)."""

    home: Path
    address: str = "127.0.0.1"  # its link address
    netns: str | None = None
    http_address: str | None = None  # where the head serves HTTP, when not on the link address

    def command(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, sys.executable, "-m", "deskpod.cli", *args]

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        env = {**os.environ, "DESKPOD_HOME": str(self.home)}
        with log.open("w") as out:
            return subprocess.Popen(self.command(*args), stdout=out, stderr=subprocess.STDOUT, env=env)

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        env = {**os.environ, "DESKPOD_HOME": str(self.home)}
        return subprocess.run(self.command(*args), capture_output=True, text=True, env=env, timeout=timeout)


@dataclass
class Link:
    head: subprocess.Popen
    boxes: list[Box]
    endpoint: str
    url: str
    logs: Path
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)
    clients: list[openai.OpenAI] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)

    def client(self, **kwargs) -> openai.OpenAI:
        self.clients.append(openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs))
        return self.clients[-1]

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)

    def start_worker(self, rank: int, token: str = TOKEN) -> subprocess.Popen:
        if rank in self.workers:  # the box's earlier process (killed by the test) is reaped first
            self.workers[rank].kill()
            self.workers[rank].wait()
        log = self.logs / f"worker{rank}-{time.monotonic_ns()}.log"
        self.workers[rank] = self.boxes[rank].start(["join", self.endpoint, "--link-token", token, "--threads", "1",
                                                     *self.worker_args], log)
        self.workers[rank].log = log
        return self.workers[rank]

    def head_log(self) -> str:
        return (self.logs / "head.log").read_text()

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=5)

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"the head exited with {self.head.returncode}:\n{self.head_log()[-3000:]}")
            try:
                if self.health().status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the link did not become healthy in {timeout:.0f} s:\n{self.head_log()[-3000:]}\n"
                           + "\n".join(w.log.read_text()[-1500:] for w in self.workers.values()))

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for process in [self.head, *self.workers.values()]:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in [self.head, *self.workers.values()]:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_link(boxes: list[Box], model: str, logs: Path, parallel: str = "pipeline", weights: str = "compact",
               extra: tuple[str, ...] = (), worker_extra: tuple[str, ...] = ()) -> Link:
    """The head on boxes[0] serving `model` over HTTP on its address, a worker on each other box; healthy."""
    logs.mkdir(parents=True, exist_ok=True)
    head_box = boxes[0]
    endpoint = f"{head_box.address}:{free_port()}"
    http_port = free_port()
    args = ["serve", model, "--nodes", str(len(boxes)), "--link", endpoint, "--link-token", TOKEN, "--parallel", parallel,
            "--weights", weights, "--threads", "1", "--host", head_box.http_address or head_box.address, "--port", str(http_port),
            "--api-key", API_KEY, "--ctx", "2048", *extra]
    head = head_box.start(args, logs / "head.log")
    link = Link(head, boxes, endpoint, f"http://{head_box.http_address or head_box.address}:{http_port}", logs,
                worker_args=list(worker_extra))
    for rank in range(1, len(boxes)):
        link.start_worker(rank)
    try:
        link.wait_healthy()
    except BaseException:
        link.stop()
        raise
    return link


MAX_TOKENS = 16

# Compact blocks compute a batch of many rows with other kernels than a single row (and so round differently):
# with them, the requests go one at a time on both sides; with float32 weights a reply does not depend on what
# runs beside it, and the requests go together, batched by the head (and on one box).


def reference(path, prompt_ids: list[list[int]], weights: str, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The greedy tokens of the model on one box (this process)."""
    config = EngineConfig(weights=weights, context=2048)
    loaded = load_model(path, config)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batches = [prompt_ids] if weights == "float32" else [[ids] for ids in prompt_ids]
    return [c.token_ids for batch in batches for c in generate_batch(loaded, batch, params, config)]


def linked_tokens(link, model: str, prompt_ids: list[list[int]], weights: str,
                  max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The link's greedy tokens for each prompt (sent together, or one at a time for compact weights)."""
    client = link.client()

    def one(ids: list[int]) -> list[int]:
        reply = client.completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        return [int(t.removeprefix("token_id:")) for t in reply.choices[0].logprobs.tokens]

    with ThreadPoolExecutor(len(prompt_ids) if weights == "float32" else 1) as pool:
        return list(pool.map(one, prompt_ids))


def smollm2_prompts(store: Store) -> list[list[int]]:
    from deskpod.engine.tokenizer import Tokenizer
    from deskpod.formats.gguf import GGUFFile

    tokenizer = Tokenizer.from_gguf(GGUFFile(store.model_file(store.get("smollm2"))))
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
             "The three primary colours are"]
    return [tokenizer.encode(t) for t in texts]

"""The link across a real network: the head and a worker in two network namespaces joined by a veth pair with
link-local addresses (what the Connect-Two-Sparks setup gives the ConnectX ports), made by the test itself.
The head's HTTP port sits on a second veth pair to this namespace, where the test's client runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from support.linking import Box, linked_tokens, reference, smollm2_prompts

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="network namespaces need root and iproute2's `ip`")

HEAD_LINK, WORKER_LINK, HEAD_HTTP, HOST_SIDE = "169.254.77.1", "169.254.77.2", "169.254.78.2", "169.254.78.1"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def namespaces() -> Iterator[tuple[str, str]]:
    tag = os.getpid() % 100000
    head, worker = f"dp-head-{tag}", f"dp-work-{tag}"
    link_a, link_b, http_a, http_b = f"dpl{tag}a", f"dpl{tag}b", f"dph{tag}a", f"dph{tag}b"
    try:
        ip("netns", "add", head)
        ip("netns", "add", worker)
        ip("link", "add", link_a, "type", "veth", "peer", "name", link_b)
        ip("link", "set", link_a, "netns", head)
        ip("link", "set", link_b, "netns", worker)
        ip("-n", head, "addr", "add", f"{HEAD_LINK}/16", "dev", link_a)
        ip("-n", worker, "addr", "add", f"{WORKER_LINK}/16", "dev", link_b)
        ip("link", "add", http_a, "type", "veth", "peer", "name", http_b)
        ip("link", "set", http_b, "netns", head)
        ip("addr", "add", f"{HOST_SIDE}/24", "dev", http_a)
        ip("-n", head, "addr", "add", f"{HEAD_HTTP}/24", "dev", http_b)
        for ns, dev in ((head, link_a), (worker, link_b), (head, http_b), (head, "lo"), (worker, "lo")):
            ip("-n", ns, "link", "set", dev, "up")
        ip("link", "set", http_a, "up")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make network namespaces here: {e.stderr.decode().strip()}")
    yield head, worker
    for ns in (head, worker):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", http_a], capture_output=True)


@pytest.fixture
def boxes(namespaces, store_home, worker_home) -> list[Box]:
    head, worker = namespaces
    return [Box(store_home, HEAD_LINK, head, http_address=HEAD_HTTP), Box(worker_home, WORKER_LINK, worker)]


def listening(netns: str, pid: int) -> set[str]:
    """The local addresses a process listens on, inside its namespace."""
    out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-ltnpH"], capture_output=True, text=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if f"pid={pid}," in line}


def test_tensor_parallel_across_namespaces(linked, boxes, store, smollm2_gguf):
    link = linked(boxes, "smollm2", parallel="tensor", weights="float32")
    ids = smollm2_prompts(store)
    assert linked_tokens(link, "smollm2", ids, "float32") == reference(smollm2_gguf, ids, "float32")
    # the link port and the process group's sockets: the link address only (and HTTP on its own address)
    # (`ip netns exec` execs the command: the process's pid is the server's)
    assert listening(boxes[0].netns, link.head.pid) == {HEAD_LINK, HEAD_HTTP}
    assert listening(boxes[1].netns, link.workers[1].pid) <= {WORKER_LINK}


def test_pipeline_over_a_slower_link(linked, boxes, store, smollm2_gguf):
    """1 ms added each way by netem on the worker's side: the same tokens, each step slower by the hand-offs."""
    worker_ns, device = boxes[1].netns, None
    out = subprocess.run(["ip", "-n", worker_ns, "-o", "link", "show", "type", "veth"], capture_output=True, text=True)
    device = out.stdout.split(":")[1].strip().split("@")[0]
    added = subprocess.run(["ip", "netns", "exec", worker_ns, "tc", "qdisc", "add", "dev", device, "root", "netem",
                            "delay", "1ms"], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"this kernel has no netem qdisc to delay the link ({added.stderr.strip()})")
    link = linked(boxes, "smollm2", parallel="pipeline", weights="float32")
    ids = smollm2_prompts(store)[:2]
    started = time.monotonic()
    assert linked_tokens(link, "smollm2", ids, "float32") == reference(smollm2_gguf, ids, "float32")
    assert time.monotonic() - started > 16 * 2e-3  # each token's step crossed the delayed link at least twice

"""The CPU container image (deploy/Containerfile), built from this checkout and answering a chat request.

No container registry is reachable from where these tests run, so the base is made here: Debian bookworm by
debootstrap, imported into podman (kept between runs). buildah builds the Containerfile on it with the pip
settings of this machine (its wheel folder, index mirrors and certificate, mounted read-only), only the kernel
builds this CPU runs (--targets auto) to keep the test short; podman runs it with a store holding SmolLM2, and
the image and its build layers are removed afterwards.

What it shows: the image answers /v1/chat/completions through the official client, runs as its own non-root
user, holds no compiler (the kernels are the build stage's), passes its own HEALTHCHECK; its size is printed."""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from support.ports import free_port

from deskpod.store import Store

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/deskpod-test-base:bookworm"
IMAGE = "localhost/deskpod:test"
DEBIAN_MIRROR = os.environ.get("DESKPOD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TOOLS = ("buildah", "podman", "debootstrap")
KEY = "image-key"


def _why_not() -> str | None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt install buildah podman debootstrap runc)"
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot builds need root"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def podman(*args: str, **kw) -> subprocess.CompletedProcess:
    # runc: crun refuses hosts with cgroups in hybrid mode (v1 controllers beside a v2 mount)
    runtime = ["--runtime", "runc"] if shutil.which("runc") else []
    return run(["podman", *runtime, *args], **kw)


def limits() -> list[str]:
    """Limits no higher than this process's own: raising them needs CAP_SYS_RESOURCE, which a sandboxed runner
    may not have (podman's defaults are higher than most hosts' and fail there). Processes: a few thousand, as
    the server's threads need, well under any host's limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = [] if hard == resource.RLIM_INFINITY else ["--ulimit", f"nofile={soft}:{hard}"]
    return [*files, "--ulimit", "nproc=4096:4096"]


def pip_settings() -> dict[str, str]:
    """This machine's pip settings (environment and config files), which the build's pip must use too."""
    listed = run([sys.executable, "-m", "pip", "config", "list"]).stdout
    settings = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"(?::env:|global|site|user)\.([\w-]+)='(.*)'", line.strip())
        if match and match[1] in ("find-links", "index-url", "extra-index-url", "cert"):
            settings[match[1]] = match[2]
    return settings


def local_paths(value: str) -> list[str]:
    """The folders and files a pip setting points at on this machine (file:// URLs included; for a local
    index, the folder above its simple/, where its pages link the files)."""
    paths = [Path(v.removeprefix("file://")) for v in value.split() if v.startswith(("/", "file:///"))]
    return [str(p.parent if p.name == "simple" else p) for p in paths if p.exists()]


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> str:
    if podman("image", "exists", BASE).returncode != 0:
        _make_base(tmp_path_factory)
    # can this machine run a container at all? (a sandbox may forbid namespaces or cgroups to podman)
    tried = podman("run", "--rm", *limits(), BASE, "true")
    if tried.returncode != 0:
        pytest.skip(f"podman cannot run a container on this machine: {tried.stderr.strip()[-300:]}")
    return BASE


def _make_base(tmp_path_factory) -> None:
    rootfs = tmp_path_factory.mktemp("base") / "rootfs"
    made = run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm",
                str(rootfs), DEBIAN_MIRROR], timeout=900)
    if made.returncode != 0:
        pytest.skip(f"debootstrap could not reach {DEBIAN_MIRROR}: {made.stderr.strip()[-300:]}")
    shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    with tar.stdout:
        imported = podman("import", "-", BASE, stdin=tar.stdout)
    tar.wait()
    assert imported.returncode == 0, imported.stderr


@pytest.fixture(scope="module")
def image(base_image) -> Iterator[str]:
    import torch

    settings = pip_settings()
    args = {"BASE": base_image, "KERNEL_TARGETS": "auto", "TORCH_SPEC": f"torch=={torch.__version__.split('+')[0]}"}
    if "find-links" in settings:  # this machine's own torch build: no download from PyTorch's index
        args["TORCH_INDEX"] = ""
    volumes = []
    for key, value in settings.items():
        args[f"PIP_{key.upper().replace('-', '_')}"] = value
        volumes += [f"--volume={path}:{path}:ro" for path in local_paths(value)]
    cmd = ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers", "-f", "deploy/Containerfile",
           *(f"--build-arg={k}={v}" for k, v in args.items()), *volumes, "-t", IMAGE, "."]
    try:
        built = run(cmd, cwd=ROOT, timeout=1800)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        yield IMAGE
    finally:  # the image, its build stage and its cached layers are GBs a runner's disk may not spare
        podman("rmi", "-f", IMAGE)
        podman("image", "prune", "-f")


@pytest.fixture(scope="module")
def container(image, smollm2_gguf, tmp_path_factory):
    home = tmp_path_factory.mktemp("image-store")
    named = home / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copyfile(smollm2_gguf, named)
    Store(home / "models").pull(str(named), name="smollm2", progress=False)
    named.unlink()
    port = free_port()
    name = f"deskpod-test-{os.getpid()}"
    started = podman("run", "-d", "--name", name, *limits(), "-p", f"127.0.0.1:{port}:8000",
                     "-v", f"{home / 'models'}:/models:U", "-e", f"DESKPOD_API_KEY={KEY}", image, "smollm2",
                     "--kv-cache-gb", "0.5")
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if podman("container", "exists", name).returncode != 0 or "exited" in podman(
                    "inspect", "--format", "{{.State.Status}}", name).stdout:
                pytest.fail(f"the container stopped:\n{podman('logs', name).stderr[-3000:]}")
            time.sleep(1)
        else:
            pytest.fail(f"the container did not become ready in 300 s:\n{podman('logs', name).stderr[-3000:]}")
        yield name, url
    finally:
        podman("rm", "-f", name)


def test_the_image_answers_a_chat_request(container):
    name, url = container
    with OpenAI(base_url=f"{url}/v1", api_key=KEY) as client:
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                               max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert httpx.get(f"{url}/v1/models").status_code == 401  # bound to 0.0.0.0 inside: the key is required


def test_the_image_runs_unprivileged_without_a_compiler_on_prebuilt_kernels(container):
    name, _ = container
    assert podman("exec", name, "id", "-u").stdout.strip() == "10001"
    found = podman("exec", name, "sh", "-c", "command -v g++ gcc c++ cc || true").stdout.strip()
    assert found == "", found
    logs = podman("logs", name)
    assert re.search(r"kernels: the prebuilt x86-64[\w.-]* build|kernels: the prebuilt arm", logs.stdout + logs.stderr)
    assert podman("healthcheck", "run", name).returncode == 0


def test_image_size_is_reported(image):
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    print(f"\n{image}: {size / 1e9:.2f} GB")
    assert size < 3e9  # torch's CPU build, onnxruntime and Python: well under the CUDA images' 10+ GB

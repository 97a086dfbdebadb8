"""Crash safety and concurrency with real processes: SIGKILL mid-copy, two pulls of one model at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deskpod.store import Store

REPO = Path(__file__).resolve().parents[2]
PULL = "import sys; from deskpod.store import Store; Store(sys.argv[1]).pull(sys.argv[2], progress=False)"


def start_pull(home: Path, source: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", PULL, str(home), str(source)], env=env, stderr=subprocess.PIPE)


def big_onnx(path: Path, size: int) -> Path:
    """A sparse file: costs no disk to make, but the store still reads, hashes and writes every byte."""
    with path.open("wb") as f:
        f.truncate(size)
    return path


def partial_copies(home: Path) -> list[Path]:
    return [p for p in (home / "tmp").glob("*/stage/*") if p.stat().st_size > 0]


def test_killed_mid_copy_leaves_no_manifest_and_the_next_pull_completes(tmp_path: Path) -> None:
    home, source = tmp_path / "home", big_onnx(tmp_path / "big.onnx", 256 << 20)
    proc = start_pull(home, source)
    deadline = time.monotonic() + 30
    while not partial_copies(home) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the pull ended before it could be killed: {stderr.decode()}"
    store = Store(home)
    assert store.list() == [] and not list(home.glob("manifests/*/*.json"))
    assert partial_copies(home), "the kill should have left a partial scratch copy"

    m = store.pull(str(source), progress=False)
    assert m.size == 256 << 20 and store.verify() == []
    assert list(store.tmp.iterdir()) == []  # the dead pull's scratch folder is gone too


def test_two_concurrent_pulls_of_one_model_make_one_good_model(tmp_path: Path) -> None:
    home, source = tmp_path / "home", big_onnx(tmp_path / "shared.onnx", 64 << 20)
    procs = [start_pull(home, source) for _ in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr.decode()
    store = Store(home)
    assert [m.ref for m in store.list()] == ["shared:latest"]
    assert store.verify() == []
    assert len(list(store.blobs.iterdir())) == 1 and list(store.tmp.iterdir()) == []

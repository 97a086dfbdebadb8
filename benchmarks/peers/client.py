"""Drive the peer workers from deskpod's venv: run one as a subprocess, get its JSON back.

Stdlib only. The peers live in their own venv (benchmarks/.venv-peers, built by
`bash benchmarks/setup_peers.sh`) and are never deskpod dependencies.

    from client import run_peer          # with benchmarks/peers on sys.path
    reply = run_peer("llamacpp", "greedy", "--gguf", gguf, "--prompt-ids", [504, 3575])
    reply["token_ids"]
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
BENCHMARKS_DIR = PEERS_DIR.parent
WORKERS = ("llamacpp", "transformers")


class PeerError(RuntimeError):
    """A peer worker could not be run, failed, or printed no JSON object."""


def peers_python() -> Path:
    """The peer venv's interpreter (PEERS_VENV overrides the venv's place, as in setup_peers.sh)."""
    venv = Path(os.environ.get("PEERS_VENV", BENCHMARKS_DIR / ".venv-peers"))
    return venv / "bin" / "python"


def peers_available() -> bool:
    """Whether the peer venv exists (for skipping peer comparisons when it does not)."""
    return peers_python().is_file()


def _argument(value: Any) -> str:
    # Lists (token ids) travel as JSON; everything else as its str().
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def run_peer(worker: str, *args: Any, timeout: float | None = None) -> dict[str, Any]:
    """Run `<worker>_worker.py *args` in the peer venv and return the JSON object it printed.

    worker is "llamacpp" or "transformers"; args are the command and its flags, e.g.
    ("speed", "--gguf", path, "--threads", 2). Raises PeerError with the worker's stderr.
    """
    if worker not in WORKERS:
        raise PeerError(f"unknown peer worker {worker!r}; expected one of {WORKERS}")
    python = peers_python()
    if not python.is_file():
        raise PeerError(f"the peers' venv is missing ({python} not found): run `bash benchmarks/setup_peers.sh`")
    command = [str(python), str(PEERS_DIR / f"{worker}_worker.py"), *map(_argument, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise PeerError(f"{worker} worker exited {done.returncode}:\n{done.stderr[-4000:]}")
    return _reply(worker, done.stdout)


def _reply(worker: str, stdout: str) -> dict[str, Any]:
    # The JSON object is the last line printed; anything a library printed comes before it.
    lines = stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as error:
        raise PeerError(f"{worker} worker printed no JSON object:\n{stdout[-4000:]}") from error
    if not isinstance(reply, dict):
        raise PeerError(f"{worker} worker printed {type(reply).__name__}, not a JSON object")
    return reply

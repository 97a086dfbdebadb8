"""Joining boxes into a link: the head listens on the link address, each worker connects to it.

Before anything else both sides prove they hold the link token (HMAC-SHA256 challenges both ways), so a box
without it is refused before any tensor or model name is exchanged, and a worker never takes orders from a
head that lacks it. The connection then carries small JSON messages (never pickles): the worker's
memory, its share of the model, the digest of the model it loaded, and torch.distributed's rendezvous keys —
the c10d Store the gloo / NCCL process group is built from is served over this authenticated connection
(c10d's own TCPStore listens on every interface and checks no one). The tensors themselves then go over the
process group. The connection stays open while the worker serves: its end tells the head at once that the
worker is gone, and the worker that the head is.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from typing import Any

import torch.distributed as dist

from deskpod.errors import DeskpodError

log = logging.getLogger(__name__)
PROTOCOL = "deskpod-link/1"
MAX_MESSAGE = 1 << 20


class LinkRefused(DeskpodError):
    """The other side turned this box away (wrong token, other model, link full)."""


class Connection:
    """Length-prefixed JSON messages over a socket."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock, self.peer = sock, peer
        self._send_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode()
        with self._send_lock:
            self.sock.sendall(struct.pack("!I", len(data)) + data)

    def receive(self) -> dict[str, Any]:
        size = struct.unpack("!I", self._exactly(4))[0]
        if size > MAX_MESSAGE:
            raise ConnectionError(f"{self.peer} sent a {size}-byte message; at most {MAX_MESSAGE} are expected")
        message = json.loads(self._exactly(size))
        if not isinstance(message, dict):
            raise ConnectionError(f"{self.peer} sent a malformed message")
        return message

    def expect(self, key: str) -> Any:
        """The value of the next message's `key`; LinkRefused with the other side's reason if it refused."""
        message = self.receive()
        if "error" in message:
            raise LinkRefused(str(message["error"]))
        if key not in message:
            raise ConnectionError(f"{self.peer} sent {sorted(message)} where {key!r} was expected")
        return message[key]

    def refuse(self, reason: str) -> None:
        try:
            self.send({"error": reason})
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"{self.peer} closed the link connection")
            data += chunk
        return data


def _proof(token: str, role: str, nonce: str) -> str:
    return hmac.new(token.encode(), f"{PROTOCOL}|{role}|{nonce}".encode(), hashlib.sha256).hexdigest()


def authenticate_worker(conn: Connection, token: str, timeout: float) -> None:
    """Head side: the worker must prove it holds `token`, then the head proves it does."""
    conn.sock.settimeout(timeout)
    nonce = secrets.token_hex(16)
    conn.send({"hello": PROTOCOL, "nonce": nonce})
    answer = conn.receive()
    if answer.get("protocol") != PROTOCOL:
        conn.refuse(f"this head speaks {PROTOCOL}, the joining box {answer.get('protocol')!r}")
        raise LinkRefused(f"{conn.peer}: speaks {answer.get('protocol')!r}, not {PROTOCOL}")
    if not hmac.compare_digest(str(answer.get("proof", "")), _proof(token, "worker", nonce)):
        conn.refuse("refused: the link token does not match the head's (give the head's --link-token)")
        raise LinkRefused(f"{conn.peer}: refused a join with a wrong link token")
    conn.send({"proof": _proof(token, "head", str(answer.get("nonce", "")))})
    conn.sock.settimeout(None)


def authenticate_head(conn: Connection, token: str, timeout: float) -> None:
    """Worker side: prove it holds `token`, and check the head does."""
    conn.sock.settimeout(timeout)
    hello = conn.receive()
    if hello.get("hello") != PROTOCOL:
        raise LinkRefused(f"{conn.peer} is not a deskpod head speaking {PROTOCOL}")
    nonce = secrets.token_hex(16)
    conn.send({"protocol": PROTOCOL, "proof": _proof(token, "worker", str(hello["nonce"])), "nonce": nonce})
    proof = conn.expect("proof")
    if not hmac.compare_digest(str(proof), _proof(token, "head", nonce)):
        raise LinkRefused(f"{conn.peer} does not hold this link token")
    conn.sock.settimeout(None)


def connect(address: str, port: int, token: str, timeout: float, wait: float = 0.0, progress=None) -> Connection:
    """The worker's authenticated connection to the head, trying for `wait` seconds while nothing listens
    there yet (a head starting beside its workers); DeskpodError saying so when it cannot be reached."""
    deadline = time.monotonic() + wait
    while True:
        try:
            sock = socket.create_connection((address, port), timeout=timeout)
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DeskpodError(f"cannot reach the head at {address}:{port}: {e.strerror or e}") from None
            if progress:
                progress(f"waiting for the head at {address}:{port} ({e.strerror or e})")
                progress = None  # said once
            time.sleep(1.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock, f"the head ({address}:{port})")
    try:
        authenticate_head(conn, token, timeout)
    except (OSError, ConnectionError, ValueError) as e:
        conn.close()
        raise DeskpodError(f"the link handshake with {address}:{port} failed: {e}") from None
    return conn


# --- torch.distributed's rendezvous over the link connections ----------------------------------------


class KeyValues:
    """The head's rendezvous keys, shared by its own process group and the workers' requests."""

    def __init__(self):
        self._values: dict[str, bytes] = {}
        self._changed = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self._changed:
            self._values[key] = value
            self._changed.notify_all()

    def get(self, key: str, timeout: float) -> bytes:
        with self._changed:
            if not self._changed.wait_for(lambda: key in self._values, timeout):
                raise DeskpodError(f"link rendezvous: no value for {key!r} within {timeout:.0f} s")
            return self._values[key]

    def add(self, key: str, amount: int) -> int:
        with self._changed:
            value = int(self._values.get(key, b"0")) + amount
            self._values[key] = str(value).encode()
            self._changed.notify_all()
            return value

    def check(self, keys: list[str]) -> bool:
        with self._changed:
            return all(k in self._values for k in keys)

    def serve(self, conn: Connection, message: dict[str, Any], timeout: float) -> None:
        """Answer one store request from a worker."""
        op, key = message["store"], str(message.get("key", ""))
        if op == "set":
            self.set(key, base64.b64decode(message["value"]))
            conn.send({"ok": True})
        elif op == "get":
            conn.send({"value": base64.b64encode(self.get(key, timeout)).decode()})
        elif op == "add":
            conn.send({"value": self.add(key, int(message["amount"]))})
        elif op == "check":
            conn.send({"value": self.check([str(k) for k in message["keys"]])})
        else:
            conn.refuse(f"unknown store operation {op!r}")


class _Store(dist.Store):
    """A c10d Store for a process group; subclasses say where the keys live."""

    def __init__(self, timeout: float):
        super().__init__()
        self._timeout = timeout

    def wait(self, keys, timeout=None):
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else self._timeout
        for key in keys:
            self._get(key, seconds)

    def get(self, key):
        return self._get(key, self._timeout)

    def _get(self, key: str, timeout: float) -> bytes:
        raise NotImplementedError


class HeadStore(_Store):
    def __init__(self, values: KeyValues, prefix: str, timeout: float):
        super().__init__(timeout)
        self._values, self._prefix = values, prefix

    def set(self, key, value):
        self._values.set(self._prefix + key, _bytes(value))

    def _get(self, key, timeout):
        return self._values.get(self._prefix + key, timeout)

    def add(self, key, amount):
        return self._values.add(self._prefix + key, amount)

    def check(self, keys):
        return self._values.check([self._prefix + k for k in keys])


class WorkerStore(_Store):
    """The head's keys, asked for over the link connection (used only while the group forms)."""

    def __init__(self, conn: Connection, prefix: str, timeout: float):
        super().__init__(timeout)
        self._conn, self._prefix = conn, prefix

    def _ask(self, message: dict[str, Any]) -> Any:
        self._conn.send(message)
        return self._conn.expect("value" if message["store"] != "set" else "ok")

    def set(self, key, value):
        self._ask({"store": "set", "key": self._prefix + key, "value": base64.b64encode(_bytes(value)).decode()})

    def _get(self, key, timeout):
        return base64.b64decode(self._ask({"store": "get", "key": self._prefix + key}))

    def add(self, key, amount):
        return int(self._ask({"store": "add", "key": self._prefix + key, "amount": amount}))

    def check(self, keys):
        return bool(self._ask({"store": "check", "keys": [self._prefix + k for k in keys]}))


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def bind_address_of(conn: Connection) -> str:
    """The local address the connection runs over: the worker's process group listens there only."""
    return conn.sock.getsockname()[0]


def hostname() -> str:
    return os.environ.get("DESKPOD_NODE_NAME") or socket.gethostname()

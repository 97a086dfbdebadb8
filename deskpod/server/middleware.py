"""ASGI middleware around every route: a request id on every response, a body-size limit on /v1, and no
state-changing request from another site's page."""

from __future__ import annotations

import json
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID = b"x-request-id"
MAX_REQUEST_ID = 128  # a client's id longer than this is replaced, not echoed


class RequestId:
    """Every response carries `x-request-id`: the client's own (as vLLM and most gateways echo it), or a new
    one, so that a client's report and the server's log name the same request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID, b"")
        ok = 0 < len(given) <= MAX_REQUEST_ID and all(33 <= c < 127 for c in given)
        request_id = given if ok else uuid.uuid4().hex.encode()
        scope.setdefault("state", {})["request_id"] = request_id.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID, request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimit:
    """Bodies of requests under `prefix` larger than `max_bytes` are answered 413 before the route reads them
    (a prompt larger than any context must not be parsed and tokenized first)."""

    def __init__(self, app: ASGIApp, max_bytes: int, prefix: str = "/v1/"):
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send, len(body))
        replayed = False

        async def replay() -> Message:  # the body once, then the client's own messages (a disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int) -> None:
        message = (f"the request body is {size:,} bytes, more than the {self.max_bytes:,} this server takes "
                   "(deskpod serve --max-request-mb)")
        await _error(send, 413, message, "request_too_large")


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}


class CrossSiteGuard:
    """Two defences for a server that browsers can reach:
    - a request that changes something (POST, PUT, DELETE...) from a page of another origin is refused, unless
      --allowed-origins names that origin: without an API key, a page on any site could otherwise make the
      browser pull, remove or unload models here. Clients that are not browsers send no Origin and pass.
    - a server bound to loopback answers only requests addressed to a loopback name: a site whose name a DNS
      rebinding points at 127.0.0.1 is then same-origin in the browser, but its Host header gives it away."""

    SAFE = {"GET", "HEAD", "OPTIONS"}

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...] = (), loopback_only: bool = False):
        self.app, self.allowed, self.loopback_only = app, set(allowed_origins), loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.loopback_only and host and _hostname(host) not in LOOPBACK_NAMES:
            return await _error(send, 403, f"this server listens on loopback and answers only requests to "
                                           f"localhost or 127.0.0.1, not to {host!r}", "host_not_allowed")
        if scope["method"] in self.SAFE or "*" in self.allowed:
            return await self.app(scope, receive, send)
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin:
            if origin not in self.allowed and (origin == "null" or origin.partition("://")[2] != host):
                message = (f"a request from a page of {origin} may not change anything here: serve with "
                           "--allowed-origins to let that site's pages in")
                return await _error(send, 403, message, "cross_site_request")
        elif headers.get(b"sec-fetch-site") == b"cross-site":
            return await _error(send, 403, "a cross-site request may not change anything here", "cross_site_request")
        await self.app(scope, receive, send)


def _hostname(host: str) -> str:
    """The name in a Host header, without its port (IPv6 literals keep their brackets)."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _error(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

"""ASGI middleware around every route: a request id on every response, a body-size limit on /v1."""

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
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

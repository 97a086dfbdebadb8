"""Every failure leaves the server as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}.

Validation errors become 400 (never FastAPI's 422) naming the field; the engine's refusals map through
`ENGINE_ERRORS`; anything unexpected is a 500 that is logged, and the server goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from deskpod.engine.sampler import InvalidSamplingParams
from deskpod.engine.scheduler import QueueFull
from deskpod.errors import DeskpodError, GenerationFailed, InvalidRequest, ModelNotFound, ModelNotReady, PromptTooLong
from deskpod.server.openai.fields import FieldError

log = logging.getLogger("deskpod.server")

RETRY_AFTER_S = 1  # what a 429 asks the client to wait


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error on /v1 (OpenAI's shape)."""

    error: ErrorDetail


ERROR_MEANINGS = {
    400: "A request field is missing or wrong: `param` names it, `message` says what to fix",
    401: "A missing or wrong API key",
    404: "No such model (the message lists what is served)",
    413: "The request body is larger than `deskpod serve --max-request-mb`",
    429: "The model's queue is full: retry after the Retry-After header's seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI documentation of the errors a route answers with."""
    return {status: {"model": ErrorResponse, "description": ERROR_MEANINGS[status]} for status in statuses}


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code), self.status, headers=self.headers
        )


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# engine refusal -> (HTTP status, OpenAI error type, code, extra headers)
ENGINE_ERRORS: dict[type[DeskpodError], tuple[int, str, str | None, dict[str, str] | None]] = {
    QueueFull: (429, "rate_limit_error", "rate_limit_exceeded", {"Retry-After": str(RETRY_AFTER_S)}),
    PromptTooLong: (400, "invalid_request_error", "context_length_exceeded", None),
    InvalidRequest: (400, "invalid_request_error", "invalid_value", None),
    InvalidSamplingParams: (400, "invalid_request_error", "invalid_value", None),
    ModelNotFound: (404, "invalid_request_error", "model_not_found", None),
    GenerationFailed: (500, "server_error", None, None),
    ModelNotReady: (503, "server_error", "model_not_ready", {"Retry-After": str(RETRY_AFTER_S)}),  # a linked box lost
}


def from_engine_error(error: DeskpodError, param: str | None = None) -> APIError:
    """The APIError for an engine refusal; a DeskpodError not in the table is the client's fault (400)."""
    for cls in type(error).__mro__:
        if cls in ENGINE_ERRORS:
            status, kind, code, headers = ENGINE_ERRORS[cls]
            return APIError(status, str(error), kind, param, code, headers)
    return APIError(400, str(error), param=param)


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, as `param` (dotted field path) and a sentence."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # raised by a model validator on behalf of one field
        loc = [*loc, cause.field]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if first.get("type") == "model_attributes_type" or (param is None and first.get("type") == "missing"):
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    why = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    message = f"{param}: {why}" if param else why
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def on_deskpod(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DeskpodError)
        return from_engine_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/v2"):  # KServe v2 clients read Triton's {"error": "..."}
            what = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
            return JSONResponse({"error": what}, exc.status_code, headers=dict(exc.headers or {}))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})).response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", "server_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(DeskpodError, on_deskpod)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)

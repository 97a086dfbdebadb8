"""Failures as Triton reports them: HTTP status + {"error": "..."}, or a gRPC status code + details."""

from __future__ import annotations

import logging

import grpc
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from deskpod.engine.sampler import InvalidSamplingParams
from deskpod.engine.scheduler import QueueFull
from deskpod.errors import (
    BackendError,
    CorruptModel,
    DeskpodError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    UnsupportedModel,
)
from deskpod.server.errors import APIError

log = logging.getLogger("deskpod.server")


class RequestTooLarge(InvalidRequest):
    """A body over the server's --max-request-mb (413)."""


# error class -> (HTTP status, gRPC code); looked up along the class's MRO, so subclasses inherit
ERRORS: dict[type[Exception], tuple[int, grpc.StatusCode]] = {
    RequestTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    QueueFull: (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ModelNotFound: (404, grpc.StatusCode.NOT_FOUND),
    ModelNotReady: (503, grpc.StatusCode.UNAVAILABLE),
    BackendError: (500, grpc.StatusCode.INTERNAL),
    InvalidRequest: (400, grpc.StatusCode.INVALID_ARGUMENT),
    InvalidSamplingParams: (400, grpc.StatusCode.INVALID_ARGUMENT),
    CorruptModel: (400, grpc.StatusCode.INVALID_ARGUMENT),
    UnsupportedModel: (400, grpc.StatusCode.INVALID_ARGUMENT),
    DeskpodError: (400, grpc.StatusCode.INVALID_ARGUMENT),
}

# HTTP status of an APIError (auth, the LLM engine's refusals) -> gRPC code
HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def classify(error: BaseException) -> tuple[int, grpc.StatusCode, str]:
    """(HTTP status, gRPC code, message) for any error; one we did not expect is logged and a 500."""
    if isinstance(error, APIError):
        return error.status, HTTP_TO_GRPC.get(error.status, grpc.StatusCode.INTERNAL), error.message
    if isinstance(error, HTTPException):
        return error.status_code, HTTP_TO_GRPC.get(error.status_code, grpc.StatusCode.INTERNAL), str(error.detail)
    for cls in type(error).__mro__:
        if cls in ERRORS:
            status, code = ERRORS[cls]
            return status, code, str(error)
    log.error("internal error", exc_info=error)
    return 500, grpc.StatusCode.INTERNAL, f"internal server error: {type(error).__name__}: {error}"


def error_response(error: BaseException) -> JSONResponse:
    status, _, message = classify(error)
    headers = getattr(error, "headers", None) or None
    return JSONResponse({"error": message}, status, headers=headers)

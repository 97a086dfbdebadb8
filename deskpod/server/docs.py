"""/docs: the API's interactive reference (Swagger UI), its assets served from the swagger-ui-bundle
package, so the page works on a machine with no internet."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from deskpod.server.errors import ErrorResponse
from deskpod.server.openai.chat.protocol import ChatCompletionChunk
from deskpod.server.openai.completions.protocol import CompletionResponse

STREAMED = (ChatCompletionChunk, CompletionResponse, ErrorResponse)  # what a stream's events carry
API_DESCRIPTION = """\
OpenAI-compatible routes (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`),
vLLM's `/tokenize` and `/detokenize`, KServe v2 / Triton (`/v2/...`, and over gRPC), Prometheus `/metrics`.
With an API key set, every route but `/health`, `/v2/health/*`, `/openapi.json` and `/docs` needs
`Authorization: Bearer <key>`. Errors are `{"error": {"message", "type", "param", "code"}}` on `/v1`.
"""


def install_docs(app: FastAPI) -> None:
    import swagger_ui_bundle

    app.openapi = lambda: _without_422(app)  # type: ignore[method-assign]

    app.mount("/docs/assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="deskpod API",
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")


def _without_422(app: FastAPI) -> dict:
    """The document FastAPI makes, less the 422 it gives every route with a body (deskpod answers a bad body
    with a 400, OpenAI's status, documented per route), plus the schemas of the stream's chunks."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for model in STREAMED:
            found = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            components.update(found.pop("$defs", {}))
            components[model.__name__] = found
        app.openapi_schema = schema
    return app.openapi_schema


def sse_events(chunk: str) -> dict:
    """The schema of each server-sent event of a stream of `chunk`s: its data is a chunk (JSON), an error
    body, or the closing [DONE]."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"type": "string", "anyOf": [{"const": "[DONE]"},
                                        {"contentMediaType": "application/json", "contentSchema": payload}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}

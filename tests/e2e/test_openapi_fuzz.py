"""schemathesis over the server's own /openapi.json: requests generated from the documented schemas (and
from the bodies next to them) get no 5xx, and every response matches what the document says, errors
included (the 400/401/404/413/429 bodies the routes document).

Every check runs but `positive_data_acceptance` (a request valid for the schema must not get a 400): the
API has rules no JSON schema expresses — top_logprobs needs logprobs, one structured output at a time, a
regex or grammar must compile, continue_final_message needs the assistant's message last — and a 400 naming
the field is their right answer.

The server runs a tiny random Llama (tests/support/tiny_llama.py) so that thousands of generated requests
stay within the suite's time; the schema is narrowed on the test's side to that model's name (random names
would all be 404s) and to small lengths and counts, which bounds the work each request can ask for."""

from __future__ import annotations

import copy

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from support.tiny_llama import write_tiny_llama

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (a test dependency) is not installed")
from schemathesis.checks import positive_data_acceptance  # noqa: E402

OPERATIONS = ["POST /v1/chat/completions", "POST /v1/completions", "POST /tokenize", "POST /detokenize",
              "GET /v1/models", "GET /v1/models/{model}"]
EXAMPLES = 60  # per operation: about half a minute in all here
BOUNDS = {"max_tokens": 8, "max_completion_tokens": 8, "n_predict": 8, "min_tokens": 8, "n": 2, "truncate_prompt_tokens": 64}


@pytest.fixture(scope="module")
def tiny_server(serve, store, tmp_path_factory):
    store.pull(str(write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")), name="tiny", progress=False)
    return serve(["tiny", "--kv-cache-gb", "0.05", "--max-request-mb", "1"], api_key="fuzz-key")


def narrowed(document: dict) -> dict:
    """The document with `model` fixed to the served model and lengths bounded (the test's own limits)."""
    document = copy.deepcopy(document)
    for schema in document["components"]["schemas"].values():
        properties = schema.get("properties", {})
        if "model" in properties and schema.get("title", "").endswith("Request"):
            properties["model"] = {"type": "string", "enum": ["tiny"]}
        for name, most in BOUNDS.items():
            for option in [properties[name], *properties[name].get("anyOf", [])] if name in properties else []:
                if option.get("type") == "integer":
                    option["maximum"] = min(option.get("maximum", most), most)
        if "prompt" in properties:
            properties["prompt"] = {"type": "string", "maxLength": 200}
        if "messages" in properties:
            properties["messages"] = {"type": "array", "minItems": 1, "maxItems": 3,
                                      "items": {"$ref": "#/components/schemas/ChatMessage"}}
    return document


@pytest.mark.parametrize("operation", OPERATIONS)
def test_generated_requests_get_documented_answers(tiny_server, operation):
    document = httpx.get(f"{tiny_server.url}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(narrowed(document))
    method, path = operation.split(" ")
    strategy = schema[path][method].as_strategy()
    headers = {"Authorization": "Bearer fuzz-key"}

    # No shrinking: a failure is reported as generated, at once (shrinking a request that timed out would
    # repeat the wait dozens of times)
    @given(case=strategy)
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))
    def check(case) -> None:
        # A generous timeout: on a busy 2-core runner one generated request can wait behind the suite's
        # other servers for longer than the client's default of 10 s.
        try:
            case.call_and_validate(base_url=tiny_server.url, headers=headers, timeout=120,
                                   excluded_checks=[positive_data_acceptance])
        except Exception as e:
            if "timeout" not in type(e).__name__.lower() and "timed out" not in str(e):
                raise
            log = tiny_server.log.read_text().splitlines()[-40:]
            raise AssertionError(f"no answer in 120 s to {case.method} {case.path} {case.body!r}; the server's "
                                 "log ends:\n" + "\n".join(log)) from e

    check()

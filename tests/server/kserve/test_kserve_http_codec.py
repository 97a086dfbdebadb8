"""The v2 HTTP body <-> InferRequest / InferResponse, against the bodies the official tritonclient builds
and parses (binary tensor data extension and JSON)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from deskpod.backends.types import InferResponse
from deskpod.errors import InvalidRequest
from deskpod.server.kserve import http_codec
from deskpod.server.kserve.http_codec import OutputFormat

IMAGE = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
WORDS = np.array([b"alpha", b"", "\u00e9t\u00e9".encode()], dtype=object)


def client_body(binary: bool, outputs: list | None = None) -> tuple[bytes, int | None]:
    image = httpclient.InferInput("image", list(IMAGE.shape), "FP32")
    image.set_data_from_numpy(IMAGE, binary_data=binary)
    words = httpclient.InferInput("words", [3], "BYTES")
    words.set_data_from_numpy(WORDS, binary_data=binary)
    return httpclient.InferenceServerClient.generate_request_body(
        [image, words], outputs=outputs, request_id="r1", parameters={"temperature": 0.5}
    )


@pytest.mark.parametrize("binary", [True, False])
def test_decodes_what_tritonclient_sends(binary: bool) -> None:
    body, header_length = client_body(binary)
    assert (header_length is not None) == binary
    request, fmt = http_codec.decode_request(body, None if header_length is None else str(header_length), "m", "2")
    assert (request.model, request.version, request.id, request.outputs) == ("m", "2", "r1", None)
    np.testing.assert_array_equal(request.inputs["image"], IMAGE)
    assert request.inputs["image"].dtype == np.float32
    assert request.inputs["words"].tolist() == WORDS.tolist()
    assert request.parameters == {"temperature": 0.5}  # binary_data_output is the protocol's, not the model's
    assert fmt.binary_default  # no outputs named: tritonclient asks for all of them in binary


def test_requested_outputs_and_their_format() -> None:
    outputs = [httpclient.InferRequestedOutput("a", binary_data=False), httpclient.InferRequestedOutput("b")]
    body, length = client_body(True, outputs)
    request, fmt = http_codec.decode_request(body, str(length), "m")
    assert request.outputs == ("a", "b")
    assert not fmt.is_binary("a") and fmt.is_binary("b")


def response() -> InferResponse:
    return InferResponse(model="m", version="1", id="r1", outputs={"image": IMAGE, "words": WORDS})


@pytest.mark.parametrize("fmt", [OutputFormat(True), OutputFormat(False), OutputFormat(False, {"words": True})])
def test_tritonclient_reads_the_response(fmt: OutputFormat) -> None:
    body, header_length = http_codec.encode_response(response(), fmt)
    assert (header_length is None) == (not fmt.binary_default and not fmt.binary)
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("image"), IMAGE)
    words = [w if isinstance(w, bytes) else w.encode() for w in result.as_numpy("words")]  # JSON gives str
    assert words == WORDS.tolist()
    assert result.get_response()["model_name"] == "m" and result.get_response()["id"] == "r1"


def test_json_only_response_is_plain_json() -> None:
    body, header_length = http_codec.encode_response(response(), OutputFormat())
    assert header_length is None
    out = json.loads(body)["outputs"]
    assert out[0] == {"name": "image", "datatype": "FP32", "shape": [2, 3, 4], "data": IMAGE.ravel().tolist()}
    assert out[1]["data"] == ["alpha", "", "\u00e9t\u00e9"]


def with_header(header: dict, blob: bytes = b"") -> tuple[bytes, str | None]:
    text = json.dumps(header).encode()
    return text + blob, (str(len(text)) if blob else None)


FP32x2 = {"name": "x", "shape": [2], "datatype": "FP32"}


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b"not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object"),
        (b'{"inputs": {}}', None, "`inputs` must be a list"),
        (b'{"id": "x"}', None, "the body needs `inputs`"),
        (b'{"inputs": [{"shape": [1]}]}', None, "inputs[0] needs a `name`"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32"}]}', None, "input `x` needs a `shape`"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "neither `data` nor"),
        (*with_header({"inputs": [FP32x2 | {"data": [1, 2]}, FP32x2 | {"data": [1, 2]}]}), "given twice"),
        # the header lies about the sizes of what follows
        (*with_header({"inputs": [FP32x2 | {"parameters": {"binary_data_size": 8}}]}, b"\0" * 12),
         "12 bytes of binary data after the JSON header, but the inputs' binary_data_size add up to 8"),
        (*with_header({"inputs": [FP32x2 | {"parameters": {"binary_data_size": 16}}]}, b"\0" * 8),
         "binary_data_size is 16, but only 8 bytes"),
        (*with_header({"inputs": [FP32x2 | {"parameters": {"binary_data_size": 4}}]}, b"\0" * 4),
         "4 bytes of data, but shape [2] of FP32 needs 8"),
        (*with_header({"inputs": [FP32x2 | {"parameters": {"binary_data_size": "8"}}]}, b"\0" * 8),
         "binary_data_size must be an integer"),
        (b'{"inputs": []}', "500", "Inference-Header-Content-Length is 500, but the body holds 14 bytes"),
        (b'{"inputs": []}', "x", "must be an integer"),
        (b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 0}}]}', None,
         "output `y`: `classification` must be an integer >= 1"),
        (b'{"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": "3"}}]}', None,
         "must be an integer >= 1 (the classes to return), got '3'"),
        (b'{"inputs": [], "parameters": 5}', None, "`parameters` must be a JSON object"),
    ],
)
def test_bad_bodies_say_what_is_wrong(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        http_codec.decode_request(body, header_length, "m")
    assert message in str(e.value)

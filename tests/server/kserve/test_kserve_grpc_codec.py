"""gRPC ModelInferRequest / ModelInferResponse <-> InferRequest / InferResponse, with the messages the
official tritonclient builds (raw contents) and reads, and typed contents as other clients send them."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc._infer_result import InferResult
from tritonclient.grpc._utils import _get_inference_request

from deskpod.backends.types import InferResponse
from deskpod.errors import InvalidRequest
from deskpod.server.kserve import grpc_codec

IMAGE = np.arange(12, dtype=np.float16).reshape(3, 4)
WORDS = np.array([b"x", b"", b"yz"], dtype=object)


def client_request() -> pb.ModelInferRequest:
    image = grpcclient.InferInput("image", [3, 4], "FP16")
    image.set_data_from_numpy(IMAGE)
    words = grpcclient.InferInput("words", [3], "BYTES")
    words.set_data_from_numpy(WORDS)
    outputs = [grpcclient.InferRequestedOutput("out")]
    return _get_inference_request("m", [image, words], "3", "id7", outputs, 0, False, False, 0, None, {"seed": 4})


def test_decodes_tritonclient_raw_contents() -> None:
    request = grpc_codec.decode_request(client_request())
    assert (request.model, request.version, request.id, request.outputs) == ("m", "3", "id7", ("out",))
    np.testing.assert_array_equal(request.inputs["image"], IMAGE)
    assert request.inputs["words"].tolist() == WORDS.tolist()
    assert request.parameters == {"seed": 4}


def test_decodes_typed_contents() -> None:
    message = pb.ModelInferRequest(model_name="m")
    message.inputs.add(name="a", datatype="INT32", shape=[2, 2]).contents.int_contents.extend([1, 2, 3, 4])
    message.inputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"p", b"q"])
    message.inputs.add(name="b", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    request = grpc_codec.decode_request(message)
    np.testing.assert_array_equal(request.inputs["a"], [[1, 2], [3, 4]])
    assert request.inputs["a"].dtype == np.int32
    assert request.inputs["s"].tolist() == [b"p", b"q"] and request.inputs["b"].tolist() == [True]


def test_tritonclient_reads_the_response() -> None:
    response = InferResponse(
        model="m", version="1", id="id7", outputs={"image": IMAGE, "words": WORDS}, parameters={"final": True}
    )
    result = InferResult(grpc_codec.encode_response(response))
    np.testing.assert_array_equal(result.as_numpy("image"), IMAGE)
    assert result.as_numpy("words").tolist() == WORDS.tolist()
    assert result.get_response().parameters["final"].bool_param is True


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: m.raw_input_contents.append(b"\0" * 4), "2 inputs outside shared memory but 1 raw_input_contents"),
        (lambda m: m.inputs[0].contents.fp32_contents.append(1.0), "FP16 must be sent in raw_input_contents"),
        (lambda m: (m.inputs[1].contents.int_contents.extend([1, 2]), m.inputs.pop(0)), "holds 2 values, but shape [3] needs 3"),
        (lambda m: (m.inputs[1].contents.int_contents.extend([1, 2, 3]), m.raw_input_contents.extend([b"\0" * 4, b"\0" * 12])),
         "input `i` has both `contents` and raw_input_contents"),
    ],
)
def test_bad_requests_say_what_is_wrong(build, message: str) -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype="FP16", shape=[2])
    request.inputs.add(name="i", datatype="INT32", shape=[3])
    build(request)
    with pytest.raises(InvalidRequest) as e:
        grpc_codec.decode_request(request)
    assert message in str(e.value)


def test_raw_size_lie_is_refused() -> None:
    request = client_request()
    request.raw_input_contents[0] = request.raw_input_contents[0][:-2]
    with pytest.raises(InvalidRequest, match="input `image`: 22 bytes of data, but shape \\[3, 4\\] of FP16 needs 24"):
        grpc_codec.decode_request(request)

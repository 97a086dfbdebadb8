"""System shared memory with the official clients and their own shm utilities (tritonclient.utils.shared_memory),
over HTTP and gRPC: regions registered, inputs read from them, outputs written into them, status and
unregister, every bound checked; CUDA shared memory refused where there is no GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from kserve_models import pair, refused, shared_server

PROTOCOLS = {"http": httpclient, "grpc": grpcclient}


@pytest.fixture(scope="module")
def kserve(serve, tmp_path_factory):
    return shared_server("main", serve, tmp_path_factory)


@pytest.fixture(params=["http", "grpc"])
def protocol(request, kserve):
    module = PROTOCOLS[request.param]
    client = module.InferenceServerClient(kserve.http_url if request.param == "http" else kserve.grpc_url)
    yield module, client
    client.unregister_system_shared_memory()
    client.close()


@pytest.fixture
def regions():
    made = []

    def make(name: str, size: int):
        made.append(shm.create_shared_memory_region(name, f"/dp_test_{os.getpid()}_{name}", size))
        return made[-1], f"/dp_test_{os.getpid()}_{name}"

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def test_inputs_and_outputs_through_shared_memory(protocol, regions):
    module, client = protocol
    a, b = pair(1)
    input_region, input_key = regions("in", 32)
    output_region, output_key = regions("out", 32)
    shm.set_shared_memory_region(input_region, [a, b])
    client.register_system_shared_memory("in", input_key, 32)
    client.register_system_shared_memory("out", output_key, 32)
    inputs = [module.InferInput("INPUT0", [1, 4], "FP32"), module.InferInput("INPUT1", [1, 4], "FP32")]
    inputs[0].set_shared_memory("in", 16)
    inputs[1].set_shared_memory("in", 16, offset=16)
    outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]
    outputs[0].set_shared_memory("out", 16)
    outputs[1].set_shared_memory("out", 16, offset=16)
    result = client.infer("add_sub", inputs, outputs=outputs)
    out0 = result.get_output("OUTPUT0")
    shape = out0["shape"] if isinstance(out0, dict) else list(out0.shape)
    assert shape == [1, 4]
    np.testing.assert_allclose(shm.get_contents_as_numpy(output_region, np.float32, [1, 4]), a + b, rtol=1e-6)
    np.testing.assert_allclose(shm.get_contents_as_numpy(output_region, np.float32, [1, 4], offset=16), a - b, rtol=1e-6)

    status = client.get_system_shared_memory_status()
    names = {r["name"] for r in status} if isinstance(status, list) else set(status.regions)
    assert names == {"in", "out"}
    client.unregister_system_shared_memory("in")
    error = refused(lambda: client.infer("add_sub", inputs, outputs=outputs))
    assert "Unable to find system shared memory region: 'in'" in error.message()


def test_bounds_are_checked(protocol, regions):
    module, client = protocol
    _, key = regions("small", 16)
    assert "does not fit" in refused(lambda: client.register_system_shared_memory("big", key, 64)).message()
    client.register_system_shared_memory("small", key, 16)
    assert "already in manager" in refused(lambda: client.register_system_shared_memory("small", key, 16)).message()
    a, b = pair(1)
    inputs = [module.InferInput("INPUT0", [1, 4], "FP32"), module.InferInput("INPUT1", [1, 4], "FP32")]
    inputs[0].set_shared_memory("small", 16, offset=8)  # reaches 8 bytes past the region
    inputs[1].set_data_from_numpy(b)
    assert "reach past the end of shared memory region 'small'" in refused(lambda: client.infer("add_sub", inputs)).message()
    inputs[0].set_data_from_numpy(a)
    outputs = [module.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory("small", 8)  # the output needs 16
    message = refused(lambda: client.infer("add_sub", inputs, outputs=outputs)).message()
    assert "should be at least 16 bytes to hold the results" in message
    escape = refused(lambda: client.register_system_shared_memory("x", "/../etc/passwd", 8)).message()
    assert "must be a POSIX shared memory name" in escape


def test_cuda_shared_memory_is_refused_without_a_gpu(protocol):
    module, client = protocol
    message = refused(lambda: client.get_cuda_shared_memory_status()).message()
    assert "no CUDA GPU" in message

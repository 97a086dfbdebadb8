"""inference.GRPCInferenceService (Triton's gRPC API, from tritonclient's generated modules) and the
standard grpc.health.v1 service, on a grpc.aio server sharing the HTTP server's event loop.

Each RPC is a thin adapter over KServeServing; errors become status codes (NOT_FOUND, INVALID_ARGUMENT,
UNAVAILABLE, INTERNAL...) with the same message the HTTP API gives. With an API key, every call but the
health service's needs the metadata `authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from dataclasses import replace
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from deskpod.server.kserve import grpc_codec
from deskpod.server.kserve.errors import classify
from deskpod.server.kserve.serving import KServeServing
from deskpod.server.kserve.shared_memory import CUDA_REFUSAL

SERVICE = "inference.GRPCInferenceService"
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"  # a stream request's parameter (tritonclient's name)
FINAL_RESPONSE = "triton_final_response"  # each response's parameter then
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def rpc(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Any error of a unary call -> its status code and message."""

    @functools.wraps(method)
    async def call(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as e:
            _, code, message = classify(e)
            await context.abort(code, message)

    return call


def tensor_metadata(entries: list[dict]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in entries]


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, kserve: KServeServing):
        self.kserve = kserve

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.kserve.server_metadata())

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.kserve.model_ready(request.name, request.version))

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.kserve.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta.get("versions", []),
            platform=meta.get("platform", ""),
            inputs=tensor_metadata(meta.get("inputs", [])),
            outputs=tensor_metadata(meta.get("outputs", [])),
        )

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self.kserve.model_config(request.name, request.version))

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        stats = self.kserve.statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        models = [pb.RepositoryIndexResponse.ModelIndex(**entry) for entry in self.kserve.index(request.ready)]
        return pb.RepositoryIndexResponse(models=models)

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        config = request.parameters["config"].string_param if "config" in request.parameters else None
        await self.kserve.load(request.model_name, config)
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.kserve.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        shm = self.kserve.shared_memory
        response = await self.kserve.infer(grpc_codec.decode_request(request, shm))
        return grpc_codec.encode_response(response, grpc_codec.shared_outputs(request), shm)

    # --- system shared memory (CUDA shared memory is refused: no GPU here) ---------------------------

    @rpc
    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: Any) -> pb.SystemSharedMemoryRegisterResponse:
        self.kserve.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: Any) -> pb.SystemSharedMemoryStatusResponse:
        reply = pb.SystemSharedMemoryStatusResponse()
        for region in self.kserve.shared_memory.status(request.name or None):
            reply.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return reply

    @rpc
    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: Any) -> pb.SystemSharedMemoryUnregisterResponse:
        self.kserve.shared_memory.unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, CUDA_REFUSAL)

    CudaSharedMemoryStatus = CudaSharedMemoryUnregister = CudaSharedMemoryRegister

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently; their responses (an LLM's: one per piece of text; a decoupled model's: as it
        sends them) are written as they come. A failing request is an error_message on the stream, which goes on,
        as in Triton. A request with `triton_enable_empty_final_response` gets `triton_final_response` on each
        response, and the empty final one a decoupled model may end with."""
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def run(request: pb.ModelInferRequest) -> None:
            try:
                shm, shared = self.kserve.shared_memory, grpc_codec.shared_outputs(request)
                decoded = grpc_codec.decode_request(request, shm)
                flag_final = bool(decoded.parameters.get(EMPTY_FINAL_RESPONSE))
                async for response in self.kserve.infer_stream(decoded):
                    if response.final and not response.outputs and not flag_final:
                        continue  # a final flag without a response: nothing to send unless asked for
                    if flag_final:
                        response = replace(response, parameters={**response.parameters, FINAL_RESPONSE: response.final})
                    queue.put_nowait(pb.ModelStreamInferResponse(
                        infer_response=grpc_codec.encode_response(response, shared, shm)))
            except Exception as e:
                queue.put_nowait(pb.ModelStreamInferResponse(error_message=classify(e)[2]))

        async def read() -> None:
            async for request in requests:
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks))
            queue.put_nowait(None)  # the client closed its side and every request is answered

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            for task in [reader, *tasks]:
                task.cancel()  # the client left: abort what still runs (an LLM request frees its KV blocks)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <key>`, the health service's excepted."""

    def __init__(self, key: str):
        self.key = key.encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or self._allowed(details):
            return handler
        return _refusal(handler)

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        metadata = dict(details.invocation_metadata or ())
        scheme, _, given = str(metadata.get("authorization", "")).partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.key)


REFUSAL = "missing or wrong API key: send the metadata 'authorization: Bearer <key>'"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only says UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield None  # pragma: no cover - abort raises

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        streaming if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def start_grpc_server(
    kserve: KServeServing, host: str, port: int, api_key: str | None = None
) -> grpc.aio.Server:
    """A started grpc.aio server on host:port (in the running loop); stop it with `await server.stop(grace)`.
    Messages up to the server's request limit are accepted (larger ones: RESOURCE_EXHAUSTED)."""
    size = kserve.limits.max_request_bytes
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_key)] if api_key else [],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(kserve), server)
    health = health_aio.HealthServicer()
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address}: is the port in use? Choose another with --grpc-port")
    await server.start()
    return server

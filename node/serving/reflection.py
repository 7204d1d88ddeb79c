"""Server reflection under both service names: `grpc.reflection.v1` and `v1alpha`.

grpcio-reflection ships only the v1alpha service; current grpcurl and other clients ask for v1
first. The two protocols are the same messages under another package name (the v1 proto is a
copy of v1alpha's), so one servicer answers both, the v1 method registered with v1alpha's
message codecs.
"""
from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, reflection.SERVICE_NAME)


def enable(service_names: list[str], server: grpc.Server) -> None:
    """Serves reflection for `service_names` (plus both reflection services) on `server`."""
    names = list(service_names) + [n for n in SERVICE_NAMES if n not in service_names]
    servicer = reflection.ReflectionServicer(names)
    for name in SERVICE_NAMES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
        }),))

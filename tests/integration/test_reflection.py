"""The reflection client flow a tool like grpcurl runs, under both reflection service names:
list the services, describe a method, and call Put and Get built from the descriptors alone."""
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from sealkv.node.security import tls
from tests.cluster import running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("reflection")), 1) as c:
        yield c


def _ask(channel, service, **request):
    info = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    (answer,) = list(info(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10))
    return answer


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection",
                                     "grpc.reflection.v1alpha.ServerReflection"])
def test_list_describe_and_call_from_descriptors_alone(cluster, service):
    node = next(iter(cluster.nodes.values()))
    with tls.channel(node.grpc, cluster.tls_files) as channel:
        listed = _ask(channel, service, list_services="")
        names = {s.name for s in listed.list_services_response.service}
        assert {"sealkv.v1.KV", "sealkv.v1.Cluster", "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= names

        files = _ask(channel, service, file_containing_symbol="sealkv.v1.KV")
        pool = descriptor_pool.DescriptorPool()
        pending = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                   for raw in files.file_descriptor_response.file_descriptor_proto]
        while pending:  # dependencies first, whatever order they came in
            progress = []
            for proto in pending:
                try:
                    pool.Add(proto)
                except TypeError:
                    continue
                progress.append(proto)
            assert progress, "a dependency was missing from the reflection answer"
            pending = [p for p in pending if p not in progress]
        kv = pool.FindServiceByName("sealkv.v1.KV")
        put, get = kv.methods_by_name["Put"], kv.methods_by_name["Get"]
        assert put.input_type.fields_by_name["key"].type == put.input_type.fields_by_name[
            "key"].TYPE_BYTES

        def call(method, **fields):
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            stub = channel.unary_unary(f"/sealkv.v1.KV/{method.name}",
                                       request_serializer=request_cls.SerializeToString,
                                       response_deserializer=response_cls.FromString)
            return stub(request_cls(**fields), timeout=10)

        key = f"reflection/{service}".encode()
        assert call(put, key=key, value=b"from descriptors").header.revision > 0
        answer = call(get, key=key)
        assert answer.found and answer.kv.value == b"from descriptors"

"""KV behaviour through real gRPC against a real 3-process cluster."""
import grpc
import pytest

from sealkv.node import errors
from sealkv.node.security import tls
from sealkv.node.client import LINEARIZABLE, SERIALIZABLE, Client
from sealkv.node.config import MAX_KEY_BYTES, MAX_VALUE_BYTES
from tests.cluster import free_port, wait_for

pytestmark = pytest.mark.integration


def test_put_on_any_node_is_read_linearizably_from_every_node(cluster3):
    for writer in ("n1", "n2", "n3"):
        key = f"from-{writer}".encode()
        with cluster3.client(writer) as c:
            put = c.put(key, b"value-" + key)
        assert put.header.revision > 0
        for reader in ("n1", "n2", "n3"):
            with cluster3.client(reader) as c:
                got = c.get(key)
            assert got.found and got.kv.value == b"value-" + key
            assert got.kv.mod_revision == put.header.revision
            assert got.header.revision >= put.header.revision
            assert got.header.member_id == reader


def test_serializable_read_is_served_locally_and_converges(cluster3):
    with cluster3.client("n1") as c:
        put = c.put(b"s", b"1")
    with cluster3.client("n3") as c:
        got = wait_for(lambda: (lambda r: r if r.found else None)(c.get(b"s", SERIALIZABLE)),
                       10, "the write to reach n3")
    assert got.kv.value == b"1" and got.kv.mod_revision == put.header.revision


def test_revisions_versions_and_prev_kv(cluster3):
    with cluster3.client() as c:
        first = c.put(b"k", b"a")
        second = c.put(b"k", b"b", prev_kv=True)
        assert second.prev_kv.value == b"a"
        assert second.header.revision > first.header.revision
        kv = c.get(b"k").kv
        assert (kv.create_revision, kv.mod_revision, kv.version) == (
            first.header.revision, second.header.revision, 2)
        deleted = c.delete(b"k", prev_kv=True)
        assert deleted.deleted == 1 and deleted.prev_kv.value == b"b"
        assert not c.get(b"k").found
        assert c.delete(b"k").deleted == 0
        again = c.put(b"k", b"c")
        assert c.get(b"k").kv.create_revision == again.header.revision


def test_compare_and_swap_conflict(cluster3):
    with cluster3.client() as c:
        created = c.compare_and_swap(b"cas", b"v1", must_not_exist=True)
        assert created.succeeded and created.kv.value == b"v1"
        rev = created.kv.mod_revision
        assert not c.compare_and_swap(b"cas", b"other", must_not_exist=True).succeeded
        ok = c.compare_and_swap(b"cas", b"v2", expected_mod_revision=rev)
        assert ok.succeeded and ok.kv.mod_revision > rev
        conflict = c.compare_and_swap(b"cas", b"v3", expected_mod_revision=rev)
        assert not conflict.succeeded
        assert conflict.kv.value == b"v2" and conflict.kv.mod_revision == ok.kv.mod_revision
        assert c.get(b"cas").kv.value == b"v2"


def test_range(cluster3):
    with cluster3.client() as c:
        for name in (b"a/1", b"a/2", b"a/3", b"b/1", b"a\xff"):
            c.put(name, b"v-" + name)
        prefix = c.range(b"a/", prefix=True)
        assert [kv.key for kv in prefix.kvs] == [b"a/1", b"a/2", b"a/3"]
        assert prefix.count == 3 and not prefix.more
        window = c.range(b"a/2", range_end=b"b/2")
        assert [kv.key for kv in window.kvs] == [b"a/2", b"a/3", b"a\xff", b"b/1"]
        limited = c.range(b"a/", prefix=True, limit=2, keys_only=True)
        assert [kv.key for kv in limited.kvs] == [b"a/1", b"a/2"]
        assert limited.more and limited.count == 3 and all(kv.value == b"" for kv in limited.kvs)
        everything = c.range(b"", range_end=b"\0", consistency=SERIALIZABLE)
        assert everything.count == 5
        assert [kv.key for kv in c.range(b"b/1").kvs] == [b"b/1"]


def test_one_mebibyte_value_round_trips(cluster3):
    value = bytes(range(256)) * (MAX_VALUE_BYTES // 256)
    with cluster3.client() as c:
        c.put(b"big", value)
        assert c.get(b"big").kv.value == value


@pytest.mark.parametrize("call, message", [
    (lambda c: c.put(b"", b"v"), "key must not be empty"),
    (lambda c: c.put(b"x" * (MAX_KEY_BYTES + 1), b"v"), "the limit is 4096"),
    (lambda c: c.put(b"k", b"v" * (MAX_VALUE_BYTES + 1)), "the limit is 1048576"),
    (lambda c: c.get(b""), "key must not be empty"),
    (lambda c: c.delete(b""), "key must not be empty"),
    (lambda c: c.compare_and_swap(b"k", b"v"), "set expected_mod_revision or must_not_exist"),
    (lambda c: c.compare_and_swap(b"k", b"v", expected_mod_revision=0), "must be positive"),
    (lambda c: c.range(b"b", range_end=b"a"), "range_end must be greater than key"),
    (lambda c: c.range(b"a", prefix=True, limit=-1), "limit must not be negative"),
    (lambda c: c.range(b"a", prefix=True, limit=10**6), "the maximum is 10000"),
    (lambda c: c.get(b"k", consistency=7), "unknown consistency"),
])
def test_bad_input_is_invalid_argument_and_changes_nothing(cluster3, call, message):
    # Settled first: a follower applies the leader's last entry a few ms after the leader.
    cluster3.wait_applied_everywhere()
    with cluster3.client() as c:
        before = c.status().applied_index
        with pytest.raises(errors.InvalidArgument, match=message):
            call(c)
        assert c.status().applied_index == before
        assert c.range(b"", range_end=b"\0").count == 0


def test_malformed_request_is_refused_and_changes_nothing(cluster3):
    node = cluster3.nodes["n1"]
    with tls.channel(node.grpc, cluster3.tls_files) as ch:
        raw_put = ch.unary_unary("/sealkv.v1.KV/Put", request_serializer=lambda b: b,
                                 response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            raw_put(b"\xff\xff\xff\xff not a protobuf", timeout=5)
    assert info.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    with cluster3.client() as c:
        assert c.range(b"", range_end=b"\0").count == 0


def test_unreachable_endpoint_is_unavailable():
    with Client([f"127.0.0.1:{free_port()}"], timeout=2) as c:
        with pytest.raises(errors.Unavailable):
            c.put(b"k", b"v")


def test_client_fails_over_to_a_live_endpoint(cluster3):
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead, cluster3.nodes["n2"].grpc], timeout=3, **cluster3.client_kwargs) as c:
        c.put(b"k", b"v")
        assert c.get(b"k", LINEARIZABLE).kv.value == b"v"

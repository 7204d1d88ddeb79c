"""The KV Batch stream through real gRPC against a real 3-process cluster."""
import queue

import grpc
import pytest

from sealkv.node.config import MAX_VALUE_BYTES
from sealkv.node.security import tls
from sealkv.v1 import kv_pb2, kv_pb2_grpc
from tests.cluster import running_cluster

pytestmark = pytest.mark.integration

OK = 0
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("batch"))) as c:
        yield c


class Stream:
    """One raw Batch stream: send messages, collect answers by id (for tests only)."""

    def __init__(self, endpoint: str, files=None):
        self.channel = tls.channel(endpoint, files)
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.responses = kv_pb2_grpc.KVStub(self.channel).Batch(iter(self.outbox.get, None),
                                                                timeout=30)
        self.order: list[int] = []

    def send(self, *ops) -> None:
        self.outbox.put(kv_pb2.BatchRequest(requests=list(ops)))

    def collect(self, n: int) -> dict:
        answers = {}
        while len(answers) < n:
            for op in next(self.responses).responses:
                assert op.id not in answers, f"id {op.id} answered twice"
                answers[op.id] = op
                self.order.append(op.id)
        return answers

    def close(self) -> None:
        self.outbox.put(None)
        assert list(self.responses) == []  # the node ends the stream once all are answered
        self.channel.close()


def op(op_id, **kw):
    return kv_pb2.RequestOp(id=op_id, **kw)


def ok(answer, kind):
    assert answer.status.code == OK, answer.status.message
    assert answer.WhichOneof("response") == kind
    return getattr(answer, kind)


def test_mixed_operations_in_one_message_each_answered_by_id(cluster):
    # A follower: writes are forwarded as with unary.
    s = Stream(cluster.nodes["n2"].grpc, cluster.tls_files)
    s.send(op(10, put=kv_pb2.PutRequest(key=b"mix/a", value=b"1")),
           op(11, put=kv_pb2.PutRequest(key=b"mix/b", value=b"2")),
           op(12, compare_and_swap=kv_pb2.CompareAndSwapRequest(key=b"mix/c", value=b"3",
                                                               must_not_exist=True)))
    first = s.collect(3)
    assert ok(first[12], "compare_and_swap").succeeded
    rev_b = ok(first[11], "put").header.revision
    s.send(op(20, get=kv_pb2.GetRequest(key=b"mix/b")),
           op(21, range=kv_pb2.RangeRequest(key=b"mix/", prefix=True)),
           op(22, delete=kv_pb2.DeleteRequest(key=b"mix/a", prev_kv=True)),
           op(23, get=kv_pb2.GetRequest(key=b"mix/none", consistency=kv_pb2.SERIALIZABLE)))
    second = s.collect(4)
    got = ok(second[20], "get")
    assert got.found and got.kv.value == b"2" and got.kv.mod_revision == rev_b
    assert [kv.key for kv in ok(second[21], "range").kvs] == [b"mix/a", b"mix/b", b"mix/c"] \
        or [kv.key for kv in ok(second[21], "range").kvs] == [b"mix/b", b"mix/c"]
    deleted = ok(second[22], "delete")
    assert deleted.deleted == 1 and deleted.prev_kv.value == b"1"
    assert not ok(second[23], "get").found
    s.close()


def test_bad_requests_fail_alone_and_are_answered_before_slower_siblings(cluster):
    s = Stream(cluster.nodes["n1"].grpc, cluster.tls_files)
    s.send(op(1, put=kv_pb2.PutRequest(key=b"bad/ok", value=b"v")),
           op(2, put=kv_pb2.PutRequest(key=b"", value=b"v")),
           op(3),
           op(4, get=kv_pb2.GetRequest(key=b"bad/ok", consistency=7)),
           op(5, put=kv_pb2.PutRequest(key=b"bad/big", value=b"x" * (MAX_VALUE_BYTES + 1))),
           op(6, range=kv_pb2.RangeRequest(key=b"b", range_end=b"a")),
           op(7, compare_and_swap=kv_pb2.CompareAndSwapRequest(key=b"bad/c", value=b"v")))
    answers = s.collect(7)
    assert ok(answers[1], "put").header.revision > 0
    messages = {i: answers[i].status.message for i in range(2, 8)}
    for i in range(2, 8):
        assert answers[i].status.code == INVALID_ARGUMENT, (i, messages[i])
        assert answers[i].WhichOneof("response") is None
    assert "empty" in messages[2] and "no operation" in messages[3]
    assert "consistency" in messages[4] and "limit" in messages[5]
    assert "range_end" in messages[6] and "expected_mod_revision" in messages[7]
    # Refused at validation, the bad ones cannot wait for the write's Raft entry: answers
    # come out of order, by id.
    assert s.order.index(1) > max(s.order.index(i) for i in range(2, 8))
    s.close()


def test_a_failed_compare_does_not_fail_its_siblings(cluster):
    s = Stream(cluster.nodes["n1"].grpc, cluster.tls_files)
    s.send(op(1, put=kv_pb2.PutRequest(key=b"cas/k", value=b"v1")))
    rev = ok(s.collect(1)[1], "put").header.revision
    s.send(op(2, compare_and_swap=kv_pb2.CompareAndSwapRequest(
               key=b"cas/k", value=b"lost", expected_mod_revision=rev + 1000)),
           op(3, put=kv_pb2.PutRequest(key=b"cas/sibling", value=b"s")),
           op(4, compare_and_swap=kv_pb2.CompareAndSwapRequest(
               key=b"cas/k", value=b"won", expected_mod_revision=rev)),
           op(5, compare_and_swap=kv_pb2.CompareAndSwapRequest(
               key=b"cas/k", value=b"late", must_not_exist=True)))
    answers = s.collect(4)
    lost, won, late = (ok(answers[i], "compare_and_swap") for i in (2, 4, 5))
    assert not lost.succeeded and lost.kv.value in (b"v1", b"won")
    assert won.succeeded and won.kv.value == b"won"
    assert not late.succeeded
    ok(answers[3], "put")
    s.send(op(6, get=kv_pb2.GetRequest(key=b"cas/k")), op(7, get=kv_pb2.GetRequest(key=b"cas/sibling")))
    reads = s.collect(2)
    assert ok(reads[6], "get").kv.value == b"won" and ok(reads[7], "get").kv.value == b"s"
    s.close()


def test_an_id_already_in_flight_is_refused_without_touching_the_first(cluster):
    s = Stream(cluster.nodes["n1"].grpc, cluster.tls_files)
    s.send(op(9, put=kv_pb2.PutRequest(key=b"dup/k", value=b"first")),
           op(9, put=kv_pb2.PutRequest(key=b"dup/k", value=b"second")))
    seen = []
    while len(seen) < 2:
        seen.extend(next(s.responses).responses)
    codes = sorted(a.status.code for a in seen)
    assert codes == [OK, INVALID_ARGUMENT]
    assert "already in flight" in next(a for a in seen if a.status.code).status.message
    s.send(op(1, get=kv_pb2.GetRequest(key=b"dup/k")))
    assert ok(s.collect(1)[1], "get").kv.value == b"first"
    s.close()


def test_status_counts_batch_messages_and_shared_entries(cluster):
    leader = cluster.leader()
    before = cluster.status(leader).kv_counters
    s = Stream(cluster.nodes[leader].grpc, cluster.tls_files)
    s.send(*[op(i, put=kv_pb2.PutRequest(key=b"count/%d" % i, value=b"v")) for i in range(40)])
    answers = s.collect(40)
    assert all(a.status.code == OK for a in answers.values())
    s.close()
    after = cluster.status(leader).kv_counters
    assert after.batch_messages - before.batch_messages == 1
    assert after.batch_requests - before.batch_requests == 40
    assert after.entry_commands - before.entry_commands == 40
    # 40 writes arrived together: they left in fewer entries than writes.
    assert after.entries - before.entries < 40
    revisions = {a.put.header.revision for a in answers.values()}
    assert len(revisions) < 40


def test_streams_beyond_the_cap_are_refused_and_clients_fall_back_to_unary(cluster):
    from sealkv.node.client import Client
    from sealkv.node.serving.batch_service import MAX_STREAMS

    endpoint = cluster.nodes["n3"].grpc
    streams = [Stream(endpoint, cluster.tls_files) for _ in range(MAX_STREAMS)]
    for i, s in enumerate(streams):  # each is open once it has answered
        s.send(op(1, get=kv_pb2.GetRequest(key=b"cap", consistency=kv_pb2.SERIALIZABLE)))
        ok(s.collect(1)[1], "get")
    extra = Stream(endpoint, cluster.tls_files)
    extra.send(op(1, get=kv_pb2.GetRequest(key=b"cap", consistency=kv_pb2.SERIALIZABLE)))
    with pytest.raises(grpc.RpcError) as refused:
        next(extra.responses)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    extra.channel.close()
    # Its stream is refused: the call goes unary, and succeeds.
    with Client([endpoint], **cluster.client_kwargs) as c:
        assert c.put(b"cap/unary", b"v").header.revision > 0
        assert c.get(b"cap/unary").kv.value == b"v"
    streams.pop().close()
    again = Stream(endpoint, cluster.tls_files)
    again.send(op(1, get=kv_pb2.GetRequest(key=b"cap/unary")))
    assert ok(again.collect(1)[1], "get").kv.value == b"v"
    for s in streams + [again]:
        s.close()

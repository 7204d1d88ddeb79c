"""Batched linearizable reads: a barrier dropped by a leader change is followed by another,
and a read past its deadline is a read timeout, never "outcome unknown"."""
import queue
import threading
import time

import grpc

from sealkv.node import errors
from sealkv.node.replication.proposer import Proposer
from sealkv.node.serving import batch_service
from sealkv.node.serving.batch_service import BatchService
from sealkv.node.serving.kv_service import KVOps
from sealkv.v1 import kv_pb2
from tests.unit.test_proposer import HeldAdapter


class TermAdapter(HeldAdapter):
    """`HeldAdapter` with a term for response headers (for tests only)."""

    term = 3


class ActiveContext:
    """A stream context that stays active (for tests only)."""

    def is_active(self):
        return True

    def auth_context(self):
        return {}  # a plaintext (--insecure) call: no verified identity


def open_stream():
    adapter = TermAdapter()
    proposer = Proposer(adapter)
    service = BatchService(KVOps("n1", proposer, adapter.sm), proposer, 10.0, lambda t: None)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    responses = service.serve(iter(outbox.get, None), ActiveContext())
    answers: queue.SimpleQueue = queue.SimpleQueue()  # the gRPC worker's part, on a thread

    def consume():
        for message in responses:
            for op in message.responses:
                answers.put(op)
    threading.Thread(target=consume, daemon=True).start()
    return adapter, outbox, answers


def get_op(op_id, timeout_ms=0):
    return kv_pb2.RequestOp(id=op_id, timeout_ms=timeout_ms, get=kv_pb2.GetRequest(key=b"k"))


def test_a_batched_read_whose_barrier_was_dropped_waits_for_another():
    adapter, outbox, answers = open_stream()
    outbox.put(kv_pb2.BatchRequest(requests=[get_op(1), get_op(2)]))
    wait_entries(adapter, 1)
    adapter.commit(0, error=errors.OutcomeUnknown("outcome unknown: the leader changed"))
    wait_entries(adapter, 2)
    adapter.commit(1)
    got = {}
    while len(got) < 2:
        op = answers.get(timeout=10)
        got[op.id] = op
    assert all(op.status.code == 0 and op.WhichOneof("response") == "get" for op in got.values())
    outbox.put(None)


def test_a_batched_read_past_its_deadline_is_a_read_timeout():
    adapter, outbox, answers = open_stream()
    outbox.put(kv_pb2.BatchRequest(requests=[get_op(1, timeout_ms=300)]))
    op = answers.get(timeout=10)
    assert op.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert op.status.message.startswith("read timed out")
    assert type(errors.from_status(op.status.code, op.status.message, read=True)) \
        is errors.ReadTimeout
    outbox.put(None)


def wait_entries(adapter, n):
    deadline = time.monotonic() + 10
    while len(adapter.entries) < n:
        assert time.monotonic() < deadline, f"entry {n} never proposed"
        time.sleep(0.005)


def test_a_deadline_before_the_idle_workers_next_wake_up_wakes_it(monkeypatch):
    # The worker wakes for a new request only when its deadline comes before the worker's
    # own next wake-up; here that is a minute away, so only the wake-up answers in time.
    monkeypatch.setattr(batch_service, "IDLE_WAKE", 60.0)
    adapter, outbox, answers = open_stream()
    outbox.put(kv_pb2.BatchRequest(requests=[get_op(1, timeout_ms=300)]))
    op = answers.get(timeout=10)
    assert op.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    outbox.put(None)

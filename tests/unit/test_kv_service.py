"""KVService on a real state machine behind a fake replication adapter: validation, statuses,
revision headers and the consistency levels."""
import grpc
import pytest

from sealkv.node import errors
from sealkv.node.config import MAX_KEY_BYTES, MAX_RANGE_LIMIT, MAX_VALUE_BYTES
from sealkv.node.serving.kv_service import KVService
from sealkv.node.state import commands as cmd
from sealkv.node.state.alarms import alarm_message
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore
from sealkv.v1 import kv_pb2


class Aborted(Exception):
    """What FakeContext.abort raises, carrying the status (for tests only)."""

    def __init__(self, code, details, metadata):
        super().__init__(details)
        self.code, self.details, self.metadata = code, details, dict(metadata)


class FakeContext:
    """A grpc.ServicerContext with no deadline that records the abort (for tests only)."""

    def __init__(self):
        self.metadata = ()

    def time_remaining(self):
        return None

    def set_trailing_metadata(self, metadata):
        self.metadata = metadata

    def abort(self, code, details):
        raise Aborted(code, details, self.metadata)


class FakeReplication:
    """Applies each proposal straight to the state machine at the next index, like a
    one-member cluster with no log (for tests only). `fail` makes the next calls raise."""

    def __init__(self, state_machine: StateMachine, term: int = 7):
        self.sm = state_machine
        self.term = term
        self.index = 0
        self.proposed: list[bytes] = []
        self.barriers = 0
        self.fail = None

    def propose(self, command: bytes, timeout: float):
        if self.fail is not None:
            raise self.fail
        self.proposed.append(command)
        self.index += 1
        return self.sm.apply(self.index, command)

    def barrier(self, timeout: float) -> int:
        if self.fail is not None:
            raise self.fail
        self.barriers += 1
        self.index += 1
        self.sm.apply(self.index, cmd.encode(cmd.Barrier()))
        return self.index


@pytest.fixture
def kv():
    sm = StateMachine(MemoryStore())
    replication = FakeReplication(sm)
    admissions = []
    service = KVService("n1", 5.0, replication, sm,
                        lambda timeout, delete=False: admissions.append(timeout))
    service.replication, service.admissions = replication, admissions
    return service


def call(service, method, request):
    return getattr(service, method)(request, FakeContext())


def status_of(service, method, request) -> Aborted:
    with pytest.raises(Aborted) as caught:
        call(service, method, request)
    return caught.value


def test_put_answers_with_the_revision_member_and_term(kv):
    r = call(kv, "Put", kv_pb2.PutRequest(key=b"k", value=b"v1"))
    assert (r.header.revision, r.header.member_id, r.header.raft_term) == (1, "n1", 7)
    assert not r.HasField("prev_kv")
    r = call(kv, "Put", kv_pb2.PutRequest(key=b"k", value=b"v2", prev_kv=True))
    assert r.header.revision == 2
    assert (r.prev_kv.value, r.prev_kv.mod_revision, r.prev_kv.version) == (b"v1", 1, 1)
    assert kv.admissions == [5.0, 5.0]


@pytest.mark.parametrize("key,value,message", [
    (b"", b"v", "key must not be empty"),
    (b"k" * (MAX_KEY_BYTES + 1), b"v", f"the limit is {MAX_KEY_BYTES}"),
    (b"k", b"v" * (MAX_VALUE_BYTES + 1), f"the limit is {MAX_VALUE_BYTES}"),
])
def test_put_refuses_bad_input_before_proposing(kv, key, value, message):
    e = status_of(kv, "Put", kv_pb2.PutRequest(key=key, value=value))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and message in e.details
    assert kv.replication.proposed == [] and kv.admissions == []


@pytest.mark.parametrize("method,request_", [
    ("Put", kv_pb2.PutRequest(key=b"k", value=b"v")),
    ("Delete", kv_pb2.DeleteRequest(key=b"k")),
    ("CompareAndSwap", kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v", must_not_exist=True)),
])
def test_every_write_passes_admission_and_a_refusal_proposes_nothing(kv, method, request_):
    call(kv, method, request_)
    assert kv.admissions == [5.0]

    def refuse(timeout, delete=False):
        raise errors.Unavailable("writer not registered yet")

    kv._admit_write = refuse
    proposed = len(kv.replication.proposed)
    e = status_of(kv, method, request_)
    assert e.code == grpc.StatusCode.UNAVAILABLE and e.details == "writer not registered yet"
    assert len(kv.replication.proposed) == proposed


@pytest.mark.parametrize("error,code", [
    (errors.Unavailable("no leader"), grpc.StatusCode.UNAVAILABLE),
    (errors.Aborted("discarded"), grpc.StatusCode.ABORTED),
    (errors.OutcomeUnknown("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_replication_failures_keep_their_status_and_say_the_node_answered(kv, error, code):
    kv.replication.fail = error
    e = status_of(kv, "Put", kv_pb2.PutRequest(key=b"k", value=b"v"))
    assert (e.code, e.details) == (code, error.message)
    assert e.metadata[errors.SERVER_METADATA_KEY] == code.name.lower()


def test_not_leader_carries_the_leader_in_trailing_metadata(kv):
    kv.replication.fail = errors.NotLeader("not the leader", leader="127.0.0.1:9")
    e = status_of(kv, "Delete", kv_pb2.DeleteRequest(key=b"k"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.metadata[errors.LEADER_METADATA_KEY] == "127.0.0.1:9"


def test_a_bug_answers_internal_without_its_message(kv):
    kv.replication.fail = RuntimeError("secret value inside")
    e = status_of(kv, "Put", kv_pb2.PutRequest(key=b"k", value=b"v"))
    assert e.code == grpc.StatusCode.INTERNAL and "secret" not in e.details


def test_get_linearizable_waits_for_a_barrier_serializable_does_not(kv):
    call(kv, "Put", kv_pb2.PutRequest(key=b"k", value=b"v"))
    r = call(kv, "Get", kv_pb2.GetRequest(key=b"k", consistency=kv_pb2.SERIALIZABLE))
    assert (r.found, r.kv.value, r.header.revision, kv.replication.barriers) == (True, b"v", 1, 0)
    r = call(kv, "Get", kv_pb2.GetRequest(key=b"k"))
    assert kv.replication.barriers == 1
    assert r.header.revision == 2  # the barrier's index: the read reflects it
    r = call(kv, "Get", kv_pb2.GetRequest(key=b"missing", consistency=kv_pb2.SERIALIZABLE))
    assert not r.found and not r.HasField("kv")


def test_get_refuses_an_unknown_consistency(kv):
    e = status_of(kv, "Get", kv_pb2.GetRequest(key=b"k", consistency=99))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "consistency" in e.details


def test_delete_counts_and_returns_the_previous_entry(kv):
    r = call(kv, "Delete", kv_pb2.DeleteRequest(key=b"k"))
    assert (r.deleted, r.header.revision) == (0, 1)
    call(kv, "Put", kv_pb2.PutRequest(key=b"k", value=b"v"))
    r = call(kv, "Delete", kv_pb2.DeleteRequest(key=b"k", prev_kv=True))
    assert (r.deleted, r.prev_kv.value, r.header.revision) == (1, b"v", 3)
    e = status_of(kv, "Delete", kv_pb2.DeleteRequest(key=b""))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT


def test_range_bounds_limits_and_more(kv):
    for key in (b"a1", b"a2", b"a3", b"b1"):
        call(kv, "Put", kv_pb2.PutRequest(key=key, value=b"v" + key))
    r = call(kv, "Range", kv_pb2.RangeRequest(key=b"a", prefix=True, limit=2,
                                              consistency=kv_pb2.SERIALIZABLE))
    assert ([x.key for x in r.kvs], r.count, r.more) == ([b"a1", b"a2"], 3, True)
    r = call(kv, "Range", kv_pb2.RangeRequest(key=b"a2", range_end=b"\0", keys_only=True,
                                              consistency=kv_pb2.SERIALIZABLE))
    assert [(x.key, x.value) for x in r.kvs] == [(b"a2", b""), (b"a3", b""), (b"b1", b"")]
    r = call(kv, "Range", kv_pb2.RangeRequest(key=b"a1", range_end=b"a3"))
    assert [x.key for x in r.kvs] == [b"a1", b"a2"] and kv.replication.barriers == 1


@pytest.mark.parametrize("request_,message", [
    (kv_pb2.RangeRequest(key=b"a", prefix=True, range_end=b"b"), "either prefix or range_end"),
    (kv_pb2.RangeRequest(key=b"b", range_end=b"a"), "range_end must be greater"),
    (kv_pb2.RangeRequest(key=b"a", limit=-1), "must not be negative"),
    (kv_pb2.RangeRequest(key=b"a", limit=MAX_RANGE_LIMIT + 1), "the maximum is"),
    (kv_pb2.RangeRequest(key=b""), "key must not be empty"),
])
def test_range_refuses_bad_bounds(kv, request_, message):
    e = status_of(kv, "Range", request_)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and message in e.details
    assert kv.replication.barriers == 0


def test_compare_and_swap_success_and_failure_return_the_entry(kv):
    r = call(kv, "CompareAndSwap", kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v1",
                                                                must_not_exist=True))
    assert (r.succeeded, r.kv.value, r.kv.mod_revision, r.header.revision) == (True, b"v1", 1, 1)
    r = call(kv, "CompareAndSwap", kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v2",
                                                                must_not_exist=True))
    assert (r.succeeded, r.kv.value, r.kv.mod_revision) == (False, b"v1", 1)
    r = call(kv, "CompareAndSwap", kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v3",
                                                                expected_mod_revision=1))
    assert (r.succeeded, r.kv.value, r.kv.version) == (True, b"v3", 2)
    r = call(kv, "CompareAndSwap", kv_pb2.CompareAndSwapRequest(key=b"new", value=b"x",
                                                                expected_mod_revision=5))
    assert not r.succeeded and not r.HasField("kv")


@pytest.mark.parametrize("request_,message", [
    (kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v"), "set expected_mod_revision"),
    (kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v", must_not_exist=False),
     "must_not_exist, when set, must be true"),
    (kv_pb2.CompareAndSwapRequest(key=b"k", value=b"v", expected_mod_revision=0),
     "must be positive"),
])
def test_compare_and_swap_refuses_an_unclear_expectation(kv, request_, message):
    e = status_of(kv, "CompareAndSwap", request_)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and message in e.details
    assert kv.replication.proposed == []


def test_a_write_refused_at_apply_by_a_nospace_alarm_is_resource_exhausted(kv):
    # Admitted before the alarm was applied: every replica refuses it at apply alike.
    kv.replication.sm.apply(1, cmd.encode(cmd.Alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n2")))
    kv.replication.index = 1
    kv.ops._write_refusal = lambda: alarm_message("n2", cmd.CAUSE_QUOTA)
    for method, request in (("Put", kv_pb2.PutRequest(key=b"k", value=b"v")),
                            ("CompareAndSwap", kv_pb2.CompareAndSwapRequest(
                                key=b"k", value=b"v", must_not_exist=True))):
        e = status_of(kv, method, request)
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.details == (
            "NOSPACE alarm: the database of n2 reached its quota (--quota-backend-bytes); "
            "delete keys or raise the quota, then run `sealkv alarm disarm`. Writes are refused "
            "until then; reads are served")
    assert call(kv, "Get", kv_pb2.GetRequest(key=b"k")).found is False
    assert call(kv, "Delete", kv_pb2.DeleteRequest(key=b"k")).deleted == 0


def test_range_stops_at_the_response_byte_limit_with_more_set(kv):
    value = b"v" * (1024 * 1024)
    for i in range(6):
        call(kv, "Put", kv_pb2.PutRequest(key=b"big/%d" % i, value=value))
    r = call(kv, "Range", kv_pb2.RangeRequest(key=b"big/", prefix=True))
    assert [kv_.key for kv_ in r.kvs] == [b"big/0", b"big/1", b"big/2"]  # 4 MiB of 1 MiB + keys
    assert r.more and r.count == 6
    r = call(kv, "Range", kv_pb2.RangeRequest(key=b"big/2\0", range_end=b"big0"))
    assert [kv_.key for kv_ in r.kvs] == [b"big/3", b"big/4", b"big/5"] and not r.more
    r = call(kv, "Range", kv_pb2.RangeRequest(key=b"big/", prefix=True, keys_only=True))
    assert len(r.kvs) == 6 and not r.more  # keys only: far below the byte limit

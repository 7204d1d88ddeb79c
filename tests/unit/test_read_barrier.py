"""Linearizable-read barriers: a barrier dropped by a leader change is proposed again within
the read's deadline, and a read never ends as "outcome unknown"."""
import threading
import time

import pytest
from pysyncobj import FAIL_REASON

from sealkv.node import errors
from sealkv.node.replication.adapter import ReplicationAdapter
from sealkv.node.replication.read_index import ReadIndexFallback
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore


class ScriptedRaft:
    """Stands in for the SyncObj, for tests only: answers each proposal with the next
    scripted failure reason, then applies it to the state machine for real. Its ReadIndex
    always falls back, as the real one does when no confirmation round can run (right after
    an election, say): every read point is a barrier entry."""

    def __init__(self, sm, failures, leader=True, delay=0.0):
        self.sm = sm
        self.delay = delay
        self.failures = list(failures)
        self.leader = object() if leader else None
        self.proposals = 0
        self.raftLastApplied = 0

    def _getLeader(self):
        return self.leader

    def _isLeader(self):
        return self.leader is not None  # the scripted node is the leader it knows

    def read_index(self, on_done):
        on_done(None, ReadIndexFallback("no entry of this leader's term is committed yet"))

    def apply_command(self, command, callback):
        self.proposals += 1
        failure = self.failures.pop(0) if self.failures else None

        def answer():
            time.sleep(self.delay)  # the commit round trip
            if failure is not None:
                callback(None, failure)
            else:
                self.raftLastApplied += 1
                callback(self.sm.apply(self.raftLastApplied, command), FAIL_REASON.SUCCESS)
        threading.Thread(target=answer, daemon=True).start()


def adapter_with(tmp_path, raft_factory):
    sm = StateMachine(MemoryStore())
    a = ReplicationAdapter(sm, raft_address="127.0.0.1:7001", partners=[],
                           data_dir=str(tmp_path), secret=None)
    a._obj = raft_factory(sm)
    return a


def test_a_barrier_dropped_by_leader_changes_is_proposed_again(tmp_path):
    a = adapter_with(tmp_path, lambda sm: ScriptedRaft(sm, [
        FAIL_REASON.LEADER_CHANGED, FAIL_REASON.DISCARDED, FAIL_REASON.NOT_LEADER]))
    assert a.barrier(5.0) == 1
    assert a._obj.proposals == 4


def test_a_read_whose_barriers_keep_failing_times_out_as_a_read(tmp_path):
    a = adapter_with(tmp_path, lambda sm: ScriptedRaft(sm, [FAIL_REASON.LEADER_CHANGED] * 10**6))
    started = time.monotonic()
    with pytest.raises(errors.ReadTimeout, match=r"read timed out.*a leader change dropped") as e:
        a.barrier(0.5)
    assert not isinstance(e.value, errors.OutcomeUnknown)
    assert time.monotonic() - started < 2.0
    assert a._obj.proposals > 1


def test_a_read_without_a_leader_is_unavailable(tmp_path):
    a = adapter_with(tmp_path, lambda sm: ScriptedRaft(sm, [], leader=False))
    with pytest.raises(errors.Unavailable, match="read not served: no leader"):
        a.barrier(0.3)
    assert a._obj.proposals == 0


def test_concurrent_reads_still_share_barriers(tmp_path):
    a = adapter_with(tmp_path, lambda sm: ScriptedRaft(sm, [FAIL_REASON.LEADER_CHANGED],
                                                       delay=0.3))
    results = []
    gate = threading.Event()

    def read():
        gate.wait()
        results.append(a.barrier(10.0))

    threads = [threading.Thread(target=read) for _ in range(20)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(15)
    assert len(results) == 20
    assert a._obj.proposals <= 4

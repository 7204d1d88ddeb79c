"""The adapter's waits wake on Raft progress: one in-process, single-voter pysyncobj member."""
import threading

import pytest

from sealkv.node.cli.local import free_port
from sealkv.node.replication.adapter import ReplicationAdapter
from sealkv.node.state import commands as cmd
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore

LONG = 60.0  # a waiter that is never woken sleeps this long; a woken one returns at once


@pytest.fixture
def single(tmp_path):
    sm = StateMachine(MemoryStore())
    halts = []
    adapter = ReplicationAdapter(sm, raft_address=f"127.0.0.1:{free_port()}", partners=[],
                                 data_dir=str(tmp_path / "raft"), secret=None,
                                 halt=halts.append)
    adapter.start()
    try:
        yield adapter, sm
    finally:
        adapter.stop()
        assert halts == []


def waiter(adapter, condition):
    """Starts a thread that waits for `condition` with a long timeout; returns (thread, box)."""
    box = []
    thread = threading.Thread(target=lambda: box.append(adapter.wait_until(condition, LONG)),
                              daemon=True)
    thread.start()
    return thread, box


def test_waiters_wake_when_leadership_and_the_applied_index_move(single):
    adapter, sm = single
    thread, box = waiter(adapter, lambda: adapter.is_leader)
    thread.join(LONG / 2)
    assert box == [True], "the wait for leadership was not woken by the election"
    applied = sm.applied_index
    thread, box = waiter(adapter, lambda: sm.applied_index > applied)
    adapter.propose(cmd.encode(cmd.Put(b"k", b"v")), 10.0)
    thread.join(LONG / 2)
    assert box == [True], "the wait for the applied index was not woken by the apply"
    assert adapter.wait_replayed(1.0)


def test_a_condition_that_never_holds_times_out(single):
    adapter, _ = single
    assert adapter.wait_until(lambda: False, 0.05) is False

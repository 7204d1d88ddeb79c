"""The read-barrier coalescer of the replication adapter, driven by a gated fake propose."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sealkv.node import errors
from sealkv.node.replication import adapter as adapter_module
from sealkv.node.replication.adapter import ReplicationAdapter
from sealkv.node.state.machine import StateMachine, WriteResult
from sealkv.node.state.storage.memory import MemoryStore
from tests.unit.test_read_barrier import ScriptedRaft

WAIT = 10.0


class GatedPropose:
    """A propose that numbers each barrier and holds it until released; for tests only."""

    def __init__(self):
        self.lock = threading.Lock()
        self.gates: list[threading.Event] = []
        self.started = threading.Semaphore(0)
        self.fail_next = None

    def __call__(self, command, timeout):
        gate = threading.Event()
        with self.lock:
            self.gates.append(gate)
            index = len(self.gates)
            error, self.fail_next = self.fail_next, None
        self.started.release()
        assert gate.wait(WAIT), "a barrier was never released"
        if error is not None:
            raise error
        return WriteResult(index)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.gates)

    def release(self, number: int) -> None:
        self.gates[number - 1].set()

    def wait_started(self, number: int) -> None:
        for _ in range(number):
            assert self.started.acquire(timeout=WAIT), "a barrier was never proposed"


class CountingEvent(threading.Event):
    """An Event that reports every wait() entry on a shared semaphore; for tests only."""

    entered = threading.Semaphore(0)

    def wait(self, timeout=None):
        CountingEvent.entered.release()
        return super().wait(timeout)


@pytest.fixture
def coalescer(tmp_path, monkeypatch):
    monkeypatch.setattr(CountingEvent, "entered", threading.Semaphore(0))

    class Group(adapter_module._BarrierGroup):
        """A barrier group whose waits can be counted; for tests only."""

        def __init__(self):
            super().__init__()
            self.done = CountingEvent()

    monkeypatch.setattr(adapter_module, "_BarrierGroup", Group)
    adapter = ReplicationAdapter(StateMachine(MemoryStore()), raft_address=None, partners=[],
                                 data_dir=str(tmp_path), secret=None)
    adapter._obj = ScriptedRaft(adapter.sm, [])  # the leader; its ReadIndex falls back
    propose = GatedPropose()
    adapter.propose = propose
    with ThreadPoolExecutor(max_workers=8) as pool:
        yield adapter, propose, pool
        for gate in propose.gates:
            gate.set()


def start_readers(adapter, pool, count: int) -> list:
    """Starts `count` linearizable reads and returns once each waits on its barrier."""
    reads = [pool.submit(adapter.barrier, WAIT) for _ in range(count)]
    for _ in range(count):
        assert CountingEvent.entered.acquire(timeout=WAIT), "a reader never waited"
    return reads


def test_a_read_never_joins_a_barrier_proposed_before_it_started(coalescer):
    adapter, propose, pool = coalescer
    [first] = start_readers(adapter, pool, 1)
    propose.wait_started(1)
    later = start_readers(adapter, pool, 3)
    # One barrier in flight, one pending: the later readers wait for a barrier not yet proposed.
    assert propose.count == 1
    propose.release(1)
    assert first.result(WAIT) == 1
    propose.wait_started(1)
    assert propose.count == 2
    assert not any(f.done() for f in later)
    propose.release(2)
    assert [f.result(WAIT) for f in later] == [2, 2, 2]


def test_at_most_one_barrier_in_flight_and_one_pending(coalescer):
    adapter, propose, pool = coalescer
    [first] = start_readers(adapter, pool, 1)
    propose.wait_started(1)
    second = start_readers(adapter, pool, 2)
    propose.release(1)
    propose.wait_started(1)
    # Barrier 2 is in flight; new readers share one pending barrier 3.
    third = start_readers(adapter, pool, 2)
    assert propose.count == 2
    propose.release(2)
    propose.wait_started(1)
    propose.release(3)
    assert first.result(WAIT) == 1
    assert [f.result(WAIT) for f in second] == [2, 2]
    assert [f.result(WAIT) for f in third] == [3, 3]
    assert propose.count == 3


def test_a_failed_barrier_fails_its_readers_and_the_next_one_is_fresh(coalescer):
    adapter, propose, pool = coalescer
    propose.fail_next = errors.ResourceExhausted("proposal queue is full")  # not retried
    failing = pool.submit(adapter.barrier, WAIT)
    propose.wait_started(1)
    propose.release(1)
    with pytest.raises(errors.ResourceExhausted):
        failing.result(WAIT)
    fresh = pool.submit(adapter.barrier, WAIT)
    propose.wait_started(1)
    propose.release(2)
    assert fresh.result(WAIT) == 2

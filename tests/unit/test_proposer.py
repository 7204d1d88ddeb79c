"""The proposer's grouping rules, against a replication adapter double (for tests only)."""
import threading
import time

import pytest

from sealkv.node import errors
from sealkv.node.replication.proposer import Proposer
from sealkv.node.replication.read_index import ReadIndexFallback
from sealkv.node.state import commands as cmd
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore


class HeldAdapter:
    """Applies each proposed entry to a real state machine when the test releases it.

    For tests only: it stands in for the Raft member so a test decides when entries commit.
    Its ReadIndex always falls back, as the real adapter's does when no confirmation round
    can run (right after an election, say): every read waits for a barrier entry.
    """

    def __init__(self):
        self.sm = StateMachine(MemoryStore())
        self.entries = []  # [payload, on_done]
        self.index = 0

    def wait_leader(self, deadline):
        pass

    def propose_async(self, payload, on_done, seal_timeout=0.0):
        self.entries.append((payload, on_done))

    def read_index_async(self, on_done, deadline):
        on_done(None, ReadIndexFallback("no entry of this leader's term is committed yet"))

    def wait_entries(self, n):
        """Waits until n entries were proposed (the proposer's thread sends the later ones)."""
        deadline = time.monotonic() + 5
        while len(self.entries) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        assert len(self.entries) == n

    def commit(self, n=0, error=None):
        payload, on_done = self.entries[n]
        if error is not None:
            on_done(None, error)
            return
        self.index += 1
        on_done(self.sm.apply(self.index, payload), None)


def put(key):
    return cmd.encode(cmd.Put(key, b"v"))


def collect():
    seen = []
    return seen, lambda result, error: seen.append((result, error))


def far():
    return time.monotonic() + 60


def test_writes_queued_without_sending_leave_as_one_entry_at_flush():
    # A batch message's writes: each joins the queue, the message's end sends them together
    # (its first write does not leave alone and make the rest wait for its commit).
    adapter = HeldAdapter()
    p = Proposer(adapter)
    seen = [collect() for _ in range(3)]
    for i, (_, on_done) in enumerate(seen):
        p.submit(put(b"m%d" % i), on_done, far(), send=False)
    assert adapter.entries == []
    p.flush()
    assert len(adapter.entries) == 1
    batch = cmd.decode(adapter.entries[0][0])
    assert isinstance(batch, cmd.Batch) and len(batch.commands) == 3
    adapter.commit(0)
    assert [s[0][0].revision for s, _ in seen] == [1, 1, 1]
    p.flush()  # nothing queued: nothing sent
    assert len(adapter.entries) == 1


def test_a_lone_write_leaves_at_once_and_later_ones_form_the_next_entry():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    first, on_first = collect()
    p.submit(put(b"a"), on_first, far())
    assert [e[0] for e in adapter.entries] == [put(b"a")]  # no timer: it left at once
    later = [collect() for _ in range(5)]
    for i, (_, on_done) in enumerate(later):
        p.submit(put(b"k%d" % i), on_done, far())
    assert len(adapter.entries) == 1  # waiting for the entry in flight
    adapter.commit(0)
    assert first[0][0].revision == 1 and first[0][1] is None
    adapter.wait_entries(2)
    batch = cmd.decode(adapter.entries[1][0])
    assert isinstance(batch, cmd.Batch) and len(batch.commands) == 5
    adapter.commit(1)
    assert [seen[0][0].revision for seen, _ in later] == [2] * 5
    assert (p.entries, p.commands) == (2, 6)


def test_reads_share_the_next_entry_with_writes_or_get_a_barrier_of_their_own():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    p.submit(put(b"a"), lambda r, e: None, far())
    reads = [collect() for _ in range(3)]
    for _, on_done in reads:
        p.submit(None, on_done, far())
    write, on_write = collect()
    p.submit(put(b"b"), on_write, far())
    adapter.commit(0)
    adapter.wait_entries(2)
    adapter.commit(1)
    assert cmd.decode(adapter.entries[1][0]) == cmd.Put(b"b", b"v")  # reads added nothing
    assert {seen[0][0].revision for seen, _ in reads} == {2}
    alone, on_alone = collect()
    p.submit(None, on_alone, far())
    adapter.wait_entries(3)  # a fallen-back read is proposed by the proposer's thread
    assert adapter.entries[2][0] == cmd.encode(cmd.Barrier())
    adapter.commit(2)
    assert alone[0][0].revision == 3


def test_entries_are_bounded_by_count_and_bytes():
    adapter = HeldAdapter()
    p = Proposer(adapter, max_commands=3, max_bytes=10**6)
    for i in range(8):
        p.submit(put(b"k%d" % i), lambda r, e: None, far())
    adapter.commit(0)
    adapter.wait_entries(2)
    assert len(cmd.decode(adapter.entries[1][0]).commands) == 3
    adapter.commit(1)
    adapter.wait_entries(3)
    adapter.commit(2)
    adapter.wait_entries(4)
    assert [len(getattr(cmd.decode(e[0]), "commands", [1])) for e in adapter.entries] == [1, 3, 3, 1]
    big = Proposer(HeldAdapter(), max_bytes=100)
    big.submit(put(b"x"), lambda r, e: None, far())
    big.submit(cmd.encode(cmd.Put(b"huge", b"v" * 500)), lambda r, e: None, far())
    big.submit(put(b"y"), lambda r, e: None, far())
    big.adapter.commit(0)
    big.adapter.wait_entries(2)
    assert cmd.decode(big.adapter.entries[1][0]).key == b"huge"  # too big to share: alone


def test_a_failed_entry_fails_each_of_its_requests_and_the_next_entry_still_leaves():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    first, on_first = collect()
    p.submit(put(b"a"), on_first, far())
    second, on_second = collect()
    p.submit(put(b"b"), on_second, far())
    adapter.commit(0, error=errors.Aborted("discarded"))
    assert isinstance(first[0][1], errors.Aborted) and not second
    adapter.wait_entries(2)
    adapter.commit(1)
    assert second[0][0].revision == 1


def test_a_waiting_request_past_its_deadline_is_withdrawn_and_never_proposed():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    p.submit(put(b"a"), lambda r, e: None, far())
    with pytest.raises(errors.Unavailable, match="nothing was applied"):
        p.propose(put(b"late"), timeout=0.05)
    adapter.commit(0)
    p.submit(put(b"after"), lambda r, e: None, far())
    adapter.wait_entries(2)
    assert adapter.entries[1][0] == put(b"after")  # the withdrawn write never left


def test_an_entry_whose_callback_never_comes_stops_holding_back_the_next():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    p.submit(put(b"orphan"), lambda r, e: None, time.monotonic() + 0.05)
    time.sleep(0.06)
    result = []
    t = threading.Thread(target=lambda: result.append(p.propose(put(b"next"), 5)))
    t.start()
    deadline = time.monotonic() + 5
    while len(adapter.entries) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    adapter.commit(1)
    t.join(5)
    assert result and result[0].revision == 1


def test_blocking_propose_raises_outcome_unknown_once_proposed():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    with pytest.raises(errors.OutcomeUnknown, match="may still apply"):
        p.propose(put(b"a"), timeout=0.05)
    with pytest.raises(errors.ReadTimeout):
        p.barrier(timeout=0.05)


def test_a_dropped_read_barrier_is_proposed_again_and_a_read_never_is_outcome_unknown():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    result = []
    t = threading.Thread(target=lambda: result.append(p.barrier(5)))
    t.start()
    adapter.wait_entries(1)
    adapter.commit(0, error=errors.Aborted("leader changed"))
    adapter.wait_entries(2)
    adapter.commit(1)
    t.join(5)
    assert result == [1]
    with pytest.raises(errors.ReadTimeout, match="a read changes nothing"):
        p.barrier(timeout=0.1)


def test_unbatched_entries_carry_one_write_each_and_pipeline_instead():
    from sealkv.node.replication.proposer import UNBATCHED_ENTRIES

    adapter = HeldAdapter()
    p = Proposer(adapter, **UNBATCHED_ENTRIES)
    reads = collect()
    for i in range(5):
        p.submit(put(b"k%d" % i), lambda r, e: None, far())
    p.submit(None, reads[1], far())
    adapter.wait_entries(6)  # a fallen-back read is proposed by the proposer's thread
    assert [e[0] for e in adapter.entries] == [put(b"k%d" % i) for i in range(5)] + [
        cmd.encode(cmd.Barrier())]  # all in flight at once, no BATCH entry
    for i in range(6):
        adapter.commit(i)
    assert reads[0][0][0].revision == 6


def test_writes_to_one_key_never_share_an_entry_and_keep_their_order():
    adapter = HeldAdapter()
    p = Proposer(adapter)
    p.submit(put(b"first"), lambda r, e: None, far())
    seen = []
    for value in (b"1", b"2", b"3"):
        p.submit(cmd.encode(cmd.Put(b"k", value)), lambda r, e, v=value: seen.append((v, r)),
                 far())
    p.submit(put(b"other"), lambda r, e: None, far())
    p.submit(cmd.encode(cmd.CompareAndSwap(b"k", b"4", cmd.CAS_BY_REVISION, 1)),
             lambda r, e: seen.append((b"cas", r)), far())
    for n in range(5):
        adapter.wait_entries(n + 1)
        adapter.commit(n)
    entries = [cmd.decode(e[0]) for e in adapter.entries]
    assert entries[1] == cmd.Batch((cmd.Put(b"k", b"1"), cmd.Put(b"other", b"v")))
    assert entries[2:4] == [cmd.Put(b"k", b"2"), cmd.Put(b"k", b"3")]
    assert isinstance(entries[4], cmd.CompareAndSwap)
    assert [v for v, _ in seen] == [b"1", b"2", b"3", b"cas"]
    assert len({r.revision for _, r in seen[:3]}) == 3


def test_key_of_reads_the_key_of_each_write_command():
    assert cmd.key_of(cmd.encode(cmd.Put(b"pk", b"v"))) == b"pk"
    assert cmd.key_of(cmd.encode(cmd.Delete(b"dk"))) == b"dk"
    assert cmd.key_of(cmd.encode(cmd.CompareAndSwap(b"ck", b"v", cmd.CAS_BY_REVISION, 9))) == b"ck"
    assert cmd.key_of(cmd.encode(cmd.Barrier())) is None

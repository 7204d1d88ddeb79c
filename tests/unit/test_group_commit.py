"""The adapter's Raft object on the sealkv journal: what is synced before what is sent.

An un-ticked `_RaftObject` (real pysyncobj, a real bound port, two silent partners) whose
journal's fdatasync and whose transport's send both write into one event list, so the tests
see the order: a follower's answer only after the fdatasync of the entries it appended, a
leader's AppendEntries sent before its own fdatasync of the group (they overlap) and its own
count only after it, one fdatasync per group, and no answer, no count and no leadership on a
full disk. Also: its wake-up pipe is drained with one read, without patching pysyncobj.
"""
import errno
import os
import socket
import time

import pytest
from pysyncobj import SyncObjConf
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from sealkv.node import durable
from sealkv.node.replication import journal as raft_journal
from sealkv.node.replication.adapter import ReplicationAdapter, _RaftObject
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Disk:
    """An fdatasync that records itself in `events`, or fails with ENOSPC while `full`;
    for tests only."""

    def __init__(self, events: list):
        self.events = events
        self.full = False

    def __call__(self, fd):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fdatasync(fd)
        self.events.append("fdatasync")


@pytest.fixture
def raft(tmp_path):
    me, leader, other = free_address(), free_address(), free_address()
    events: list = []
    full: list = []
    halts: list = []
    adapter = ReplicationAdapter(StateMachine(MemoryStore()), raft_address=me,
                                 partners=[leader, other], data_dir=str(tmp_path),
                                 secret="0123456789abcdef", halt=halts.append,
                                 on_disk_full=full.append)
    disk = Disk(events)
    journal = raft_journal.FileJournal(str(tmp_path), fdatasync=disk,
                                       on_disk_full=adapter._on_disk_full)
    adapter.journal = journal
    conf = SyncObjConf(autoTick=False, password=adapter.secret, bindAddress=me, useFork=False,
                       dynamicMembershipChange=True, journalFile=journal,
                       appendEntriesUseBatch=False,
                       fullDumpFile=str(tmp_path / "raft.dump"), serializer=adapter._write_dump,
                       deserializer=adapter._read_dump)
    obj = _RaftObject(adapter, me, [leader, other], conf, journal)
    obj._SyncObj__transport.send = lambda node, message: events.append(
        ("send", node.address, message["type"], len(message.get("entries", ()))))
    obj.events, obj.disk, obj.full, obj.halts = events, disk, full, halts
    obj.leader, obj.other = TCPNode(leader), TCPNode(other)
    yield obj
    obj.destroy()


def entry(index: int, term: int) -> tuple:
    return (bytes([_COMMAND_TYPE.REGULAR]) + b"%d/%d" % (index, term), index, term)


def append(obj, prev, prev_term, entries, commit=1, term=2):
    obj._SyncObj__onMessageReceived(obj.leader, {
        'type': 'append_entries', 'term': term, 'commit_index': commit,
        'entries': entries, 'prevLogIdx': prev, 'prevLogTerm': prev_term})


def test_a_follower_answers_only_after_one_fdatasync_of_the_entries_it_appended(raft):
    raft.events.clear()
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 12)])
    replies = [e for e in raft.events if e != "fdatasync" and e[2] == "next_node_idx"]
    assert len(replies) == 1
    assert raft.events.index("fdatasync") < raft.events.index(replies[0])
    assert raft.events.count("fdatasync") == 1  # ten entries, one group, one fdatasync
    assert raft._journal.last_index == 11


def test_a_follower_with_a_full_disk_does_not_answer_and_answers_once_written(raft):
    raft.disk.full = True
    raft.events.clear()
    append(raft, 1, 0, [entry(2, 1), entry(3, 1)])
    assert raft.events == []  # no acknowledgement of entries that are not on disk
    assert raft.full and raft._journal.failing
    raft.disk.full = False
    append(raft, 3, 1, [entry(4, 1)])
    reply = [e for e in raft.events if e != "fdatasync"][-1]
    assert reply[2] == "next_node_idx"
    on_disk = raft_journal.FileJournal(raft._journal.directory)
    assert [e[1] for e in on_disk[:]] == [1, 2, 3, 4]  # the held-back group was written too
    on_disk._destroy()


def test_a_follower_that_cannot_write_holds_back_a_bounded_amount(raft, monkeypatch):
    from sealkv.node.replication import adapter as adapter_module

    monkeypatch.setattr(adapter_module, "HELD_BACK_MAX", 100)
    raft.disk.full = True
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 12)])
    assert raft._journal.failing and raft._journal.unsynced_bytes > 100
    append(raft, 11, 1, [entry(12, 1)])
    assert raft._journal.last_index == 11  # dropped, unanswered: memory stays bounded
    raft.disk.full = False
    raft._journal.sync()
    raft.events.clear()
    append(raft, 11, 1, [entry(12, 1)])
    assert raft._journal.last_index == 12
    assert [e for e in raft.events if e != "fdatasync"][-1][2] == "next_node_idx"


def become_leader(obj) -> None:
    obj._SyncObj__connectedNodes.update({obj.leader, obj.other})
    obj._SyncObj__raftCurrentTerm = 3
    obj._SyncObj__onBecomeLeader()


def test_a_leader_sends_a_drained_group_once_then_syncs_it_once_before_counting_it(raft):
    become_leader(raft)
    assert raft._isLeader()
    raft.events.clear()
    for i in range(5):
        raft.apply_command(b"cmd%d" % i, callback=lambda result, reason: None)
    raft._checkCommandsToApply()
    # The leader's fdatasync overlaps the followers' (it sends first), and it is done before
    # the drain returns, so the next tick's commit count never includes an unsynced copy.
    sends = [e for e in raft.events if e != "fdatasync" and e[2] == "append_entries"]
    assert sends and all(e[3] == 5 for e in sends)  # one message per follower, whole group
    assert raft.events.count("fdatasync") == 1 and raft.events[-1] == "fdatasync"
    assert raft._journal.unsynced_bytes == 0
    acknowledge(raft, raft.other, raft._journal.last_index)
    assert raft._SyncObj__raftCommitIndex == raft._journal.last_index


def acknowledge(obj, node, index: int) -> None:
    """A follower's success reply for everything up to `index`, then one tick (pysyncobj's
    commit count, which counts the leader itself)."""
    obj._SyncObj__onMessageReceived(node, {'type': 'next_node_idx', 'next_node_idx': index + 1,
                                          'reset': False, 'success': True})
    obj.doTick(0)


def test_a_leader_answers_a_committed_write_before_it_sends_the_new_commit_index(raft):
    from sealkv.node.state import commands as cmd

    become_leader(raft)
    raft._SyncObj__transport._preventConnectNodes.update({raft.leader, raft.other})
    acknowledge(raft, raft.other, raft._journal.last_index)  # the no-op commits
    raft._adapter.sm.defer_commit = True  # as ReplicationAdapter.start sets it
    raft._adapter.propose_async(cmd.encode(cmd.Put(b"k", b"v")),
                                lambda result, error: raft.events.append(("answered", error)))
    raft._checkCommandsToApply()
    raft.events.clear()
    acknowledge(raft, raft.other, raft._journal.last_index)  # commits, applies, answers
    assert raft.events == [("answered", None)]  # the commit index does not leave yet
    deadline = time.monotonic() + 5.0
    while len(raft.events) == 1 and time.monotonic() < deadline:
        raft.doTick(0.05)  # an idle leader's next AppendEntries carries it, soon
    sends = [e for e in raft.events[1:] if e[0] == "send" and e[2] == "append_entries"]
    assert sends and all(e[3] == 0 for e in sends), raft.events


def test_a_leader_that_cannot_write_its_group_steps_down_and_never_counts_it(raft):
    become_leader(raft)
    commit = raft._SyncObj__raftCommitIndex
    raft.disk.full = True
    raft.events.clear()
    raft.apply_command(b"cmd", callback=lambda result, reason: None)
    raft._checkCommandsToApply()
    assert "fdatasync" not in raft.events
    assert raft._SyncObj__raftState == _RAFT_STATE.FOLLOWER and raft._getLeader() is None
    assert len(raft.full) == 1
    acknowledge(raft, raft.other, raft._journal.last_index)  # a follower that wrote it
    assert raft._SyncObj__raftCommitIndex == commit  # not counted by the deposed leader


def test_an_unsaved_vote_is_never_sent(raft, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable, "write_atomically", full_disk)
    raft.events.clear()
    with pytest.raises(raft_journal.MetaNotDurable):
        raft._SyncObj__onMessageReceived(raft.other, {
            'type': 'request_vote', 'term': 9, 'last_log_index': 5, 'last_log_term': 2})
    assert raft.events == [] and raft.full


def test_a_snapshot_that_cannot_be_installed_halts_and_is_never_acknowledged(raft):
    raft.events.clear()
    raft._SyncObj__onMessageReceived(raft.leader, {
        'type': 'append_entries', 'term': 2, 'commit_index': 5,
        'serialized': (b"SEALKVD2 but not a dump at all", True, True)})
    assert len(raft.halts) == 1 and "raft.dump" in raft.halts[0]
    assert [e for e in raft.events if e != "fdatasync"] == []  # no next_node_idx reply


def test_a_failing_dump_backs_off_instead_of_retrying_every_tick(raft, monkeypatch):
    adapter = raft._adapter

    def full_disk(out):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter.sm, "write_snapshot", full_disk)
    delays = []
    for _ in range(3):
        with pytest.raises(OSError):
            adapter._write_dump(str(raft._journal.directory) + "/raft.dump.tmp",
                                ((b"x", 3, 1), (b"y", 2, 1), set()))
        delays.append(adapter._dump_retry_at - time.monotonic())
    assert delays[0] > 0.5 and delays[1] > 1.5 and delays[2] > 3.5  # 1 s, 2 s, 4 s
    assert len(raft.full) == 3
    assert not os.path.exists(str(raft._journal.directory) + "/raft.dump.tmp")
    # While backing off, pysyncobj's compaction is not even attempted.
    raft._SyncObj__forceLogCompaction = True
    raft._SyncObj__tryLogCompaction()
    assert raft._SyncObj__forceLogCompaction


def test_a_record_damaged_under_a_running_node_halts_it(raft):
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 6)])
    journal = raft._journal
    journal._cache.clear()  # force reads from the file
    offset = journal._offsets[1]
    with open(journal.path, "r+b") as f:
        f.seek(offset + raft_journal.HEADER_SIZE)
        f.write(b"\xff")
    raft._SyncObj__leaderCommitIndex = raft._SyncObj__raftCommitIndex = 5
    raft._onTick(0)
    assert len(raft.halts) == 1 and "changed on disk while running" in raft.halts[0]


def test_proposals_wake_the_tick_thread_through_a_pipe_drained_by_one_read(raft, monkeypatch):
    pipe = raft._SyncObj__pipeNotifier._PipeNotifier__pipeR
    for i in range(3):
        raft.apply_command(b"cmd%d" % i, callback=lambda result, reason: None)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(fd) or real_read(fd, n))
    with raft._tick_lock:  # the poller waits without it, as the tick thread does
        raft._poller.poll(0)
    monkeypatch.undo()
    assert reads == [pipe]  # pysyncobj's own drain reads again, until EAGAIN
    with pytest.raises(BlockingIOError):
        os.read(pipe, 1)
    # Only this object's pipe changed: pysyncobj's class keeps its own drain.
    assert PipeNotifier._PipeNotifier__onNewNotification.__module__ == "pysyncobj.pipe_notifier"


def test_a_dump_load_keeps_the_entries_after_the_dump_that_compaction_had_not_trimmed(raft):
    # A node stopped after writing its dump at entry 8 and before the next tick dropped the
    # entries it covers: its journal still starts at 1. pysyncobj keeps the journal across
    # the load only when it starts with the dump's last two entries, else replaces it with
    # them, and the acknowledged entries 9-11 (not applied yet) would be gone.
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 12)])
    previous, last = raft._journal[6], raft._journal[7]
    assert (previous[1], last[1]) == (7, 8)
    raft._adapter._keep_entries_after_dump(previous, last)
    journal = raft._journal
    assert journal[0] == previous and journal[1] == last  # pysyncobj's check now holds
    assert (journal.first_index, journal.last_index) == (7, 11)
    on_disk = raft_journal.FileJournal(journal.directory)
    assert [e[1] for e in on_disk[:]] == [7, 8, 9, 10, 11]
    on_disk._destroy()


def test_a_proposal_is_taken_on_its_own_thread_while_the_tick_waits_in_its_poll(raft):
    become_leader(raft)
    last = raft._journal.last_index
    for node in (raft.leader, raft.other):  # both followers caught up: no probing
        acknowledge(raft, node, last)  # (a tick: a proposing thread may now take its own)
    raft._SyncObj__connectedNodes.update({raft.leader, raft.other})  # the tick dropped them
    pipe = raft._SyncObj__pipeNotifier._PipeNotifier__pipeR
    with pytest.raises(BlockingIOError):
        os.read(pipe, 1)
    raft.events.clear()
    answers = []
    raft.submit(b"payload", lambda result, reason: answers.append(reason))
    # Appended, sent to both followers and synced before submit returned; no tick ran and
    # the tick thread was not woken.
    assert raft._journal.last_index == last + 1
    sends = [e[1] for e in raft.events if e[0] == "send" and e[2] == "append_entries"]
    assert sorted(sends) == sorted([raft.leader.address, raft.other.address])
    assert raft.events[-1] == "fdatasync"
    with pytest.raises(BlockingIOError):
        os.read(pipe, 1)
    acknowledge(raft, raft.other, last + 1)
    assert answers == [0]  # FAIL_REASON.SUCCESS: committed and applied
    # While the tick thread holds its lock, a proposal goes pysyncobj's way: queued, and the
    # tick thread woken through its pipe.
    with raft._tick_lock:
        raft.submit(b"second", lambda result, reason: None)
        assert raft._journal.last_index == last + 1
    assert os.read(pipe, 1)


def test_a_stalled_apply_resumes_only_at_the_first_entry_after_the_last_commit(raft):
    # A database that found its disk full stalls applying; pysyncobj's apply loop then goes
    # on through the tick's committed entries, each answered "stalled", and the tick rewinds
    # to the last commit. If the retry time passes in the middle of that loop, a later entry
    # must not apply: the database would commit without the entries skipped before it.
    from sealkv.node.replication.adapter import _STALLED
    from sealkv.node.state import commands as cmd

    adapter = raft._adapter
    last = raft.raftLastApplied
    adapter._committed_raft_index = last
    adapter._stalled, adapter._stalled_until = True, time.monotonic() - 1  # retry is due
    raft._SyncObj__raftLastApplied = last + 1  # this tick's loop skipped entry last + 1
    assert adapter._apply(cmd.encode(cmd.Put(b"k2", b"v"))) is _STALLED  # entry last + 2
    assert adapter._stalled
    raft._SyncObj__raftLastApplied = last  # the tick's rewind to the last commit
    assert adapter._apply(cmd.encode(cmd.Put(b"k1", b"v"))) is not _STALLED  # last + 1
    assert not adapter._stalled
    assert adapter.sm.base.get(b"k1") is not None and adapter.sm.base.get(b"k2") is None

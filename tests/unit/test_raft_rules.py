"""The Raft rules sealkv enforces around pysyncobj: the follower's append rule and the
leader's progress (next index) tracking, driven through a real, un-ticked Raft object."""
import socket
import time

import pytest
from pysyncobj import FAIL_REASON, SyncObjConf
from pysyncobj.journal import MemoryJournal
from pysyncobj.node import TCPNode
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from sealkv.node.replication import safe_pickle
from sealkv.node.replication.adapter import ReplicationAdapter, _RaftObject
from sealkv.node.replication.journal import FileJournal
from sealkv.node.replication.raft_rules import (CommittedConflict, MalformedAppend,
                                                plan_append)
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def entry(index: int, term: int, tag: str = "") -> tuple:
    """A fresh journal entry (a new tuple each call, so identity shows what was kept)."""
    return (bytes([_COMMAND_TYPE.REGULAR]) + f"{index}/{term}{tag}".encode(), index, term)


def membership(index: int, term: int, kind: str, address: str) -> tuple:
    body = safe_pickle._dumps([kind, address, TCPNode(address)])
    return (bytes([_COMMAND_TYPE.MEMBERSHIP]) + body, index, term)


def journal_of(*entries) -> MemoryJournal:
    j = MemoryJournal()
    for e in entries:
        j.add(*e)
    return j


# -- the pure rule --------------------------------------------------------------------------


def test_plan_skips_entries_already_present_with_the_same_term():
    j = journal_of(*(entry(i, 1) for i in range(1, 8)))
    plan = plan_append(j, 3, [entry(4, 1), entry(5, 1), entry(6, 1)], commit_index=2)
    assert plan.truncate_from is None and plan.append == () and plan.last_index == 6


def test_plan_appends_only_the_new_tail_of_an_overlapping_message():
    j = journal_of(*(entry(i, 1) for i in range(1, 6)))
    new = [entry(i, 1) for i in range(4, 9)]
    plan = plan_append(j, 3, new, commit_index=5)
    assert plan.truncate_from is None
    assert [e[1] for e in plan.append] == [6, 7, 8]
    assert plan.last_index == 8


def test_plan_truncates_from_the_first_conflict_only():
    j = journal_of(*(entry(i, 1) for i in range(1, 9)))
    new = [entry(5, 1), entry(6, 2), entry(7, 2)]
    plan = plan_append(j, 4, new, commit_index=5)
    assert plan.truncate_from == 6
    assert [(e[1], e[2]) for e in plan.append] == [(6, 2), (7, 2)]
    assert plan.last_index == 7


def test_plan_refuses_a_conflict_at_or_below_the_commit_index():
    j = journal_of(*(entry(i, 1) for i in range(1, 9)))
    for commit in (6, 7):
        with pytest.raises(CommittedConflict, match="entry 6 conflicts"):
            plan_append(j, 5, [entry(6, 2)], commit_index=commit)


def test_plan_refuses_entries_that_do_not_follow_prev():
    j = journal_of(entry(1, 1))
    with pytest.raises(MalformedAppend):
        plan_append(j, 1, [entry(3, 1)], commit_index=0)


# -- a real Raft object, driven message by message ------------------------------------------


class HaltRecorder:
    """Records halt reasons instead of exiting the process, for tests only."""

    def __init__(self):
        self.reasons = []

    def __call__(self, reason):
        self.reasons.append(reason)


class SentRecorder:
    """Records what the Raft object sends instead of sending it, for tests only."""

    def __init__(self):
        self.sent = []

    def __call__(self, node, message):
        self.sent.append((node.address, message))
        return True

    def last(self):
        return self.sent[-1][1]


@pytest.fixture
def raft(tmp_path):
    """An un-ticked `_RaftObject` (real pysyncobj, real bound port, two silent partners)."""
    obj = make_raft(tmp_path)
    yield obj
    obj.destroy()


def make_raft(tmp_path, me=None, **settings):
    """An un-ticked `_RaftObject` over the journal in `tmp_path` (as it is on disk);
    `settings` are further `SyncObjConf` options."""
    me, leader, other = me or free_address(), free_address(), free_address()
    halt = HaltRecorder()
    adapter = ReplicationAdapter(StateMachine(MemoryStore()), raft_address=me,
                                 partners=[leader, other], data_dir=str(tmp_path),
                                 secret="0123456789abcdef", halt=halt)
    journal = FileJournal(str(tmp_path))
    conf = SyncObjConf(autoTick=False, password=adapter.secret, bindAddress=me, useFork=False,
                       dynamicMembershipChange=True, journalFile=journal, **settings)
    obj = _RaftObject(adapter, me, [leader, other], conf, journal)
    adapter._obj = obj
    sent = SentRecorder()
    obj._SyncObj__transport.send = sent
    obj.halt, obj.sent = halt, sent
    obj.leader, obj.other = TCPNode(leader), TCPNode(other)
    return obj


def append(obj, prev, prev_term, entries, commit, term=2):
    obj._SyncObj__onMessageReceived(obj.leader, {
        'type': 'append_entries', 'term': term, 'commit_index': commit,
        'entries': entries, 'prevLogIdx': prev, 'prevLogTerm': prev_term})
    return obj.sent.last()


def log_of(obj):
    j = obj._SyncObj__raftLog
    return [j[i] for i in range(len(j))]


def test_follower_keeps_matching_entries_of_overlapping_messages(raft):
    first = [entry(i, 1) for i in range(2, 7)]
    assert append(raft, 1, 0, first, commit=3) == {
        'type': 'next_node_idx', 'next_node_idx': 7, 'reset': False, 'success': True}
    kept = log_of(raft)
    # The reply to the first message was slow: the leader sends 4..9 again.
    reply = append(raft, 3, 1, [entry(i, 1, "again") for i in range(4, 10)], commit=5)
    assert reply['success'] and reply['next_node_idx'] == 10
    after = log_of(raft)
    assert [e[1] for e in after] == list(range(1, 10))
    assert all(a is b for a, b in zip(after[:6], kept))  # 1..6 were never rewritten
    assert raft.raftCommitIndex == 5
    assert raft.halt.reasons == []


def test_follower_replaces_only_the_conflicting_suffix(raft):
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 9)], commit=3)
    before = log_of(raft)
    reply = append(raft, 4, 1, [entry(5, 1), entry(6, 2, "new"), entry(7, 2, "new")],
                   commit=3)
    assert reply['success'] and reply['next_node_idx'] == 8
    after = log_of(raft)
    assert [(e[1], e[2]) for e in after] == [(1, 0)] + [(i, 1) for i in range(2, 6)] + [(6, 2), (7, 2)]
    assert all(a is b for a, b in zip(after[:5], before[:5]))
    assert after[5][0].endswith(b"new")


def test_commit_advances_only_over_entries_the_message_vouched_for(raft):
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 9)], commit=1)
    # A heartbeat of a newer leader that has checked only up to index 4.
    append(raft, 4, 1, [], commit=8, term=3)
    assert raft.raftCommitIndex == 4


def test_an_empty_append_that_would_repeat_a_recent_success_is_not_answered(raft, monkeypatch):
    from sealkv.node.replication import raft_rules

    now = [100.0]
    monkeypatch.setattr(raft_rules, "monotonic_time", lambda: now[0])
    period = raft._SyncObj__conf.appendEntriesPeriod
    append(raft, 1, 0, [entry(2, 1), entry(3, 1)], commit=1)
    answered = len(raft.sent.sent)
    append(raft, 3, 1, [], commit=3)  # the commit-only message right after the commit
    assert len(raft.sent.sent) == answered and raft.raftCommitIndex == 3  # applied, silent
    now[0] += 1.5 * period  # a heartbeat a period later: answered (the leader hears it)
    assert append(raft, 3, 1, [], commit=3)['next_node_idx'] == 4
    assert len(raft.sent.sent) == answered + 1
    append(raft, 3, 1, [], commit=3, term=3)  # a new term: always answered
    assert len(raft.sent.sent) == answered + 2
    append(raft, 3, 1, [entry(4, 3)], commit=3, term=3)  # entries: always answered
    assert raft.sent.last()['next_node_idx'] == 5 and len(raft.sent.sent) == answered + 3
    append(raft, 9, 3, [], commit=3, term=3)  # a rejection forgets the last success
    assert raft.sent.last()['success'] is False
    assert append(raft, 4, 3, [], commit=3, term=3)['next_node_idx'] == 5
    assert len(raft.sent.sent) == answered + 5


def test_conflict_at_or_below_commit_halts_and_removes_nothing(raft):
    append(raft, 1, 0, [entry(i, 1) for i in range(2, 9)], commit=6)
    before = log_of(raft)
    replies = len(raft.sent.sent)
    append(raft, 4, 1, [entry(5, 1), entry(6, 3, "evil")], commit=6, term=3)
    assert len(raft.halt.reasons) == 1
    assert "conflict at or below the commit index" in raft.halt.reasons[0]
    assert log_of(raft) == before
    assert len(raft.sent.sent) == replies  # no reply: a halted replica acknowledges nothing
    # Later messages are ignored too.
    append(raft, 8, 1, [entry(9, 3)], commit=6, term=3)
    assert log_of(raft) == before


def test_rejections_name_the_refused_prev_and_hint_where_to_go(raft):
    append(raft, 1, 0, [entry(2, 1), entry(3, 1)], commit=1)
    assert append(raft, 9, 2, [entry(10, 2)], commit=1) == {
        'type': 'next_node_idx', 'next_node_idx': 4, 'reset': True, 'success': False,
        'rejected': 9}
    assert append(raft, 3, 2, [entry(4, 2)], commit=1) == {
        'type': 'next_node_idx', 'next_node_idx': 3, 'reset': True, 'success': False,
        'rejected': 3}


def test_membership_changes_are_reversed_only_for_removed_entries(raft):
    newcomer = free_address()
    calls = []
    original = raft._SyncObj__doChangeCluster

    def spy(request, reverse=False):
        calls.append((request[0], reverse))
        return original(request, reverse)

    raft._SyncObj__doChangeCluster = spy  # instance attribute: a spy, for tests only
    append(raft, 1, 0, [entry(2, 1), membership(3, 1, 'add', newcomer), entry(4, 1)], commit=1)
    assert calls == [('add', False)]
    assert TCPNode(newcomer) in raft.otherNodes
    # Overlap: the membership entry is already there and is neither undone nor redone.
    append(raft, 1, 0, [entry(2, 1), membership(3, 1, 'add', newcomer), entry(4, 1),
                        entry(5, 1)], commit=2)
    assert calls == [('add', False)]
    # A conflict at 3 really removes it: reversed once.
    append(raft, 2, 1, [entry(3, 2)], commit=2, term=2)
    assert calls == [('add', False), ('add', True)]
    assert TCPNode(newcomer) not in raft.otherNodes


def restart_with_log(tmp_path, *entries):
    """A node restarted over a journal holding `entries` after the first no-op, with the
    saved commit index still at 1 (the meta file is written once a second), ticked once."""
    journal = FileJournal(str(tmp_path))
    journal.add(bytes([_COMMAND_TYPE.NO_OP]), 1, 1)
    for e in entries:
        journal.add(*e)
    journal._destroy()
    obj = make_raft(tmp_path)
    obj._onTick(0.0)
    return obj


def test_a_restart_puts_the_logs_latest_membership_in_effect_committed_or_not(tmp_path):
    newcomer, gone = free_address(), free_address()
    noop = (bytes([_COMMAND_TYPE.NO_OP]), 3, 1)
    obj = restart_with_log(tmp_path, membership(2, 1, 'add', gone), noop,
                           membership(4, 1, 'add', newcomer), membership(5, 1, 'rem', gone))
    try:
        assert obj.raftCommitIndex == 1
        # The newcomer may lead already: without it, its connections would be refused.
        assert TCPNode(newcomer) in obj.otherNodes
        assert TCPNode(gone) not in obj.otherNodes
        # Committing the entries changes nothing: the commit of `add gone` does not bring
        # back the member the log removed after it.
        append(obj, 5, 1, [], commit=3, term=1)
        obj._onTick(0.0)
        assert obj.raftLastApplied >= 3
        assert TCPNode(gone) not in obj.otherNodes
        assert TCPNode(newcomer) in obj.otherNodes
    finally:
        obj.destroy()


def test_a_conflict_after_a_restart_still_reverses_an_adopted_membership_entry(tmp_path):
    newcomer = free_address()
    obj = restart_with_log(tmp_path, entry(2, 1), membership(3, 1, 'add', newcomer))
    try:
        assert TCPNode(newcomer) in obj.otherNodes
        append(obj, 2, 1, [entry(3, 2)], commit=2, term=2)
        assert TCPNode(newcomer) not in obj.otherNodes
    finally:
        obj.destroy()


# -- the leader's view of a follower ----------------------------------------------------------


def lead(obj, last_index):
    for i in range(2, last_index):
        obj._SyncObj__raftLog.add(*entry(i, 1))
    obj._SyncObj__setCurrentTerm(2, None)
    obj._SyncObj__onBecomeLeader()  # appends its no-op at last_index
    obj._SyncObj__connectedNodes.add(obj.leader)  # the follower under test
    assert obj._SyncObj__raftState == _RAFT_STATE.LEADER


def reply(obj, next_index, success, rejected=None):
    message = {'type': 'next_node_idx', 'next_node_idx': next_index, 'reset': not success,
               'success': success}
    if rejected is not None:
        message['rejected'] = rejected
    obj._SyncObj__onMessageReceived(obj.leader, message)


def test_a_successful_reply_never_moves_next_index_back(raft):
    lead(raft, 10)
    follower = raft.leader
    nxt, match = raft._SyncObj__raftNextIndex, raft._SyncObj__raftMatchIndex
    for i in range(11, 16):
        raft._SyncObj__raftLog.add(*entry(i, 2))
        raft._SyncObj__sendAppendEntries()
    assert nxt[follower] == 16
    reply(raft, 12, True)  # the reply to an early message arrives late
    assert (nxt[follower], match[follower]) == (16, 11)
    reply(raft, 16, True)
    assert (nxt[follower], match[follower]) == (16, 15)
    sent = [m for a, m in raft.sent.sent if a == follower.address and m['entries']]
    starts = [m['entries'][0][1] for m in sent]
    assert starts == sorted(set(starts))  # no entry was sent twice


def test_rejection_probes_one_message_at_a_time_and_ignores_stale_rejections(raft):
    lead(raft, 10)
    follower = raft.leader
    nxt = raft._SyncObj__raftNextIndex
    raft._SyncObj__sendAppendEntries()
    assert nxt[follower] == 11
    reply(raft, 6, False, rejected=9)  # follower's log ends at 5
    assert nxt[follower] == 6
    reply(raft, 6, False, rejected=10)  # a later in-flight message: stale
    assert nxt[follower] == 6
    raft.sent.sent.clear()
    raft._SyncObj__sendAppendEntries()
    raft._SyncObj__sendAppendEntries()  # the probe is outstanding: nothing more
    probes = [m for a, m in raft.sent.sent if a == follower.address]
    assert len(probes) == 1 and probes[0]['prevLogIdx'] == 5
    assert nxt[follower] == 6  # a probe does not advance the next index
    reply(raft, 11, True)
    raft.sent.sent.clear()
    raft._SyncObj__raftLog.add(*entry(11, 2))
    raft._SyncObj__sendAppendEntries()
    assert nxt[follower] == 12  # replicating (pipelined) again


def test_a_rejection_from_a_stock_follower_backs_off_as_pysyncobj_does(raft):
    lead(raft, 10)
    follower = raft.leader
    raft._SyncObj__sendAppendEntries()
    reply(raft, 7, False)  # no 'rejected' key
    assert raft._SyncObj__raftNextIndex[follower] == 7


# -- the leader's commit index travels with the next AppendEntries ------------------------------


class PollRecorder:
    """A poller that records each wait it is asked for, then waits; for tests only."""

    def __init__(self, inner):
        self.inner = inner
        self.waits = []

    def poll(self, timeout):
        self.waits.append(timeout)
        self.inner.poll(timeout)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def leader(tmp_path):
    """A leader at term 2 whose no-op (index 2) is committed, with both followers connected,
    sending each proposal at once as sealkv does (appendEntriesUseBatch=False); its heartbeat
    period is 10 s, so that no heartbeat carries a commit index during a test."""
    obj = make_raft(tmp_path, appendEntriesUseBatch=False, appendEntriesPeriod=10.0,
                    raftMinTimeout=40.0, raftMaxTimeout=50.0, connectionTimeout=50.0)
    # The silent partners count as connected and are never dialled (the transport would
    # find nobody there and drop them from the connected nodes during a tick).
    obj._SyncObj__transport._preventConnectNodes.update({obj.leader, obj.other})
    lead(obj, 2)
    obj._SyncObj__connectedNodes.add(obj.other)
    obj._onTick(0.0)  # the first tick's start-up steps
    obj.sent.sent.clear()
    reply(obj, 3, True)  # a follower holds the no-op: it commits
    obj._onTick(0.0)
    assert obj.raftLastApplied == 2
    # No caller waits for the no-op on the leader: every node should apply it soon.
    assert commit_reaches_both(obj, 2)
    obj.sent.sent.clear()
    yield obj
    obj.destroy()


def appends_to(obj, address):
    return [m for a, m in obj.sent.sent if a == address and m['type'] == 'append_entries']


def commit_reaches_both(obj, index):
    return all(any(m['commit_index'] >= index for m in appends_to(obj, node.address))
               for node in (obj.leader, obj.other))


def propose(obj, results):
    """A local write (a barrier entry) taken and sent by one tick."""
    from sealkv.node.state import commands as cmd

    obj.apply_command(cmd.encode(cmd.Barrier()),
                      callback=lambda result, reason: results.append(reason))
    obj._onTick(0.0)


def test_a_commit_alone_sends_nothing_the_next_proposal_or_an_idle_leader_soon_carries_it(
        leader):
    from sealkv.node.replication.raft_rules import COMMIT_NOTICE_DELAY

    results = []
    propose(leader, results)  # index 3
    reply(leader, 4, True)
    leader.sent.sent.clear()
    leader._onTick(0.0)
    assert results == [FAIL_REASON.SUCCESS] and leader.raftCommitIndex == 3
    assert leader.sent.sent == []  # pysyncobj would send both followers commit_index 3 now
    # The next proposal's AppendEntries carries it.
    propose(leader, results)  # index 4
    for node in (leader.leader, leader.other):
        sent = appends_to(leader, node.address)
        assert [(m['entries'][-1][1], m['commit_index']) for m in sent] == [(4, 3)]
    assert leader._poller.wake_by is None  # nothing is owed any more
    reply(leader, 5, True)
    leader.sent.sent.clear()
    leader._onTick(0.0)
    assert results == [FAIL_REASON.SUCCESS] * 2 and leader.raftLastApplied == 4
    assert leader.sent.sent == []
    # Idle: the tick's wait ends by the delay, and the next tick sends the commit index.
    polls = leader._poller.inner = PollRecorder(leader._poller.inner)
    deadline = time.monotonic() + 5.0
    while not commit_reaches_both(leader, 4) and time.monotonic() < deadline:
        leader._onTick(1.0)  # the tick thread's usual wait, here 1 s
    assert commit_reaches_both(leader, 4), leader.sent.sent
    assert all(m['entries'] == [] for _, m in leader.sent.sent)
    # Every wait before the tick that sent it ended by the delay; that tick's own wait (after
    # the send) and later ones are as long as asked again.
    *owed, after = polls.waits
    assert owed and max(owed) <= COMMIT_NOTICE_DELAY and after == 1.0


def test_the_commit_of_a_write_a_follower_forwarded_goes_out_at_once(leader):
    # The follower answers its caller once it applied the entry: it must hear the commit.
    leader.apply_command(b"forwarded", callback=None)
    command, _ = leader._SyncObj__commandsQueue.get_nowait()  # the bytes a follower sends
    leader._SyncObj__onMessageReceived(leader.other, {'type': 'apply_command',
                                                      'command': command, 'request_id': 9})
    leader._onTick(0.0)
    assert [m['log_idx'] for a, m in leader.sent.sent
            if m['type'] == 'apply_command_response'] == [3]
    reply(leader, 4, True)
    leader.sent.sent.clear()
    leader._onTick(0.0)
    assert leader.raftLastApplied == 3
    assert commit_reaches_both(leader, 3), leader.sent.sent


def test_the_commit_of_an_entry_whose_caller_tells_followers_goes_out_at_once(leader):
    # An operator's act (the adapter's blocking propose marks its callback): every member
    # applies it right away, so the operator can act on each member once it is answered.
    from sealkv.node.replication.raft_rules import TELL_FOLLOWERS
    from sealkv.node.state import commands as cmd

    def callback(result, reason):
        pass

    setattr(callback, TELL_FOLLOWERS, True)
    leader.apply_command(cmd.encode(cmd.Barrier()), callback=callback)
    leader._onTick(0.0)  # index 3 taken and sent
    reply(leader, 4, True)
    leader.sent.sent.clear()
    leader._onTick(0.0)
    assert leader.raftLastApplied == 3
    assert commit_reaches_both(leader, 3), leader.sent.sent


def commit_owed(leader) -> None:
    """The leader commits entry 3 in a tick and owes its followers the commit index."""
    propose(leader, [])
    reply(leader, 4, True)
    leader.sent.sent.clear()
    leader._onTick(0.0)  # commits 3: owed, not sent
    assert leader.sent.sent == []


def test_a_follower_s_read_index_answer_follows_the_owed_commit_index(leader):
    commit_owed(leader)
    leader._SyncObj__onMessageReceived(leader.other, {'type': 'read_index_request',
                                                      'request_id': 7, 'term': 2})
    seq = sent_of_type(leader, 'read_index_ping')[0][1]['seq']
    leader._SyncObj__onMessageReceived(leader.leader, {'type': 'read_index_pong', 'term': 2,
                                                       'seq': seq})
    to_follower = [m for a, m in leader.sent.sent if a == leader.other.address
                   and m['type'] in ('append_entries', 'read_index_response')]
    assert [m['type'] for m in to_follower] == ['append_entries', 'read_index_response']
    assert to_follower[0]['commit_index'] >= to_follower[1]['index'] == 3
    assert leader._poller.wake_by is None


def test_a_leadership_transfer_sends_the_owed_commit_index_before_timeout_now(leader):
    commit_owed(leader)
    answers = []
    leader.transferLeadership(leader.leader, callback=lambda res, reason: answers.append(reason))
    assert answers == [FAIL_REASON.SUCCESS]
    to_target = [m for a, m in leader.sent.sent if a == leader.leader.address]
    assert [m['type'] for m in to_target] == ['append_entries', 'timeout_now']
    assert to_target[0]['commit_index'] == 3


# -- elections: PreVote, the leader lease, stale terms -----------------------------------------


def term_of(obj):
    return obj._SyncObj__raftCurrentTerm


def expire_election_timeout(obj):
    obj._SyncObj__raftElectionDeadline = 0
    obj._SyncObj__connectedNodes.update({obj.leader, obj.other})


def sent_of_type(obj, kind):
    return [(a, m) for a, m in obj.sent.sent if m['type'] == kind]


def pre_vote(obj, term, last_index=1, last_term=0, sender=None):
    obj._SyncObj__onMessageReceived(sender or obj.other, {
        'type': 'pre_vote', 'term': term, 'last_log_index': last_index,
        'last_log_term': last_term})
    return obj.sent.last()


def test_an_expired_election_timeout_asks_for_pre_votes_without_raising_the_term(raft):
    for _ in range(5):
        expire_election_timeout(raft)
        raft._election_tick()
    assert term_of(raft) == 0
    assert raft._SyncObj__raftState == _RAFT_STATE.FOLLOWER
    asks = sent_of_type(raft, 'pre_vote')
    assert len(asks) == 10 and all(m['term'] == 1 for _, m in asks)
    assert sent_of_type(raft, 'request_vote') == []


def test_a_quorum_of_pre_votes_starts_a_real_election(raft):
    expire_election_timeout(raft)
    raft._election_tick()
    raft._SyncObj__onMessageReceived(raft.leader, {
        'type': 'pre_vote_response', 'term': 1, 'granted': True, 'current_term': 0})
    raft._election_tick()
    assert term_of(raft) == 1
    assert raft._SyncObj__raftState == _RAFT_STATE.CANDIDATE
    votes = sent_of_type(raft, 'request_vote')
    assert len(votes) == 2 and all(m['term'] == 1 and 'transfer' not in m for _, m in votes)


def test_a_refused_pre_vote_from_a_higher_term_catches_the_term_up(raft):
    expire_election_timeout(raft)
    raft._election_tick()
    raft._SyncObj__onMessageReceived(raft.leader, {
        'type': 'pre_vote_response', 'term': 1, 'granted': False, 'current_term': 4})
    assert term_of(raft) == 4 and raft._SyncObj__raftState == _RAFT_STATE.FOLLOWER
    raft._election_tick()
    assert sent_of_type(raft, 'request_vote') == []


def test_a_voter_that_hears_its_leader_grants_no_pre_vote_and_keeps_its_term(raft):
    append(raft, 1, 0, [entry(2, 1)], commit=1, term=1)
    assert pre_vote(raft, 2, 2, 1)['granted'] is False
    raft._leader_contact -= 10  # the leader has been silent for longer than the timeout
    answer = pre_vote(raft, 2, 2, 1)
    assert answer == {'type': 'pre_vote_response', 'term': 2, 'granted': True,
                      'current_term': 1}
    assert term_of(raft) == 1  # answering changes nothing here
    assert pre_vote(raft, 1, 2, 1)['granted'] is False  # not above our term
    assert pre_vote(raft, 2, 1, 0)['granted'] is False  # log behind ours


def test_a_request_vote_is_ignored_while_the_leader_is_alive_unless_a_transfer(raft):
    append(raft, 1, 0, [entry(2, 1)], commit=1, term=1)
    request = {'type': 'request_vote', 'term': 5, 'last_log_index': 2, 'last_log_term': 1}
    raft._SyncObj__onMessageReceived(raft.other, dict(request))
    assert term_of(raft) == 1 and sent_of_type(raft, 'response_vote') == []
    raft._SyncObj__onMessageReceived(raft.other, dict(request, transfer=True))
    assert term_of(raft) == 5 and len(sent_of_type(raft, 'response_vote')) == 1


def test_a_leadership_transfer_campaigns_at_once_and_says_so(raft):
    append(raft, 1, 0, [entry(2, 1)], commit=1, term=1)
    raft._SyncObj__onMessageReceived(raft.leader, {'type': 'timeout_now', 'term': 1})
    raft._SyncObj__connectedNodes.add(raft.leader)
    raft._election_tick()
    votes = sent_of_type(raft, 'request_vote')
    assert term_of(raft) == 2 and votes and all(m.get('transfer') is True for _, m in votes)


def test_append_entries_of_a_lower_term_is_answered_with_our_term(raft):
    append(raft, 1, 0, [entry(2, 3)], commit=1, term=3)
    assert append(raft, 2, 3, [], commit=1, term=2) == {'type': 'stale_term', 'term': 3}


def test_a_leader_told_of_a_higher_term_steps_down(raft):
    lead(raft, 4)
    raft._SyncObj__onMessageReceived(raft.other, {'type': 'stale_term', 'term': 9})
    assert raft._SyncObj__raftState == _RAFT_STATE.FOLLOWER and term_of(raft) == 9


def test_new_messages_pass_the_whitelist_unpickler():
    for message in ({'type': 'pre_vote', 'term': 3, 'last_log_index': 10, 'last_log_term': 2},
                    {'type': 'pre_vote_response', 'term': 3, 'granted': True,
                     'current_term': 2},
                    {'type': 'stale_term', 'term': 4},
                    {'type': 'request_vote', 'term': 3, 'last_log_index': 1,
                     'last_log_term': 1, 'transfer': True},
                    {'type': 'next_node_idx', 'next_node_idx': 4, 'reset': True,
                     'success': False, 'rejected': 9}):
        assert safe_pickle.safe_loads(safe_pickle._dumps(message)) == message


def test_pysyncobj_s_own_election_never_fires_in_a_whole_tick(raft):
    for _ in range(3):
        expire_election_timeout(raft)
        raft._onTick(0.0)
    assert term_of(raft) == 0
    assert sent_of_type(raft, 'request_vote') == []
    assert len(sent_of_type(raft, 'pre_vote')) >= 4  # the first tick loads the dump first

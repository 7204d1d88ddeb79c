"""ReadIndex: the bookkeeping (read_index.py: which reads share a round, when a quorum has
confirmed it, which answers do not count) and its driver on a real, un-ticked Raft object
(raft_rules.py: pings, pongs, requests, fallbacks)."""
import pytest
from pysyncobj.syncobj import _RAFT_STATE

from sealkv.node import errors
from sealkv.node.replication import safe_pickle
from sealkv.node.replication.read_index import (
    FollowerRequests, LeaderRounds, ReadIndexFallback,
)
from tests.unit.test_raft_rules import (  # noqa: F401 (raft is a fixture)
    append, entry, lead, raft, sent_of_type, term_of,
)

A, B, C, D = "a", "b", "c", "d"  # the other voters, as the driver names nodes


def test_a_round_is_confirmed_by_a_quorum_counting_the_leader():
    rounds = LeaderRounds(timeout=1.0)
    rounds.add("r1")
    started = rounds.start(0.0, index=7, term=3, voters={A, B})  # three voters in all
    assert started is not None and not started.confirmed
    assert rounds.ack(A, started.seq, 3) is started  # leader + A = 2 of 3
    assert started.confirmed and started.index == 7 and started.waiters == ["r1"]
    assert rounds.current is None


def test_five_voters_need_two_answers_and_duplicates_count_once():
    rounds = LeaderRounds(timeout=1.0)
    rounds.add("r1")
    started = rounds.start(0.0, 7, 3, {A, B, C, D})
    assert rounds.ack(A, started.seq, 3) is None
    assert rounds.ack(A, started.seq, 3) is None  # the same voter again
    assert rounds.ack(B, started.seq, 3) is started


def test_answers_of_another_round_term_or_node_do_not_count():
    rounds = LeaderRounds(timeout=1.0)
    rounds.add("r1")
    started = rounds.start(0.0, 7, 3, {A, B})
    assert rounds.ack(A, started.seq - 1, 3) is None  # an older round
    assert rounds.ack(A, started.seq, 2) is None  # an older term
    assert rounds.ack(A, started.seq, 4) is None  # not the round's term
    assert rounds.ack("learner", started.seq, 3) is None  # not a voter of the round
    assert rounds.ack(C, started.seq, 3) is None  # joined after the round started
    assert not started.confirmed and rounds.current is started


def test_a_single_voter_confirms_at_once():
    rounds = LeaderRounds(timeout=1.0)
    rounds.add("r1")
    started = rounds.start(0.0, 5, 1, set())
    assert started.confirmed and rounds.current is None


def test_reads_that_arrive_during_a_round_share_the_next_one():
    rounds = LeaderRounds(timeout=1.0)
    rounds.add("r1")
    rounds.add("r2")
    first = rounds.start(0.0, 7, 3, {A, B})
    rounds.add("r3")
    rounds.add("r4")
    assert rounds.start(0.1, 8, 3, {A, B}) is None  # one round in flight at a time
    assert rounds.ack(B, first.seq, 3) is first
    assert first.waiters == ["r1", "r2"]
    second = rounds.start(0.2, 9, 3, {A, B})
    assert second.waiters == ["r3", "r4"] and second.seq == first.seq + 1
    assert second.index == 9  # the commit index when the round started, not before
    assert rounds.ack(A, first.seq, 3) is None  # a late answer to the first round


def test_a_round_without_a_quorum_expires_and_nothing_starts_without_reads():
    rounds = LeaderRounds(timeout=1.0)
    assert rounds.start(0.0, 7, 3, {A, B}) is None and rounds.idle
    rounds.add("r1")
    started = rounds.start(0.0, 7, 3, {A, B})
    assert rounds.expired(0.5) is None
    assert rounds.expired(1.0) is started and rounds.current is None
    assert rounds.ack(A, started.seq, 3) is None


def test_drain_ends_the_round_in_flight_and_the_pending_reads():
    rounds = LeaderRounds(timeout=1.0)
    rounds.add("r1")
    rounds.start(0.0, 7, 3, {A, B})
    rounds.add("r2")
    assert rounds.drain() == ["r1", "r2"] and rounds.idle


def test_a_follower_sends_one_request_at_a_time_and_drops_one_to_a_former_leader():
    requests = FollowerRequests(timeout=2.0)
    requests.add("r1")
    sent = requests.start(0.0, leader=A, term=3)
    assert sent.target == A and sent.waiters == ["r1"]
    requests.add("r2")
    assert requests.start(0.1, A, 3) is None
    assert requests.answer(sent.seq + 1) is None  # not the request in flight
    assert requests.answer(sent.seq) is sent
    second = requests.start(0.2, A, 3)
    assert second.waiters == ["r2"]
    assert requests.leader_gone(A) is None
    assert requests.leader_gone(B) is second  # the leader changed: it may never answer
    assert requests.answer(second.seq) is None  # its late answer is ignored
    requests.add("r3")
    third = requests.start(0.3, B, 4)
    assert requests.leader_gone(None) is third  # no leader known any more


# -- the tick-thread driver (raft_rules), on a real un-ticked Raft object ------------------

class Answers:
    """Collects what `read_index` answers, for tests only."""

    def __init__(self):
        self.got = []

    def __call__(self, index, error):
        self.got.append((index, error))


def ask(obj) -> Answers:
    answers = Answers()
    obj.read_index(answers)
    obj._read_tick()
    return answers


def pong(obj, node, seq, term=2):
    obj._SyncObj__onMessageReceived(node, {'type': 'read_index_pong', 'term': term,
                                           'seq': seq})


def leading_with_commit(obj):
    lead(obj, 5)  # term 2, its no-op at index 5
    obj._SyncObj__raftCommitIndex = 5


def test_a_leader_confirms_its_commit_index_with_a_quorum_of_pongs_in_its_term(raft):
    leading_with_commit(raft)
    first, second = Answers(), Answers()
    raft.read_index(first)
    raft.read_index(second)
    raft._read_tick()
    pings = sent_of_type(raft, 'read_index_ping')
    assert len(pings) == 2 and {m['seq'] for _, m in pings} == {1}
    assert all(m['term'] == 2 for _, m in pings)
    assert first.got == [] and second.got == []
    pong(raft, raft.leader, seq=1, term=1)  # another term: not counted
    pong(raft, raft.leader, seq=0)  # another round: not counted
    assert first.got == []
    pong(raft, raft.leader, seq=1)  # leader + one of two others: a quorum of three
    assert first.got == [(5, None)] and second.got == [(5, None)]
    assert raft.read_rounds == 1


def test_reads_during_a_round_share_the_next_one_at_the_commit_index_then(raft):
    leading_with_commit(raft)
    early = ask(raft)
    raft._SyncObj__raftCommitIndex = 7  # writes committed while the round is out
    late = ask(raft)
    assert len(sent_of_type(raft, 'read_index_ping')) == 2  # no second round yet
    pong(raft, raft.other, seq=1)
    assert early.got == [(5, None)] and late.got == []
    second = sent_of_type(raft, 'read_index_ping')[2:]
    assert second and all(m['seq'] == 2 for _, m in second)
    pong(raft, raft.other, seq=2)
    assert late.got == [(7, None)]


def test_a_leader_without_a_committed_entry_of_its_term_falls_back(raft):
    lead(raft, 5)  # the no-op is not committed
    answers = ask(raft)
    assert len(answers.got) == 1 and isinstance(answers.got[0][1], ReadIndexFallback)
    assert sent_of_type(raft, 'read_index_ping') == []


def test_an_uncommitted_membership_change_makes_reads_fall_back(raft):
    leading_with_commit(raft)
    raft._membership_change_index = 6
    assert isinstance(ask(raft).got[0][1], ReadIndexFallback)
    raft._SyncObj__raftCommitIndex = 6
    assert ask(raft).got == []  # a round is out
    assert sent_of_type(raft, 'read_index_ping')


def test_a_pong_of_a_higher_term_deposes_the_leader_and_its_reads_retry(raft):
    leading_with_commit(raft)
    answers = ask(raft)
    pong(raft, raft.leader, seq=1, term=7)
    assert raft._SyncObj__raftState == _RAFT_STATE.FOLLOWER and term_of(raft) == 7
    raft._read_tick()
    assert len(answers.got) == 1 and isinstance(answers.got[0][1], errors.Aborted)


def test_an_unanswered_round_falls_back_and_reads_use_barriers_for_a_while(raft):
    leading_with_commit(raft)
    answers = ask(raft)
    raft._rounds.current.started -= raft._rounds.timeout
    raft._read_tick()
    assert isinstance(answers.got[0][1], ReadIndexFallback)
    pings = len(sent_of_type(raft, 'read_index_ping'))
    assert isinstance(ask(raft).got[0][1], ReadIndexFallback)  # no new round for now
    assert len(sent_of_type(raft, 'read_index_ping')) == pings


def test_a_voter_echoes_only_its_leader_in_its_term(raft):
    append(raft, 1, 0, [entry(2, 3)], commit=1, term=3)  # follows raft.leader in term 3
    ping = {'type': 'read_index_ping', 'term': 3, 'seq': 4}
    raft._SyncObj__onMessageReceived(raft.other, dict(ping))  # not its leader
    assert sent_of_type(raft, 'read_index_pong') == []
    raft._SyncObj__onMessageReceived(raft.leader, dict(ping, term=5))  # not its term
    assert sent_of_type(raft, 'read_index_pong') == []
    raft._SyncObj__onMessageReceived(raft.leader, dict(ping, term=2))  # a deposed leader
    assert raft.sent.last() == {'type': 'stale_term', 'term': 3}
    raft._SyncObj__onMessageReceived(raft.leader, dict(ping))
    assert raft.sent.last() == {'type': 'read_index_pong', 'term': 3, 'seq': 4}


def test_a_follower_asks_its_leader_once_for_concurrent_reads(raft):
    append(raft, 1, 0, [entry(2, 3)], commit=1, term=3)
    first = ask(raft)
    second = ask(raft)
    requests = sent_of_type(raft, 'read_index_request')
    assert len(requests) == 1 and requests[0][0] == raft.leader.address
    request_id = requests[0][1]['request_id']
    raft._SyncObj__onMessageReceived(raft.other, {  # not from the node asked: ignored
        'type': 'read_index_response', 'request_id': request_id, 'index': 99})
    raft._SyncObj__onMessageReceived(raft.leader, {
        'type': 'read_index_response', 'request_id': request_id, 'index': 9})
    assert first.got == [(9, None)]
    assert second.got == []  # it arrived while the request was out: it shares the next
    follow_up = sent_of_type(raft, 'read_index_request')[1:]
    assert len(follow_up) == 1
    raft._SyncObj__onMessageReceived(raft.leader, {
        'type': 'read_index_response', 'request_id': follow_up[0][1]['request_id'],
        'error': 'fallback'})
    assert isinstance(second.got[0][1], ReadIndexFallback)


def test_a_follower_whose_leader_changes_fails_its_reads_retryably(raft):
    append(raft, 1, 0, [entry(2, 3)], commit=1, term=3)
    answers = ask(raft)
    raft._SyncObj__raftLeader = raft.other
    raft._read_tick()
    assert len(answers.got) == 1 and isinstance(answers.got[0][1], errors.Aborted)


def test_a_leader_answers_a_follower_s_request_after_its_round(raft):
    leading_with_commit(raft)
    raft._SyncObj__onMessageReceived(raft.other, {'type': 'read_index_request',
                                                  'request_id': 3, 'term': 2})
    assert sent_of_type(raft, 'read_index_response') == []
    pong(raft, raft.leader, seq=1)
    assert sent_of_type(raft, 'read_index_response') == [
        (raft.other.address, {'type': 'read_index_response', 'request_id': 3, 'index': 5})]


@pytest.mark.parametrize("message", [
    {'type': 'read_index_ping', 'term': 3, 'seq': 1},
    {'type': 'read_index_pong', 'term': 3, 'seq': 1},
    {'type': 'read_index_request', 'request_id': 2, 'term': 3},
    {'type': 'read_index_response', 'request_id': 2, 'index': 40},
    {'type': 'read_index_response', 'request_id': 2, 'error': 'fallback'},
])
def test_read_index_messages_pass_the_whitelist_unpickler(message):
    assert safe_pickle.safe_loads(safe_pickle._dumps(message)) == message

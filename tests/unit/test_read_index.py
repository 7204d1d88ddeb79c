"""The ReadIndex bookkeeping (read_index.py): which reads share a round, when a quorum has
confirmed it, and which answers do not count."""
from sealkv.node.replication.read_index import FollowerRequests, LeaderRounds

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

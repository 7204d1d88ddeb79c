"""Unit tests of the capability fan-out (sealkv.plugins.fanout) with a scripted prober.

No sockets and no sleeps: members answer through `Prober`, a fake probe function, and a hung
member blocks on an event until the test ends. The real gRPC path (GetCapability between node
processes, a node without the plugin answering UNIMPLEMENTED) is covered by
tests/integration/test_encryption_admin.py.
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from sealkv.node import errors
from sealkv.node.replication.membership import MemberRecord, MembershipSnapshot
from sealkv.node.state import commands as cmd
from sealkv.plugins.fanout import ProbeAnswer, fan_out, fan_out_and_act, probe_member


class FakeRpcError(grpc.RpcError):
    """A failed RPC with a status code; for tests only."""

    def __init__(self, code: grpc.StatusCode, details: str = ""):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Prober:
    """A scripted probe; for tests only.

    `answers` maps a gRPC address to a `ProbeAnswer`, an exception to raise, or "hang" (block
    until `release` is set). `calls` counts the probes per address; `barrier`, when set, makes
    every probe wait for the others (it only passes when the probes run concurrently).
    """

    def __init__(self, answers, barrier=None):
        self.answers = dict(answers)
        self.calls: dict[str, int] = {}
        self.release = threading.Event()
        self.barrier = barrier
        self._lock = threading.Lock()

    def __call__(self, member, channel, timeout):
        assert channel == f"channel:{member.grpc_address}"
        with self._lock:
            self.calls[member.grpc_address] = self.calls.get(member.grpc_address, 0) + 1
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        answer = self.answers[member.grpc_address]
        if answer == "hang":
            self.release.wait(30)
            return ProbeAnswer(0, True)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeHandle:
    """A node handle with a scripted membership and a real membership lock; for tests only.

    `snapshots` is a list of (config_version, members); each `membership_snapshot()` call
    returns the next one (the last repeats).
    """

    def __init__(self, snapshots):
        self.snapshots = list(snapshots)
        self.calls = 0
        self.membership_lock = threading.RLock()

    def membership_snapshot(self):
        version, members = self.snapshots[min(self.calls, len(self.snapshots) - 1)]
        self.calls += 1
        voters = tuple(m for m in members if m.role == cmd.ROLE_VOTER)
        learners = tuple(m for m in members if m.role == cmd.ROLE_LEARNER)
        return MembershipSnapshot(voters, learners, None, 1, 0, 0, version)

    def channel(self, address):
        return f"channel:{address}"


IDS = {"n1": 101, "n2": 102, "n3": 103, "l1": 201}


def expected(member):
    return IDS.get(member.name)


def voter(name):
    return MemberRecord(name, f"raft-{name}", f"grpc-{name}", cmd.ROLE_VOTER)


def learner(name):
    return MemberRecord(name, "", f"grpc-{name}", cmd.ROLE_LEARNER)


def capable(node_id):
    return ProbeAnswer(node_id, True, "", {"seen": "yes"})


@pytest.fixture
def prober():
    made = []

    def make(answers, barrier=None):
        made.append(Prober(answers, barrier))
        return made[-1]

    yield make
    for p in made:
        p.release.set()


def test_every_capable_member_passes_and_each_gets_a_verdict(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": capable(102),
                    "grpc-l1": capable(201)})
    result = fan_out(FakeHandle([(7, [voter("n1"), voter("n2"), learner("l1")])]), probe,
                     expected)
    assert result.ok, result.summary()
    assert result.config_version == 7 and result.rounds == 1
    by_name = {v.member: v for v in result.verdicts}
    assert sorted(by_name) == ["l1", "n1", "n2"]
    assert by_name["l1"].role == "learner" and by_name["l1"].responder_id == 201
    assert by_name["n1"].details["seen"] == "yes"
    assert result.summary().startswith("all 3 members capable")


def test_a_hung_member_cannot_hold_the_call_past_the_deadline(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": "hang"})
    result = fan_out(FakeHandle([(1, [voter("n1"), voter("n2")])]), probe, expected,
                     deadline=0.3)
    assert not result.ok
    (failure,) = result.failures
    assert failure.member == "n2" and "did not answer within 0.3s" in failure.reason
    assert "n2" in result.summary() and "did not answer" in result.summary()


@pytest.mark.parametrize("code,details,reason", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect; Connection refused", "unreachable"),
    (grpc.StatusCode.UNAVAILABLE, "failed to connect; Socket closed",
     "refused TLS: no mutual TLS with this node's certificate"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded",
     "timeout: did not answer before the deadline"),
    (grpc.StatusCode.UNIMPLEMENTED, "Method not found",
     "not capable: it does not serve the capability RPC (plugin not enabled there)"),
    (grpc.StatusCode.PERMISSION_DENIED, "node certificate may not call",
     "refused TLS: it does not accept this node's certificate"),
    (grpc.StatusCode.INTERNAL, "internal error in X", "probe failed (INTERNAL)"),
])
def test_a_failed_rpc_is_a_verdict_named_by_its_reason_class(prober, code, details, reason):
    # The class only, never the transport's text: a member address is operator input, and
    # the text would tell a caller what answers at any address.
    probe = prober({"grpc-n1": capable(101), "grpc-n2": FakeRpcError(code, details)})
    result = fan_out(FakeHandle([(1, [voter("n1"), voter("n2")])]), probe, expected)
    (failure,) = result.failures
    assert failure.member == "n2" and failure.reason == reason


def test_a_probe_that_raises_something_else_fails_the_member(prober):
    probe = prober({"grpc-n1": ValueError("bad answer")})
    (failure,) = fan_out(FakeHandle([(1, [voter("n1")])]), probe, expected).failures
    assert failure.reason == "probe failed (ValueError)"


def test_a_member_that_is_not_capable_fails_with_its_reason(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": ProbeAnswer(102, False, "no KEK")})
    result = fan_out(FakeHandle([(1, [voter("n1"), voter("n2")])]), probe, expected)
    (failure,) = result.failures
    assert failure.member == "n2" and failure.reason == "not capable: no KEK"
    assert "n2" in result.summary() and "no KEK" in result.summary()


def test_a_responder_with_another_node_id_fails(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": capable(999)})
    (failure,) = fan_out(FakeHandle([(1, [voter("n1"), voter("n2")])]), probe,
                         expected).failures
    assert failure.member == "n2" and failure.responder_id == 999
    assert "mismatched responder" in failure.reason


def test_malformed_rows_always_fail_and_are_never_merged(prober):
    probe = prober({"grpc-n1": capable(101)})
    rows = [voter("n1"), MemberRecord("", "raft-x", "", cmd.ROLE_VOTER),
            MemberRecord("", "raft-y", "", cmd.ROLE_VOTER),
            MemberRecord("l9", "", "", cmd.ROLE_LEARNER)]
    result = fan_out(FakeHandle([(1, rows)]), probe, lambda m: None)
    assert not result.ok and len(result.failures) == 3
    assert all("malformed member row" in v.reason for v in result.failures)
    assert probe.calls == {"grpc-n1": 1}


def test_rows_are_deduplicated_by_expected_id_else_by_address(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-a": capable(0)})
    rows = [voter("n1"), MemberRecord("n1-again", "", "grpc-n1", cmd.ROLE_LEARNER),
            MemberRecord("a", "", "grpc-a", cmd.ROLE_LEARNER),
            MemberRecord("b", "", "grpc-a", cmd.ROLE_LEARNER)]
    result = fan_out(FakeHandle([(1, rows)]), probe,
                     lambda m: 101 if m.name.startswith("n1") else None)
    assert result.ok, result.summary()
    assert probe.calls == {"grpc-n1": 1, "grpc-a": 1}
    merged = {v.member: v.details.get("merged_rows") for v in result.verdicts}
    assert merged == {"n1": "n1,n1-again", "a": "a,b"}


def test_an_empty_member_set_refuses(prober):
    result = fan_out(FakeHandle([(1, [])]), prober({}), expected)
    assert not result.ok and "no members" in result.summary()


def test_a_snapshot_that_cannot_be_taken_refuses(prober):
    class Broken(FakeHandle):
        """A handle whose snapshot fails; for tests only."""

        def membership_snapshot(self):
            raise RuntimeError("membership changing")

    result = fan_out(Broken([]), prober({}), expected)
    assert not result.ok and "snapshot could not be taken" in result.summary()


def test_a_member_that_joins_mid_check_is_probed(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": capable(102),
                    "grpc-n3": ProbeAnswer(103, False, "old build")})
    before = [voter("n1"), voter("n2")]
    result = fan_out(FakeHandle([(1, before), (2, before + [voter("n3")])]), probe, expected)
    assert result.rounds == 2 and result.config_version == 2
    assert probe.calls == {"grpc-n1": 2, "grpc-n2": 2, "grpc-n3": 1}
    assert [v.member for v in result.failures] == ["n3"]


def test_a_membership_that_keeps_changing_refuses_after_max_rounds(prober):
    probe = prober({"grpc-n1": capable(101)})
    handle = FakeHandle([(v, [voter("n1")]) for v in range(1, 10)])
    result = fan_out(handle, probe, expected, max_rounds=3)
    assert not result.ok and result.rounds == 3 and "kept changing" in result.summary()
    assert probe.calls == {"grpc-n1": 3} and handle.calls == 4


def test_probes_run_concurrently(prober):
    # Each probe waits at a barrier for the other two: only concurrent probes get past it.
    probe = prober({f"grpc-n{i}": capable(100 + i) for i in (1, 2, 3)},
                   barrier=threading.Barrier(3))
    result = fan_out(FakeHandle([(1, [voter("n1"), voter("n2"), voter("n3")])]), probe,
                     expected, deadline=30.0)
    assert result.ok, result.summary()


def test_probe_member_uses_the_same_rules(prober):
    verdict = probe_member(FakeHandle([(1, [])]), voter("n1"), prober({"grpc-n1": capable(7)}),
                           101, 1.0)
    assert not verdict.ok and "mismatched responder" in verdict.reason


# ---- fan_out_and_act: the check and the action under the membership lock ---------------------

def far_end():
    return time.monotonic() + 60


def test_the_action_runs_under_the_membership_lock_at_the_probed_version(prober):
    handle = FakeHandle([(4, [voter("n1")])])
    seen = []

    def action(snapshot):
        # Another thread cannot take the lock while the action runs.
        taken = []
        t = threading.Thread(target=lambda: taken.append(
            handle.membership_lock.acquire(blocking=False)))
        t.start()
        t.join()
        seen.append((snapshot.config_version, taken[0]))
        return "done"

    result, value = fan_out_and_act(handle, prober({"grpc-n1": capable(101)}), expected,
                                    action, what="cutover", end=far_end())
    assert value == "done" and result.ok and seen == [(4, False)]


def test_a_change_between_probe_and_action_probes_again_before_acting(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": capable(102)})
    handle = FakeHandle([(1, [voter("n1")]), (2, [voter("n1"), voter("n2")])])
    versions = []
    result, _ = fan_out_and_act(handle, probe, expected,
                                lambda s: versions.append(s.config_version),
                                what="cutover", end=far_end())
    assert versions == [2] and result.rounds == 2 and probe.calls["grpc-n2"] == 1


def test_a_failed_member_refuses_naming_it_and_nothing_is_done(prober):
    probe = prober({"grpc-n1": capable(101), "grpc-n2": ProbeAnswer(102, False, "no KEK")})
    acted = []
    with pytest.raises(errors.FailedPrecondition, match=r"cutover refused: .*n2.*no KEK"):
        fan_out_and_act(FakeHandle([(1, [voter("n1"), voter("n2")])]), probe, expected,
                        acted.append, what="cutover", end=far_end())
    assert acted == []


def test_a_membership_that_keeps_changing_is_refused_without_acting(prober):
    handle = FakeHandle([(v, [voter("n1")]) for v in range(1, 10)])
    acted = []
    with pytest.raises(errors.FailedPrecondition, match="kept changing"):
        fan_out_and_act(handle, prober({"grpc-n1": capable(101)}), expected, acted.append,
                        what="cutover", end=far_end(), max_rounds=2)
    assert acted == []


def test_a_deadline_too_short_for_a_round_is_unavailable(prober):
    with pytest.raises(errors.Unavailable, match="deadline is too short"):
        fan_out_and_act(FakeHandle([(1, [voter("n1")])]), prober({"grpc-n1": capable(101)}),
                        expected, lambda s: None, what="cutover",
                        end=time.monotonic() + 0.5, reserve=1.0)

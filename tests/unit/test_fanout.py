"""Tests of the capability fan-out (sealkv.plugins.fanout) against real in-process gRPC peers."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from sealkv.node.state import commands as cmd
from sealkv.node.replication.membership import MembershipSnapshot
from sealkv.node.replication.membership import MemberRecord
from sealkv.plugins.fanout import ProbeAnswer, fan_out, probe_member

METHOD = "/sealkv.test.Capability/Get"


class Peer:
    """A real gRPC server answering the test capability RPC; for tests only.

    `answer` is "<responder id>:<capable 0|1>:<reason>"; `hang` makes it wait until released.
    """

    def __init__(self, answer: str, hang: bool = False):
        self.answer = answer
        self.hang = hang
        self.release = threading.Event()
        self.calls = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.unary_unary_rpc_method_handler(self._get)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "sealkv.test.Capability", {"Get": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def _get(self, request, context):
        self.calls += 1
        if self.hang:
            self.release.wait(30)
        return self.answer.encode()

    def stop(self):
        self.release.set()
        self.server.stop(0)


class FakeHandle:
    """A node handle with a scripted membership; for tests only.

    `snapshots` is a list of (config_version, members); each `membership_snapshot()` call
    returns the next one (the last repeats).
    """

    def __init__(self, snapshots):
        self.snapshots = list(snapshots)
        self.calls = 0
        self._channels = {}

    def membership_snapshot(self):
        version, members = self.snapshots[min(self.calls, len(self.snapshots) - 1)]
        self.calls += 1
        voters = tuple(m for m in members if m.role == cmd.ROLE_VOTER)
        learners = tuple(m for m in members if m.role == cmd.ROLE_LEARNER)
        return MembershipSnapshot(voters, learners, None, 1, 0, 0, version)

    def channel(self, address):
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address)
        return self._channels[address]

    def close(self):
        for ch in self._channels.values():
            ch.close()


def probe(member, channel, timeout):
    raw = channel.unary_unary(METHOD)(b"", timeout=timeout).decode()
    responder, capable, reason = raw.split(":", 2)
    return ProbeAnswer(int(responder), capable == "1", reason, {"seen": "yes"})


IDS = {"n1": 101, "n2": 102, "n3": 103, "l1": 201}


def expected(member):
    return IDS.get(member.name)


def voter(name, peer):
    return MemberRecord(name, f"raft-{name}", peer.address if peer else "", cmd.ROLE_VOTER)


def learner(name, peer):
    return MemberRecord(name, "", peer.address if peer else "", cmd.ROLE_LEARNER)


@pytest.fixture
def peers():
    started = []

    def make(answer, hang=False):
        peer = Peer(answer, hang)
        started.append(peer)
        return peer

    yield make
    for peer in started:
        peer.stop()


@pytest.fixture
def handles():
    made = []

    def make(snapshots):
        handle = FakeHandle(snapshots)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        handle.close()


def test_every_capable_member_passes_and_each_gets_a_verdict(peers, handles):
    p1, p2, pl = peers("101:1:"), peers("102:1:"), peers("201:1:")
    members = [voter("n1", p1), voter("n2", p2), learner("l1", pl)]
    result = fan_out(handles([(7, members)]), probe, expected)
    assert result.ok, result.summary()
    assert result.config_version == 7 and result.rounds == 1
    assert sorted(v.member for v in result.verdicts) == ["l1", "n1", "n2"]
    by_name = {v.member: v for v in result.verdicts}
    assert by_name["l1"].role == "learner" and by_name["l1"].responder_id == 201
    assert by_name["n1"].details["seen"] == "yes"
    assert result.summary().startswith("all 3 members capable")


def test_a_hung_peer_cannot_hold_the_call_past_the_deadline(peers, handles):
    good, hung = peers("101:1:"), peers("102:1:", hang=True)
    handle = handles([(1, [voter("n1", good), voter("n2", hung)])])
    start = time.monotonic()
    result = fan_out(handle, probe, expected, deadline=0.5)
    took = time.monotonic() - start
    assert took < 2.0, f"fan-out took {took:.1f}s with a 0.5s deadline"
    assert not result.ok
    (failure,) = result.failures
    assert failure.member == "n2"
    assert "did not answer" in failure.reason
    assert "n2" in result.summary() and "did not answer" in result.summary()
    hung.release.set()
    # A late answer never flips the verdict that was returned.
    time.sleep(0.2)
    assert not result.ok


def test_an_unreachable_member_fails(peers, handles):
    good = peers("101:1:")
    dead = peers("102:1:")
    dead.stop()
    result = fan_out(handles([(1, [voter("n1", good), voter("n2", dead)])]), probe, expected,
                     deadline=2.0)
    assert not result.ok
    (failure,) = result.failures
    assert failure.member == "n2"
    assert failure.reason.startswith(("unreachable", "did not answer"))


def test_a_member_that_is_not_capable_fails_with_its_reason(peers, handles):
    p1, p2 = peers("101:1:"), peers("102:0:no KEK loaded")
    result = fan_out(handles([(1, [voter("n1", p1), voter("n2", p2)])]), probe, expected)
    assert not result.ok
    (failure,) = result.failures
    assert failure.member == "n2" and failure.reason == "not capable: no KEK loaded"
    assert "n2" in result.summary() and "no KEK loaded" in result.summary()


def test_a_responder_with_another_node_id_fails(peers, handles):
    p1, impostor = peers("101:1:"), peers("999:1:")
    result = fan_out(handles([(1, [voter("n1", p1), voter("n2", impostor)])]), probe, expected)
    assert not result.ok
    (failure,) = result.failures
    assert failure.member == "n2" and failure.responder_id == 999
    assert "mismatched responder" in failure.reason


def test_a_peer_without_the_rpc_is_not_capable(peers, handles):
    p1 = peers("101:1:")
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    try:
        member = MemberRecord("n2", "raft-n2", f"127.0.0.1:{port}", cmd.ROLE_VOTER)
        result = fan_out(handles([(1, [voter("n1", p1), member])]), probe, expected)
    finally:
        bare.stop(0)
    (failure,) = result.failures
    assert failure.member == "n2" and failure.reason.startswith("not capable")


def test_malformed_rows_always_fail_and_are_never_merged(peers, handles):
    p1 = peers("101:1:")
    rows = [voter("n1", p1),
            MemberRecord("", "raft-x", "", cmd.ROLE_VOTER),
            MemberRecord("", "raft-y", "", cmd.ROLE_VOTER),
            MemberRecord("l9", "", "", cmd.ROLE_LEARNER)]
    result = fan_out(handles([(1, rows)]), probe, lambda m: None)
    assert not result.ok
    assert len(result.failures) == 3
    assert all("malformed member row" in v.reason for v in result.failures)
    assert p1.calls == 1


def test_rows_are_deduplicated_by_expected_id_else_by_address(peers, handles):
    p1, p2 = peers("101:1:"), peers("0:1:")
    same_id = [voter("n1", p1), MemberRecord("n1-again", "", p1.address, cmd.ROLE_LEARNER)]
    by_address = [MemberRecord("a", "", p2.address, cmd.ROLE_LEARNER),
                  MemberRecord("b", "", p2.address, cmd.ROLE_LEARNER)]

    def ids(member):
        return 101 if member.name.startswith("n1") else None

    result = fan_out(handles([(1, same_id + by_address)]), probe, ids)
    assert result.ok, result.summary()
    assert len(result.verdicts) == 2
    assert p1.calls == 1 and p2.calls == 1
    merged = {v.member: v.details.get("merged_rows") for v in result.verdicts}
    assert merged == {"n1": "n1,n1-again", "a": "a,b"}


def test_an_empty_member_set_refuses(handles):
    result = fan_out(handles([(1, [])]), probe, expected)
    assert not result.ok
    assert "no members" in result.summary()


def test_a_snapshot_that_cannot_be_taken_refuses():
    class Broken:
        """A handle whose snapshot fails; for tests only."""

        def membership_snapshot(self):
            raise RuntimeError("membership changing")

    result = fan_out(Broken(), probe, expected)
    assert not result.ok and "snapshot could not be taken" in result.summary()


def test_a_member_that_joins_mid_check_is_probed(peers, handles):
    p1, p2, late = peers("101:1:"), peers("102:1:"), peers("103:0:old build")
    before = [voter("n1", p1), voter("n2", p2)]
    after = before + [voter("n3", late)]
    # The first snapshot is taken before probing; the second (after) shows a new version.
    result = fan_out(handles([(1, before), (2, after)]), probe, expected)
    assert result.rounds == 2 and result.config_version == 2
    assert late.calls == 1
    assert not result.ok
    assert [v.member for v in result.failures] == ["n3"]


def test_a_membership_that_keeps_changing_refuses(peers, handles):
    p1 = peers("101:1:")
    snapshots = [(v, [voter("n1", p1)]) for v in range(1, 10)]
    result = fan_out(handles(snapshots), probe, expected, max_rounds=3)
    assert not result.ok
    assert result.rounds == 3
    assert "kept changing" in result.summary()


def test_probes_run_concurrently(peers, handles):
    slow = [peers(f"{100 + i}:1:", hang=True) for i in range(1, 4)]
    members = [voter(f"n{i}", p) for i, p in enumerate(slow, start=1)]

    def release_soon():
        time.sleep(0.3)
        for p in slow:
            p.release.set()

    threading.Thread(target=release_soon, daemon=True).start()
    start = time.monotonic()
    result = fan_out(handles([(1, members)]), probe, expected, deadline=3.0)
    assert result.ok, result.summary()
    assert time.monotonic() - start < 1.5


def test_probe_member_uses_the_same_rules(peers, handles):
    impostor = peers("7:1:")
    verdict = probe_member(handles([(1, [])]), voter("n1", impostor), probe, 101, 1.0)
    assert not verdict.ok and "mismatched responder" in verdict.reason

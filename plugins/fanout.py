"""The capability fan-out: ask every cluster member whether it can do something, fail-closed.

An admin plugin that must not switch the cluster to a new behaviour until every member supports
it (the encryption plugin's envelope cutovers are the first user) calls `fan_out` with its own
probe. The contract (ENCRYPTION.md §7 steps 4-6):

- The member set is `handle.membership_snapshot()` (taken under the membership lock): every
  voter and every learner, disconnected ones included. A snapshot that cannot be taken refuses.
- Members are deduplicated by their expected node id where the caller knows one, else by gRPC
  address. Malformed rows (no name or no gRPC address) are never merged and always fail.
- Every unique member is probed concurrently, on its own thread, under ONE overall deadline.
  Each member's verdict slot starts as "did not answer": a hung peer cannot hold the call past
  the deadline, and an answer that arrives after it is ignored.
- A member passes only if it answered, says it is capable, and the responder's id is the
  expected one. No partial success: any failure, or an empty member set, makes `ok` false.
- After probing, the snapshot is taken again; if the configuration version changed, the
  new membership is probed (at most `max_rounds` rounds in all, one loop: `_rounds`), so a
  member that joined mid-check is probed.

`fan_out` returns the verdicts; they describe the membership at `result.config_version` only.
A caller that acts on them uses `fan_out_and_act`, which takes that last snapshot while holding
`handle.membership_lock` and runs the action under it, so no member can join between the check
and the action.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import grpc

from sealkv.node import errors
from sealkv.node.state import commands as cmd
from sealkv.node.replication.membership import MemberRecord

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 5.0
DEFAULT_MAX_ROUNDS = 3


@dataclass(frozen=True)
class ProbeAnswer:
    """What a member said when probed.

    `responder_id` is the node id the responder claims to be (0: unknown / not capable),
    `capable` its verdict about itself, `reason` why it is not capable, and `details` extra
    facts to show the operator (strings only: versions, epochs; never secrets).
    """

    responder_id: int
    capable: bool
    reason: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CapabilityVerdict:
    """The fan-out's verdict on one member: whether it passed and, if not, why."""

    member: str
    address: str
    role: str
    ok: bool
    reason: str
    expected_id: Optional[int] = None
    responder_id: int = 0
    details: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """Returns "name (address): reason" for messages."""
        return f"{self.member or '<unnamed>'} ({self.address or 'no gRPC address'}): {self.reason}"


@dataclass(frozen=True)
class FanOutResult:
    """The outcome of a fan-out: one verdict per unique member, at `config_version`.

    `problem` is set when the member set itself could not be checked (no snapshot, no members,
    membership kept changing); then `ok` is false whatever the verdicts say.
    """

    verdicts: tuple[CapabilityVerdict, ...]
    config_version: int
    rounds: int
    problem: str = ""

    @property
    def ok(self) -> bool:
        """Whether every member passed (false for an empty member set)."""
        return not self.problem and bool(self.verdicts) and all(v.ok for v in self.verdicts)

    @property
    def failures(self) -> tuple[CapabilityVerdict, ...]:
        """The verdicts of the members that did not pass."""
        return tuple(v for v in self.verdicts if not v.ok)

    def summary(self) -> str:
        """Returns one line: which members failed and why, or that all passed."""
        if self.problem:
            return f"capability check failed: {self.problem}"
        if not self.verdicts:
            return "capability check failed: the membership snapshot lists no members"
        failures = self.failures
        if failures:
            return ("capability check failed for " + "; ".join(v.describe() for v in failures))
        return (f"all {len(self.verdicts)} members capable: "
                + ", ".join(v.member for v in self.verdicts))


Probe = Callable[[MemberRecord, grpc.Channel, float], ProbeAnswer]
ExpectedId = Callable[[MemberRecord], Optional[int]]


@dataclass
class _Target:
    member: MemberRecord
    expected_id: Optional[int]
    names: list[str]


def fan_out(handle: Any, probe: Probe, expected_id: ExpectedId, *,
            deadline: float = DEFAULT_DEADLINE, max_rounds: int = DEFAULT_MAX_ROUNDS
            ) -> FanOutResult:
    """Probes every member of the cluster and returns the verdicts (see the module docstring).

    `handle` is the node handle (`membership_snapshot()`, `channel(address)`). `probe(member,
    channel, timeout)` asks one member and returns a `ProbeAnswer`; it may raise (a
    `grpc.RpcError` is reported by its status code, anything else as a failed probe) and must
    honour `timeout`. `expected_id(member)` returns the node id the member must answer with,
    or None when unknown (then any responder id is accepted and the row is deduplicated by
    address). `deadline` bounds each round; at most `max_rounds` rounds run.

    Called on a gRPC worker thread, never on the tick thread. Never raises for a member's
    failure: every failure is a verdict.
    """
    if deadline <= 0:
        raise ValueError("deadline must be positive")
    result, _ = _rounds(handle, probe, expected_id, lambda: deadline, max_rounds,
                        lambda _result: (handle.membership_snapshot(), _NO_ACTION))
    return result


def fan_out_and_act(handle: Any, probe: Probe, expected_id: ExpectedId,
                    action: Callable[[Any], Any], *, what: str, end: float,
                    reserve: float = 1.0, deadline: float = DEFAULT_DEADLINE,
                    max_rounds: int = DEFAULT_MAX_ROUNDS) -> tuple[FanOutResult, Any]:
    """Runs the fan-out, then `action(snapshot)` while holding `handle.membership_lock` at the
    probed configuration version, so no member can join between the check and the action.

    `end` is the caller's deadline (a `time.monotonic()` value); each round gets at most
    `deadline` seconds and leaves `reserve` seconds of `end` for what follows. When the
    membership changed during a round, the new membership is probed (at most `max_rounds`
    rounds in all). Returns (the fan-out's result, what `action` returned). Raises
    `FailedPrecondition` naming `what` and the members that failed (or that the membership
    kept changing, or could not be read), and `Unavailable` when `end` leaves no time for a
    round or the membership lock stays busy. Called on a gRPC worker thread.
    """
    def budget() -> float:
        left = min(deadline, end - time.monotonic() - reserve)
        if left <= 0.1:
            raise errors.Unavailable(f"{what}: the request deadline is too short for the "
                                     "capability check; retry with a longer deadline")
        return left

    def settle(result: FanOutResult) -> tuple[Any, Any]:
        lock = handle.membership_lock
        if not lock.acquire(timeout=max(0.0, end - time.monotonic())):
            raise errors.Unavailable(f"{what}: the membership lock is busy: retry")
        try:
            snapshot = handle.membership_snapshot()
            if snapshot.config_version != result.config_version:
                return snapshot, _NO_ACTION
            if not result.ok:
                raise errors.FailedPrecondition(f"{what} refused: {result.summary()}")
            return snapshot, action(snapshot)
        finally:
            lock.release()

    result, value = _rounds(handle, probe, expected_id, budget, max_rounds, settle)
    if value is _NO_ACTION:
        raise errors.FailedPrecondition(f"{what} refused: {result.summary()}")
    return result, value


_NO_ACTION = object()


def _rounds(handle: Any, probe: Probe, expected_id: ExpectedId, budget: Callable[[], float],
            max_rounds: int, settle: Callable[[FanOutResult], tuple[Any, Any]]
            ) -> tuple[FanOutResult, Any]:
    """The one bounded loop of the membership re-check.

    Each round probes the members of the current snapshot under `budget()` seconds, then
    `settle(result)` takes the snapshot again and returns (that snapshot, a value). When the
    configuration version held still, the loop ends with (result, value); otherwise it probes
    the new membership, at most `max_rounds` rounds in all. A snapshot that cannot be taken
    ends it with a result whose `problem` says so, and the value `_NO_ACTION`.
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be at least 1")
    try:
        snapshot = handle.membership_snapshot()
    except Exception as exc:  # any failure to read the membership refuses the check
        return FanOutResult((), 0, 0, f"the membership snapshot could not be taken "
                                      f"({type(exc).__name__}: {exc})"), _NO_ACTION
    verdicts: tuple[CapabilityVerdict, ...] = ()
    for round_ in range(1, max_rounds + 1):
        version = snapshot.config_version
        timeout = budget()
        log.info("capability fan-out round %d: probing %d members (configuration version %d)",
                 round_, len(snapshot.members), version)
        verdicts = _probe_round(handle, snapshot.members, probe, expected_id, timeout)
        result = FanOutResult(verdicts, version, round_)
        try:
            snapshot, value = settle(result)
        except errors.SealkvError:
            raise
        except Exception as exc:  # the membership could not be read again: refuse
            return FanOutResult(verdicts, version, round_,
                                f"the membership snapshot could not be taken again "
                                f"({type(exc).__name__}: {exc})"), _NO_ACTION
        if snapshot.config_version == version:
            return result, value
        log.info("membership changed during the capability fan-out (version %d -> %d); "
                 "probing again", version, snapshot.config_version)
    return FanOutResult(verdicts, snapshot.config_version, max_rounds,
                        f"the membership kept changing during {max_rounds} rounds; retry"), \
        _NO_ACTION


def probe_member(handle: Any, member: MemberRecord, probe: Probe, expected: Optional[int],
                 timeout: float) -> CapabilityVerdict:
    """Probes one member with the same rules as `fan_out` (for member-add fences)."""
    return _probe_round(handle, (member,), probe, lambda _m: expected, timeout)[0]


def _targets(members, expected_id: ExpectedId) -> tuple[list[_Target], list[CapabilityVerdict]]:
    """Deduplicates rows; returns (targets to probe, verdicts of malformed rows)."""
    targets: dict[tuple, _Target] = {}
    malformed: list[CapabilityVerdict] = []
    for m in members:
        role = cmd.ROLE_NAMES.get(m.role, "unknown role")
        if not m.name or not m.grpc_address:
            what = "no name" if not m.name else "no gRPC address"
            label = m.name or (f"voter at raft {m.raft_address}" if m.raft_address else "")
            malformed.append(CapabilityVerdict(
                label, m.grpc_address, role, False,
                f"malformed member row ({what} in the member directory): cannot be probed"))
            continue
        try:
            expected = expected_id(m)
        except Exception as exc:
            malformed.append(CapabilityVerdict(
                m.name, m.grpc_address, role, False,
                f"malformed member row: no expected node id ({type(exc).__name__})"))
            continue
        key = ("id", expected) if expected is not None else ("address", m.grpc_address)
        if key in targets:
            targets[key].names.append(m.name)
        else:
            targets[key] = _Target(m, expected, [m.name])
    return list(targets.values()), malformed


def _probe_round(handle: Any, members, probe: Probe, expected_id: ExpectedId,
                 deadline: float) -> tuple[CapabilityVerdict, ...]:
    targets, malformed = _targets(members, expected_id)
    end = time.monotonic() + deadline
    slots = [_verdict(t, False, f"timeout: did not answer within {deadline:.1f}s")
             for t in targets]
    cond = threading.Condition()
    state = {"finished": 0, "closed": False}

    def run(i: int, target: _Target) -> None:
        verdict = _ask(handle, target, probe, end)
        with cond:
            if not state["closed"]:
                slots[i] = verdict
            state["finished"] += 1
            cond.notify_all()

    for i, target in enumerate(targets):
        threading.Thread(target=run, args=(i, target), daemon=True,
                         name=f"capability-probe-{target.member.name}").start()
    with cond:
        cond.wait_for(lambda: state["finished"] == len(targets),
                      timeout=max(0.0, end - time.monotonic()))
        state["closed"] = True
        return tuple(slots) + tuple(malformed)


def _ask(handle: Any, target: _Target, probe: Probe, end: float) -> CapabilityVerdict:
    m = target.member
    try:
        channel = handle.channel(m.grpc_address)
        answer = probe(m, channel, max(0.01, end - time.monotonic()))
    except grpc.RpcError as exc:
        return _verdict(target, False, _rpc_reason(exc))
    except Exception as exc:  # a bug in the probe: its type only, never its message
        return _verdict(target, False, f"probe failed ({type(exc).__name__})")
    if target.expected_id is not None and answer.responder_id != target.expected_id:
        return _verdict(target, False,
                        f"mismatched responder: answered as node id {answer.responder_id:#018x}, "
                        f"expected {target.expected_id:#018x} (the directory's gRPC address "
                        "points at another node)", answer)
    if not answer.capable:
        return _verdict(target, False, f"not capable: {answer.reason or 'no reason given'}",
                        answer)
    return _verdict(target, True, "capable", answer)


def _rpc_reason(exc: grpc.RpcError) -> str:
    """Returns the reason class of a failed probe: unreachable, timeout, refused TLS, not
    capable, or the status name. Never the transport's error text: a member address is
    operator input, and the text would tell a caller what answers at any address."""
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if "handshake" in lowered or "socket closed" in lowered or "ssl" in lowered:
            return "refused TLS: no mutual TLS with this node's certificate"
        return "unreachable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout: did not answer before the deadline"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return "refused TLS: it does not accept this node's certificate"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "not capable: it does not serve the capability RPC (plugin not enabled there)"
    name = code.name if code is not None else "UNKNOWN"
    return f"probe failed ({name})"


def _verdict(target: _Target, ok: bool, reason: str,
             answer: Optional[ProbeAnswer] = None) -> CapabilityVerdict:
    m = target.member
    details = dict(answer.details) if answer is not None else {}
    if len(target.names) > 1:
        details["merged_rows"] = ",".join(target.names)
    return CapabilityVerdict(m.name, m.grpc_address, cmd.ROLE_NAMES.get(m.role, "unknown role"),
                             ok, reason, target.expected_id,
                             answer.responder_id if answer is not None else 0, details)

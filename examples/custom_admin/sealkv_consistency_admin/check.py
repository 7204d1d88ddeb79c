"""The consistency comparison: what the digests members reported say, with no I/O.

A check gathers one `MemberAnswer` per member (from `Cluster.Digest`) in rounds until the
answers have `settled`, then `compare`s them. Digests are only comparable at one applied index,
so the comparison happens at the index most reachable members report at or above the target
(the leader's commit index when the check started); members elsewhere are NOT_COMPARED.
A digest held by a strict majority of the compared members is the agreed one; without such a
majority no member agrees. The verdict is INCONSISTENT when any member disagrees, INCOMPLETE
when none disagrees but one could not be compared, and CONSISTENT otherwise.
"""
from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence


class MemberState(enum.Enum):
    """How one member fared (the values match `MemberState` in consistency.proto)."""

    AGREES = 1
    DISAGREES = 2
    UNREACHABLE = 3
    NOT_COMPARED = 4


class Verdict(enum.Enum):
    """The outcome of a whole check (the values match `Verdict` in consistency.proto)."""

    CONSISTENT = 1
    INCONSISTENT = 2
    INCOMPLETE = 3


@dataclass(frozen=True)
class MemberAnswer:
    """What one member answered to `Cluster.Digest`, or why it did not.

    `reachable` is false when the member did not answer (or another node answered at its
    address); then `reason` says why and the index and digest are meaningless.
    """

    name: str
    address: str
    role: str
    reachable: bool
    reason: str = ""
    applied_index: int = 0
    digest: str = ""
    keys: int = 0


@dataclass(frozen=True)
class MemberResult:
    """One member's row in a report: its answer, its state and why it is in that state."""

    answer: MemberAnswer
    state: MemberState
    reason: str


@dataclass(frozen=True)
class Report:
    """The result of comparing one round of answers against `target_index`."""

    verdict: Verdict
    target_index: int
    compared_index: int
    agreed_digest: str
    members: tuple[MemberResult, ...]

    def summary(self) -> str:
        """Returns one line for humans: the verdict and the members it is about."""
        if not self.members:
            return "incomplete: the membership lists no members"
        def names(*states: MemberState) -> str:
            return ", ".join(m.answer.name or "<unnamed>" for m in self.members
                             if m.state in states)
        if self.verdict is Verdict.CONSISTENT:
            return (f"consistent: all {len(self.members)} members agree at index "
                    f"{self.compared_index}")
        if self.verdict is Verdict.INCONSISTENT:
            return (f"inconsistent at index {self.compared_index}: "
                    f"{names(MemberState.DISAGREES)} disagree")
        return (f"incomplete: {names(MemberState.UNREACHABLE, MemberState.NOT_COMPARED)} "
                f"could not be compared")


def settled(answers: Sequence[MemberAnswer], target_index: int) -> bool:
    """Whether waiting longer cannot improve the comparison.

    True once every reachable member has applied at least `target_index` and all of them
    report the same applied index. Unreachable members are not waited for: they are reported.
    """
    reachable = [a for a in answers if a.reachable]
    if not reachable:
        return True
    indexes = {a.applied_index for a in reachable}
    return len(indexes) == 1 and min(indexes) >= target_index


def compared_index(answers: Sequence[MemberAnswer], target_index: int) -> Optional[int]:
    """Returns the index to compare at: the one most reachable members at or above the target
    report (the highest on a tie), or None when no reachable member reached the target."""
    counts = Counter(a.applied_index for a in answers
                     if a.reachable and a.applied_index >= target_index)
    if not counts:
        return None
    return max(counts, key=lambda index: (counts[index], index))


def compare(answers: Sequence[MemberAnswer], target_index: int) -> Report:
    """Classifies every answer and returns the report (see the module docstring)."""
    index = compared_index(answers, target_index)
    compared = [a for a in answers if a.reachable and a.applied_index == index]
    digests = Counter(a.digest for a in compared)
    agreed = ""
    if digests:
        digest, count = digests.most_common(1)[0]
        if 2 * count > len(compared):
            agreed = digest
    rows = []
    for a in answers:
        if not a.reachable:
            rows.append(MemberResult(a, MemberState.UNREACHABLE, a.reason or "did not answer"))
        elif a.applied_index < target_index:
            rows.append(MemberResult(a, MemberState.NOT_COMPARED,
                                     f"applied index {a.applied_index} is behind the target "
                                     f"{target_index}"))
        elif a.applied_index != index:
            rows.append(MemberResult(a, MemberState.NOT_COMPARED,
                                     f"at index {a.applied_index} while the others were compared "
                                     f"at {index} (writes kept arriving)"))
        elif not agreed:
            rows.append(MemberResult(a, MemberState.DISAGREES,
                                     f"no digest is held by a majority of the {len(compared)} "
                                     f"members compared at index {index}"))
        elif a.digest != agreed:
            rows.append(MemberResult(a, MemberState.DISAGREES,
                                     f"digest {a.digest[:16]} differs from the agreed "
                                     f"{agreed[:16]}"))
        else:
            rows.append(MemberResult(a, MemberState.AGREES, ""))
    states = {r.state for r in rows}
    if MemberState.DISAGREES in states:
        verdict = Verdict.INCONSISTENT
    elif not rows or states != {MemberState.AGREES}:
        verdict = Verdict.INCOMPLETE
    else:
        verdict = Verdict.CONSISTENT
    return Report(verdict, target_index, index or 0, agreed, tuple(rows))

"""A linearizability checker for histories of sealkv key-value operations.

The history format (`Operation`, fields ``client``, ``op``, ``key``, ``value``, ``expected``,
``call``, ``ret``, ``output``) and its JSON-lines file format are described in
`tests.faults.history`; both are re-exported here.

The model is a map from key to value. Per key, the state is the current value (bytes) or None
when the key does not exist, and every key starts absent unless `check` is given an initial
state. ``put`` sets the value; ``delete`` sets None; ``get`` must return the state and leaves it;
``cas(expected, new)`` succeeds exactly when the state equals ``expected`` (None meaning "must
not exist") and then sets ``new``, while a failed ``cas`` leaves the state alone. The harness
writes a unique value with every ``put`` and ``cas``, so comparing values is as strong as
comparing revisions: a read that returns a value names the one write it observed.

The search is Wing & Gong's, with Lowe's just-in-time linearization and memoisation, done the
way Porcupine does it. Keys never interact in this model, so each key's sub-history is checked
on its own (P-compositionality), which keeps every search small. For one key, the call and
return events are sorted by time (a call before a return at the same instant, so touching
intervals count as concurrent) into a doubly linked list. The search walks the list: at a call
it tries to linearize that operation next (the model accepts it and the pair (set of linearized
operations as an int bitset, model state) has not been explored); if so the operation's two
events are lifted out of the list and the walk restarts from the head; at a return it has met
an operation whose deadline passed unlinearized, so it undoes the last choice (unlift) and
tries the next candidate. The search is iterative, so long histories do not hit the recursion
limit. Two prunings, both sound without the unique-value convention, keep concurrent writes
from multiplying the search: an accepted read-only candidate (a ``get``, a failed ``cas``) can
always go next, so its siblings are never tried; and a write that leaves a state no pending
write can restore, while a pending read or swap still needs that state, is refused at once
instead of when that read's deadline passes.

Operations whose outcome is unknown (``ret`` None) may take effect at any time after their
call, or never. Their return events sit at +infinity, after every known return, so reaching
one means every operation with a known outcome has been linearized and the history is
accepted; the unknown ones left in the list are the ones that never took effect. An unknown
``get`` cannot change the state, so it is dropped before the search. An unknown ``cas`` is
linearized only as a successful swap, because a failed swap has no effect and is the same as
never happening. An unknown write whose value no operation could observe is dropped too (see
`_drop_unobservable_writes`), which keeps fault runs with many timed-out writes fast.

The search can take exponential time on a violating history with much concurrency, so it
has a budget: a number of steps and a timeout, shared by all keys. When the budget runs out
the verdict is "unknown", never "ok", and `CheckResult.ok` is False.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping

from tests.faults.history import (
    Operation,
    dump_history,
    load_history,
    operation_from_json,
    operation_to_json,
    save_history,
    validate_operation,
)

__all__ = [
    "CheckResult",
    "Operation",
    "Violation",
    "check",
    "dump_history",
    "load_history",
    "operation_from_json",
    "operation_to_json",
    "save_history",
    "validate_operation",
]

Verdict = Literal["ok", "violation", "unknown"]

# Step kinds of the per-key model, precomputed so the search loop does no string compares.
_SET = 0  # put, delete: always accepted, the state becomes the argument.
_READ = 1  # get: accepted when the state equals the value read.
_SWAP = 2  # cas that succeeded (or may have): accepted when the state equals expected.
_NO_SWAP = 3  # cas that failed: accepted when the state differs from expected.

# Marks "no value" where None is a value (the key does not exist).
_NOTHING = object()

# How many search steps pass between two looks at the clock; the clock is slow next to a step.
_CLOCK_EVERY = 4096


@dataclass(frozen=True)
class Violation:
    """The evidence that one key's sub-history is not linearizable.

    ``prefix`` is the longest linearization the search built (in linearization order),
    ``state`` the key's value after it, and ``blocked`` the operation whose return came before
    the search could place it after that prefix. When ``blocked`` fits the state but would
    overwrite it for good, ``stranded`` lists the pending operations that still had to observe
    that state (a stale read shows up this way: the newer write is blocked, the read stranded).
    It is a witness of where the search got stuck, not the smallest failing sub-history.
    """

    key: bytes
    prefix: tuple[Operation, ...]
    state: bytes | None
    blocked: Operation
    stranded: tuple[Operation, ...] = ()

    def describe(self) -> str:
        """Return a human-readable, multi-line account of the violation."""
        lines = [f"key {self.key!r} is not linearizable."]
        if self.prefix:
            lines.append(f"Longest linearizable prefix found ({len(self.prefix)} operations):")
            lines.extend(f"  {operation}" for operation in self.prefix)
        else:
            lines.append("No operation could be linearized first.")
        lines.append(f"State after that prefix: {self.state!r}.")
        lines.append(f"Operation that could not be placed: {self.blocked}")
        if self.stranded:
            lines.append("because these operations must still observe that state:")
            lines.extend(f"  {operation}" for operation in self.stranded)
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of `check`: a verdict in {"ok", "violation", "unknown"} and its evidence.

    ``ok`` is True only for "ok"; an exhausted budget gives "unknown", which is not ok. The
    result refuses to be used as a bool, so ``assert check(history)`` cannot pass by accident:
    test ``result.ok`` or ``result.verdict``.
    """

    verdict: Verdict
    violations: tuple[Violation, ...] = ()
    unknown_keys: tuple[bytes, ...] = ()
    keys_checked: int = 0
    operations_checked: int = 0
    steps: int = 0

    @property
    def ok(self) -> bool:
        """Whether the history was proven linearizable."""
        return self.verdict == "ok"

    @property
    def violation(self) -> Violation | None:
        """The first violation found (keys in sorted order), or None."""
        return self.violations[0] if self.violations else None

    @property
    def key(self) -> bytes | None:
        """The key of the first violation, or None."""
        return self.violations[0].key if self.violations else None

    def describe(self) -> str:
        """Return a human-readable summary, fit for an assertion message."""
        head = (
            f"verdict {self.verdict}: {self.keys_checked} keys, "
            f"{self.operations_checked} operations, {self.steps} search steps"
        )
        parts = [head]
        if self.unknown_keys:
            parts.append(f"budget ran out on {len(self.unknown_keys)} keys: {list(self.unknown_keys)!r}")
        parts.extend(violation.describe() for violation in self.violations)
        return "\n".join(parts)

    def __bool__(self) -> bool:
        raise TypeError("a CheckResult is not a bool; test result.ok or result.verdict")


@dataclass
class _Budget:
    """The search steps and wall-clock time left, shared by every key of one `check`."""

    steps_left: float
    deadline: float
    clock: Callable[[], float]
    steps_used: int = 0


@dataclass
class _KeyOutcome:
    """What the search found for one key: "ok", "violation" (with evidence) or "unknown"."""

    verdict: Verdict
    violation: Violation | None = None
    operations: int = 0


def check(
    history: Iterable[Operation],
    *,
    max_steps: int | None = None,
    timeout: float | None = None,
    initial: Mapping[bytes, bytes] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Check whether `history` is linearizable against the key-value model.

    `max_steps` bounds the total search steps and `timeout` the seconds spent (read from
    `clock`), both over all keys; None means no bound. When either runs out before a key is
    decided, that key (and every key not yet searched) is reported in ``unknown_keys`` and the
    verdict is "unknown", unless some key was already proven a violation, which is definite.
    `initial` gives the value of keys that exist before the history starts. Every operation is
    validated first; a malformed one raises ValueError.
    """
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0 or None, got {max_steps}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
    initial = dict(initial or {})
    by_key: dict[bytes, list[Operation]] = defaultdict(list)
    for operation in history:
        validate_operation(operation)
        by_key[operation.key].append(operation)

    budget = _Budget(
        steps_left=math.inf if max_steps is None else max_steps,
        deadline=math.inf if timeout is None else clock() + timeout,
        clock=clock,
    )
    violations: list[Violation] = []
    unknown_keys: list[bytes] = []
    operations = 0
    for key in sorted(by_key):
        outcome = _check_key(key, by_key[key], initial.get(key), budget)
        operations += outcome.operations
        if outcome.verdict == "violation":
            violations.append(outcome.violation)
        elif outcome.verdict == "unknown":
            unknown_keys.append(key)
    if violations:
        verdict: Verdict = "violation"
    elif unknown_keys:
        verdict = "unknown"
    else:
        verdict = "ok"
    return CheckResult(
        verdict=verdict,
        violations=tuple(violations),
        unknown_keys=tuple(unknown_keys),
        keys_checked=len(by_key),
        operations_checked=operations,
        steps=budget.steps_used,
    )


def _drop_unobservable_writes(operations: list[Operation]) -> list[Operation]:
    """Return one key's operations without the unknown-outcome ones that cannot matter.

    An unknown ``get`` never changes the state. An unknown write (put, delete, cas) of value v
    (None for delete) cannot matter when no operation observes v (no ``get`` returns it, no
    ``cas`` expects it) and no ``cas`` on the key failed: in any linearization that contains
    the write, nothing between it and the next write can be a ``get`` (it would return v) or a
    swap (it would expect v), so removing the write leaves a valid linearization; and one
    without the write is valid for the smaller history as it stands. A failed ``cas`` is the
    exception because it observes "not v", which such a write could be the reason for.
    """
    known = [o for o in operations if o.ret is not None or o.op != "get"]
    if any(o.op == "cas" and o.output is False for o in known):
        return known
    observed = {o.output for o in known if o.op == "get" and o.ret is not None}
    observed.update(o.expected for o in known if o.op == "cas")
    return [o for o in known if o.ret is not None or o.value in observed]


def _check_key(
    key: bytes, operations: list[Operation], initial: bytes | None, budget: _Budget
) -> _KeyOutcome:
    """Search for a linearization of one key's operations, within `budget`."""
    ops = _drop_unobservable_writes(operations)
    n = len(ops)
    if n == 0:
        return _KeyOutcome("ok")
    if budget.steps_left <= 0 or budget.clock() >= budget.deadline:
        return _KeyOutcome("unknown", operations=n)

    kinds = [0] * n
    first = [None] * n  # The value set, read, or expected.
    second = [None] * n  # The value a swap writes.
    unknown = [False] * n
    # For the dead-end test: the value each operation must see (known reads and swaps), the
    # value it writes, and how many pending operations need or can write each value.
    needs: list = [_NOTHING] * n
    writes: list = [_NOTHING] * n
    needed: dict[bytes | None, int] = {}
    available: dict[bytes | None, int] = {}
    events = []
    for i, o in enumerate(ops):
        if o.op == "put":
            kinds[i], first[i] = _SET, o.value
        elif o.op == "delete":
            kinds[i] = _SET
        elif o.op == "get":
            kinds[i], first[i] = _READ, o.output
        elif o.ret is None or o.output:
            kinds[i], first[i], second[i] = _SWAP, o.expected, o.value
        else:
            kinds[i], first[i] = _NO_SWAP, o.expected
        unknown[i] = o.ret is None
        if kinds[i] == _SET or kinds[i] == _SWAP:
            writes[i] = first[i] if kinds[i] == _SET else second[i]
            available[writes[i]] = available.get(writes[i], 0) + 1
        if (kinds[i] == _READ or kinds[i] == _SWAP) and not unknown[i]:
            needs[i] = first[i]
            needed[needs[i]] = needed.get(needs[i], 0) + 1
        events.append((o.call, 0, i))
        events.append((math.inf if o.ret is None else o.ret, 1, i))
    events.sort()

    # Nodes of the doubly linked list: 0 is the head, 1..2n the events in time order, 2n+1
    # the tail, so unlinking never needs a None check.
    tail = 2 * n + 1
    nxt = list(range(1, tail + 2))
    prv = list(range(-1, tail + 1))
    node_op = [0] * (tail + 1)
    is_call = [False] * (tail + 1)
    call_node = [0] * n
    ret_node = [0] * n
    for node, (_, is_return, i) in enumerate(events, start=1):
        node_op[node] = i
        if is_return:
            ret_node[i] = node
        else:
            is_call[node] = True
            call_node[i] = node

    state = initial
    linearized = 0
    stack: list[tuple[int, bytes | None, bool]] = []  # (operation, state before it, read-only)
    seen: set[tuple[int, bytes | None]] = set()
    best_length = -1
    best = None  # (prefix, state after it, blocked operation, linearized bits)
    steps_left = budget.steps_left
    deadline = budget.deadline
    clock = budget.clock
    steps = 0
    node = nxt[0]
    verdict: Verdict = "ok"
    while node != tail:
        if steps >= steps_left:
            verdict = "unknown"
            break
        steps += 1
        if deadline != math.inf and steps % _CLOCK_EVERY == 0 and clock() >= deadline:
            verdict = "unknown"
            break
        i = node_op[node]
        if is_call[node]:
            kind = kinds[i]
            if kind == _SET:
                accepted, new_state = True, first[i]
            elif kind == _READ:
                accepted, new_state = state == first[i], state
            elif kind == _SWAP:
                accepted, new_state = state == first[i], second[i]
            else:
                accepted, new_state = state != first[i], state
            if (
                accepted
                and new_state != state
                and needed.get(state, 0) > (needs[i] is not _NOTHING)
                and not available.get(state, 0)
            ):
                # Leaving this state for good strands a pending operation that must see it:
                # no pending write can restore it, so every extension of this prefix fails.
                accepted = False
            if not accepted:
                node = nxt[node]
                continue
            read_only = kind == _READ or kind == _NO_SWAP
            bits = linearized | (1 << i)
            memo = (bits, new_state)
            if memo not in seen:
                seen.add(memo)
                stack.append((i, state, read_only))
                state = new_state
                linearized = bits
                c, r = node, ret_node[i]
                p, q = prv[c], nxt[c]
                nxt[p], prv[q] = q, p
                p, q = prv[r], nxt[r]
                nxt[p], prv[q] = q, p
                if needs[i] is not _NOTHING:
                    needed[needs[i]] -= 1
                if writes[i] is not _NOTHING:
                    available[writes[i]] -= 1
                node = nxt[0]
                continue
            if not read_only:
                node = nxt[node]
                continue
            # An accepted read-only candidate whose successor was already explored (and so
            # failed) proves this prefix dead as well, by the lemma below: backtrack.
        else:
            if unknown[i]:
                # Every return still listed lies at +infinity: each known operation is placed.
                break
            if len(stack) > best_length:
                best_length = len(stack)
                best = ([j for j, _, _ in stack], state, i, linearized)
        # Undo the last choice, and keep undoing while it was a read-only operation: a
        # candidate that does not change the state and is accepted can always go next (it is
        # called before every pending return, so moving it forward keeps real-time order, and
        # it changes nothing for later operations), so when the prefix after it has no
        # completion, the prefix before it has none either and its other candidates need no
        # trying. This keeps reads from multiplying the search.
        while stack:
            i, state, read_only = stack.pop()
            linearized ^= 1 << i
            c, r = call_node[i], ret_node[i]
            nxt[prv[r]] = r
            prv[nxt[r]] = r
            nxt[prv[c]] = c
            prv[nxt[c]] = c
            if needs[i] is not _NOTHING:
                needed[needs[i]] += 1
            if writes[i] is not _NOTHING:
                available[writes[i]] += 1
            if not read_only:
                break
        else:
            verdict = "violation"
            break
        node = nxt[c]

    budget.steps_left -= steps
    budget.steps_used += steps
    if verdict == "violation":
        prefix, state, blocked, bits = best
        stranded = ()
        if kinds[blocked] == _SET or (kinds[blocked] == _SWAP and state == first[blocked]):
            pending = (j for j in range(n) if not bits >> j & 1 and j != blocked)
            stranded = tuple(ops[j] for j in pending if needs[j] is not _NOTHING and needs[j] == state)
        violation = Violation(
            key=key,
            prefix=tuple(ops[j] for j in prefix),
            state=state,
            blocked=ops[blocked],
            stranded=stranded,
        )
        return _KeyOutcome("violation", violation=violation, operations=n)
    return _KeyOutcome(verdict, operations=n)

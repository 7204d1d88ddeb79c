"""The record of what clients asked a sealkv cluster and what they saw, kept for checking.

A history is a list of `Operation` records, one per client request, in any order. Each record
has these fields:

- ``client``: the id (str or int) of the client that issued the request. A client issues one
  request at a time, but the checker does not rely on it.
- ``op``: one of ``"put"``, ``"get"``, ``"delete"``, ``"cas"``.
- ``key``: the key, bytes.
- ``value``: for ``put`` the value written, for ``cas`` the new value written on success
  (bytes); None for ``get`` and ``delete``.
- ``expected``: for ``cas`` only, the value the key must hold for the swap to happen, or None
  meaning "the key must not exist"; None for every other operation.
- ``call``: monotonic seconds when the client sent the request.
- ``ret``: monotonic seconds when the client got the answer, or None when the outcome is
  unknown (a timeout, a lost connection, an error after the request may have reached the
  leader). An operation with an unknown outcome may have taken effect at any time after
  ``call``, or never.
- ``output``: what the client observed. For ``get`` the value read, or None for "not found";
  for ``cas`` True when the swap happened and False when it did not; None for ``put`` and
  ``delete``. Always None when ``ret`` is None.

Every ``call`` and ``ret`` must come from the same monotonic clock (one process, or clocks the
harness has aligned); the checker trusts real-time order between a return and a later call.

A history is stored as JSON lines, one operation per line, so a failing fault run can keep its
history file next to its logs and a developer can re-check it later with `load_history`. Byte
strings are written as lowercase hex, which keeps keys and values readable with ``grep``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Union

ClientId = Union[str, int]

OPS = frozenset({"put", "get", "delete", "cas"})


@dataclass(frozen=True, slots=True)
class Operation:
    """One client request and what the client observed, as described in the module docstring."""

    client: ClientId
    op: str
    key: bytes
    value: bytes | None = None
    expected: bytes | None = None
    call: float = 0.0
    ret: float | None = None
    output: bytes | bool | None = None

    @property
    def outcome_known(self) -> bool:
        """Whether the client got an answer, so the operation certainly took effect before `ret`."""
        return self.ret is not None

    def __str__(self) -> str:
        if self.op == "put":
            text = f"put({self.key!r}, {self.value!r})"
        elif self.op == "get":
            text = f"get({self.key!r})"
        elif self.op == "delete":
            text = f"delete({self.key!r})"
        else:
            text = f"cas({self.key!r}, expected={self.expected!r}, new={self.value!r})"
        if self.ret is None:
            return f"client {self.client}: {text} -> unknown [{self.call:.6f}, ?]"
        if self.op in ("get", "cas"):
            text += f" -> {self.output!r}"
        return f"client {self.client}: {text} [{self.call:.6f}, {self.ret:.6f}]"


def validate_operation(operation: Operation) -> None:
    """Raise ValueError saying what to change when `operation` does not follow the format."""
    o = operation
    if o.op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {o.op!r}")
    if not isinstance(o.key, bytes):
        raise ValueError(f"key must be bytes, got {type(o.key).__name__}")
    if not isinstance(o.client, (str, int)) or isinstance(o.client, bool):
        raise ValueError(f"client must be a str or an int, got {type(o.client).__name__}")
    if o.op in ("put", "cas"):
        if not isinstance(o.value, bytes):
            raise ValueError(f"{o.op} needs value as bytes (the value written), got {o.value!r}")
    elif o.value is not None:
        raise ValueError(f"{o.op} takes no value; set value=None")
    if o.op == "cas":
        if o.expected is not None and not isinstance(o.expected, bytes):
            raise ValueError(f"cas expected must be bytes or None, got {o.expected!r}")
    elif o.expected is not None:
        raise ValueError(f"only cas takes expected; set expected=None for {o.op}")
    if isinstance(o.call, bool) or not isinstance(o.call, (int, float)) or not math.isfinite(o.call):
        raise ValueError(f"call must be a finite number of seconds, got {o.call!r}")
    if o.ret is None:
        if o.output is not None:
            raise ValueError("an operation with an unknown outcome (ret=None) must have output=None")
        return
    if isinstance(o.ret, bool) or not isinstance(o.ret, (int, float)) or not math.isfinite(o.ret):
        raise ValueError(f"ret must be a finite number of seconds or None, got {o.ret!r}")
    if o.ret < o.call:
        raise ValueError(f"ret ({o.ret}) is before call ({o.call}); both must come from one monotonic clock")
    if o.op == "get" and o.output is not None and not isinstance(o.output, bytes):
        raise ValueError(f"get output must be the value read (bytes) or None, got {o.output!r}")
    if o.op == "cas" and not isinstance(o.output, bool):
        raise ValueError(f"cas output must be True or False when ret is known, got {o.output!r}")
    if o.op in ("put", "delete") and o.output is not None:
        raise ValueError(f"{o.op} output must be None, got {o.output!r}")


def _hex(data: bytes | None) -> str | None:
    return None if data is None else data.hex()


def _unhex(text: str | None) -> bytes | None:
    return None if text is None else bytes.fromhex(text)


def operation_to_json(operation: Operation) -> dict:
    """Return the JSON-ready dict for one operation, with byte strings as hex."""
    o = operation
    output = o.output if isinstance(o.output, bool) or o.output is None else o.output.hex()
    return {
        "client": o.client,
        "op": o.op,
        "key": o.key.hex(),
        "value": _hex(o.value),
        "expected": _hex(o.expected),
        "call": o.call,
        "ret": o.ret,
        "output": output,
    }


def operation_from_json(record: dict) -> Operation:
    """Return the operation a dict from `operation_to_json` describes, validated."""
    output = record.get("output")
    if isinstance(output, str):
        output = bytes.fromhex(output)
    operation = Operation(
        client=record["client"],
        op=record["op"],
        key=bytes.fromhex(record["key"]),
        value=_unhex(record.get("value")),
        expected=_unhex(record.get("expected")),
        call=record["call"],
        ret=record.get("ret"),
        output=output,
    )
    validate_operation(operation)
    return operation


def dump_history(history: Iterable[Operation], stream: IO[str]) -> None:
    """Write `history` to a text stream as JSON lines, one operation per line."""
    for operation in history:
        stream.write(json.dumps(operation_to_json(operation), separators=(",", ":")))
        stream.write("\n")


def save_history(history: Iterable[Operation], path: str | Path) -> None:
    """Write `history` to the file at `path` as JSON lines, replacing the file."""
    with open(path, "w", encoding="utf-8") as stream:
        dump_history(history, stream)


def load_history(path: str | Path) -> list[Operation]:
    """Read a history written by `save_history`; a malformed line raises ValueError naming it."""
    history = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                history.append(operation_from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a history operation: {exc}") from exc
    return history

"""Output for the CLI: `-w table|json|simple`, like etcdctl."""
from __future__ import annotations

import base64
import json
from typing import Any, Sequence

import click


def text(raw: bytes) -> str:
    """Returns bytes as text for humans (undecodable bytes escaped)."""
    return raw.decode("utf-8", "backslashreplace")


def json_bytes(raw: bytes) -> Any:
    """Returns UTF-8 bytes as a string, anything else as {"base64": ...}."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def emit_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    click.echo(line)
    click.echo("| " + " | ".join(h.upper().ljust(w) for h, w in zip(headers, widths)) + " |")
    click.echo(line)
    for r in cells:
        click.echo("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    click.echo(line)


def emit_simple(rows: Sequence[Sequence[Any]]) -> None:
    for r in rows:
        click.echo(", ".join(str(c) for c in r))


def emit(fmt: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], data: Any) -> None:
    """Prints rows as a table or simple lines, or `data` as JSON."""
    if fmt == "json":
        emit_json(data)
    elif fmt == "table":
        emit_table(headers, rows)
    else:
        emit_simple(rows)

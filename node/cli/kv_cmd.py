"""`sealkv put|get|del`: the key-value commands."""
from __future__ import annotations

import click

from sealkv.node.cli.main import CliError, Ctx, pass_ctx
from sealkv.node.cli.output import emit_json, json_bytes, text


def kv_json(kv) -> dict:
    return {"key": json_bytes(kv.key), "value": json_bytes(kv.value),
            "create_revision": kv.create_revision, "mod_revision": kv.mod_revision,
            "version": kv.version}


@click.command()
@click.argument("key")
@click.argument("value", required=False)
@click.option("--value-file", type=click.File("rb"), help="Read the value from a file ('-': stdin).")
@pass_ctx
def put(c: Ctx, key, value, value_file):
    """Puts VALUE under KEY."""
    if (value is None) == (value_file is None):
        raise click.UsageError("give exactly one of VALUE or --value-file")
    raw = value.encode() if value is not None else value_file.read()
    r = c.run(c.client.put, key.encode(), raw)
    if c.write_out == "json":
        emit_json({"revision": r.header.revision, "member": r.header.member_id})
    else:
        click.echo("OK")


@click.command()
@click.argument("key")
@click.argument("range_end", required=False)
@click.option("--prefix", is_flag=True, help="Get every key starting with KEY.")
@click.option("--from-key", is_flag=True, help="Get every key >= KEY.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most this many keys.")
@click.option("--keys-only", is_flag=True)
@click.option("--consistency", type=click.Choice(["l", "s", "linearizable", "serializable"]),
              default="l", show_default=True, help="l(inearizable) or s(erializable).")
@pass_ctx
def get(c: Ctx, key, range_end, prefix, from_key, limit, keys_only, consistency):
    """Gets KEY, or the keys in [KEY, RANGE_END), or with --prefix."""
    from sealkv.node.client import LINEARIZABLE, SERIALIZABLE

    level = LINEARIZABLE if consistency.startswith("l") else SERIALIZABLE
    if sum(bool(x) for x in (range_end, prefix, from_key)) > 1:
        raise click.UsageError("use only one of RANGE_END, --prefix, --from-key")
    if not (range_end or prefix or from_key) and not limit and not keys_only:
        r = c.run(c.client.get, key.encode(), level)
        if not r.found:
            raise CliError(f"key not found: {key}")
        kvs = [r.kv]
    else:
        end = range_end.encode() if range_end else (b"\0" if from_key else b"")
        r = c.run(c.client.range, key.encode(), end, prefix, limit, keys_only, level)
        kvs = list(r.kvs)
    if c.write_out == "json":
        emit_json({"revision": r.header.revision, "kvs": [kv_json(kv) for kv in kvs]})
    elif c.write_out == "table":
        from sealkv.node.cli.output import emit_table

        emit_table(["key", "value", "mod_revision"],
                   [[text(kv.key), "" if keys_only else text(kv.value), kv.mod_revision]
                    for kv in kvs])
    else:
        for kv in kvs:
            click.echo(text(kv.key))
            if not keys_only:
                click.echo(text(kv.value))


@click.command(name="del")
@click.argument("key")
@pass_ctx
def delete(c: Ctx, key):
    """Deletes KEY; prints how many keys were deleted (0 or 1)."""
    r = c.run(c.client.delete, key.encode())
    if c.write_out == "json":
        emit_json({"deleted": r.deleted, "revision": r.header.revision})
    else:
        click.echo(str(r.deleted))



def register(cli: click.Group) -> None:
    for command in (put, get, delete):
        cli.add_command(command)

"""`sealkv member list|add|remove`: cluster membership."""
from __future__ import annotations

import click

from sealkv.node.cli.main import Ctx, pass_ctx
from sealkv.node.state.commands import ROLE_NAMES
from sealkv.node.cli.output import emit


def member_rows(members):
    return [[m.name or "?", ROLE_NAMES.get(m.role, "?"), m.raft_address or "-", m.grpc_address,
             "yes" if m.connected else "no", "yes" if m.is_leader else "no",
             m.replication_lag if m.replication_lag >= 0 else "-"] for m in members]


def member_json(m) -> dict:
    return {"name": m.name, "role": ROLE_NAMES.get(m.role, "?"), "raft_address": m.raft_address,
            "grpc_address": m.grpc_address, "connected": m.connected, "is_leader": m.is_leader,
            "replication_lag": m.replication_lag}


MEMBER_HEADERS = ["name", "role", "raft", "grpc", "connected", "leader", "lag"]


@click.group()
def member():
    """List, add and remove cluster members."""


@member.command(name="list")
@pass_ctx
def member_list(c: Ctx):
    """Lists the members."""
    r = c.run(c.client.member_list)
    emit(c.write_out, MEMBER_HEADERS, member_rows(r.members),
         {"config_version": r.config_version, "members": [member_json(m) for m in r.members]})


@member.command(name="add")
@click.argument("name")
@click.option("--raft", "raft_address", help="The new voter's raft HOST:PORT.")
@click.option("--grpc", "grpc_address", required=True, help="The new member's gRPC HOST:PORT.")
@click.option("--learner", is_flag=True, help="Add a learner (no vote, no raft address).")
@pass_ctx
def member_add(c: Ctx, name, raft_address, grpc_address, learner):
    """Adds a voter (--raft) or a learner (--learner)."""
    if learner == bool(raft_address):
        raise click.UsageError("give --raft for a voter or --learner for a learner")
    r = c.run(c.client.member_add, name, raft_address or "", grpc_address, learner,
              timeout=c.timeout * 3)
    emit(c.write_out, MEMBER_HEADERS, member_rows(r.members),
         {"config_version": r.config_version, "members": [member_json(m) for m in r.members]})


@member.command(name="remove")
@click.argument("name")
@pass_ctx
def member_remove(c: Ctx, name):
    """Removes the member NAME."""
    r = c.run(c.client.member_remove, name, timeout=c.timeout * 3)
    emit(c.write_out, MEMBER_HEADERS, member_rows(r.members),
         {"config_version": r.config_version, "members": [member_json(m) for m in r.members]})



def register(cli: click.Group) -> None:
    cli.add_command(member)

"""`sealkv alarm list|disarm`: the NOSPACE alarm, like etcdctl's."""
from __future__ import annotations

import click

from sealkv.node.cli.main import Ctx, pass_ctx
from sealkv.node.cli.output import emit

ALARM_HEADERS = ["member", "alarm", "cause", "replicated", "message"]


def alarm_rows(alarms) -> list:
    return [[a.member, a.alarm, a.cause, "yes" if a.replicated else "no", a.message]
            for a in alarms]


def alarm_json(a) -> dict:
    return {"member": a.member, "alarm": a.alarm, "cause": a.cause,
            "replicated": a.replicated, "message": a.message}


def _emit(c: Ctx, alarms) -> None:
    if c.write_out == "simple":
        for a in alarms:  # etcdctl's "memberID:... alarm:NOSPACE" lines, plus the cause
            click.echo(f"member:{a.member} alarm:{a.alarm} cause:{a.cause}")
        return
    emit(c.write_out, ALARM_HEADERS, alarm_rows(alarms), [alarm_json(a) for a in alarms])


@click.group()
def alarm():
    """List or disarm alarms (NOSPACE: a full disk or the database quota)."""


@alarm.command(name="list")
@pass_ctx
def alarm_list(c: Ctx):
    """Lists the active alarms (nothing printed when there are none)."""
    _emit(c, c.run(c.client.alarm_list).alarms)


@alarm.command(name="disarm")
@pass_ctx
def alarm_disarm(c: Ctx):
    """Disarms every alarm and prints the ones it disarmed; writes resume.

    Free space (or delete keys under the quota) first: a member still short of space raises
    its alarm again within a second.
    """
    before = c.run(c.client.alarm_list).alarms
    c.run(c.client.alarm_disarm)
    _emit(c, before)


def register(cli: click.Group) -> None:
    cli.add_command(alarm)

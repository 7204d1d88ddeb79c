"""Global CLI flags anywhere on the line, shell completion and `sealkv version` (no cluster)."""
import json

import click
import pytest
from click.testing import CliRunner

from sealkv.node import __version__
from sealkv.node.cli.main import register_commands

cli = register_commands()


def hoist(*args):
    ctx = click.Context(cli)
    return cli._hoist_global_options(ctx, list(args))


@pytest.mark.parametrize("given,expected", [
    (["get", "k", "-w", "json"], ["-w", "json", "get", "k"]),
    (["get", "k", "-wjson"], ["-wjson", "get", "k"]),
    (["member", "list", "--write-out=table"], ["--write-out=table", "member", "list"]),
    (["put", "k", "v", "--endpoints", "a:1", "--timeout", "2"],
     ["--endpoints", "a:1", "--timeout", "2", "put", "k", "v"]),
    # Before and after: both kept, the later one (after the subcommand) wins in click.
    (["-w", "json", "get", "k", "-w", "simple"], ["-w", "json", "-w", "simple", "get", "k"]),
    # After `--` everything is an argument.
    (["put", "k", "--", "-w"], ["put", "k", "--", "-w"]),
    # A subcommand's own option of another name is left alone.
    (["get", "k", "--prefix", "-w", "json"], ["-w", "json", "get", "k", "--prefix"]),
    (["encryption", "status", "--cluster", "-w", "json"],
     ["-w", "json", "encryption", "status", "--cluster"]),
])
def test_global_options_move_in_front_of_the_subcommand(given, expected):
    assert hoist(*given) == expected


def test_a_subcommand_that_declares_the_same_option_keeps_it():
    @cli.command(name="test-only-own-timeout")
    @click.option("--timeout")
    def own(timeout):  # for tests only
        click.echo(timeout)

    try:
        assert hoist("test-only-own-timeout", "--timeout", "7") == [
            "test-only-own-timeout", "--timeout", "7"]
        r = CliRunner().invoke(cli, ["test-only-own-timeout", "--timeout", "7"])
        assert r.output == "7\n"
    finally:
        cli.commands.pop("test-only-own-timeout")


def test_version_without_a_cluster_prints_the_client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["version", "-w", "json"], env={"SEALKV_ENDPOINTS": None})
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"client": __version__, "servers": {}}


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o nosort -F"),
                                          ("zsh", "#compdef sealkv"), ("fish", "complete --no-files")])
def test_completion_scripts(shell, marker):
    r = CliRunner().invoke(cli, ["completion", shell])
    assert r.exit_code == 0 and marker in r.stdout and "_SEALKV_COMPLETE" in r.stdout

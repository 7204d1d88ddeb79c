"""`sealkv node start`: run one node in the foreground."""
from __future__ import annotations

import sys
from typing import Any

import click

from sealkv.node import logs
from sealkv.node.cli.main import EXIT_USAGE, CliError


def parse_kek_options(pairs, flag: str = "--kek-option") -> dict[str, str]:
    """Returns {KEY: VALUE} of repeated `flag` KEY=VALUE flags; a bad pair is a usage error."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"{flag} takes KEY=VALUE, got {pair!r}", EXIT_USAGE)
        options[key.strip()] = value
    return options


def kek_plugin_options(kek_file, kek_provider, pairs, prefix: str = "") -> dict[str, Any]:
    """The encryption plugin's options for one KEK given by flags: `<prefix>kek_file`,
    `<prefix>kek_provider` and `<prefix>kek_options` (from the repeated `--<prefix>kek-option`
    KEY=VALUE `pairs`), only those given; a bad pair is a usage error."""
    options: dict[str, Any] = {}
    if kek_file:
        options[prefix + "kek_file"] = kek_file
    if kek_provider:
        options[prefix + "kek_provider"] = kek_provider
    if pairs:
        options[prefix + "kek_options"] = parse_kek_options(
            pairs, "--" + prefix.replace("_", "-") + "kek-option")
    return options


@click.group()
def node():
    """Run a node."""


@node.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="A TOML file; flags override its keys.")
@click.option("--name", help="This member's name (unique in the cluster).")
@click.option("--data-dir", help="Where the journal, dumps and sidecar live.")
@click.option("--raft", help="Raft HOST:PORT to bind (exactly this address).")
@click.option("--grpc", help="gRPC HOST:PORT to serve clients and peers on.")
@click.option("--learner", is_flag=True, default=None, help="Join as a learner (no raft port).")
@click.option("--initial-cluster", help="NAME=RAFT/GRPC,... of the members to start with.")
@click.option("--secret-file", help="The cluster secret (0600 file); required with peers.")
@click.option("--plugins", "plugins_", help="Comma-separated plugins to enable, in order.")
@click.option("--encryption", is_flag=True, default=None,
              help="Enable the encryption plugin (same as adding it to --plugins).")
@click.option("--kek-file", help="The key-encryption key file of the encryption plugin.")
@click.option("--kek-provider", help="The KEK provider of the encryption plugin: file "
              "(default), pkcs11, or an installed third-party provider.")
@click.option("--kek-option", "kek_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the KEK provider (repeatable), e.g. module=..., "
              "token_label=..., key_label=..., pin_file=... for pkcs11.")
@click.option("--next-kek-file", help="The next KEK file, staged for `sealkv encryption "
              "rewrap-keys` (same checks as --kek-file).")
@click.option("--next-kek-provider", help="The provider of the next KEK (like --kek-provider).")
@click.option("--next-kek-option", "next_kek_options", multiple=True, metavar="KEY=VALUE",
              help="An option of the next KEK's provider (repeatable, like --kek-option).")
@click.option("--cacert", help="The cluster CA certificate (mutual TLS, the default).")
@click.option("--cert", help="This node's certificate (`sealkv cert create-node`).")
@click.option("--key", help="This node's private key (0600).")
@click.option("--certs-dir", help="Shorthand: DIR/ca.crt and DIR/node.NAME.crt|key.")
@click.option("--insecure", is_flag=True, default=None,
              help="Serve plaintext gRPC with no client identities (one-host experiments only).")
@click.option("--request-timeout", type=float, help="Seconds a request may wait (default 5).")
@click.option("--fsync", type=click.Choice(["always", "never"]),
              help="always (default): the log, term and vote are on disk before they count; "
                   "never: faster, but a power loss may forget acknowledged writes.")
@click.option("--batch-entries/--no-batch-entries", default=None,
              help="Concurrent writes share one Raft entry (default); --no-batch-entries "
                   "proposes one entry per write, for a rolling upgrade from a version "
                   "without the BATCH opcode (see the README).")
@click.option("--peer-wire", type=click.Choice(["gcm", "fernet"]),
              help="The format this node sends on the raft port: gcm (AES-256-GCM, the "
                   "default) or fernet (pysyncobj's, for a rolling upgrade from a version "
                   "without the peer wire; see the README). Every node accepts both.")
@click.option("--quota-backend-bytes", type=int,
              help="Bytes of keys and values the database may hold before the NOSPACE alarm "
                   "refuses writes (default 2 GiB).")
@click.option("--listen-metrics", metavar="HOST:PORT",
              help="Serve Prometheus metrics (/metrics) and /health over HTTP here.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Log lines as text or one JSON object per line.")
def start(config_file, name, data_dir, raft, grpc, learner, initial_cluster, secret_file,
          plugins_, encryption, kek_file, kek_provider, kek_options, next_kek_file,
          next_kek_provider, next_kek_options, cacert, cert, key,
          certs_dir, insecure, request_timeout, fsync, batch_entries, peer_wire,
          quota_backend_bytes,
          listen_metrics, log_level, log_format):
    """Runs one node in the foreground until SIGTERM or SIGINT."""
    from sealkv.node.config import ConfigError, build_config, load_toml
    from sealkv.node.server import run

    values = load_toml(config_file) if config_file else {}
    logs.configure(log_level, log_format, name or str(values.get("name", "")))
    flags = {"name": name, "data_dir": data_dir, "raft": raft, "grpc": grpc,
             "learner": learner, "initial_cluster": initial_cluster,
             "secret_file": secret_file, "request_timeout": request_timeout, "fsync": fsync,
             "batch_entries": batch_entries, "peer_wire": peer_wire,
             "quota_backend_bytes": quota_backend_bytes,
             "listen_metrics": listen_metrics,
             "cacert": cacert, "cert": cert, "key": key, "insecure": insecure}
    values.update({k: v for k, v in flags.items() if v is not None})
    if plugins_ is not None:
        values["plugins"] = [p.strip() for p in plugins_.split(",") if p.strip()]
    plugin_list = list(values.get("plugins", []))
    if encryption and "encryption" not in plugin_list:
        plugin_list.insert(0, "encryption")
    values["plugins"] = plugin_list
    if certs_dir:
        from sealkv.node.security.pki import node_files

        files = node_files(certs_dir, values.get("name") or "NAME")
        for field_, path in (("cacert", files.cacert), ("cert", files.cert), ("key", files.key)):
            values.setdefault(field_, path)
    encryption_options = values.setdefault("plugin_options", {}).setdefault("encryption", {})
    encryption_options.update(kek_plugin_options(kek_file, kek_provider, kek_options))
    encryption_options.update(kek_plugin_options(next_kek_file, next_kek_provider,
                                                 next_kek_options, "next_"))
    try:
        config = build_config(values)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    sys.exit(run(config))


def register(cli: click.Group) -> None:
    cli.add_command(node)

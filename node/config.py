"""Node configuration: flags or a TOML file, validated with errors that say what to change.

TOML layout (every key optional except name, grpc and one of raft / learner):

    name = "n1"
    data_dir = "/var/lib/sealkv/n1"
    raft = "127.0.0.1:7001"          # omit and set learner = true for a learner
    grpc = "127.0.0.1:9001"
    secret_file = "/etc/sealkv/secret"
    cacert = "/etc/sealkv/certs/ca.crt"   # mutual TLS (default); or insecure = true
    cert = "/etc/sealkv/certs/node.n1.crt"
    key = "/etc/sealkv/certs/node.n1.key"
    initial_cluster = "n1=127.0.0.1:7001/127.0.0.1:9001,n2=...,n3=..."
    plugins = ["encryption"]
    request_timeout = 5.0
    fsync = "always"                 # or "never": see the README's Durability section
    batch_entries = true             # false: one Raft entry per write (rolling upgrades)
    peer_wire = "gcm"                # or "fernet": what the raft port sends (rolling upgrades)
    quota_backend_bytes = 2147483648 # keys+values the database may hold (NOSPACE alarm above)
    [raft_settings]                  # RaftSettings fields
    log_compaction_min_entries = 50000
    [plugin_options.encryption]      # handed to the plugin as PluginContext.options
    kek_file = "/etc/sealkv/kek"
    next_kek_file = "/etc/sealkv/kek.next" # staged for `sealkv encryption rewrap-keys`
                                     # (next_kek_provider, next_kek_options as for the KEK)
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any, Optional

from sealkv.node import durable
from sealkv.node.state import commands as cmd
from sealkv.node.replication.settings import RaftSettings
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.security.pki import CertFiles

MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 1024 * 1024
MAX_RANGE_LIMIT = 10000
# A Range response stops before the pair that would take its keys and values past this
# (`more` is then set; at least one pair is always returned).
MAX_RANGE_BYTES = 4 * 1024 * 1024
MAX_NAME_BYTES = 64
SECRET_MIN_BYTES = 32
# A data directory made before the 32-byte rule keeps working with its old secret (warned).
LEGACY_SECRET_MIN_BYTES = 16
PEER_WIRE_FORMATS = ("gcm", "fernet")  # peer_wire.FORMATS (that module loads cryptography)
PEER_WIRE_DEFAULT = "gcm"
DEFAULT_QUOTA_BACKEND_BYTES = 2 * 1024 ** 3
MIN_QUOTA_BACKEND_BYTES = 1024 * 1024


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


@dataclass
class NodeConfig:
    """Everything one node process needs to start."""

    name: str
    grpc: str
    data_dir: str
    raft: Optional[str] = None
    learner: bool = False
    initial_cluster: list[MemberRecord] = field(default_factory=list)
    secret_file: Optional[str] = None
    plugins: list[str] = field(default_factory=list)
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    request_timeout: float = 5.0
    # "always": the journal, term and vote are fdatasynced before they count; "never": they
    # are written (they survive a process crash) but a power loss may forget them.
    fsync: str = durable.FSYNC_ALWAYS
    # True: concurrent writes share one BATCH entry (opcode 0x12). False: one entry per write,
    # for a rolling upgrade from a version whose nodes cannot apply BATCH.
    batch_entries: bool = True
    # The raft peer wire this node sends: "gcm" (AES-256-GCM, replication/peer_wire.py) or
    # "fernet" (pysyncobj's own, which nodes before the peer wire read). Both are accepted.
    peer_wire: str = PEER_WIRE_DEFAULT
    quota_backend_bytes: int = DEFAULT_QUOTA_BACKEND_BYTES
    # HOST:PORT of the Prometheus metrics and /health HTTP listener (None: no listener).
    listen_metrics: Optional[str] = None
    raft_settings: RaftSettings = field(default_factory=RaftSettings)
    cacert: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    insecure: bool = False

    @property
    def tls_files(self) -> Optional[CertFiles]:
        """This node's TLS material (its node certificate), or None when --insecure."""
        if self.insecure:
            return None
        return CertFiles(self.cacert, self.cert, self.key)

    def validate(self) -> None:
        """Raises ConfigError naming the setting to change."""
        check_name(self.name, "name")
        check_address(self.grpc, "grpc")
        if self.learner and self.raft:
            raise ConfigError("a learner has no raft address: drop --raft or --learner")
        if not self.learner and not self.raft:
            raise ConfigError("--raft HOST:PORT is required (or --learner for a learner)")
        if self.raft:
            check_address(self.raft, "raft")
        if self.learner and not self.initial_cluster:
            raise ConfigError("a learner needs --initial-cluster listing the voters to follow")
        if self.initial_cluster and not self.learner:
            mine = [m for m in self.initial_cluster if m.name == self.name]
            if not mine or mine[0].raft_address != self.raft:
                raise ConfigError(f"--initial-cluster must list this node as "
                                  f"{self.name}={self.raft}/{self.grpc}")
        if self.listen_metrics is not None:
            check_address(self.listen_metrics, "listen_metrics")
        given = [p for p in (self.cacert, self.cert, self.key) if p]
        if self.insecure and given:
            raise ConfigError("--insecure serves plaintext: drop --cacert/--cert/--key, or drop "
                              "--insecure to serve mutual TLS")
        if not self.insecure and len(given) != 3:
            raise ConfigError("gRPC serves mutual TLS by default: give --cacert, --cert and "
                              "--key (or --certs-dir DIR holding ca.crt and node.NAME.crt|key; "
                              "see `sealkv cert`), or --insecure for an experiment on one host")
        if self.request_timeout <= 0:
            raise ConfigError("request_timeout must be positive")
        if not isinstance(self.batch_entries, bool):
            raise ConfigError(f"batch_entries must be true or false (got {self.batch_entries!r})")
        if self.peer_wire not in PEER_WIRE_FORMATS:
            raise ConfigError(f"peer_wire must be {' or '.join(PEER_WIRE_FORMATS)} "
                              f"(got {self.peer_wire!r})")
        if self.fsync not in durable.FSYNC_POLICIES:
            raise ConfigError(f"fsync must be {' or '.join(durable.FSYNC_POLICIES)} "
                              f"(got {self.fsync!r})")
        if not isinstance(self.quota_backend_bytes, int) or \
                self.quota_backend_bytes < MIN_QUOTA_BACKEND_BYTES:
            raise ConfigError(f"quota_backend_bytes must be an integer of at least "
                              f"{MIN_QUOTA_BACKEND_BYTES} (1 MiB)")
        try:
            self.raft_settings.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def db_dir(self) -> str:
        """Where the database lives: `<data-dir>/db`."""
        return os.path.join(self.data_dir, "db")

    @property
    def db_map_bytes(self) -> int:
        """The LMDB map (address space, not disk): twice the quota, so the quota alarm comes
        first; a larger quota grows the map at the next start."""
        return 2 * self.quota_backend_bytes + 64 * 1024 * 1024

    @property
    def partners(self) -> list[str]:
        return [m.raft_address for m in self.initial_cluster
                if m.role == cmd.ROLE_VOTER and m.raft_address != self.raft]

    def read_secret(self, existing: bool = False) -> Optional[str]:
        """Returns the cluster secret, or None; refuses files others can read.

        A new cluster needs SECRET_MIN_BYTES; a node whose data directory already holds a
        raft log (`existing`) is held to LEGACY_SECRET_MIN_BYTES only.
        """
        if not self.secret_file:
            return None
        try:
            fd = os.open(self.secret_file, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            raise ConfigError(f"cannot open secret file {self.secret_file}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"secret file {self.secret_file} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigError(f"secret file {self.secret_file} is readable by group or others:"
                                  f" run chmod 600 {self.secret_file}")
            secret = os.read(fd, 4096).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
        minimum = LEGACY_SECRET_MIN_BYTES if existing else SECRET_MIN_BYTES
        if len(secret.encode()) < minimum:
            raise ConfigError(f"secret file {self.secret_file} holds fewer than "
                              f"{minimum} bytes: write a longer random secret, "
                              f"e.g. `head -c 32 /dev/urandom | base64 > {self.secret_file}`")
        return secret


def check_name(name: str, what: str = "name") -> None:
    """Raises ConfigError unless `name` is a short, printable member name."""
    if not name or len(name.encode()) > MAX_NAME_BYTES or not name.replace("-", "").replace(
            "_", "").replace(".", "").isalnum():
        raise ConfigError(f"{what} must be 1-{MAX_NAME_BYTES} letters, digits, '-', '_' or '.'")


def check_address(address: str, what: str) -> None:
    """Raises ConfigError unless `address` is HOST:PORT with a port in 1-65535."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} address {address!r} must be HOST:PORT")


def check_member_address(address: str, what: str) -> None:
    """Raises ConfigError unless `address` is HOST:PORT that peers can dial: a port in
    1-65535 and a host that is an IP address (not a wildcard or multicast one) or a DNS name."""
    check_address(address, what)
    host = address.rpartition(":")[0]
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            raise ConfigError(f"{what} address {address!r} is a wildcard or multicast address: "
                              "give the address other members dial")
        return
    labels = bare.rstrip(".").split(".")
    if len(bare) > 253 or not all(
            0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            and not label.startswith("-") for label in labels):
        raise ConfigError(f"{what} address {address!r} must name an IP address or a DNS name")


def parse_initial_cluster(text: str) -> list[MemberRecord]:
    """Parses "name=RAFT/GRPC,..." (a learner: "name=learner/GRPC") into member records."""
    members: list[MemberRecord] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, addrs = item.partition("=")
        raft, slash, grpc = addrs.partition("/")
        if not eq or not slash:
            raise ConfigError(f"initial cluster entry {item!r} must be NAME=RAFT_HOST:PORT/"
                              "GRPC_HOST:PORT")
        check_name(name, "member name")
        check_address(grpc, f"member {name} grpc")
        if raft == "learner":
            members.append(MemberRecord(name, "", grpc, cmd.ROLE_LEARNER))
            continue
        check_address(raft, f"member {name} raft")
        members.append(MemberRecord(name, raft, grpc, cmd.ROLE_VOTER))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ConfigError("initial cluster names a member twice")
    return members


def format_initial_cluster(members: list[MemberRecord]) -> str:
    """The inverse of `parse_initial_cluster`."""
    return ",".join(f"{m.name}={m.raft_address or 'learner'}/{m.grpc_address}" for m in members)


def load_toml(path: str) -> dict[str, Any]:
    """Reads a node TOML file into keyword arguments for `build_config`."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def build_config(values: dict[str, Any]) -> NodeConfig:
    """Builds and validates a NodeConfig from merged TOML and flag values."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(sorted(unknown))}")
    if isinstance(values.get("initial_cluster"), str):
        values["initial_cluster"] = parse_initial_cluster(values["initial_cluster"])
    settings = values.get("raft_settings") or {}
    if isinstance(settings, dict):
        fields = {f.name for f in dataclasses.fields(RaftSettings)}
        bad = set(settings) - fields
        if bad:
            raise ConfigError(f"unknown raft_settings keys: {', '.join(sorted(bad))}")
        values["raft_settings"] = RaftSettings(**settings)
    for required in ("name", "grpc", "data_dir"):
        if not values.get(required):
            raise ConfigError(f"{required} is required")
    config = NodeConfig(**values)
    config.validate()
    return config

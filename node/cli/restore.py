"""Building a new local cluster from a backup file (`sealkv snapshot restore`).

`restore(...)` writes everything `sealkv cluster up --data-dir D` needs to start the
restored cluster, like `etcdutl snapshot restore`: the cluster record, a new cluster secret,
a new PKI (unless --insecure), and per member a data directory holding

- `db/`: the LMDB database at the backup's applied index N, with the new membership (the
  new members, configuration version N) and no alarms (they named the old members); the
  revocation list is kept;
- `raft/raft.dump`: a Raft dump of that same state whose log base is a no-op at index N
  (`dump_file.restored_log_base`), so the new log continues at N+1 and nothing new is
  skipped as "already applied";
- each storage layer's node-local files (`RestoresSnapshots`; the encryption plugin: fresh
  data keys, an empty writer registry and a sidecar with fresh epochs, see
  `plugins/encryption/restore.py`).

Everything is built in a sibling temporary directory and renamed to D at the end; the
backup's SHA-256 is checked while it is read. A damaged backup, a missing KEK or any other
failure removes the temporary directory: D is never left half-written. Runs on the CLI's
thread; no node may run on D.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from sealkv.node import durable
from sealkv.node.cli import local
from sealkv.node.replication import dump_file
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state import commands as cmd
from sealkv.node.state.backup_file import BackupReader
from sealkv.node.state.machine import END_RECORD, StateMachine, encode_record, \
    encode_snapshot_header
from sealkv.node.state.storage.lmdb_store import LmdbStore

DUMP_NAME = os.path.join("raft", "raft.dump")


class RestoreError(RuntimeError):
    """The restore cannot go on; nothing was written. The message says what to do."""


@dataclass
class Restored:
    """What a restore built: the cluster record and what each plugin reported."""

    record: local.LocalCluster
    applied_index: int
    keys: int
    plugin_summaries: dict[str, Mapping[str, Any]] = field(default_factory=dict)


class _OpaqueState:
    """A plugin state carried as bytes into a member's database (the restore runs no plugin)."""

    def __init__(self, data: bytes):
        self.data = data

    def snapshot_state(self) -> bytes:
        return self.data

    def restore_state(self, data: bytes) -> None:
        self.data = data


def restore(backup: str, data_dir: str, *, nodes: int, base_port: Optional[int],
            insecure: bool, fsync: str, plugin_options: Mapping[str, Mapping[str, Any]],
            kek_record: Mapping[str, Any],
            members: Optional[list[MemberRecord]] = None) -> Restored:
    """Builds the restored cluster in `data_dir` (see the module docstring); returns it.

    The members are `n1..n<nodes>` on 127.0.0.1 (ports from `base_port`, else free ones),
    or exactly `members` (voters: names and addresses as `--initial-cluster` gives them,
    each member's data directory `data_dir/<name>`, its certificate for its gRPC host).

    `plugin_options` are the storage layers' options as a node gets them (the encryption
    plugin's KEK); `kek_record` the KEK fields of the cluster record (`kek_file`,
    `kek_provider`, `kek_options`). Raises `RestoreError` or `BackupError`; nothing is left
    behind then.
    """
    data_dir = os.path.abspath(data_dir)
    if os.path.exists(data_dir) and (not os.path.isdir(data_dir) or os.listdir(data_dir)):
        raise RestoreError(f"{data_dir} exists and is not empty: restore into a new directory")
    parent = os.path.dirname(data_dir)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    work = os.path.join(parent, f".{os.path.basename(data_dir)}.restoring-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.mkdir(work, 0o700)
    try:
        restored = _build(backup, data_dir, work, _nodes(data_dir, nodes, base_port, members),
                          insecure, fsync, plugin_options, kek_record)
        if os.path.isdir(data_dir):
            os.rmdir(data_dir)  # empty (checked above): the rename puts the cluster there
        os.rename(work, data_dir)
        durable.sync_dir(parent, durable.FSYNC_ALWAYS)
        return restored
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _nodes(data_dir: str, count: int, base_port: Optional[int],
           members: Optional[list[MemberRecord]]) -> list[local.LocalNode]:
    if members is None:
        return local.define_nodes(data_dir, count, base_port)
    learners = [m.name for m in members if m.role != cmd.ROLE_VOTER]
    if learners or not members:
        raise RestoreError("a restored cluster starts with voters only (NAME=RAFT/GRPC); add "
                           "learners afterwards with `sealkv member add --learner`")
    return [local.LocalNode(m.name, m.raft_address, m.grpc_address,
                            os.path.join(data_dir, m.name),
                            os.path.join(data_dir, f"{m.name}.log")) for m in members]


def _build(backup: str, data_dir: str, work: str, nodes: list[local.LocalNode],
           insecure: bool, fsync: str, plugin_options, kek_record) -> Restored:
    with BackupReader(backup) as reader:
        index = reader.applied_index
        record = local.LocalCluster(
            data_dir, os.path.join(data_dir, "secret"), fsync=fsync, insecure=insecure,
            certs_dir=None if insecure else os.path.join(data_dir, "pki"))
        record.nodes = nodes
        members = [MemberRecord(n.name, n.raft, n.grpc, cmd.ROLE_VOTER) for n in record.nodes]
        states, member_files, summaries = _plugin_states(reader.state["plugins"], index,
                                                         plugin_options)
        record.plugins = sorted(states, key=lambda name: name != "encryption")
        if "encryption" in states:
            if not (kek_record.get("kek_file") or kek_record.get("kek_provider")):
                raise RestoreError("the backup's cluster ran the encryption plugin, so the "
                                   "restored nodes need a KEK: give --kek-file F (or "
                                   "--kek-provider/--kek-option)")
            record.kek_file = kek_record.get("kek_file")
            record.kek_provider = kek_record.get("kek_provider")
            record.kek_options = dict(kek_record.get("kek_options") or {})
        header = dict(reader.state, members=[[m.name, m.raft_address, m.grpc_address, m.role]
                                             for m in members],
                      config_version=index, alarms=[], plugins=states)
        template = os.path.join(work, "template")
        os.mkdir(template, 0o700)
        keys = _write_dump(reader, header, index, [m.raft_address for m in members],
                           os.path.join(template, DUMP_NAME))
    _write_database(template, states)
    for node in record.nodes:
        member_dir = os.path.join(work, node.name)
        shutil.copytree(template, member_dir)
        for write in member_files:
            write(member_dir)
    shutil.rmtree(template)
    local.write_secret(os.path.join(work, "secret"))
    if not insecure:
        local.make_pki(os.path.join(work, "pki"),
                       [(n.name, n.grpc.rsplit(":", 1)[0].strip("[]")) for n in record.nodes])
    record.save(work)
    return Restored(record, index, keys, summaries)


def _plugin_states(states: Mapping[str, bytes], index: int,
                   options: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[dict[str, bytes], list[Callable[[str], None]], dict]:
    """The restored cluster's plugin states, the writers of their member files, and their
    summaries. Every plugin of the backup must be installed here."""
    from sealkv.node import plugin_loader
    from sealkv.plugins.api import RestoresSnapshots, StartupRefused

    out, writers, summaries = {}, [], {}
    for name, raw in states.items():
        try:
            loaded = plugin_loader.load([name], plugin_loader.STORAGE_GROUP)
        except plugin_loader.PluginError as exc:
            raise RestoreError(f"the backup holds the state of storage layer {name!r}, which "
                               f"cannot be loaded here: {exc}") from None
        cls = loaded[0][1] if loaded else None
        if cls is None:
            raise RestoreError(f"the backup holds the state of {name!r}, which is not a "
                               "storage layer here")
        if isinstance(cls, RestoresSnapshots):
            try:
                restored = cls.restore_snapshot_state(raw, index, options.get(name, {}))
            except StartupRefused as exc:
                raise RestoreError(str(exc)) from None
            out[name] = restored.state
            writers.append(restored.write_member_files)
            summaries[name] = dict(restored.summary)
        else:
            out[name] = raw
    return out, writers, summaries


def _write_dump(reader: BackupReader, header: dict, index: int, cluster: list[str],
                path: str) -> int:
    """Writes the member dump from the backup's records (checking the backup's SHA-256 at
    the end); returns the number of records."""
    os.makedirs(os.path.dirname(path), mode=0o700)
    last, previous = dump_file.restored_log_base(index)
    keys = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, durable.FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        out = dump_file.ChecksumWriter(f)
        out.write(dump_file.dump_header(last, previous, cluster))
        out.write(encode_snapshot_header(header))
        for key, entry in reader.records():
            out.write(encode_record(key, entry))
            keys += 1
        out.write(END_RECORD)
        reader.verify()  # a damaged backup stops here; the caller removes everything
        f.write(out.crc.to_bytes(4, "big"))
        f.flush()
        os.fsync(f.fileno())
    return keys


def _write_database(member_dir: str, states: Mapping[str, bytes]) -> None:
    """Loads the member dump into a new LMDB database beside it (the node opens it at the
    backup's index; the dump only sets its Raft log base)."""
    store = LmdbStore(os.path.join(member_dir, "db"))
    store.open()
    try:
        machine = StateMachine(store, plugin_states={name: _OpaqueState(b"")
                                                     for name in states})
        path = os.path.join(member_dir, DUMP_NAME)
        with open(path, "rb") as src:
            dump_file.read_dump_start(path, src)  # leaves `src` at the snapshot
            machine.read_snapshot(src)
    finally:
        store.close()

"""The public plugin API of sealkv: base classes for storage layers and admin services.

Plugins are found through entry points (`sealkv.storage_layers`, `sealkv.admin_services`),
enabled by name and in order, and checked against `API_VERSION` when loaded: a plugin whose
`api_version` differs is refused with an error naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

from sealkv.node.replication.payload_codec import PayloadCodec
from sealkv.node.state.storage.base import Storage

API_VERSION = 1


def plugin_data_dir(data_dir: str, plugin_name: str) -> str:
    """Returns `<data-dir>/<plugin name>`, where a plugin keeps its node-local files.

    A storage layer that writes node-local state keeps it there and nowhere else: a node whose
    data directory holds a file there refuses to start while that plugin is not enabled.
    """
    return os.path.join(data_dir, plugin_name)


class StartupRefused(Exception):
    """Raised by a plugin to refuse start-up; the message must tell the operator what to do."""


@dataclass
class PluginContext:
    """What the node tells a plugin when it builds it.

    `options` holds the plugin's own settings from the node's configuration (flags or the
    TOML table `[plugin_options.<name>]`).
    """

    node_name: str
    raft_id: str
    data_dir: str
    options: Mapping[str, Any] = field(default_factory=dict)


CommandHandler = Callable[[int, bytes], Any]


class StorageLayerPlugin:
    """Base class of a storage layer plugin (entry point group `sealkv.storage_layers`).

    A storage layer wraps the node's storage stack and may own replicated state and replicated
    command opcodes. The node builds it once, before Raft starts.
    """

    api_version: int = API_VERSION
    name: str = ""

    def __init__(self, context: PluginContext):
        self.context = context

    def wrap(self, inner: Storage) -> Storage:
        """Returns the layer that wraps `inner` (called once, before Raft starts)."""
        return inner

    def command_handlers(self) -> Mapping[int, CommandHandler]:
        """Returns opcode -> handler(index, body) for this plugin's replicated commands.

        Handlers run inside replicated apply, on the pysyncobj tick thread, with the state
        lock held. They must be deterministic (no clock, randomness or network), fast, and
        never wait. They write no node-local file either: a handler that changes what must be
        durable on this node records it and lets the node perform it (`PersistsAfterApply`).
        A handler raises `ApplyHalt` when the entry cannot be applied. Opcodes 0x03-0x0F are
        reserved for the built-in encryption plugin.
        """
        return {}

    def snapshot_state(self) -> bytes:
        """Returns this plugin's replicated state, for a Raft snapshot (tick thread, lock held)."""
        return b""

    def restore_state(self, data: bytes) -> None:
        """Replaces this plugin's replicated state with `data` from a snapshot.

        Like a command handler it writes no node-local file; what must be made durable is
        left to `PersistsAfterApply.persist_applied`, which the state machine runs next.
        """

    def prepare_start(self) -> None:
        """Called once on the start-up thread, before Raft starts or replays anything.

        The place for node-local preparation that replay depends on (the encryption plugin
        loads its KEK and makes its new nonce epochs durable here). Raise `StartupRefused`
        to stop start-up.
        """

    def admit_write(self, timeout: float) -> None:
        """Called on a gRPC thread before a client write is proposed.

        May wait up to `timeout` seconds; raises a `sealkv.node.errors.SealkvError` (for
        example `Unavailable`, which clients retry) to refuse the write.
        """

    def start(self, node: Any) -> None:
        """Called once the node has replayed its log and before it serves clients.

        `node` is the narrow node handle (`sealkv.node.serving.handle.NodeHandle`). Raise
        `StartupRefused` to stop start-up.
        """

    def stop(self) -> None:
        """Called once at shutdown."""


@runtime_checkable
class ProvidesPayloadCodec(Protocol):
    """Optional capability of a storage layer plugin: it seals Raft command payloads.

    The node checks it with `isinstance` when it builds the replication adapter and calls
    `payload_codec()` once, on the start-up thread, before Raft starts; the first enabled
    layer that offers one wins. The codec's own contract is `PayloadCodec`'s.
    """

    def payload_codec(self) -> PayloadCodec: ...


@runtime_checkable
class PersistsAfterApply(Protocol):
    """Optional capability of a storage layer plugin: node-local I/O that apply decided.

    The etcd-io/raft Ready/Advance split for a plugin's side effects. A command handler and
    `restore_state` never write a file: they change the plugin's in-memory state and record
    what must be made durable (an "effect", e.g. "the encryption sidecar must reflect the key
    table as of now"). The node then performs it by calling `persist_applied()`:

    - Who calls: the state machine (`StateMachine.persist_applied`), which the replication
      adapter calls right after every `StateMachine.apply` returns, and which
      `StateMachine.load`, `read_snapshot` and `rollback` call themselves before returning.
    - Which thread: the thread that applies (the pysyncobj tick thread; the start-up thread
      before it runs), without the state lock held, always before the next entry is applied.
      So the entry after the one that decided an effect is applied with the effect done.
    - Nothing due: returns at once (it runs after every entry).
    - Failure: raises `ApplyHalt` (with no key material in its message) and leaves the effect
      due. The state machine then aborts the open transaction of the entries applied since
      the last commit and the node halts, exactly as when apply itself fails: an effect is
      never dropped silently.
    - The "not durable yet" gate is the plugin's duty: until `persist_applied()` has made an
      effect durable, nothing may depend on it. For the encryption plugin, no value or raft
      payload is sealed under a nonce epoch whose sidecar record is not yet on disk (a crash
      could otherwise reuse nonces): writers on other threads wait for the persist, within
      their deadline; the applying thread itself is refused (it would wait for itself).
    """

    def persist_applied(self) -> None: ...


@dataclass(frozen=True)
class RestoredState:
    """What a storage layer makes of its replicated state for a new cluster restored from a
    backup (`RestoresSnapshots.restore_snapshot_state`).

    `state` replaces the plugin's state in every member's database; `write_member_files(dir)`
    writes the plugin's node-local files into one member's data directory (called once per
    member, before any node starts); `summary` is what the restore prints (no key material).
    """

    state: bytes
    write_member_files: Callable[[str], None] = lambda data_dir: None
    summary: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class RestoresSnapshots(Protocol):
    """Optional capability of a storage layer plugin class: it understands its replicated
    state in a backup file (`sealkv snapshot status|restore`).

    Both are class methods, called on the CLI's thread in a process where no node runs.
    `describe_snapshot_state(state)` returns what `snapshot status` shows (JSON-able; an
    `encrypted` flag says whether the backup's values are sealed); it needs no key and must
    never return key material. `restore_snapshot_state(state, index, options)` returns the
    `RestoredState` of a new cluster whose log starts after `index`, with the plugin's
    options as a node would get them (the encryption plugin needs its KEK there); it raises
    `StartupRefused` with the fix when it cannot (the restore then writes nothing). A plugin
    without this capability has its state copied unchanged.
    """

    @classmethod
    def describe_snapshot_state(cls, state: bytes) -> Mapping[str, Any]: ...

    @classmethod
    def restore_snapshot_state(cls, state: bytes, index: int,
                               options: Mapping[str, Any]) -> RestoredState: ...


class AdminPlugin:
    """Base class of an admin service plugin (entry point group `sealkv.admin_services`).

    The node builds it with the narrow node handle (`sealkv.node.serving.handle.NodeHandle`: status,
    `membership_snapshot()`, propose, a pool of gRPC channels to peers, the capability
    fan-out) and calls `add_services(server)` once before the gRPC server starts. Handlers run
    on gRPC worker threads; they may block on the handle with deadlines but never on the
    pysyncobj tick thread.
    """

    api_version: int = API_VERSION
    name: str = ""
    #: The role each method of the plugin's services needs: "/package.Service/Method" ->
    #: "readonly", "readwrite" or "admin" (admin may call everything). Every method of every
    #: service `add_services` returns must be declared, or the node refuses to start.
    method_roles: Mapping[str, str] = {}
    #: Methods that node certificates (peers) may call as well, e.g. a capability probe.
    peer_methods: frozenset = frozenset()

    def __init__(self, node: Any):
        self.node = node

    def add_services(self, server: Any) -> list[str]:
        """Adds gRPC services to `server`; returns their full names (for reflection and for
        authorization: a service not returned here is denied to everyone)."""
        return []

    @classmethod
    def cli_commands(cls) -> list[Any]:
        """Returns click commands to add to the `sealkv` CLI (imported only when enabled)."""
        return []

    def stop(self) -> None:
        """Called once at shutdown."""


@runtime_checkable
class ProvidesMetrics(Protocol):
    """An optional capability of a plugin: metrics read at scrape time.

    `metrics()` is called on the metrics listener's thread for every scrape; it must be quick,
    take no lock that apply holds for long, and never raise. It returns
    `(name, kind, help, samples)` tuples: `kind` is "gauge" or "counter", `samples` a list of
    `(labels, value)` with string labels. Names start with `sealkv_`; a label never carries a
    key, a value or key material.
    """

    def metrics(self) -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
        ...

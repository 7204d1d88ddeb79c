"""The fault harness: a real cluster, recording clients, a seeded nemesis, and the checks.

One run (`run_seed`) starts a 3-node cluster with the encryption plugin (each node with a
current KEK and the next one staged), each node in its own network namespace when the machine
allows it (see `tests.faults.netns`), else on 127.0.0.1 without partitions. Client threads
drive puts, linearizable gets, deletes and compare-and-swaps on a few keys and record every
call and return (`tests.faults.history`). Two threads act on the cluster meanwhile, each on a
schedule drawn from the seed:

- the nemesis injects one fault at a time: kill -9 and restart of the leader or a follower,
  SIGSTOP/SIGCONT, the leader isolated, a minority/majority split, a voter added and removed,
  and with `use_disks` (`--fault-disks`) a full disk: each initial node's data directory is
  then on a small loop-mounted ext4 filesystem of its own (`tests.faults.disks`), which the
  nemesis fills to the last block under the leader or a follower, holds 1-3 s, frees, and
  then disarms the NOSPACE alarm as an operator would;
- the operator runs the encryption admin commands one at a time, as an operator would, while
  those faults come and go: bootstrap, the storage and raft-log envelope cutovers, data-key
  rotations (both purposes), online re-encryption, cluster-wide compaction, key retirement
  (`retire_dek`: the key the last rotation replaced, after the re-encryption and compaction
  it needs), the KEK rewrap (`rewrap-keys`) and `snapshot save`, whose file is checked.

A step the cluster refuses (a member down, a partition, a precondition not met yet) counts as
"KIND (refused)"; the run's summary counts every kind's successes and refusals. A step that
breaks a promise (a saved snapshot that is damaged or misses an acknowledged write) or fails
in the harness is a finding.

After the faults are healed the run checks five things: every node it did not remove runs
and serves again, the history is linearizable (`tests.faults.lincheck`), every acknowledged
write to the append-only ledger keys is readable, every node converges to the same applied
index and state digest, and no node logged at CRITICAL or logged a traceback, except the lines
in `EXPECTED_LOG_EVENTS`. Any exception while the run checks is a finding too: the history
and the nodes' full logs are kept and the replay command is printed.

Only the nemesis's and the operator's own timing comes from the seed; thread interleavings do
not, so a seed replays the same schedules, not the same history.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from sealkv.node import errors
from sealkv.node.cli.snapshot_cmd import save_snapshot
from sealkv.node.client import Client
from sealkv.node.state.backup_file import BackupReader, summarize
from sealkv.v1 import encryption_admin_pb2 as enc_pb
from sealkv.v1 import encryption_admin_pb2_grpc as enc_grpc
from tests.cluster import Cluster, NodeProc, wait_for
from tests.faults import lincheck
from tests.faults.disks import DataDisks
from tests.faults.history import Operation, save_history
from tests.faults.netns import Network

KEYS = [b"r0", b"r1", b"r2", b"r3"]
OP_TIMEOUT = 2.0
HISTORY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "fault-histories")

# Log events a fault is expected to make a node log at CRITICAL or with a traceback: (the
# fault that causes it, a pattern matched against the event). Every other CRITICAL line or
# traceback fails the run. Empty: no fault of the nemesis is expected to cause either.
EXPECTED_LOG_EVENTS: tuple[tuple[str, re.Pattern], ...] = ()

# Errors after which the operation certainly had no effect (nothing was submitted, or the
# proposal was discarded before it committed).
NO_EFFECT = (errors.Unavailable, errors.Aborted, errors.ResourceExhausted,
             errors.FailedPrecondition, errors.InvalidArgument)


class NetnsCluster(Cluster):
    """A `Cluster` whose nodes each run in their own network namespace."""

    def __init__(self, base_dir: str, size: int, network: Network, **kwargs):
        self.network = network
        super().__init__(base_dir, size, **kwargs)

    def addresses(self, name: str) -> tuple[str, str]:
        ip = self.network.add_host(name)
        return f"{ip}:7000", f"{ip}:9000"

    def launch_prefix(self, node: NodeProc) -> list[str]:
        return self.network.exec_prefix(node.name)


@dataclass
class RunResult:
    """What one seed did and found. `faults` counts each nemesis fault and operator step by
    kind ("KIND" when it took effect, "KIND (refused)" when the cluster refused it);
    `refusals` counts the reasons the operator's steps were refused (digits as N)."""

    seed: int
    operations: int = 0
    unknown_outcomes: int = 0
    ledger_writes: int = 0
    faults: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    verdict: str = "unknown"
    problems: list[str] = field(default_factory=list)
    history_file: Optional[str] = None
    partitions: bool = False
    # Whether the run was asked for the fill-disk fault (`use_disks`), and why the initial
    # nodes run without disks of their own anyway ("" when they have them).
    disks: bool = False
    disks_skipped: str = ""
    timeline: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, kind: str, done: bool, reason: str = "", since: float = 0.0) -> None:
        """Counts one step (from the nemesis or the operator thread) that began at `since`
        (monotonic; 0: not timed) and ended now."""
        now = time.monotonic()
        with self.lock:
            self.faults[kind if done else kind + " (refused)"] += 1
            if since:
                self.timeline.append((round(since - self.started, 1), round(now - since, 1),
                                      kind if done else kind + " (refused)"))
            if reason:
                self.refusals[f"{kind}: {re.sub(r'[0-9]+', 'N', reason)[:160]}"] += 1

    def to_json(self) -> dict:
        return {"seed": self.seed, "operations": self.operations,
                "unknown_outcomes": self.unknown_outcomes, "ledger_writes": self.ledger_writes,
                "faults": dict(self.faults), "refusals": dict(self.refusals),
                "verdict": self.verdict, "problems": self.problems,
                "history_file": self.history_file, "partitions": self.partitions,
                "disks": self.disks, "disks_skipped": self.disks_skipped,
                "timeline": sorted(self.timeline)}


class Recorder:
    """Collects operations from every client thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.history: list[Operation] = []
        self.ledger: dict[bytes, bytes] = {}

    def add(self, op: Operation) -> None:
        with self.lock:
            self.history.append(op)


class ClientThread(threading.Thread):
    """One client: a seeded mix of operations, each recorded with its call and return."""

    def __init__(self, index: int, endpoints: list[str], seed: int, recorder: Recorder,
                 stop: threading.Event, client_kwargs: Optional[dict] = None):
        super().__init__(daemon=True, name=f"fault-client-{index}")
        self.index = index
        self.rng = random.Random(seed * 1000 + index)
        endpoints = list(endpoints)
        self.rng.shuffle(endpoints)
        self.client = Client(endpoints, timeout=OP_TIMEOUT, **(client_kwargs or {}))
        self.recorder = recorder
        self.stop = stop
        self.counter = 0
        self.seen: dict[bytes, tuple[Optional[bytes], int]] = {}
        self.error: Optional[BaseException] = None

    def unique(self) -> bytes:
        self.counter += 1
        return b"c%d-%d" % (self.index, self.counter)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                roll = self.rng.random()
                key = self.rng.choice(KEYS)
                if roll < 0.30:
                    self.put(key)
                elif roll < 0.60:
                    self.get(key)
                elif roll < 0.70:
                    self.delete(key)
                elif roll < 0.90:
                    self.cas(key)
                else:
                    self.ledger()
        except BaseException as exc:  # reported by the run: a harness bug must not pass
            self.error = exc
        finally:
            self.client.close()

    def _write(self, op: str, key: bytes, call_fn, value=None, expected=None):
        call = time.monotonic()
        try:
            response = call_fn()
        except errors.OutcomeUnknown:
            self.recorder.add(Operation(self.index, op, key, value, expected, call, None, None))
            return None
        except NO_EFFECT:
            return None
        ret = time.monotonic()
        output = response.succeeded if op == "cas" else None
        self.recorder.add(Operation(self.index, op, key, value, expected, call, ret, output))
        return response

    def put(self, key: bytes) -> None:
        value = self.unique()
        self._write("put", key, lambda: self.client.put(key, value), value=value)

    def delete(self, key: bytes) -> None:
        self._write("delete", key, lambda: self.client.delete(key))

    def cas(self, key: bytes) -> None:
        value = self.unique()
        expected, revision = self.seen.get(key, (None, 0))
        if expected is None:
            fn = lambda: self.client.compare_and_swap(key, value, must_not_exist=True)  # noqa: E731
        else:
            fn = lambda: self.client.compare_and_swap(  # noqa: E731
                key, value, expected_mod_revision=revision)
        self._write("cas", key, fn, value=value, expected=expected)

    def get(self, key: bytes) -> None:
        call = time.monotonic()
        try:
            response = self.client.get(key)
        except errors.SealkvError:
            return  # a failed read has no effect on the state
        ret = time.monotonic()
        value = response.kv.value if response.found else None
        self.seen[key] = (value, response.kv.mod_revision if response.found else 0)
        self.recorder.add(Operation(self.index, "get", key, call=call, ret=ret, output=value))

    def ledger(self) -> None:
        key = b"ledger/%d/%d" % (self.index, self.counter)
        value = self.unique()
        try:
            self.client.put(key, value)
        except errors.SealkvError:
            return
        with self.recorder.lock:
            self.recorder.ledger[key] = value


class Actor(threading.Thread):
    """A thread that acts on the cluster on a schedule drawn from `rng` until `stop` is set,
    counting what it does in `result`; an exception in it is kept in `error` for the run."""

    def __init__(self, name: str, cluster: Cluster, rng: random.Random,
                 stop: threading.Event, result: RunResult):
        super().__init__(daemon=True, name=name)
        self.cluster = cluster
        self.rng = rng
        self.stop = stop
        self.result = result
        self.error: Optional[BaseException] = None


class Nemesis(Actor):
    """Injects one fault at a time, on a schedule drawn from the seed."""

    # How long the nemesis tries to disarm the NOSPACE alarm after freeing a disk (the
    # cluster may be electing: a full leader steps down).
    DISARM_DEADLINE = 60.0

    def __init__(self, cluster: Cluster, rng: random.Random, stop: threading.Event,
                 result: RunResult, partitions: bool, disks: Optional[DataDisks] = None):
        super().__init__("nemesis", cluster, rng, stop, result)
        self.partitions = partitions
        self.disks = disks
        self.extra_voter: Optional[str] = None
        # A node whose addition or removal the cluster did not confirm (see `settle`).
        self.unsettled: Optional[str] = None
        self.added = 0

    def kinds(self) -> list[str]:
        kinds = ["kill-leader", "kill-follower", "pause-leader", "pause-follower",
                 "membership"]
        if self.partitions:
            kinds += ["partition-leader", "partition-split"]
        if self.disks is not None:
            kinds += ["fill-disk"]
        return kinds

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.5, 1.5)):
                kind = self.rng.choice(self.kinds())
                since = time.monotonic()
                done = getattr(self, "do_" + kind.replace("-", "_"))()
                self.result.count(kind, done is not False, since=since)
        except BaseException as exc:  # reported by the run, never swallowed
            self.error = exc

    def hold(self) -> None:
        self.stop.wait(self.rng.uniform(1.0, 3.0))

    def live(self) -> list[str]:
        return live_voters(self.cluster)

    def leader(self) -> Optional[str]:
        return self.cluster.leader()

    def victim(self, leader: bool) -> Optional[str]:
        current = self.leader()
        if leader:
            return current
        others = sorted(n for n in self.live() if n != current)
        return self.rng.choice(others) if others else None

    def do_kill_leader(self, leader: bool = True) -> Optional[bool]:
        name = self.victim(leader)
        if name is None:
            return False  # no leader known (or no other voter runs): nothing was injected
        self.cluster.kill(name, signal.SIGKILL)
        self.hold()
        self.cluster.start_node(name)

    def do_kill_follower(self) -> Optional[bool]:
        return self.do_kill_leader(leader=False)

    def do_pause_leader(self, leader: bool = True) -> Optional[bool]:
        name = self.victim(leader)
        if name is None:
            return False  # no leader known (or no other voter runs): nothing was injected
        self.cluster.kill(name, signal.SIGSTOP)
        self.hold()
        self.cluster.kill(name, signal.SIGCONT)

    def do_pause_follower(self) -> Optional[bool]:
        return self.do_pause_leader(leader=False)

    def do_partition_leader(self) -> Optional[bool]:
        leader = self.leader()
        if leader is None:
            return False  # no leader known: nothing was injected
        names = set(self.cluster.nodes)
        self.cluster.network.partition({leader}, names - {leader})
        self.stop.wait(self.rng.uniform(2.0, 5.0))
        self.cluster.network.heal()

    def do_partition_split(self) -> None:
        names = sorted(self.cluster.nodes)
        self.rng.shuffle(names)
        minority = set(names[:len(names) // 2]) or {names[0]}
        self.cluster.network.partition(minority, set(names) - minority)
        self.stop.wait(self.rng.uniform(2.0, 5.0))
        self.cluster.network.heal()

    def do_fill_disk(self) -> Optional[bool]:
        """Fills the leader's or a follower's disk to the last block, holds, frees it, and
        disarms the NOSPACE alarm as an operator would. Only the initial nodes have a disk
        of their own: a node the nemesis added is never the victim."""
        name = self.victim(self.rng.random() < 0.5)
        if name is None or name not in self.disks.mounts:
            return False  # no leader known, or the one picked has no disk to fill
        try:
            self.disks.fill(name)
            self.hold()
        finally:
            self.disks.free(name)
        disarm_alarms(self.cluster, self.DISARM_DEADLINE)

    def do_membership(self) -> bool:
        self.settle()
        name = None
        try:
            with self.cluster.client(*self.live(), timeout=5) as c:
                if self.extra_voter is None:
                    self.added += 1
                    name = f"x{self.added}"
                    node = self.cluster.add_node(name)
                    wait_for(lambda: self.cluster.healthy(name), 30, f"{name} to serve")
                    c.member_add(name, node.raft, node.grpc, timeout=15)
                    self.extra_voter = name
                else:
                    name, self.extra_voter = self.extra_voter, None
                    c.member_remove(name, timeout=15)
                    self.cluster.nodes[name].retired = True
                    self.cluster.kill(name, signal.SIGTERM)
        except errors.SealkvError:
            self.unsettled = name
            return False  # refused or unknown under faults: the checks at the end still apply
        return True

    def settle(self) -> None:
        """Settles an addition or removal the cluster refused or left unknown, as an operator
        would: the node stays (the extra voter) if the leader's member list names it, and is
        stopped for good otherwise. A node left running outside the membership hears no
        leader, ever, and the end-of-run check that every live node names one would fail."""
        name, self.unsettled = self.unsettled, None
        if name is None:
            return

        def members():
            leader = self.cluster.leader()
            if leader is None:
                return None
            with self.cluster.client(leader, timeout=5) as c:
                return {m.name for m in c.member_list().members}

        if name in wait_for(members, 60, "the leader's member list"):
            self.extra_voter = name
        else:
            self.cluster.nodes[name].retired = True
            self.cluster.kill(name, signal.SIGTERM)


def live_voters(cluster: Cluster) -> list[str]:
    """The voters whose process runs (a copy: the nemesis adds nodes while others read)."""
    return [n for n, node in list(cluster.nodes.items()) if node.alive() and node.raft]


class Refused(Exception):
    """An operator step the cluster refused (a precondition not met yet, a member down, a
    partition): counted as "KIND (refused)", never a finding."""


class Operator(Actor):
    """Runs the encryption admin commands one at a time, as an operator would, on a schedule
    drawn from the seed, while the nemesis injects faults (see the module docstring).

    Each `step_KIND` returns normally when the step took effect, raises `Refused` when the
    cluster refused it, returns None when there was nothing to do (not counted) and raises
    anything else for a finding (the run fails).
    """

    # The weights of the steps once both cutovers are done. After a rotation the operator
    # mostly goes on to retire the key it replaced (RETIRE_AFTER_ROTATION): a run under
    # faults has time for a few such cycles only.
    STEADY = {"rotate-dek": 3, "rotate-raft-dek": 3, "reencrypt": 1, "compact": 1,
              "rewrap-keys": 3, "snapshot-save": 2}
    RETIRE_AFTER_ROTATION = 0.7
    RETIRE_PERSISTENCE = 20.0
    # Steps that need every member to answer: the operator first waits (a bounded time) until
    # every member is up (`members_up`), as one would before a cutover.
    ALL_MEMBERS = {"bootstrap", "enable-storage-envelope", "enable-raft-envelope", "compact",
                   "retire-dek", "rewrap-keys"}
    MEMBERS_UP_WAIT = 10.0

    def __init__(self, cluster: Cluster, rng: random.Random, stop: threading.Event,
                 result: RunResult, recorder: Recorder, work_dir: str):
        super().__init__("operator", cluster, rng, stop, result)
        self.recorder = recorder
        self.work_dir = work_dir
        self.bootstrapped = False
        self.enveloped = False
        self.raft_enveloped = False
        self.rewrapped = False
        self.rotated = False  # a rotation since the last retirement: a key to retire
        self.snapshots = 0

    def next_kind(self) -> str:
        if not self.bootstrapped:
            return "bootstrap"
        if not self.enveloped:
            return "enable-storage-envelope"
        if not self.raft_enveloped:
            return "enable-raft-envelope"
        if self.rotated and self.rng.random() < self.RETIRE_AFTER_ROTATION:
            return "retire-dek"
        weights = dict(self.STEADY)
        if self.rewrapped:
            del weights["rewrap-keys"]  # the next KEK is staged once per run
        kinds = sorted(weights)
        return self.rng.choices(kinds, [weights[k] for k in kinds])[0]

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.3, 1.0)):
                kind = self.next_kind()
                if kind in ("bootstrap", "enable-storage-envelope", "enable-raft-envelope") \
                        and self.rng.random() < 0.25:
                    kind = "snapshot-save"  # a backup in the cleartext phases too
                if kind in self.ALL_MEMBERS:
                    self.wait_members_up(self.MEMBERS_UP_WAIT)
                since = time.monotonic()
                try:
                    done = getattr(self, "step_" + kind.replace("-", "_"))()
                except Refused as refusal:
                    self.result.count(kind, False, str(refusal), since)
                    continue
                if done is not None:
                    self.result.count(kind, True, since=since)
        except BaseException as exc:  # reported by the run, never swallowed
            self.error = exc

    def wait_members_up(self, timeout: float) -> bool:
        """Waits until `members_up`, up to `timeout` or the end of the run."""
        deadline = time.monotonic() + timeout
        while not self.members_up():
            if time.monotonic() > deadline or self.stop.wait(0.3):
                return False
        return True

    def members_up(self) -> bool:
        """What `sealkv endpoint status` shows an operator before a step every member must
        answer: a leader, connected to every member of its member table, each of which runs
        and names that leader (a member that is down, paused or cut off does not)."""
        try:
            leader = self.cluster.leader()
            if not leader:
                return False
            members = self.cluster.status(leader).members
            for member in members:
                node = self.cluster.nodes.get(member.name)
                if node is None or not node.alive() or not member.connected:
                    return False
                if self.cluster.status(member.name).leader != leader:
                    return False
        except errors.SealkvError:
            return False
        return bool(members)

    # ---- calls ---------------------------------------------------------------------------

    def call(self, method: str, request, timeout: float = 15):
        """Calls an encryption admin RPC through any live voter (the client follows the
        leader); every `SealkvError` is a refusal."""
        try:
            with self.cluster.client(*live_voters(self.cluster), timeout=10) as c:
                return c.call(enc_grpc.EncryptionAdminStub, method, request, timeout=timeout)
        except errors.SealkvError as exc:
            raise Refused(f"{method}: {type(exc).__name__}: {exc.message}") from None

    def mutate(self, method: str, request, timeout: float = 15):
        """A mutator whose "already done" refusal means it took effect earlier (its first
        answer was lost to a fault)."""
        try:
            return self.call(method, request, timeout)
        except Refused as refusal:
            if "FailedPrecondition" in str(refusal) and "already" in str(refusal):
                return None
            raise

    # ---- the cutovers --------------------------------------------------------------------

    def step_bootstrap(self) -> bool:
        self.mutate("BootstrapEncryption", enc_pb.BootstrapEncryptionRequest())
        self.bootstrapped = True
        return True

    def step_enable_storage_envelope(self) -> bool:
        self.mutate("EnableStorageEnvelope", enc_pb.EnableStorageEnvelopeRequest())
        self.enveloped = True
        return True

    def step_enable_raft_envelope(self) -> bool:
        self.mutate("EnableRaftEnvelope", enc_pb.EnableRaftEnvelopeRequest())
        self.raft_enveloped = True
        return True

    # ---- keys ----------------------------------------------------------------------------

    def step_rotate_dek(self) -> bool:
        self.call("RotateDEK", enc_pb.RotateDEKRequest(purpose=enc_pb.STORAGE))
        self.rotated = True
        return True

    def step_rotate_raft_dek(self) -> bool:
        self.call("RotateDEK", enc_pb.RotateDEKRequest(purpose=enc_pb.RAFT))
        self.rotated = True
        return True

    def step_reencrypt(self) -> bool:
        """Starts (or finds running) the job and returns: it goes on under the faults."""
        self.call("StartReencryption", enc_pb.StartReencryptionRequest(rate=5000, batch_size=64))
        return True

    def step_compact(self) -> bool:
        """Compacts every member (the receiving node fans out); refused unless all did."""
        answer = self.call("Compact", enc_pb.CompactRequest(cluster=True), timeout=40)
        failed = [f"{row.member}: {row.reason}" for row in answer.nodes if not row.ok]
        if failed:
            raise Refused("Compact: " + "; ".join(failed))
        return True

    def reencrypted(self, timeout: float) -> enc_pb.ReencryptionStatus:
        """Starts a re-encryption (or finds the running one) and waits, up to `timeout` or
        the end of the run, until it is done and its compaction has an outcome."""
        self.call("StartReencryption", enc_pb.StartReencryptionRequest(rate=5000, batch_size=64))
        self.result.count("reencrypt", True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = self.call("GetReencryptionStatus", enc_pb.GetReencryptionStatusRequest(),
                                   timeout=5)
                # compaction: "done on N members", "failed: ...", or "pending"/"running".
                if status.state == "done" and status.compaction.startswith(("done", "failed")):
                    return status
            except Refused:
                pass  # a fault: ask again
            if time.monotonic() > deadline or self.stop.wait(0.5):
                raise Refused("the re-encryption did not finish in time")

    def step_retire_dek(self) -> Optional[bool]:
        """Retires the oldest key that is not active (`retire_oldest`), trying again, after
        the members are up, for up to RETIRE_PERSISTENCE seconds while the cluster refuses
        (a member down, no leader, a compaction a fault cut short), as an operator told to
        "retry when every member is up" would. Refused with the last reason after that."""
        deadline = time.monotonic() + self.RETIRE_PERSISTENCE
        while True:
            try:
                return self.retire_oldest()
            except Refused:
                if time.monotonic() > deadline or self.stop.wait(0.5):
                    raise
            self.wait_members_up(max(0.0, deadline - time.monotonic()))

    def retire_oldest(self) -> Optional[bool]:
        """Retires the oldest key that is not active, as an operator would: ask the members
        what uses it; while stored values do, re-encrypt and wait for the job and its
        compaction; while entries of a retained log do, compact every member; then retire
        it. The server refuses (with the count of users) when it is still in use, or when a
        member cannot say: a refusal."""
        side = self.call("GetSidecarState", enc_pb.GetSidecarStateRequest(), timeout=5)
        active = {side.active_storage_key_id, side.active_raft_key_id}
        candidates = sorted(k.key_id for k in side.keys if k.key_id not in active)
        if not candidates:
            self.rotated = False  # every key the rotations replaced is retired
            return None
        key_id = candidates[0]
        for _ in range(3):
            users = self.key_users(key_id)
            if any(values for values, _ in users.values()):
                self.reencrypted(timeout=20)
            elif any(entries for _, entries in users.values()):
                self.step_compact()
                self.result.count("compact", True)
            else:
                break
        self.call("RetireDEK", enc_pb.RetireDEKRequest(key_id=key_id))
        self.rotated = len(candidates) > 1  # more keys the rotations replaced
        return True

    def key_users(self, key_id: int) -> dict[str, tuple[int, int]]:
        """{member: (stored values, retained log entries)} under `key_id`, from each live
        voter that answers `GetKeyUsage` (what the leader asks every member before it retires
        a key; one that does not answer now is the server's to refuse)."""
        users = {}
        for name in live_voters(self.cluster):
            try:
                with Client([self.cluster.nodes[name].grpc], timeout=5,
                            **self.cluster.client_kwargs) as c:
                    usage = c.call(enc_grpc.EncryptionAdminStub, "GetKeyUsage",
                                   enc_pb.GetKeyUsageRequest(key_id=key_id), timeout=5,
                                   follow_leader=False)
            except errors.SealkvError:
                continue  # paused, restarting or cut off: the server's check will say
            users[name] = (usage.stored_values, usage.log_entries)
        return users

    def step_rewrap_keys(self) -> bool:
        """Rewraps the key table under the next KEK every node has staged since it started
        (the capability fan-out refuses while a member cannot show it)."""
        answer = self.call("RewrapKeys", enc_pb.RewrapKeysRequest(), timeout=30)
        if answer.kek_generation < 1:
            raise AssertionError(f"rewrap-keys answered KEK generation {answer.kek_generation}")
        self.rewrapped = True
        return True

    # ---- backups -------------------------------------------------------------------------

    def step_snapshot_save(self) -> bool:
        """`sealkv snapshot save` through any live voter, then `sealkv snapshot status`'s
        checks: the file's SHA-256 matches and it holds every ledger key acknowledged before
        the save began (the snapshot is a linearizable read). A refused or broken transfer
        is a refusal (nothing was saved); a damaged file or a missing write is a finding."""
        with self.recorder.lock:
            acknowledged = set(self.recorder.ledger)
        self.snapshots += 1
        path = os.path.join(self.work_dir, f"backup-{self.snapshots}.db")
        try:
            with self.cluster.client(*live_voters(self.cluster), timeout=10) as c:
                saved = save_snapshot(c, path, deadline=30)
        except errors.SealkvError as exc:
            raise Refused(f"Snapshot: {type(exc).__name__}: {exc.message}") from None
        summary = summarize(path)  # raises BackupError for a damaged file: a finding
        if summary["sha256"] != saved["sha256"] or summary["revision"] != saved["revision"]:
            raise AssertionError(f"snapshot {path}: status {summary['sha256']}@"
                                 f"{summary['revision']} != save {saved}")
        with BackupReader(path) as reader:
            keys = {key for key, _ in reader.records()}
            reader.verify()
        missing = sorted(acknowledged - keys)
        if missing:
            raise AssertionError(f"snapshot {path} (revision {saved['revision']}) misses "
                                 f"{len(missing)} acknowledged ledger writes, e.g. "
                                 f"{missing[:3]}")
        os.unlink(path)
        return True


def disarm_alarms(cluster: Cluster, deadline: float) -> None:
    """Disarms the NOSPACE alarm through any live voter until no live voter lists one (an
    alarm raised just before the disarm may replicate after it), as an operator would once
    the disk has room; raises AssertionError when the cluster does not clear it in time."""

    def cleared() -> bool:
        names = live_voters(cluster)
        with cluster.client(*names, timeout=5) as c:
            c.alarm_disarm()
        for name in names:
            with Client([cluster.nodes[name].grpc], timeout=5, **cluster.client_kwargs) as c:
                if c.alarm_list(endpoint=cluster.nodes[name].grpc, follow_leader=False).alarms:
                    return False
        return True

    wait_for(cleared, deadline, "the NOSPACE alarm to be disarmed", interval=0.5)


def heal_everything(cluster: Cluster, disks: Optional[DataDisks] = None) -> None:
    """Ends every fault: heal partitions, resume paused nodes, restart killed voters, free
    filled disks (the alarm is disarmed once the cluster has a leader: `disarm_alarms`)."""
    if disks is not None:
        disks.free_all()
    if isinstance(cluster, NetnsCluster):
        cluster.network.heal()
    for name, node in cluster.nodes.items():
        if node.alive():
            os.kill(node.pid, signal.SIGCONT)
        elif node.proc is not None and node.proc.returncode == -signal.SIGKILL:
            cluster.start_node(name)


def check_every_node_serves(cluster: Cluster, result: RunResult) -> None:
    """Every node the run started and did not remove runs and serves again after the faults
    are healed: a node that halted, or refused to start again (say, after the KEK rewrap),
    is a finding, not a node to leave out of the convergence check."""
    kept = [n for n, node in cluster.nodes.items() if node.proc is not None and not node.retired]
    try:
        wait_for(lambda: all(cluster.nodes[n].alive() and cluster.healthy(n) for n in kept),
                 60, "every node to serve again")
    except AssertionError:
        down = {n: ("running, not serving" if cluster.nodes[n].alive()
                    else f"exited with {cluster.nodes[n].proc.returncode}")
                for n in kept if not (cluster.nodes[n].alive() and cluster.healthy(n))}
        if down:
            result.problems.append(f"nodes down after the faults were healed: {down}")


def converged(cluster: Cluster) -> bool:
    """Whether every live node reports the same applied index and state digest."""
    views = set()
    for node in cluster.nodes.values():
        if not node.alive():
            continue
        with Client([node.grpc], timeout=3, **cluster.client_kwargs) as c:
            d = c.digest(endpoint=node.grpc)
        views.add((d.applied_index, d.digest))
    return len(views) == 1


def run_seed(seed: int, base_dir: str, duration: float, clients: int = 4,
             use_netns: Optional[bool] = None, use_disks: bool = False) -> RunResult:
    """Runs one seeded fault run; returns what it found (never raises for a finding).
    `use_disks`: give each initial node a small disk of its own, for the fill-disk fault
    (skipped, saying why in `disks_skipped`, where it cannot be mounted). Off by default:
    see `--fault-disks` in tests/conftest.py."""
    rng = random.Random(seed)
    result = RunResult(seed)
    if use_netns is None:
        use_netns = Network.available()[0]
    result.partitions = use_netns
    result.disks = use_disks
    keks = []
    for name in ("kek", "kek.next"):
        keks.append(os.path.join(base_dir, name))
        fd = os.open(keks[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
    # Every node (those the nemesis adds too) starts with the next KEK staged: the operator's
    # rewrap-keys moves the key table to it once, and a node restarted afterwards opens the
    # table under either.
    kwargs = dict(plugins=["encryption"],
                  extra_args=["--kek-file", keks[0], "--next-kek-file", keks[1]])
    network = Network(rng) if use_netns else None
    cluster: Optional[Cluster] = None
    disks: Optional[DataDisks] = None
    recorder = Recorder()
    stop = threading.Event()
    try:
        # Inside the try: a failure setting up hosts is a finding with its evidence too.
        cluster = NetnsCluster(base_dir, 3, network, **kwargs) if network \
            else Cluster(base_dir, 3, **kwargs)
        if use_disks:
            disks, result.disks_skipped = DataDisks.create(
                base_dir, [n.name for n in cluster.initial])
        else:
            result.disks_skipped = "not asked for (--fault-disks)"
        if disks is not None:
            for node in cluster.initial:
                node.data_dir = disks.data_dir(node.name)
        cluster.start(timeout=60)
        threads = [ClientThread(i, [n.grpc for n in cluster.initial], seed, recorder, stop,
                                cluster.client_kwargs)
                   for i in range(clients)]
        nemesis = Nemesis(cluster, rng, stop, result, use_netns, disks)
        operator = Operator(cluster, random.Random(f"operator-{seed}"), stop, result, recorder,
                            base_dir)
        result.started = time.monotonic()
        for t in threads:
            t.start()
        nemesis.start()
        operator.start()
        stop.wait(duration)
        stop.set()
        nemesis.join(60)
        operator.join(90)
        for t in threads:
            t.join(30)
        for t in threads:
            if t.error is not None:
                result.problems.append(f"client {t.index} failed: {type(t.error).__name__}: "
                                       f"{t.error}")
        for actor in (nemesis, operator):
            if actor.is_alive():
                result.problems.append(f"the {actor.name} did not stop")
            elif actor.error is not None:
                result.problems.append(f"{actor.name} failed: {type(actor.error).__name__}: "
                                       f"{actor.error}")
        heal_everything(cluster, disks)
        nemesis.settle()
        check_every_node_serves(cluster, result)
        if disks is not None:
            disarm_alarms(cluster, Nemesis.DISARM_DEADLINE)
        leader = cluster.wait_leader(timeout=60)
        final_reads(cluster, leader, recorder)
        check_ledger(cluster, leader, recorder, result)
        try:
            wait_for(lambda: converged(cluster), 60, "every node to converge")
        except AssertionError as exc:
            result.problems.append(f"nodes did not converge: {exc}")
        result.operations = len(recorder.history)
        result.unknown_outcomes = sum(1 for op in recorder.history if op.ret is None)
        result.ledger_writes = len(recorder.ledger)
        verdict = lincheck.check(recorder.history, timeout=120)
        result.verdict = verdict.verdict
        if verdict.verdict != "ok":
            result.problems.append(f"linearizability: {verdict.verdict}: {verdict.describe()}")
    except AssertionError as exc:
        result.problems.append(str(exc))
    except Exception as exc:  # any failure while running or checking is a finding
        result.problems.append(f"the run failed: {type(exc).__name__}: {exc}")
    finally:
        stop.set()
        if cluster is not None:
            cluster.stop_all()
        if network is not None:
            network.close()
        for node in _nodes(cluster):
            result.problems.extend(log_problems(node.name, node.log()))
        if disks is not None:
            # The images (the nodes' data) stay beside the run's evidence when it failed.
            stuck = disks.close(keep_images=bool(result.problems))
            if stuck:
                result.problems.append(f"could not unmount {stuck}")
        if result.problems:
            keep_evidence(seed, duration, cluster, recorder, result)
    return result


def replay_command(seed: int, duration: float, disks: bool = False) -> str:
    """The command that replays `seed`'s fault schedule (`disks`: with --fault-disks)."""
    return (f"pytest tests/faults -m faults --fault-seeds {seed} --fault-duration {duration:g}"
            + (" --fault-disks" if disks else ""))


def _nodes(cluster: Optional[Cluster]) -> list:
    return list(cluster.nodes.values()) if cluster is not None else []


def keep_evidence(seed: int, duration: float, cluster: Optional[Cluster], recorder: Recorder,
                  result: RunResult) -> None:
    """Saves the history and every node's full log under HISTORY_DIR; prints the replay."""
    os.makedirs(HISTORY_DIR, exist_ok=True)
    result.history_file = os.path.join(HISTORY_DIR, f"seed-{seed}.jsonl")
    with recorder.lock:
        history = list(recorder.history)
    save_history(history, result.history_file)
    with open(os.path.join(HISTORY_DIR, f"seed-{seed}.logs.txt"), "w") as f:
        for node in _nodes(cluster):
            f.write(f"--- {node.name} ---\n{node.log()}\n")
    print(f"seed {seed} failed; history and logs kept in {HISTORY_DIR}; replay: "
          f"{replay_command(seed, duration, result.disks)}")


_TRACEBACK = "Traceback (most recent call last):"


def log_events(text: str) -> list[str]:
    """The CRITICAL lines of a node's log, and one line per traceback (the line before it
    and the exception it ended with)."""
    events = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(_TRACEBACK):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            before = lines[i - 1] if i else ""
            ended = lines[j] if j < len(lines) else "(log ends inside the traceback)"
            events.append(f"traceback after [{before}]: {ended}")
            i = j + 1
            continue
        if " CRITICAL " in line:
            events.append(line)
        i += 1
    return events


def log_problems(name: str, text: str) -> list[str]:
    """The events of `log_events` that no entry of EXPECTED_LOG_EVENTS explains."""
    return [f"{name} logged {event}" for event in log_events(text)
            if not any(pattern.search(event) for _, pattern in EXPECTED_LOG_EVENTS)]


def final_reads(cluster: Cluster, leader: str, recorder: Recorder) -> None:
    """Reads every key linearizably after the faults, as the history's last operations."""
    with cluster.client(leader, timeout=10) as c:
        for key in KEYS:
            call = time.monotonic()
            response = c.get(key)
            recorder.add(Operation("final", "get", key, call=call, ret=time.monotonic(),
                                   output=response.kv.value if response.found else None))


def check_ledger(cluster: Cluster, leader: str, recorder: Recorder, result: RunResult) -> None:
    """Every acknowledged ledger write is readable, with its value, on every live node."""
    for name, node in cluster.nodes.items():
        if not node.alive():
            continue
        with cluster.client(name, timeout=10) as c:
            got = {kv.key: kv.value for kv in c.range(b"ledger/", prefix=True).kvs}
        lost = [k for k, v in recorder.ledger.items() if got.get(k) != v]
        if lost:
            result.problems.append(f"{name} lost {len(lost)} acknowledged ledger writes, "
                                   f"e.g. {lost[:3]}")


def write_summary(results: list[RunResult]) -> str:
    """Writes fault-histories/summary.json and returns the summary the test run prints: the
    totals, then one line per kind of fault or operator step (how often it took effect, how
    often it was refused, in how many seeds it took effect at least once, and the commonest
    reasons it was refused)."""
    os.makedirs(HISTORY_DIR, exist_ok=True)
    with open(os.path.join(HISTORY_DIR, "summary.json"), "w") as f:
        json.dump([r.to_json() for r in results], f, indent=2)
    faults, refusals, seeds_done = Counter(), Counter(), Counter()
    for r in results:
        faults.update(r.faults)
        refusals.update(r.refusals)
        seeds_done.update(k for k, v in r.faults.items() if v and not k.endswith(" (refused)"))
    failed = [r.seed for r in results if r.problems]
    lines = [f"fault runs: {len(results)} seeds, "
             f"{sum(r.operations for r in results)} operations checked "
             f"({sum(r.unknown_outcomes for r in results)} with unknown outcome), "
             f"{sum(r.ledger_writes for r in results)} ledger writes verified; "
             f"failing seeds: {failed or 'none'}"]
    kinds = sorted({k.removesuffix(" (refused)") for k in faults})
    for kind in kinds:
        line = (f"  {kind}: {faults[kind]} done, {faults[kind + ' (refused)']} refused; "
                f"done in {seeds_done[kind]}/{len(results)} seeds")
        reasons = [(n, r[len(kind) + 2:]) for r, n in refusals.most_common()
                   if r.startswith(kind + ": ")][:2]
        if reasons:
            line += "; refused: " + " | ".join(f"{n}x {reason}" for n, reason in reasons)
        lines.append(line)
    return "\n".join(lines)

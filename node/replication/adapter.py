"""The replication adapter: the only module of sealkv that imports pysyncobj.

It wraps one `SyncObj`, submits versioned command bytes through a single replicated entry
point, resolves each caller's wait from the apply callback (always with a deadline: pysyncobj
can orphan callbacks), confirms linearizable read points by ReadIndex (`raft_rules`,
`read_index`; coalesced barrier entries as the fallback), persists the state machine in its
own snapshot format (no pickle), halts the node when an entry cannot be applied, and owns the
membership lock under which every membership change and `membership_snapshot()` run.

Group commit: the state machine applies the entries of one tick into one database transaction
(`StateMachine.defer_commit`); the adapter commits it before the tick takes new proposals, and
only then resolves the callers of those entries, so an acknowledged write is in the database.

Snapshots ("dumps"): the database is the local state; a restart replays only the log after
its applied index (`StateMachine.load`). The dump file exists for pysyncobj's compaction and
for followers that lag behind it. It is written on a background thread from a read
transaction opened on the tick thread at the exact index pysyncobj asks for, never under the
state lock; a dump the database already covers is not loaded at start-up.

Settings (see `RaftSettings`) are chosen for low single-request latency on loopback while
keeping pipelined throughput: pysyncobj's defaults batch every 100 ms.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import sys
import threading
import time
from queue import Empty, Full
from typing import Callable, Optional

from pysyncobj import FAIL_REASON, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj import pickle as raft_pickle
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.poller import PollPoller
from pysyncobj.syncobj import _COMMAND_TYPE, _RAFT_STATE

from sealkv.node import durable, errors
from sealkv.node.state import commands as cmd
from sealkv.node.replication import journal as raft_journal
from sealkv.node.replication import frames, peer_wire, safe_pickle
from sealkv.node.replication.dump_file import (
    DUMP_FIX, ChecksumWriter, dump_header, read_dump_start,
)
from sealkv.node.replication.proposer import retry_barrier
from sealkv.node.replication.read_index import ReadIndexFallback
from sealkv.node.replication.raft_rules import TELL_FOLLOWERS, RaftRulesSyncObj, WakeByPoller
from sealkv.node.errors import ApplyHalt, where
from sealkv.node.replication.membership import MemberRecord, MembershipSnapshot
from sealkv.node.replication.payload_codec import IdentityCodec, PayloadCodec
from sealkv.node.replication.settings import RaftSettings
from sealkv.node.replication.stats import ReplicationStats
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.base import StorageFull

safe_pickle.install()
raft_journal.install()


log = logging.getLogger(__name__)

HALT_EXIT_CODE = 70
# A node whose journal cannot be written (disk full) retries this often, not on every tick.
DISK_RETRY_PERIOD = 1.0
HELD_BACK_MAX = 16 * 1024 * 1024
# A dump that failed is retried after this long (doubling up to the maximum), not every tick.
DUMP_RETRY_MIN = 1.0
# A database commit that found no space is retried after this long (the entries wait).
STALL_RETRY = 1.0
_STALLED = object()  # what _apply returns for an entry it will apply again later
DUMP_RETRY_MAX = 60.0
SWITCH_INTERVAL = 0.0005
SEAL_WAIT = 5.0  # propose_async: the longest wait at a closed intake (raft envelope cutover)


class _WakePipe(PipeNotifier):
    """pysyncobj's wake-up pipe, drained with one read.

    pysyncobj writes a byte to this pipe for every proposal to wake the tick thread, and
    drains it by reading until EAGAIN: a second read and a raised exception on the tick
    thread for every lone proposal. Here a short read means drained (the poll is
    level-triggered: a later byte wakes it again). Only `_RaftObject` uses it.
    """

    def _PipeNotifier__onNewNotification(self, descr, event_mask) -> None:
        try:
            while len(os.read(self._PipeNotifier__pipeR, 1024)) == 1024:
                pass
        except BlockingIOError:
            pass
        callback = self._PipeNotifier__callback
        if callback is not None:
            callback()

    @staticmethod
    def retire(notifier: PipeNotifier, poller) -> None:
        """Unregisters `notifier`'s pipe from `poller` and closes both of its ends."""
        poller.unsubscribe(notifier._PipeNotifier__pipeR)
        os.close(notifier._PipeNotifier__pipeR)
        os.close(notifier._PipeNotifier__pipeW)


class _WaitUnlocked:
    """A `select.poll` object whose wait runs without the tick lock (see `_RaftObject.submit`).

    pysyncobj's tick ends in `PollPoller.poll`, which waits on this object and then dispatches
    the events it returned: the tick thread holds its lock again before it handles any of them.
    """

    def __init__(self, poll, lock: threading.Lock):
        self._poll = poll
        self._lock = lock
        self.register = poll.register
        self.unregister = poll.unregister

    def poll(self, timeout_ms):
        self._lock.release()
        try:
            return self._poll.poll(timeout_ms)
        finally:
            self._lock.acquire()


class _RaftObject(RaftRulesSyncObj):
    """The SyncObj with one replicated method; everything else lives in the adapter.

    Its base enforces the Raft rules pysyncobj 0.3.17 breaks (see `raft_rules`).
    """

    def __init__(self, adapter: "ReplicationAdapter", self_node, partners, conf,
                 journal: raft_journal.FileJournal):
        self._adapter = adapter
        self._journal = journal
        self._coalescing = False
        self._send_pending = False
        self._peer_wire: Optional[peer_wire.PeerWire] = None
        self._wake_pipe: Optional[_WakePipe] = None  # see _SyncObj__pipeNotifier
        # Held by the tick thread except while it waits in its poll, and by a thread that
        # takes a proposal itself (`submit`): pysyncobj's state has one user at a time.
        self._tick_lock = threading.Lock()
        self._ticked = False  # the first tick (dump load, journal adoption) is done
        self._apply_id: Optional[int] = None
        adapter._obj = self  # the tick thread starts inside __init__ and may call back
        super().__init__(self_node, partners, conf)
        if adapter.codec.gates_appends:
            self._SyncObj__commandsQueue = _GatedQueue(self._SyncObj__commandsQueue, self,
                                                       adapter.codec)

    # pysyncobj builds its wake-up pipe in SyncObj.__init__ (`self.__pipeNotifier =
    # PipeNotifier(self._poller)`), before its tick thread starts. The assignment lands here:
    # the pipe it built is unregistered and closed, and this object's own `_WakePipe` takes
    # its place, before any thread can have written to the first one.

    @property
    def _SyncObj__pipeNotifier(self) -> Optional[PipeNotifier]:
        return self._wake_pipe

    @_SyncObj__pipeNotifier.setter
    def _SyncObj__pipeNotifier(self, built: PipeNotifier) -> None:
        if not isinstance(built, _WakePipe):
            _WakePipe.retire(built, self._poller)
            built = _WakePipe(self._poller)
        self._wake_pipe = built

    # pysyncobj builds its poller first thing in SyncObj.__init__ (`self._poller =
    # createPoller(...)`); the assignment lands here, and the poller's wait releases the tick
    # lock (`_WaitUnlocked`). The rules' `WakeByPoller` goes around it (raft_rules' `_poller`).

    @property
    def _poller(self) -> Optional[WakeByPoller]:
        return RaftRulesSyncObj._poller.fget(self)

    @_poller.setter
    def _poller(self, built: PollPoller) -> None:
        if not isinstance(built, PollPoller):
            raise RuntimeError(f"unexpected pysyncobj poller {type(built).__name__}")
        built._PollPoller__poll = _WaitUnlocked(built._PollPoller__poll, self._tick_lock)
        RaftRulesSyncObj._poller.fset(self, built)

    @replicated
    def apply_command(self, command: bytes):
        return self._adapter._apply(command)

    def submit(self, payload: bytes, callback) -> None:
        """`apply_command(payload, callback=callback)`, taken on this thread when it can be.

        pysyncobj queues a proposal and wakes its tick thread through a pipe; the tick thread
        then leaves its poll, takes the GIL, runs the start of a tick and only then appends
        and sends the entry (~150 µs of a lone write's ~1.7 ms on an idle 2-core machine).
        When the tick thread is waiting in its poll (the tick lock is free), this thread
        instead runs what the tick would run next, `_checkCommandsToApply` (append, send,
        fsync), under the tick lock. Otherwise (the tick is busy, the node is starting, its
        journal cannot be written, it halted) the proposal goes the usual way.
        """
        if self._apply_id is None:
            self._apply_id = self._methodToID[self._getFuncName("apply_command")]
        command = bytes((_COMMAND_TYPE.REGULAR,)) + raft_pickle.dumps((self._apply_id,
                                                                       (payload,)))
        if not (self._ticked and not self._journal.failing and not self._adapter._halted
                and self._tick_lock.acquire(blocking=False)):
            self._applyCommand(command, callback)
            return
        try:
            try:
                self._SyncObj__commandsQueue.put_nowait((command, callback))
            except Full:
                self._SyncObj__callErrCallback(FAIL_REASON.QUEUE_FULL, callback)
                return
            self._guarded(self._checkCommandsToApply)
            self._adapter._after_tick()
        finally:
            self._tick_lock.release()

    @property
    def encryptor(self):
        # pysyncobj's transport hands this to every connection it builds; the bounded
        # connections (frames.py) then send the configured peer wire and accept both. It is
        # read inside SyncObj.__init__, after pysyncobj built its Fernet from the password.
        fernet = getattr(self, "_SyncObj__encryptor", None)
        if fernet is None:
            return None
        if self._peer_wire is None:
            self._peer_wire = peer_wire.PeerWire(fernet, self._adapter.wire_root,
                                                 self._adapter.peer_wire)
        return self._peer_wire

    def _on_safety_violation(self, reason: str) -> None:
        self._adapter._do_halt(reason)

    # Adaptive AppendEntries (tick thread only). With appendEntriesUseBatch=False pysyncobj
    # sends one AppendEntries per follower for every command it takes from its queue: a lone
    # request leaves at once (~1 ms instead of the ~100 ms batching period), but under load
    # every command costs two pickles, zlib and Fernet on the leader plus two replies, and
    # pipelined throughput collapses. Draining the whole queue first and then sending once
    # keeps the lone-request latency and turns a burst of N proposals into one message per
    # follower. (Overrides pysyncobj 0.3.17's name-mangled `__sendAppendEntries`.)
    #
    # Durability (group commit): the entries the leader appended while draining are sent
    # first and then written and fdatasynced once, in the same tick, so the leader's fsync
    # runs while the followers receive and fsync theirs (Raft thesis §10.2.1; etcd-io/raft's
    # leader also persists in parallel with replicating): a lone write waits for one fsync
    # round, not the leader's and then a follower's. The leader still counts its own copy
    # only once it is durable: the commit count runs at the start of a later tick, after this
    # sync returned. A journal that cannot be written (disk full) makes the leader step down
    # instead of counting an entry it does not hold; what it sent is then like any entry of a
    # deposed leader (committed only if a quorum holds it, unknown to its callers).

    def _checkCommandsToApply(self):
        # The entries this tick applied commit to the database before new proposals are
        # taken and before their callers hear about them (see ReplicationAdapter).
        self._adapter._commit_applied()
        self._refuse_unforwardable()
        self._with_group_commit(super()._checkCommandsToApply)

    def _refuse_unforwardable(self) -> None:
        # A follower forwards its proposals to the leader it knows. pysyncobj does so whether
        # or not a connection to it is up (its transport drops the message when none is) and
        # then waits for an answer that never comes, until the election timeout forgets the
        # leader: the caller then hears LEADER_CHANGED ("outcome unknown") about a proposal
        # that never left. That is the window after a leader dies (or a graceful hand-over is
        # impossible). Callers wait for a reachable leader before proposing
        # (`_require_leader`); a proposal queued as the connection dropped is refused here as
        # MISSING_LEADER (`Unavailable`: nothing was submitted), and proposals other nodes
        # forwarded here are answered NOT_LEADER, as pysyncobj does.
        leader = self._SyncObj__raftLeader
        if (leader is None or self._SyncObj__raftState == _RAFT_STATE.LEADER
                or leader in self._SyncObj__connectedNodes):
            return
        queue = self._SyncObj__commandsQueue
        while True:
            try:
                _, callback = queue.get_nowait()
            except Empty:
                return
            _refuse_queued(self, callback, FAIL_REASON.NOT_LEADER
                           if isinstance(callback, tuple) else FAIL_REASON.MISSING_LEADER)

    def _SyncObj__onBecomeLeader(self):
        # The leader's no-op is synced like any other group before it is sent or counted.
        self._with_group_commit(super()._SyncObj__onBecomeLeader)

    def _with_group_commit(self, append) -> None:
        outer = self._coalescing
        self._coalescing = True
        try:
            append()
        finally:
            self._coalescing = outer
        if outer:
            return
        if self._send_pending:
            self._send_pending = False
            self._SyncObj__sendAppendEntries()
        if not self._journal.sync() and self._isLeader():
            self._adapter._step_down_disk_full()

    def _SyncObj__sendAppendEntries(self):
        if self._coalescing:
            self._send_pending = True
            return
        # pysyncobj's tick applies newly committed entries and then, when its heartbeat (or
        # a commit notice, see raft_rules) is due, sends AppendEntries before it reaches
        # _checkCommandsToApply: commit the applied group and answer its callers first, so a
        # waiting writer does not also wait for the leader to pickle, encrypt and send a
        # message per follower.
        self._adapter._commit_applied()
        super()._SyncObj__sendAppendEntries()

    # A follower's answer to AppendEntries (raft_rules' `_reply_progress`) or to a snapshot
    # (pysyncobj's `__sendNextNodeIdx`) claims the entries are held: write and fdatasync the
    # group it appended first; never answer for a journal that could not be written or for
    # a node that halted.

    def _reply_progress(self, node, next_index: int, *, success: bool,
                        rejected: Optional[int] = None) -> None:
        if self._adapter._halted or not self._journal.sync():
            return
        super()._reply_progress(node, next_index, success=success, rejected=rejected)

    def _receive_append(self, node, message) -> None:
        # A member that cannot write holds back at most HELD_BACK_MAX bytes of entries in
        # memory; beyond that it drops AppendEntries unanswered, and the leader's usual
        # rejection-and-probe repairs the gap once the disk has room.
        if self._journal.failing and self._journal.unsynced_bytes > HELD_BACK_MAX:
            return
        super()._receive_append(node, message)

    def _SyncObj__sendNextNodeIdx(self, node, reset=False, nextNodeIdx=None, success=False):
        if self._adapter._halted or not self._journal.sync():
            return
        super()._SyncObj__sendNextNodeIdx(node, reset=reset, nextNodeIdx=nextNodeIdx,
                                          success=success)

    def _SyncObj__getEntries(self, fromIDx, count=None, maxSizeBytes=None):
        # pysyncobj slices the whole tail and then trims it by size; read only what is sent.
        journal = self._journal
        if fromIDx is None or not len(journal) or fromIDx < journal.first_index:
            return []
        return journal.entries(fromIDx - journal.first_index, count, maxSizeBytes)

    def _SyncObj__tryLogCompaction(self):
        adapter = self._adapter
        if time.monotonic() < adapter._dump_retry_at:
            return
        if self._journal.size_bytes > adapter.settings.log_compaction_min_bytes:
            self.forceLogCompaction()
        super()._SyncObj__tryLogCompaction()

    def _onTick(self, timeToWait=0.0):
        with self._tick_lock:
            self._tick(timeToWait)
            self._ticked = self._ticked or self._SyncObj__transport.ready

    def _tick(self, timeToWait: float) -> None:
        adapter = self._adapter
        if self._journal.failing:
            # Never campaign with entries that are not on disk; retry the write once a second.
            self._hold_off_election()
            if time.monotonic() >= adapter._disk_retry_at:
                adapter._disk_retry_at = time.monotonic() + DISK_RETRY_PERIOD
                self._journal.sync()
        elif adapter._disk_full_warned and not self._journal.meta_failing:
            adapter._disk_recovered()
        if not self._guarded(lambda: self._tick_body(timeToWait)):
            time.sleep(min(timeToWait, DISK_RETRY_PERIOD))
        adapter._after_tick()

    def _tick_body(self, timeToWait: float) -> None:
        adapter = self._adapter
        super()._onTick(timeToWait)
        # Ticks that apply without reaching _checkCommandsToApply (transport not ready at
        # start-up) commit here.
        adapter._commit_applied()
        leader = self._getLeader()
        adapter.stats.leader_seen(getattr(leader, "address", None))

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Runs `step` (raft work under the tick lock); False when the term or vote could not
        be saved."""
        try:
            step()
        except raft_journal.MetaNotDurable:
            # The term or vote could not be saved: pysyncobj raised before sending the vote
            # or message that needed it. The alarm and its one warning are already raised.
            self._hold_off_election()
            return False
        except durable.DamagedFile as exc:
            # A journal record changed on disk under a running node: stop, do not serve it
            # (pysyncobj would log the same traceback on every tick).
            self._adapter._do_halt(str(exc))
        return True

    def _hold_off_election(self) -> None:
        self._SyncObj__raftElectionDeadline = (time.monotonic()
                                               + self._adapter.settings.raft_max_timeout)


def _payload_of(command: bytes) -> Optional[bytes]:
    """Returns the payload of a pysyncobj REGULAR command (our one replicated method's only
    argument), or None for anything else."""
    if command[:1] != bytes((_COMMAND_TYPE.REGULAR,)):
        return None
    try:
        call = raft_pickle.loads(command[1:])
    except Exception:  # not ours to judge: pysyncobj decodes it again at apply
        return None
    if isinstance(call, tuple) and len(call) == 2 and len(call[1]) == 1 \
            and isinstance(call[1][0], bytes):
        return call[1][0]
    return None


def _refuse_queued(raft: "_RaftObject", callback, reason: int) -> None:
    """Answers a proposal taken from pysyncobj's queue with `reason` without applying it
    (tick thread): to the node that forwarded it (a `(node, request id)` callback, as
    pysyncobj answers), or through its local callback."""
    if isinstance(callback, tuple):
        node, request_id = callback
        raft._SyncObj__transport.send(node, {
            "type": "apply_command_response", "request_id": request_id, "error": reason})
    elif callback is not None:
        callback(None, reason)


class _GatedQueue:
    """pysyncobj's proposal queue with the payload codec's append gate (tick thread only).

    On the leader, every proposal taken from the queue, local or forwarded by a follower, is
    shown to `codec.admit_append` with the log index it is about to get; a refused one is
    answered REQUEST_DENIED (the proposer's `propose` raises a retryable `Unavailable`) and
    never reaches the log.
    """

    def __init__(self, inner, raft: "_RaftObject", codec: PayloadCodec):
        self._inner = inner
        self._raft = raft
        self._codec = codec
        self.denied = 0

    def put_nowait(self, item) -> None:
        self._inner.put_nowait(item)

    def get_nowait(self):
        while True:
            command, callback = self._inner.get_nowait()
            raft = self._raft
            if raft._SyncObj__raftState != _RAFT_STATE.LEADER:
                return command, callback
            payload = _payload_of(command)
            if payload is None:
                return command, callback
            reason = self._codec.admit_append(raft._SyncObj__getCurrentLogIndex() + 1, payload)
            if reason is None:
                return command, callback
            self.denied += 1
            if self.denied % 100 == 1:
                log.warning("refused a proposal at the leader (%d so far): %s", self.denied,
                            reason)
            _refuse_queued(raft, callback, FAIL_REASON.REQUEST_DENIED)


class _BarrierGroup:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.index = 0
        self.error: Optional[errors.SealkvError] = None


class ReplicationAdapter:
    """Runs the Raft member of one node around a `StateMachine`."""

    def __init__(self, state_machine: StateMachine, *, raft_address: Optional[str],
                 partners: list[str], data_dir: str, secret: Optional[str],
                 settings: Optional[RaftSettings] = None,
                 halt: Optional[Callable[[str], None]] = None,
                 payload_codec: Optional[PayloadCodec] = None,
                 fsync: str = durable.FSYNC_ALWAYS,
                 on_disk_full: Optional[Callable[[str], None]] = None,
                 peer_wire_format: str = peer_wire.FORMAT_GCM):
        """Prepares (does not start) the Raft member.

        `raft_address` is this voter's host:port (bound exactly, never all interfaces), or
        None for a learner, which only follows `partners`. A node with partners refuses to
        start without a cluster `secret`. `payload_codec` seals proposals and opens entries
        (the raft-log envelope); the default is the identity. `fsync` is the journal's
        policy ("always": entries, term and vote are fdatasynced before they count;
        "never"). `on_disk_full(path)` is called on the tick thread each time a journal,
        meta or dump write finds the disk full (it raises the NOSPACE alarm; it must be
        quick and must not raise). `peer_wire_format` is the format this node sends to its
        peers ("gcm": AES-256-GCM, see `peer_wire`; "fernet": pysyncobj's own, for a
        rolling upgrade); it accepts both.
        """
        self.sm = state_machine
        self.stats = ReplicationStats()
        self.raft_address = raft_address
        self.partners = [p for p in partners if p != raft_address]
        self.data_dir = data_dir
        self.settings = settings or RaftSettings()
        self.settings.validate()
        if self.partners and not secret:
            raise ValueError("a multi-node cluster needs a cluster secret (--secret-file): the "
                             "raft port carries pickled data that only the secret authenticates")
        self.secret = secret
        if peer_wire_format not in peer_wire.FORMATS:
            raise ValueError(f"peer_wire must be one of {', '.join(peer_wire.FORMATS)} "
                             f"(got {peer_wire_format!r})")
        self.peer_wire = peer_wire_format
        self.wire_root = peer_wire.root_key(secret) if secret else None
        durable.check_policy(fsync)
        self.fsync = fsync
        self.halt = halt or _exit_halt
        self.codec: PayloadCodec = payload_codec or IdentityCodec()
        self._notify_disk_full = on_disk_full or (lambda path: None)
        self._disk_full_warned = False
        self._disk_retry_at = 0.0
        self._dump_retry_at = 0.0
        self._dump_backoff = DUMP_RETRY_MIN
        self.journal: Optional[raft_journal.FileJournal] = None
        self.membership_lock = threading.RLock()
        self._obj: Optional[_RaftObject] = None
        self._barrier_lock = threading.Lock()
        self._barrier_inflight: Optional[_BarrierGroup] = None
        self._barrier_next: Optional[_BarrierGroup] = None
        self._halted = False
        # Tick thread only: callbacks of applied entries waiting for their group's commit.
        self._after_commit: list[Callable[[], None]] = []
        self._dump = _BackgroundDump(self)
        # Disk-full stall (tick thread only): pysyncobj's applied index at the last commit,
        # when applying may resume, and callers of entries to apply again, by index.
        self._committed_raft_index: Optional[int] = None
        self._stalled_until = 0.0
        self._stalled = False
        self._applying_index = 0
        self._orphans: dict[int, list[Callable[[object], None]]] = {}
        # Tick thread only: reads whose read index is confirmed, waiting until the entries up
        # to it are applied and committed here: (index, seq, deadline, on_done).
        self._read_waits: list = []
        self._read_seq = itertools.count()
        # Notified by the tick thread when the leader, the term or the applied index moved.
        self._progress = threading.Condition()
        self._generation = 0
        self._seen: tuple = (None, 0, 0, False)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Opens the journal and starts the tick thread, which replays the dump and journal.

        Raises `durable.DamagedFile` (one line naming file, offset and fix) when the journal
        or meta file cannot be trusted.
        """
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        self.sm.defer_commit = True
        self.journal = raft_journal.FileJournal(self.data_dir, self.fsync,
                                                on_disk_full=self._on_disk_full)
        raft_journal.register_directory(self.data_dir, self.fsync)
        for leftover in ("raft.dump.tmp", "raft.dump.1.tmp"):  # a dump cut short by a crash
            durable.unlink_if_exists(os.path.join(self.data_dir, leftover))
        # The tick thread and the request threads hand the GIL back and forth on every
        # proposal; Python's default 5 ms switch interval can add that much to each hand-off.
        sys.setswitchinterval(SWITCH_INTERVAL)
        frames.install()
        s = self.settings
        conf = SyncObjConf(
            password=self.secret,
            bindAddress=self.raft_address,
            useFork=False,
            dynamicMembershipChange=True,
            journalFile=self.journal,
            fullDumpFile=os.path.join(self.data_dir, "raft.dump"),
            serializer=self._dump.start,
            serializeChecker=self._dump.check,
            deserializer=self._read_dump,
            appendEntriesUseBatch=s.append_entries_use_batch,
            appendEntriesPeriod=s.append_entries_period,
            autoTickPeriod=s.auto_tick_period,
            raftMinTimeout=s.raft_min_timeout,
            raftMaxTimeout=s.raft_max_timeout,
            connectionTimeout=s.connection_timeout,
            connectionRetryTime=s.connection_retry_time,
            leaderFallbackTimeout=s.leader_fallback_timeout,
            appendEntriesBatchSizeBytes=s.append_entries_batch_size_bytes,
            logCompactionMinEntries=s.log_compaction_min_entries,
            logCompactionMinTime=s.log_compaction_min_time,
            commandsQueueSize=s.commands_queue_size,
            maxBindRetries=5,
            onStateChanged=self._on_state_changed,
        )
        self._obj = _RaftObject(self, self.raft_address, self.partners, conf, self.journal)

    def stop(self) -> None:
        """Stops the tick thread and closes the raft port."""
        if self._obj is not None:
            self._obj.destroy()
            thread = getattr(self._obj, "_SyncObj__thread", None)
            if thread is not None and thread is not threading.current_thread():
                thread.join(5)

    def wait_dump_written(self, timeout: float) -> None:
        """Waits for a background snapshot writer to finish (before closing the database)."""
        self._dump.join(timeout)

    def wait_replayed(self, timeout: float) -> bool:
        """Waits until the dump and the journal entries known committed at start are applied."""
        target = self._obj.raftCommitIndex
        return self.wait_until(lambda: self._obj.raftLastApplied >= target, timeout)

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Waits until `condition()` holds; returns False if it did not within `timeout`.

        `condition` is re-checked whenever the tick thread sees the leader, the term or the
        applied index change; it must be cheap and must not wait. Call from any thread but
        the pysyncobj tick thread.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._progress:
                generation = self._generation
            if condition():  # outside the lock: it may take the state lock
                return True
            with self._progress:
                while self._generation == generation:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._progress.wait(remaining)
            if time.monotonic() >= deadline:
                return condition()

    def _after_tick(self) -> None:
        # Tick thread: wake the waiters of wait_until when something they may wait for moved.
        obj = self._obj
        if obj is None:
            return
        if self._read_waits:
            self._expire_read_waits()
        leader = obj._getLeader()
        seen = (None if leader is None else leader.address, obj.raftCurrentTerm,
                obj.raftLastApplied, leader in obj._SyncObj__connectedNodes)
        if seen != self._seen:
            self._seen = seen
            with self._progress:
                self._generation += 1
                self._progress.notify_all()

    # -- apply (tick thread) ----------------------------------------------------------

    def _apply(self, payload: bytes):
        index = self._obj.raftLastApplied + 1
        self._applying_index = index
        if self._stalled:
            # Applying resumes only with the first entry after the last commit: the retry
            # time can pass in the middle of a tick's apply loop, and applying a later entry
            # after skipping an earlier one would commit a database without that entry.
            if time.monotonic() < self._stalled_until or index != self._committed_raft_index + 1:
                return _STALLED
            self._stalled = False
        started = time.perf_counter()
        try:
            result = self.sm.apply(index, self.codec.open(index, payload))
            # Ready/Advance: what apply decided to write (the encryption sidecar) is written
            # here, on this thread, before the next entry applies; a failure halts below.
            self.sm.persist_applied()
            self.stats.observe_apply(time.perf_counter() - started)
            waiting = self._orphans.pop(index, None)
            if waiting:
                self._after_commit.extend(lambda r=result, w=w: w(r) for w in waiting)
            return result
        except StorageFull:
            self._storage_full()
            return _STALLED
        except ApplyHalt as exc:
            self._do_halt(str(exc))
        except BaseException as exc:  # apply must never raise into pysyncobj
            self._do_halt(f"entry {index}: unexpected {type(exc).__name__} at {where(exc)}")

    def _on_state_changed(self, old: int, new: int) -> None:
        # Tick thread. A new leader shows the codec its unapplied suffix (a cutover marker in
        # it re-arms the append gate); a node that stops leading drops what it had armed.
        obj = self._obj
        if new == _RAFT_STATE.LEADER and obj is not None:
            entries = obj._SyncObj__getEntries(obj.raftLastApplied + 1)
            unapplied = [(e[1], p) for e, p in ((e, _payload_of(e[0])) for e in entries)
                         if p is not None]
            self.codec.on_leadership(True, unapplied)
        elif old == _RAFT_STATE.LEADER:
            self.codec.on_leadership(False, ())

    def _commit_applied(self) -> None:
        """Commits the applied group and resolves its callers (tick thread).

        When the database cannot write (disk or map full), nothing of the group is kept: the
        NOSPACE alarm is raised, pysyncobj is rewound to the last committed entry and the
        group is applied again `STALL_RETRY` seconds later, until there is room. The
        group's callers are resolved when it finally commits. The node keeps its raft role
        meanwhile (heartbeats, votes, log replication): only applying waits.
        """
        if self._obj is None:
            return
        if self._stalled or self.sm.base.in_write and self._stall_commit_failed():
            self._obj._SyncObj__raftLastApplied = self._committed_raft_index
            return
        self._committed_raft_index = self._obj.raftLastApplied
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()
        waits = self._read_waits
        while waits and waits[0][0] <= self._committed_raft_index:
            _, _, _, on_done = heapq.heappop(waits)
            on_done(None)

    def _stall_commit_failed(self) -> bool:
        try:
            self.sm.commit()
        except StorageFull:
            self._storage_full()
            return True
        except BaseException as exc:
            self._after_commit = []
            self._do_halt(f"cannot commit applied entries to the database: "
                          f"{type(exc).__name__} at {where(exc)}")
            return True
        return False

    def _storage_full(self) -> None:
        """The database is out of space: raise the alarm, drop the group, retry later."""
        if not self._stalled:
            log.error("the database cannot write (no space): applying pauses, retrying every "
                      "%.0fs", STALL_RETRY)
        self._on_disk_full(getattr(self.sm.base, "path", "the database"))
        try:
            self.sm.rollback()
        except StorageFull:  # a plugin's file (the encryption sidecar): written at the retry
            pass
        except ApplyHalt as exc:  # the reloaded plugin state could not be persisted
            self._do_halt(str(exc))
        if self._committed_raft_index is None:
            self._committed_raft_index = self.sm.applied_index
        self._stalled = True
        self._stalled_until = time.monotonic() + STALL_RETRY

    def _when_committed(self, callback: Callable[[], None]) -> None:
        """Runs `callback` once the entries applied so far are committed (tick thread)."""
        if self.sm.base.in_write or self._stalled:
            self._after_commit.append(callback)
        else:
            callback()

    def _do_halt(self, reason: str) -> None:
        self._halted = True
        self.halt(reason)

    # -- a full disk (tick thread) ----------------------------------------------------

    def _on_disk_full(self, path: str) -> None:
        # One WARNING per episode, not one per tick; the alarm is raised every time (it is
        # idempotent) so that status shows it even if it was disarmed too early.
        if not self._disk_full_warned:
            self._disk_full_warned = True
            log.warning("disk full writing %s: NOSPACE alarm raised; this member holds back "
                        "(no acknowledgement, no campaign) until it can write again, and "
                        "nothing it acknowledged is lost", path)
        self._notify_disk_full(path)

    def _disk_recovered(self) -> None:
        self._disk_full_warned = False
        log.warning("the raft journal and meta file in %s are writable again; the NOSPACE "
                    "alarm stays until disarmed", self.data_dir)

    def _step_down_disk_full(self) -> None:
        # The leader appended (and sent) entries it cannot write: it must not count itself
        # for them. Stepping down lets a member with space lead; this one does not campaign
        # until its journal is written (see _RaftObject._onTick).
        obj = self._obj
        obj._SyncObj__setState(_RAFT_STATE.FOLLOWER)
        obj._SyncObj__raftLeader = None
        obj._hold_off_election()

    # -- proposals --------------------------------------------------------------------

    def propose(self, command: bytes, timeout: float):
        """Replicates `command` and returns its apply result on this node.

        Raises `Unavailable` when no leader is known within the timeout (nothing was
        submitted), `OutcomeUnknown` when the deadline passes after submission, `Aborted`
        when a leader change discarded it, `ResourceExhausted` when the queue is full.
        """
        deadline = time.monotonic() + timeout
        self._require_leader(deadline)
        payload = self.codec.seal(command, max(0.0, deadline - time.monotonic()))
        done = threading.Event()
        box: list = []

        def resolve(result, reason):
            box.append((result, reason))
            done.set()

        def on_result(result, reason):
            if result is _STALLED:
                self._orphans.setdefault(self._applying_index, []).append(
                    lambda real: resolve(real, reason))
            else:
                self._when_committed(lambda: resolve(result, reason))

        # The blocking path is the admin's and the plugins' (key changes, cutovers): the
        # followers hear the commit at once, not with the next write (see raft_rules).
        setattr(on_result, TELL_FOLLOWERS, True)
        self._obj.apply_command(payload, callback=on_result)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            self.stats.proposals_failed += 1
            raise errors.OutcomeUnknown(
                f"outcome unknown: not committed within {timeout:.1f}s (it may still apply)")
        result, reason = box[0]
        if reason == FAIL_REASON.SUCCESS:
            return result
        self.stats.proposals_failed += 1
        raise _proposal_failure(reason)

    def propose_async(self, command: bytes,
                      on_done: Callable[[object, Optional[errors.SealkvError]], None],
                      seal_timeout: Optional[float] = None) -> None:
        """Submits `command` without waiting; `on_done(result, error)` is called once.

        For pipelining callers (the proposer, the raw-engine benchmark). `on_done` runs on the
        tick thread and must be short; `error` is the exception `propose` would raise.
        pysyncobj can orphan a callback (a follower installing a snapshot), so callers must
        also keep a deadline of their own. The one wait: while a raft-log envelope cutover
        holds this node's intake, sealing blocks the caller up to `seal_timeout` seconds
        (default `SEAL_WAIT`; the barrier is meant to hold writes, not fail them).
        """
        def on_result(result, reason):
            error = None if reason == FAIL_REASON.SUCCESS else _proposal_failure(reason)
            if result is _STALLED:
                self._orphans.setdefault(self._applying_index, []).append(
                    lambda real: on_done(real, error))
            else:
                self._when_committed(lambda: on_done(result, error))

        try:
            payload = self.codec.seal(command, SEAL_WAIT if seal_timeout is None else seal_timeout)
        except errors.SealkvError as exc:  # paused intake: refused, nothing submitted
            on_done(None, exc)
            return
        self._obj.submit(payload, on_result)

    def wait_leader(self, deadline: float) -> None:
        """Waits until a leader is known and reachable from here (this node leads or is
        connected to it; `deadline` on the monotonic clock).

        Raises `Unavailable` when none is by then or this node has halted. Called
        from request threads before submitting, never from the tick thread.
        """
        self._require_leader(deadline)

    def _require_leader(self, deadline: float) -> None:
        if self._halted:
            raise errors.Unavailable("node halted")
        if self._leader_reachable():
            return  # the common case, before every write: no closure, no lock, no clock
        if not self.wait_until(self._leader_reachable, deadline - time.monotonic()):
            raise errors.Unavailable("no leader: the cluster has no quorum or is electing")

    def _leader_reachable(self) -> bool:
        # A proposal made here can reach a leader: this node leads, or it has a connection to
        # the leader it knows (a follower whose leader died keeps naming it until its election
        # timeout; what it forwarded meanwhile would be dropped, see _refuse_unforwardable).
        obj = self._obj
        leader = obj._getLeader()
        return leader is not None and (obj._isLeader()
                                       or leader in obj._SyncObj__connectedNodes)

    def barrier(self, timeout: float) -> int:
        """Waits for a quorum-confirmed read point to be applied here and returns its index.

        The read point is a read index (`read_index_async`: the leader's commit index,
        confirmed by a round of messages a quorum answered in its term, no log entry), or,
        when that falls back, a no-op barrier entry. Reads that arrive while a round (or a
        barrier) is in flight share the next one, which starts when the current one
        completes: a point fixed before a read started could be ordered before writes
        acknowledged before the read started. A read point dropped by a leader change (or
        not confirmed in its time) is sought again while the deadline allows: it changes
        nothing, safe to repeat, so a read never has an unknown outcome.

        Raises `ReadTimeout` when no barrier is confirmed within `timeout`, `Unavailable`
        when no leader was known until then (or the node halted), `ResourceExhausted` when
        the proposal queue is full.
        """
        return retry_barrier(self._read_point_once, timeout, lambda: self._halted)

    def read_index_async(self, on_done: Callable[[Optional[int], Optional[Exception]], None],
                         deadline: float) -> None:
        """Confirms a linearizable read point without a log entry (ReadIndex); never blocks.

        Any thread but the tick thread. `on_done(index, error)` is called once, on the tick
        thread (it must be short): with the confirmed read index once every entry up to it is
        applied and committed to the database here, so a read of the state machine then
        sees every write acknowledged before this call. Errors: `ReadIndexFallback` (confirm
        with a barrier entry instead: right after an election, during a membership change or
        a leadership transfer, or with peers that do not answer ReadIndex messages),
        `Aborted` (the leader changed: retry), `Unavailable` (no leader known), `OutcomeUnknown`
        (confirmed, but not applied here by `deadline`, a monotonic time).
        """
        def confirmed(index: Optional[int], error) -> None:  # tick thread
            if error is not None:
                if isinstance(error, ReadIndexFallback):
                    self.stats.read_index_fallbacks += 1
                on_done(None, error)
                return
            self.stats.read_index_reads += 1
            if index <= (self._committed_raft_index or 0):
                on_done(index, None)
                return
            heapq.heappush(self._read_waits, (
                index, next(self._read_seq), deadline,
                lambda failure: on_done(None, failure) if failure else on_done(index, None)))

        self._obj.read_index(confirmed)

    def _expire_read_waits(self) -> None:
        # Tick thread: a read whose caller gave up no longer waits for its index here.
        now = time.monotonic()
        waits = self._read_waits
        expired = [w for w in waits if w[2] <= now]
        if not expired:
            return
        self._read_waits = [w for w in waits if w[2] > now]
        heapq.heapify(self._read_waits)
        for index, _, _, on_done in expired:
            on_done(errors.OutcomeUnknown(f"read index {index} confirmed but not applied here "
                                          "in time"))

    def _read_point_once(self, timeout: float) -> int:
        """One linearizable read point: ReadIndex, or a barrier entry when it falls back."""
        deadline = time.monotonic() + timeout
        self._require_leader(deadline)
        done = threading.Event()
        box: list = []
        self.read_index_async(lambda index, error: (box.append((index, error)), done.set()),
                              deadline)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise errors.OutcomeUnknown(f"read point not confirmed within {timeout:.1f}s")
        index, error = box[0]
        if isinstance(error, ReadIndexFallback):
            return self._barrier_once(max(0.0, deadline - time.monotonic()))
        if error is not None:
            raise error
        return index

    def _barrier_once(self, timeout: float) -> int:
        with self._barrier_lock:
            if self._barrier_next is None:
                self._barrier_next = _BarrierGroup()
                if self._barrier_inflight is None:
                    self._launch_barrier_locked(timeout)
            group = self._barrier_next if self._barrier_next is not None \
                else self._barrier_inflight
        if not group.done.wait(timeout):
            if self._obj._getLeader() is None:
                raise errors.Unavailable("no leader: the cluster has no quorum or is electing")
            raise errors.OutcomeUnknown(f"read barrier not confirmed within {timeout:.1f}s")
        if group.error is not None:
            raise group.error
        return group.index

    def _launch_barrier_locked(self, timeout: float) -> None:
        group = self._barrier_next
        self._barrier_next = None
        self._barrier_inflight = group
        threading.Thread(target=self._run_barrier, args=(group, timeout), daemon=True,
                         name="read-barrier").start()

    def _run_barrier(self, group: _BarrierGroup, timeout: float) -> None:
        try:
            group.index = self.propose(cmd.encode(cmd.Barrier()), timeout).revision
        except errors.SealkvError as exc:
            group.error = exc
        finally:
            group.done.set()
            with self._barrier_lock:
                self._barrier_inflight = None
                if self._barrier_next is not None:
                    self._launch_barrier_locked(timeout)

    # -- status -----------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._obj is not None and self._obj._isLeader()

    @property
    def leader_raft_address(self) -> Optional[str]:
        leader = self._obj._getLeader() if self._obj is not None else None
        return None if leader is None else leader.address

    @property
    def term(self) -> int:
        return self._obj.raftCurrentTerm if self._obj is not None else 0

    @property
    def read_index_rounds(self) -> int:
        """The ReadIndex confirmation rounds this node completed as the leader."""
        return getattr(self._obj, "read_rounds", 0)

    @property
    def is_learner(self) -> bool:
        return self.raft_address is None

    @property
    def halted(self) -> bool:
        return self._halted

    def raft_state(self) -> dict:
        """Returns term, commit and applied index, quorum, log size and per-voter facts."""
        obj = self._obj
        voters = self._voter_addresses()
        connected = {a for a in voters if a == self.raft_address
                     or obj.isNodeConnected(TCPNode(a))}
        lag = {}
        if self.is_leader:
            # The commit index, not the journal's last entry: the journal is the tick
            # thread's to read (compaction rewrites it).
            commit = obj.raftCommitIndex
            match = _copy_dict(getattr(obj, "_SyncObj__raftMatchIndex", {}))
            lag = {node.address: max(0, commit - idx) for node, idx in match.items()
                   if hasattr(node, "address")}
            lag[self.raft_address] = 0
        return {
            "term": obj.raftCurrentTerm,
            "commit_index": obj.raftCommitIndex,
            "applied_index": obj.raftLastApplied,
            "has_quorum": obj.hasQuorum if not self.is_learner else self.leader_raft_address is not None,
            "log_size": obj._getRaftLogSize(),
            "voters": voters,
            "connected": connected,
            "lag": lag,
        }

    def _voter_addresses(self) -> list[str]:
        nodes = {n.address for n in self._obj.otherNodes}
        if self.raft_address is not None:
            nodes.add(self.raft_address)
        return sorted(nodes)

    def membership_snapshot(self) -> MembershipSnapshot:
        """Returns voters, learners, leader, term, indexes and the configuration version.

        Taken under the membership lock, so it never interleaves with a membership change
        made through this adapter.
        """
        with self.membership_lock:
            directory, version = self.sm.member_directory()
            by_raft = {m.raft_address: m for m in directory.values() if m.role == cmd.ROLE_VOTER}
            state = self.raft_state()
            voters = tuple(by_raft.get(addr) or MemberRecord("", addr, "", cmd.ROLE_VOTER)
                           for addr in state["voters"])
            learners = tuple(sorted((m for m in directory.values() if m.role == cmd.ROLE_LEARNER),
                                    key=lambda m: m.name))
            leader = self.leader_raft_address
            return MembershipSnapshot(voters, learners, leader, state["term"],
                                      state["commit_index"], state["applied_index"],
                                      version, frozenset(state["connected"]))

    # -- membership (callers hold membership_lock and run on the leader) ---------------

    def add_voter(self, raft_address: str, timeout: float) -> None:
        """Adds `raft_address` to the Raft configuration and waits until it is committed."""
        self._change_membership(self._obj.addNodeToCluster, raft_address, timeout)

    def remove_voter(self, raft_address: str, timeout: float) -> None:
        """Removes `raft_address` from the Raft configuration and waits until committed."""
        self._change_membership(self._obj.removeNodeFromCluster, raft_address, timeout)

    def _change_membership(self, change, raft_address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = threading.Event()
            box: list = []
            applied = self._obj.raftLastApplied
            change(raft_address, callback=lambda res, reason: (box.append(reason), done.set()))
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise errors.OutcomeUnknown("outcome unknown: membership change not committed "
                                            f"within {timeout:.1f}s")
            if box[0] == FAIL_REASON.SUCCESS:
                return
            # pysyncobj denies a change while the previous one or the leader's no-op is
            # uncommitted: retry once the log moved (at most every 50 ms) until the deadline.
            if box[0] != FAIL_REASON.REQUEST_DENIED or time.monotonic() >= deadline:
                raise _failure(box[0])
            self.wait_until(lambda: self._obj.raftLastApplied != applied,
                            min(0.05, deadline - time.monotonic()))

    def transfer_leadership(self, raft_address: Optional[str], timeout: float) -> None:
        """Asks the leader to hand over to `raft_address` (None: most caught-up voter)."""
        done = threading.Event()
        asked = threading.Event()
        box: list = []

        def job() -> None:  # tick thread: pysyncobj's transferLeadership sends on the transport
            if not asked.is_set():
                asked.set()
                self._obj.transferLeadership(
                    raft_address, callback=lambda res, reason: (box.append(reason), done.set()))

        self._obj.addOnTickCallback(job)
        try:
            if not done.wait(timeout):
                raise errors.OutcomeUnknown("leadership transfer not acknowledged in time")
        finally:
            self._obj.removeOnTickCallback(job)
        if box[0] != FAIL_REASON.SUCCESS:
            raise errors.FailedPrecondition(
                "leadership transfer refused: the target must be a connected, fully caught-up "
                "voter and this node must be the leader")

    def compact(self, timeout: float) -> int:
        """Rewrites the database without its free pages (`compact_database`), then writes a
        new snapshot of everything applied here and drops the log before it; returns the
        index the snapshot covers.

        The dump is written to a new file and renamed over the old one, and the journal keeps
        only the entries after the snapshot (pysyncobj keeps the last two applied entries).
        Called from a gRPC thread; waits on the tick thread's progress, bounded by `timeout`
        (`OutcomeUnknown` when it passes: the compaction may still finish).
        """
        deadline = time.monotonic() + timeout
        self.compact_database(timeout)
        timeout = max(0.1, deadline - time.monotonic())
        obj = self._obj
        target = obj.raftLastApplied - 1
        done = threading.Event()

        def check() -> None:  # tick thread
            compacted = obj._SyncObj__lastSerializedEntry
            log_ = obj._SyncObj__raftLog
            if compacted is not None and compacted >= target and len(log_) \
                    and log_[0][1] >= compacted:
                done.set()

        obj.addOnTickCallback(check)
        try:
            obj.forceLogCompaction()
            if not done.wait(timeout):
                raise errors.OutcomeUnknown(f"log compaction not finished within {timeout:.1f}s")
        finally:
            obj.removeOnTickCallback(check)
        return obj._SyncObj__lastSerializedEntry

    def compact_database(self, timeout: float) -> None:
        """Has the tick thread rewrite the database file with only its live pages (applying
        pauses meanwhile, like etcd's defrag), after any snapshot being written. Called from
        a gRPC thread; raises `OutcomeUnknown` when `timeout` passes first."""
        done = threading.Event()
        box: list = []

        def job() -> None:  # tick thread
            if done.is_set() or box:
                return
            box.append(None)
            try:
                self._dump.join(timeout)
                result = self.sm.compact_store(timeout)
                if result is not None:
                    log.info("database compacted: %d -> %d bytes", *result)
            except Exception as exc:
                box[0] = exc
            finally:
                done.set()

        self._obj.addOnTickCallback(job)
        try:
            if not done.wait(timeout):
                raise errors.OutcomeUnknown(f"database compaction not finished within "
                                            f"{timeout:.1f}s")
        finally:
            self._obj.removeOnTickCallback(job)
        if isinstance(box[0], StorageFull):
            raise errors.ResourceExhausted("no space to compact the database: free space first")
        if box[0] is not None:
            raise errors.Unavailable(f"database compaction did not run: "
                                     f"{type(box[0]).__name__}")

    # -- dump files (tick thread) -----------------------------------------------------

    def _write_dump(self, filename: str, data, view=None) -> None:
        # Writes the dump to `filename` (a temporary name, renamed over the dump afterwards
        # through a durable rename); a failure is retried with a back-off instead of on every
        # tick (pysyncobj only logs "Failed to store full dump"). `view` is a database read
        # transaction opened at the dump's index (the background writer), else the current
        # state is read.
        last, previous, cluster = data
        header = dump_header(last, previous,
                             [getattr(n, "address", str(n)) for n in cluster if n is not None])
        started = time.perf_counter()
        try:
            with open(filename, "wb") as f:
                os.fchmod(f.fileno(), durable.FILE_MODE)
                out = ChecksumWriter(f)
                out.write(header)
                if view is not None:
                    with self.sm.base.read_view(view):
                        index = self.sm.write_snapshot(out)
                else:
                    index = self.sm.write_snapshot(out)
                # pysyncobj's own entries (no-ops, membership) never reach the database: its
                # index may be below the dump's, never above.
                if index > last[1]:
                    raise RuntimeError(f"snapshot at index {index}, dump claims {last[1]}")
                f.write(out.crc.to_bytes(4, "big"))
                f.flush()
                durable.sync_file(f.fileno(), filename, self.fsync)
        except Exception as exc:
            self._dump_failed(filename, exc)
            raise
        self._dump_backoff = DUMP_RETRY_MIN
        self.stats.observe_snapshot(time.perf_counter() - started)
        self.codec.snapshot_taken(previous[1])

    def _dump_failed(self, filename: str, exc: Exception) -> None:
        try:
            os.unlink(filename)
        except OSError:
            pass
        self._dump_retry_at = time.monotonic() + self._dump_backoff
        if durable.is_disk_full(exc):
            self._notify_disk_full(filename)
            log.warning("disk full writing dump %s: NOSPACE alarm raised; the journal keeps "
                        "its entries, retrying in %.0fs", filename, self._dump_backoff)
        else:
            log.warning("cannot write dump %s (%s at %s); retrying in %.0fs", filename,
                        type(exc).__name__, where(exc), self._dump_backoff)
        self._dump_backoff = min(DUMP_RETRY_MAX, self._dump_backoff * 2)

    def _read_dump(self, filename: str):
        # Called on the tick thread at start (the local dump) and when a follower installs a
        # snapshot from the leader. pysyncobj swallows errors here and would then acknowledge
        # the snapshot (or serve an empty replica): any failure halts the node instead.
        try:
            with open(filename, "rb") as src:
                last, previous, cluster = read_dump_start(filename, src)
                offset = src.tell()
                try:
                    if not self.sm.read_snapshot(src, skip_if_covered=True):
                        log.info("the database (applied index %d) covers the snapshot at index "
                                 "%d in %s: not loading it", self.sm.applied_index, last[1],
                                 filename)
                except ApplyHalt as exc:
                    raise durable.DamagedFile(filename, offset, f"snapshot refused ({exc})",
                                              DUMP_FIX) from None
                except Exception as exc:
                    raise durable.DamagedFile(filename, offset, "snapshot cannot be read "
                                              f"({type(exc).__name__} at {where(exc)})",
                                              DUMP_FIX) from None
        except durable.DamagedFile as exc:
            self._do_halt(str(exc))
            raise
        except OSError as exc:
            self._do_halt(f"{filename}: cannot read the dump ({exc.strerror})")
            raise
        self._keep_entries_after_dump(previous, last)
        # pysyncobj now keeps no entry before `previous` (a snapshot installed from the leader
        # replaces the whole log): the codec forgets what it counted there (the retained log's
        # users of a raft key), as after a snapshot of our own.
        self.codec.snapshot_taken(previous[1])
        # pysyncobj compares these with its own TCPNode to drop itself: strings never match.
        return last, previous, cluster


    def _keep_entries_after_dump(self, previous, last) -> None:
        """Drops the journal entries the dump covers, up to `previous` (tick thread).

        pysyncobj keeps the journal across a dump load only when it starts with the dump's
        last two entries, as compaction leaves it, and otherwise replaces it with those two.
        A node stopped after its dump was written and before the next tick dropped the
        entries the dump covers starts with more in front: it would lose the entries after
        the dump that it had acknowledged (a follower's may not be applied yet). This drops
        only what that compaction would have dropped.
        """
        journal = self.journal
        if journal is None or not len(journal):
            return
        pos = previous[1] - journal.first_index
        if pos <= 0 or pos + 1 >= len(journal):
            return
        if journal[pos] == previous and journal[pos + 1] == last:
            journal.deleteEntriesTo(pos)


class _DumpNotRenamed(Exception):
    """Stops pysyncobj from renaming a dump a background thread is still writing."""


class _BackgroundDump:
    """Writes pysyncobj's dump from a database read transaction on a background thread.

    pysyncobj calls `start(tmp, data)` (its serializer hook) on the tick thread, then renames
    `tmp` over the dump. On an MVCC store, `start` opens the read transaction there (the
    database holds every entry up to pysyncobj's last applied index: each tick's group is
    committed before compaction runs) and raises `_DumpNotRenamed`, so pysyncobj renames
    nothing; the worker writes, syncs and renames the dump itself, never holding the state
    lock. `check()` (the serializeChecker hook) reports SERIALIZING, then SUCCESS or FAILED;
    until SUCCESS pysyncobj keeps the log entries the dump will cover and sends no snapshot.
    On the in-memory store (tests) the dump is written synchronously, as pysyncobj expects.
    """

    def __init__(self, adapter: "ReplicationAdapter"):
        self.adapter = adapter
        self._state = SERIALIZER_STATE.NOT_SERIALIZING
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def _set(self, state) -> None:
        with self._lock:
            self._state = state

    def start(self, tmp_name: str, data) -> None:
        adapter = self.adapter
        sm = adapter.sm
        if not sm.mvcc:
            try:
                adapter._write_dump(tmp_name, data)
            except Exception:
                self._set(SERIALIZER_STATE.FAILED)
                raise
            self._set(SERIALIZER_STATE.SUCCESS)
            return
        if sm.base.in_write:  # never expected: each tick commits before compaction runs
            self._set(SERIALIZER_STATE.FAILED)
            raise _DumpNotRenamed("the database has uncommitted entries")
        final = tmp_name[:-len(".tmp")] if tmp_name.endswith(".tmp") else tmp_name + ".dump"
        view = sm.base.begin_read()
        self._set(SERIALIZER_STATE.SERIALIZING)
        self._thread = threading.Thread(target=self._write, args=(final, data, view),
                                        daemon=True, name="dump-writer")
        self._thread.start()
        raise _DumpNotRenamed("the dump is written in the background")

    def _write(self, final: str, data, view) -> None:
        work = final + ".writing"
        started = time.monotonic()
        try:
            self.adapter._write_dump(work, data, view)
            durable.replace(work, final, self.adapter.fsync)
        except Exception:  # _write_dump reported it and set the back-off
            self._set(SERIALIZER_STATE.FAILED)
            return
        finally:
            view.abort()
        log.debug("wrote the snapshot at index %d in %.2fs", data[0][1],
                  time.monotonic() - started)
        self._set(SERIALIZER_STATE.SUCCESS)

    def check(self):
        with self._lock:
            state = self._state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._state = SERIALIZER_STATE.NOT_SERIALIZING
            return state

    def join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


def _copy_dict(d: dict) -> dict:
    # pysyncobj mutates its dicts on the tick thread; copying may race, so retry.
    for _ in range(10):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


def _proposal_failure(reason: int) -> errors.SealkvError:
    # For a regular proposal REQUEST_DENIED only ever comes from the payload codec's append
    # gate: nothing was appended, a retry is safe.
    if reason == FAIL_REASON.REQUEST_DENIED:
        return errors.Unavailable("the leader refused the proposal (a raft-log envelope cutover"
                                  " is in progress); it was not applied: retry")
    return _failure(reason)


def _failure(reason: int) -> errors.SealkvError:
    if reason == FAIL_REASON.QUEUE_FULL:
        return errors.ResourceExhausted("proposal queue is full; retry later")
    if reason == FAIL_REASON.MISSING_LEADER:
        return errors.Unavailable("no leader: the cluster has no quorum or is electing")
    if reason == FAIL_REASON.DISCARDED:
        return errors.Aborted("proposal discarded by a leader change; it was not applied, retry")
    if reason == FAIL_REASON.NOT_LEADER:
        return errors.Aborted("proposal reached a node that is no longer the leader; it was not "
                              "applied, retry")
    if reason == FAIL_REASON.REQUEST_DENIED:
        return errors.FailedPrecondition("request denied by the raft layer")
    # LEADER_CHANGED, UNKNOWN_OUTCOME: the entry may or may not commit.
    return errors.OutcomeUnknown("outcome unknown: the leader changed before the entry committed")


def _exit_halt(reason: str) -> None:
    log.critical("halting: %s; this replica stops here rather than diverge", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(HALT_EXIT_CODE)

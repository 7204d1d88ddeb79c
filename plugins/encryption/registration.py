"""This node's writer registration and the write admission it guards (ENCRYPTION.md §4).

A node must not seal a client write under a data key before its own registry row for
(that key, its current epoch) is applied. `WriterRegistration` knows which REGISTER commands
this node still needs (`pending`), proposes them from a background thread until they are
applied, and holds client writes back until they are (`admit_write`).

It shares the encryption plugin's replicated state, epoch table and condition: every apply
handler notifies the condition, and both the thread and `admit_write` wait on it (events, not
sleeps). The condition is a `ChangeCondition`, which counts its notifications: a write
admitted when no change was notified since the last admission passes at once (every client
write of the node passes here). Nothing here logs a key or key bytes.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping, Optional

from sealkv.node import errors

from .commands import RegisterCommand, WriterRow, encode_command
from .nonce import node_id16
from .state import EncryptionState

log = logging.getLogger(__name__)

PROPOSE_TIMEOUT = 5.0
FIRST_RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 2.0

Propose = Callable[[bytes, float], Any]


class ChangeCondition(threading.Condition):
    """A condition variable that counts its notifications (`changes`).

    The encryption plugin changes its state (the replicated state, this process's epochs) only
    while holding it, and notifies it after every change; `changes` then tells a reader that
    nothing changed since it last looked. Incremented with the lock held; read without it (an
    int read is atomic), so a change still in progress is seen only once it is notified.
    """

    def __init__(self, lock=None):
        super().__init__(lock)
        self.changes = 0

    def notify(self, n: int = 1) -> None:
        self.changes += 1
        super().notify(n)

    def notify_all(self) -> None:
        self.changes += 1
        super().notify_all()


class WriterRegistration:
    """The registration thread and the admission gate of one node (see the module docstring).

    `state` is the live replicated state and `epochs` this process's epoch per key id, both
    changed only by the plugin on the tick thread while it holds `cond`. `start` and `stop`
    run on the start-up thread, `admit_write` on gRPC threads, the loop on its own thread.
    """

    def __init__(self, state: EncryptionState, epochs: Mapping[int, int], full_id: int,
                 cond: ChangeCondition):
        self._state = state
        self._epochs = epochs
        self._full_id = full_id
        self._node16 = node_id16(full_id)
        self._cond = cond
        # `cond.changes` when a write was last admitted (-1: never).
        self._admitted_at = -1
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def pending(self) -> list[RegisterCommand]:
        """Returns the REGISTER commands this node still needs (active keys, current epochs)."""
        with self._cond:
            state = self._state
            result = []
            for dek_id in sorted({state.active_storage_id, state.active_raft_id} - {0}):
                epoch = self._epochs.get(dek_id)
                if epoch is None:
                    continue
                record = state.writer(dek_id, self._node16)
                if record is None or record.last_epoch < epoch:
                    result.append(RegisterCommand(WriterRow(dek_id, self._full_id, epoch)))
            return result

    def admit_write(self, timeout: float) -> None:
        """Waits up to `timeout` until this node's registry rows for its current epochs are
        applied for every key a client write could be sealed under; else raises `Unavailable`.
        """
        # Every client write passes here: the usual case (nothing changed since the last
        # admission) is answered by one comparison, without the condition's lock. The rows and
        # epochs only change on the tick thread, under the condition, which counts every
        # change it is notified of: equal counts mean the state that admitted the last write.
        if self._admitted_at == self._cond.changes:
            return
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._cond:
            while True:
                missing = self._unregistered_key()
                if missing is None:
                    self._admitted_at = self._cond.changes  # no change can run meanwhile
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set():
                    raise errors.Unavailable(
                        f"this node's writer registration for key {missing} is not applied "
                        "yet: retry")
                self._cond.wait(remaining)

    def _unregistered_key(self) -> Optional[int]:
        state = self._state
        keys = []
        if state.bootstrapped:
            keys.append(state.active_storage_id)
        if state.raft_envelope_active:
            keys.append(state.active_raft_id)
        for dek_id in keys:
            record = state.writer(dek_id, self._node16)
            epoch = self._epochs.get(dek_id)
            if (record is None or epoch is None or record.full_node_id != self._full_id
                    or record.last_epoch != epoch):
                return dek_id
        return None

    def start(self, propose: Propose) -> None:
        """Starts the thread that proposes `pending()` with `propose(command, timeout)`."""
        self._thread = threading.Thread(target=self._run, args=(propose,),
                                        name="sealkv-encryption-register", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread and fails writes still waiting in `admit_write`."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()

    def _run(self, propose: Propose) -> None:
        """Proposes what is pending until it is applied; idles on the condition otherwise.

        Catches only the errors a proposal may end with (`SealkvError`: no leader, a leader
        change, a full queue, an unknown outcome), logs each failed round at WARNING and
        retries after a delay that doubles up to `MAX_RETRY_DELAY`. Anything else is a bug:
        it is logged (type and location only) and ends the thread.
        """
        delay = FIRST_RETRY_DELAY
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping.is_set() or self.pending())
                if self._stopping.is_set():
                    return
                pending = self.pending()
            failed = 0
            for command in pending:
                try:
                    propose(encode_command(command), PROPOSE_TIMEOUT)
                except errors.SealkvError as error:
                    failed += 1
                    log.warning("writer registration for key %d not applied yet (%s); "
                                "retrying in %.2fs", command.row.dek_id, type(error).__name__,
                                delay)
                except Exception as error:
                    log.error("writer registration stopped: unexpected %s at %s; client writes"
                              " stay refused until the node restarts", type(error).__name__,
                              errors.where(error))
                    return
            if not failed:
                delay = FIRST_RETRY_DELAY  # pacing only: an applied row ends `pending`
            if self._stopping.wait(delay):
                return
            if failed:
                delay = min(delay * 2, MAX_RETRY_DELAY)

"""The leader side of online re-encryption: a thread that drives the replicated job.

Every node runs one `ReencryptionDriver` (owned by the encryption admin plugin); only the
current leader acts. While the replicated job is running it reads the next `batch_size`
records after the job's cursor from its own store, proposes a BATCH naming the keys that need
a rewrite with the `mod_revision` it saw, waits for it to apply, and sleeps so that at most
`rate` records per second are examined. At the end of the store it proposes FINISH (another
pass when a rotation left values under an old key). A new leader picks the job up from the
replicated cursor; a former leader's late proposals are stale and have no effect. When the
job was started with compaction, the leader that finished it compacts every member.

Nothing here logs a key or a value.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Optional

from sealkv.node import errors

from . import reencryption
from .reencryption import ReencryptBatch, ReencryptCompacted, ReencryptFinish, needs_rewrite

log = logging.getLogger(__name__)

SCAN_CHUNK = 1000
IDLE_PERIOD = 0.5
PROPOSE_TIMEOUT = 10.0
RATE_WINDOW = 10.0


def count_store(handle: Any, active_storage_id: int) -> tuple[int, int]:
    """Returns (records in the store, records needing a rewrite) on this node."""
    total = remaining = 0
    start = b""
    while True:
        chunk = handle.stored_records(start, SCAN_CHUNK)
        for _, entry in chunk:
            total += 1
            remaining += needs_rewrite(entry, active_storage_id)
        if len(chunk) < SCAN_CHUNK:
            return total, remaining
        start = reencryption.key_after(chunk[-1][0])


class ReencryptionDriver:
    """Drives the re-encryption job while this node leads (see the module docstring).

    `layer()` returns the encryption layer (its `EncryptionLayerAccess`, or None);
    `compact_cluster()` runs the cluster-wide compaction and returns a one-line outcome.
    Methods other than `start` and `stop` are safe from any thread.
    """

    def __init__(self, handle: Any, layer: Callable[[], Optional[Any]],
                 compact_cluster: Callable[[], str]):
        self.handle = handle
        self.layer = layer
        self.compact_cluster = compact_cluster
        self.compaction = ""
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._samples: collections.deque = collections.deque(maxlen=256)
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sealkv-reencrypt", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def wake(self) -> None:
        """Looks at the job now instead of at the next idle tick."""
        self._wake.set()

    def rate(self) -> float:
        """Records examined per second over the last few seconds (0 when not driving here)."""
        samples = list(self._samples)
        if len(samples) < 2 or time.monotonic() - samples[-1][0] > RATE_WINDOW:
            return 0.0
        first = next((s for s in samples if samples[-1][0] - s[0] <= RATE_WINDOW), samples[0])
        elapsed = samples[-1][0] - first[0]
        return (samples[-1][1] - first[1]) / elapsed if elapsed > 0 else 0.0

    # ---- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(IDLE_PERIOD)
            self._wake.clear()
            try:
                self._drive()
            except errors.SealkvError as exc:  # no leader, leadership moved, a timeout
                log.info("re-encryption step not done (%s): retrying", type(exc).__name__)
                self._stopping.wait(IDLE_PERIOD)

    def _job(self):
        layer = self.layer()
        return None if layer is None else layer.view().state.job

    def _drive(self) -> None:
        job = self._job()
        while (job is not None and job.state == reencryption.RUNNING
               and self.handle.is_leader() and not self._stopping.is_set()):
            started = time.monotonic()
            examined = self._step(job)
            self._samples.append((time.monotonic(), self._job().done))
            pause = examined / max(job.rate, 1) - (time.monotonic() - started)
            if pause > 0 and self._stopping.wait(pause):  # the throttle (pacing only)
                return
            job = self._job()
        if job is not None and job.needs_compaction and self.handle.is_leader():
            self._compact(job)

    def _step(self, job) -> int:
        """Proposes the next BATCH (or FINISH); returns the records it examined."""
        layer = self.layer()
        active = layer.view().state.active_storage_id
        start = reencryption.key_after(job.cursor) if job.cursor else b""
        records = self.handle.stored_records(start, job.batch_size)
        if records:
            items = []
            for key, entry in records:
                if not needs_rewrite(entry, active):
                    continue
                if not layer.record_readable(key, entry):
                    log.warning("re-encryption skips a value that fails authentication on the "
                                "leader (it stays as it is; reads of it answer DATA_LOSS)")
                    continue
                items.append((key, entry.mod_revision))
            command = ReencryptBatch(job.job_id, len(records), job.cursor, records[-1][0],
                                     tuple(items))
        else:
            total, remaining = count_store(self.handle, active)
            command = ReencryptFinish(job.job_id, job.cursor, remaining > 0, total)
        self.handle.propose(reencryption.encode_command(command), PROPOSE_TIMEOUT)
        return len(records)

    def _compact(self, job) -> None:
        """Compacts every member after a finished job, then records the outcome in the log
        (so a leader change between the two cannot lose the compaction)."""
        log.info("re-encryption job %d done: %d values rewritten, %d skipped (newer client "
                 "writes), %d pass(es); compacting every member", job.job_id, job.rewritten,
                 job.skipped, job.passes)
        self.compaction = "running"
        try:
            self.compaction = self.compact_cluster()
        except errors.SealkvError as exc:
            self.compaction = f"failed: {exc.message}"
        log.info("compaction after re-encryption: %s", self.compaction)
        ok = not self.compaction.startswith("failed")
        self.handle.propose(reencryption.encode_command(ReencryptCompacted(job.job_id, ok)),
                            PROPOSE_TIMEOUT)

"""The NOSPACE alarm, like etcd's: raised when a disk fills or the database quota is reached.

An alarm is replicated state (the ALARM core command, 0x30): every member sees every alarm,
and while one is active every replica refuses PUT and CAS at apply (deletes go on, reads are
served). `AlarmBoard` is the node-local side:

- `raise_alarm(cause)`: any code of this node that hits ENOSPC or the quota calls it (the
  database, the snapshot writer, the journal). It never blocks and never raises: the alarm
  takes effect on this node at once (its writes are refused) and a background thread proposes
  the ALARM entry until it is applied, so the other members refuse writes too. Safe from any
  thread, the pysyncobj tick thread included.
- `alarms()`: the active alarms, replicated ones plus this node's not yet replicated ones.
- `write_refusal()`: the RESOURCE_EXHAUSTED message writes get, or None.
- `disarm(timeout)`: proposes the disarm of every alarm (gRPC thread); writes resume. A member
  still short of space raises its alarm again at its next check.
- `check_space(cost, max_age)`: compares the database with the quota and the disk with its
  reserve, raising the alarm when one is exceeded; the node calls it before admitting a write
  (with a disk reading up to `WRITE_DISK_READING_AGE` old: one statvfs per write was a
  syscall and a GIL hand-off on every Put's path) and every `CHECK_PERIOD` seconds.

Nothing here imports pysyncobj: proposing goes through the callable the node hands in.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from sealkv.node.state import commands as cmd

log = logging.getLogger(__name__)

NOSPACE = "NOSPACE"
CAUSE_NAMES = {cmd.CAUSE_DISK_FULL: "disk-full", cmd.CAUSE_QUOTA: "quota"}
CAUSE_BY_NAME = {name: cause for cause, name in CAUSE_NAMES.items()}
CHECK_PERIOD = 1.0
# How old the disk reading a write's admission uses may be (the disk reserve covers what is
# written meanwhile; a write that still finds no space raises the alarm at apply).
WRITE_DISK_READING_AGE = 0.1
PROPOSE_TIMEOUT = 5.0
RETRY_PERIOD = 1.0
MIN_DISK_RESERVE = 1024 * 1024
MAX_DISK_RESERVE = 256 * 1024 * 1024


def alarm_message(member: str, cause: int) -> str:
    """The exact words a refused write and `sealkv alarm list` give for an alarm."""
    if cause == cmd.CAUSE_QUOTA:
        what = (f"the database of {member} reached its quota (--quota-backend-bytes); "
                "delete keys or raise the quota")
    else:
        what = f"the disk of {member} is full; free space on it"
    return (f"NOSPACE alarm: {what}, then run `sealkv alarm disarm`. Writes are refused "
            "until then; reads are served")


@dataclass(frozen=True, slots=True)
class Alarm:
    """One active alarm: who raised it, why, and whether the cluster has it yet."""

    member: str
    cause: int
    replicated: bool
    kind: str = NOSPACE

    @property
    def cause_name(self) -> str:
        return CAUSE_NAMES.get(self.cause, str(self.cause))

    @property
    def message(self) -> str:
        return alarm_message(self.member, self.cause)


def disk_reserve(total_bytes: int) -> int:
    """Free bytes a disk keeps back before the alarm: 1/8 of it, within 1 MiB..256 MiB."""
    return max(MIN_DISK_RESERVE, min(MAX_DISK_RESERVE, total_bytes // 8))


class AlarmBoard:
    """This node's view of the NOSPACE alarm (see the module docstring for the contract)."""

    def __init__(self, member: str, state_machine, propose: Callable[[bytes, float], object],
                 *, db_dir: Optional[str] = None, data_bytes: Callable[[], int] = lambda: 0,
                 quota_bytes: Optional[int] = None):
        self.member = member
        self.sm = state_machine
        self.propose = propose
        self.db_dir = db_dir
        self.data_bytes = data_bytes
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._local: dict[int, float] = {}   # cause -> when raised here, until replicated
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._disk_reading: Optional[tuple[float, int, int]] = None  # (when, free, total)

    # -- the API the rest of the node calls ---------------------------------------------

    def raise_alarm(self, cause: int = cmd.CAUSE_DISK_FULL, kind: str = NOSPACE) -> None:
        """Raises this member's alarm now, and replicates it in the background. Never blocks."""
        if kind != NOSPACE or cause not in CAUSE_NAMES:
            raise ValueError(f"unknown alarm {kind}/{cause}")
        if (self.member, cause) in self.sm.alarms:  # a dict read: no lock, never blocks
            return
        with self._lock:
            first = cause not in self._local
            self._local.setdefault(cause, time.monotonic())
        if first:
            log.error("%s", alarm_message(self.member, cause))
        self._wake.set()

    def alarms(self) -> list[Alarm]:
        """Returns the active alarms: replicated ones, then this node's pending ones."""
        replicated = self.sm.active_alarms()
        found = [Alarm(member, cause, True) for member, cause in sorted(replicated)]
        with self._lock:
            for cause in sorted(self._local):
                if (self.member, cause) not in replicated:
                    found.append(Alarm(self.member, cause, False))
        return found

    def write_refusal(self) -> Optional[str]:
        """Returns the message writes are refused with while an alarm is active, else None."""
        if not self._local and not self.sm.alarms:
            return None
        active = self.alarms()
        return active[0].message if active else None

    def disarm(self, timeout: float) -> object:
        """Proposes the disarm of every alarm and returns the apply result (gRPC thread)."""
        with self._lock:
            self._local.clear()
        return self.propose(cmd.encode(cmd.Alarm(cmd.ALARM_DISARM, cmd.CAUSE_ANY, "")), timeout)

    def check_space(self, cost: int = 0, max_age: float = 0.0) -> None:
        """Raises the alarm when the quota or the disk reserve would be exceeded by `cost`.

        The disk is read again unless the last reading is younger than `max_age` seconds.
        """
        if self.quota_bytes is not None and self.data_bytes() + cost > self.quota_bytes:
            self.raise_alarm(cmd.CAUSE_QUOTA)
        if self.db_dir is not None:
            now = time.monotonic()
            reading = self._disk_reading
            if reading is None or now - reading[0] >= max_age:
                try:
                    st = os.statvfs(self.db_dir)
                except OSError:
                    return
                reading = (now, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
                self._disk_reading = reading
            _, free, total = reading
            if free - cost < disk_reserve(total):
                self.raise_alarm(cmd.CAUSE_DISK_FULL)

    # -- background: periodic checks and replication of local alarms --------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alarms", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(PROPOSE_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(CHECK_PERIOD)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.check_space()
            except Exception as exc:  # a check must never kill the thread
                log.error("space check failed: %s", type(exc).__name__)
            self._replicate()

    def _replicate(self) -> None:
        replicated = self.sm.active_alarms()
        with self._lock:
            for cause in [c for c in self._local if (self.member, c) in replicated]:
                del self._local[cause]
            pending = sorted(self._local)
        for cause in pending:
            try:
                self.propose(cmd.encode(cmd.Alarm(cmd.ALARM_RAISE, cause, self.member)),
                             PROPOSE_TIMEOUT)
            except Exception as exc:
                log.warning("could not replicate the NOSPACE alarm yet (%s); retrying",
                            type(exc).__name__)
                self._stopping.wait(RETRY_PERIOD)
                self._wake.set()
                return
        if pending:
            self._wake.set()  # drop them from the local set at once

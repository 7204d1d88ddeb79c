"""The node-local side of the NOSPACE alarm: raise at once, replicate in the background,
refuse writes with exact words, check the quota and the disk reserve."""
import os
import threading

import pytest

from sealkv.node.state import commands as cmd
from sealkv.node.state.alarms import AlarmBoard, alarm_message, disk_reserve
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.memory import MemoryStore


class Log:
    """A one-member log for tests only: proposals apply to the state machine at once,
    unless `refuse` is set (then they fail like an unreachable leader)."""

    def __init__(self, sm):
        self.sm, self.index, self.refuse = sm, 0, False
        self.proposed = threading.Event()

    def propose(self, command, timeout):
        if self.refuse:
            raise TimeoutError("no leader")
        self.index += 1
        result = self.sm.apply(self.index, command)
        self.proposed.set()
        return result


@pytest.fixture
def board():
    sm = StateMachine(MemoryStore())
    log = Log(sm)
    b = AlarmBoard("n1", sm, log.propose, data_bytes=lambda: 0, quota_bytes=1000)
    b.log = log
    yield b
    b.stop()


def test_messages_say_which_member_and_what_to_do():
    assert alarm_message("n2", cmd.CAUSE_DISK_FULL) == (
        "NOSPACE alarm: the disk of n2 is full; free space on it, then run `sealkv alarm "
        "disarm`. Writes are refused until then; reads are served")
    assert alarm_message("n1", cmd.CAUSE_QUOTA) == (
        "NOSPACE alarm: the database of n1 reached its quota (--quota-backend-bytes); delete "
        "keys or raise the quota, then run `sealkv alarm disarm`. Writes are refused until "
        "then; reads are served")


def test_a_raised_alarm_refuses_writes_at_once_and_is_replicated_in_the_background(board):
    assert board.write_refusal() is None and board.alarms() == []
    board.log.refuse = True
    board.start()
    board.raise_alarm(cmd.CAUSE_DISK_FULL)
    assert board.write_refusal() == alarm_message("n1", cmd.CAUSE_DISK_FULL)
    [alarm] = board.alarms()
    assert (alarm.member, alarm.cause_name, alarm.replicated) == ("n1", "disk-full", False)
    board.log.refuse = False
    assert board.log.proposed.wait(10)
    board.sm.commit()
    [alarm] = board.alarms()
    assert alarm.replicated and board.sm.active_alarms() == {("n1", cmd.CAUSE_DISK_FULL): 1}


def test_an_alarm_another_member_raised_refuses_writes_here_too(board):
    board.sm.apply(1, cmd.encode(cmd.Alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n3")))
    assert board.write_refusal() == alarm_message("n3", cmd.CAUSE_QUOTA)


def test_disarm_clears_replicated_and_local_alarms(board):
    board.sm.apply(1, cmd.encode(cmd.Alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n3")))
    board.log.index = 1
    board.raise_alarm(cmd.CAUSE_DISK_FULL)
    board.disarm(1.0)
    assert board.alarms() == [] and board.write_refusal() is None


def test_check_space_raises_the_quota_alarm_when_a_write_would_exceed_it(board):
    board.check_space(cost=1000)
    assert board.write_refusal() is None
    board.check_space(cost=1001)
    assert [a.cause_name for a in board.alarms()] == ["quota"]


def test_check_space_raises_the_disk_alarm_below_the_reserve(board, tmp_path):
    board.db_dir = str(tmp_path)
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    board.check_space(cost=0)
    assert board.write_refusal() is None or free < disk_reserve(st.f_blocks * st.f_frsize)
    board.quota_bytes = None
    board.check_space(cost=free)
    assert [a.cause_name for a in board.alarms()] == ["disk-full"]


def test_disk_reserve_is_an_eighth_within_bounds():
    assert disk_reserve(8 * 1024 * 1024) == 1024 * 1024
    assert disk_reserve(1024) == 1024 * 1024
    assert disk_reserve(100 * 1024 ** 3) == 256 * 1024 * 1024


def test_unknown_alarms_are_refused(board):
    with pytest.raises(ValueError):
        board.raise_alarm(9)


def test_a_write_admission_reuses_a_recent_disk_reading(board, tmp_path, monkeypatch):
    board.db_dir = str(tmp_path)
    board.quota_bytes = None
    board.check_space()
    reads = []
    real = os.statvfs
    monkeypatch.setattr(os, "statvfs", lambda path: reads.append(path) or real(path))
    board.check_space(max_age=60)
    assert reads == []
    free = real(tmp_path).f_bavail * real(tmp_path).f_frsize
    board.check_space(cost=free, max_age=60)  # the cost still counts against the old reading
    assert [a.cause_name for a in board.alarms()] == ["disk-full"]
    board.check_space()
    assert reads == [str(tmp_path)]

"""The sealkv journal on its own: records, checksums, torn tails, group commit, compaction."""
import errno
import json
import logging
import os

import pytest

from sealkv.node import durable
from sealkv.node.durable import DamagedFile
from sealkv.node.replication import journal as j
from tests.damage import flip_bits


class CountingSync:
    """Counts fdatasync calls and performs them, for tests only."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fd):
        self.calls += 1
        os.fdatasync(fd)


def open_journal(path, **kw):
    return j.FileJournal(str(path), **kw)


def filled(path, count=5, **kw):
    journal = open_journal(path, **kw)
    for i in range(1, count + 1):
        journal.add(b"cmd-%d" % i, i, 1 + i // 3)
    assert journal.sync()
    return journal


def test_entries_round_trip_through_the_file(tmp_path):
    journal = filled(tmp_path, 5)
    journal._destroy()
    again = open_journal(tmp_path)
    assert len(again) == 5
    assert again[0] == (b"cmd-1", 1, 1)
    assert again[-1] == (b"cmd-5", 5, 2)
    assert again[1:3] == [(b"cmd-2", 2, 1), (b"cmd-3", 3, 2)]
    assert again.entries(1, None, 1) == [(b"cmd-2", 2, 1)]


def test_entries_appended_after_reopening_do_not_shadow_older_ones(tmp_path):
    filled(tmp_path, 5)._destroy()
    journal = open_journal(tmp_path)
    journal.add(b"cmd-6", 6, 3)
    assert [e[1] for e in journal[:]] == [1, 2, 3, 4, 5, 6]
    assert journal[0] == (b"cmd-1", 1, 1) and journal[5] == (b"cmd-6", 6, 3)


def test_entries_are_read_from_disk_when_the_cache_is_small(tmp_path):
    journal = open_journal(tmp_path, cache_bytes=64)
    for i in range(1, 201):
        journal.add(b"v" * 50, i, 1)
    assert journal.sync()
    assert len(journal._cache) < 10
    assert journal[0] == (b"v" * 50, 1, 1)
    assert [e[1] for e in journal[100:103]] == [101, 102, 103]


def test_record_format_carries_crc32c(tmp_path):
    assert j.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    record = j.encode_record(b"payload", 7, 3)
    assert record[-4:] == (j.crc32c(b"payload")).to_bytes(4, "little")


def test_add_only_buffers_and_one_sync_covers_the_group(tmp_path):
    counter = CountingSync()
    journal = open_journal(tmp_path, fdatasync=counter)
    base = counter.calls
    for i in range(1, 101):
        journal.add(b"x", i, 1)
    assert os.path.getsize(journal.path) == len(j.MAGIC)  # nothing written before sync
    assert journal.sync()
    assert counter.calls == base + 1
    assert journal.sync()  # nothing new: no second fdatasync
    assert counter.calls == base + 1


def test_never_policy_writes_but_does_not_fdatasync(tmp_path):
    counter = CountingSync()
    journal = open_journal(tmp_path, policy=durable.FSYNC_NEVER, fdatasync=counter)
    journal.add(b"x", 1, 1)
    assert journal.sync()
    assert counter.calls == 0
    assert os.path.getsize(journal.path) > len(j.MAGIC)


def test_torn_tail_is_truncated_with_one_warning(tmp_path, caplog):
    journal = filled(tmp_path, 5)
    size = journal.size_bytes  # where the records end (the file is preallocated beyond)
    journal._destroy()
    path = tmp_path / j.JOURNAL_FILE
    with open(path, "r+b") as f:
        f.truncate(size - 3)
    caplog.set_level(logging.WARNING)
    journal = open_journal(tmp_path)
    assert len(journal) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert str(path) in message and "torn tail at offset" in message
    assert path.stat().st_size < size - 3
    journal.add(b"again", 5, 2)
    assert journal.sync()
    journal._destroy()
    assert open_journal(tmp_path)[-1] == (b"again", 5, 2)


def test_zeroed_tail_is_a_torn_tail(tmp_path):
    filled(tmp_path, 3)._destroy()
    path = tmp_path / j.JOURNAL_FILE
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    assert len(open_journal(tmp_path)) == 3


def test_a_bit_flip_in_the_middle_refuses_to_open(tmp_path):
    journal = filled(tmp_path, 5)
    offset = journal._offsets[2]
    journal._destroy()
    path = tmp_path / j.JOURNAL_FILE
    flip_bits(path, offset + j.HEADER_SIZE + 1, 0x01)
    with pytest.raises(DamagedFile) as err:
        open_journal(tmp_path)
    message = str(err.value)
    assert f"{path}: journal record checksum mismatch at offset {offset};" in message
    assert "sealkv member remove" in message and "\n" not in message


def test_a_damaged_header_in_the_middle_refuses_to_open(tmp_path):
    journal = filled(tmp_path, 5)
    offset = journal._offsets[1]
    journal._destroy()
    path = tmp_path / j.JOURNAL_FILE
    flip_bits(path, offset, 0x80)  # the length: without a header checksum this would look torn
    with pytest.raises(DamagedFile, match=f"header checksum mismatch at offset {offset}"):
        open_journal(tmp_path)


def test_a_foreign_file_refuses_to_open(tmp_path):
    (tmp_path / j.JOURNAL_FILE).write_bytes(b"PYSYNCOBJ\0\0\0 old format")
    with pytest.raises(DamagedFile, match="not a sealkv journal at offset 0"):
        open_journal(tmp_path)


def test_delete_entries_from_truncates_written_and_buffered_records(tmp_path):
    journal = filled(tmp_path, 5)
    journal.add(b"buffered", 6, 3)
    journal.deleteEntriesFrom(3)
    assert len(journal) == 3 and journal[-1] == (b"cmd-3", 3, 2)
    journal.add(b"new-4", 4, 4)
    assert journal.sync()
    journal._destroy()
    again = open_journal(tmp_path)
    assert [e[0] for e in again[:]] == [b"cmd-1", b"cmd-2", b"cmd-3", b"new-4"]


def test_compaction_writes_a_new_file_without_the_old_records(tmp_path):
    journal = filled(tmp_path, 6)
    old_inode = os.stat(journal.path).st_ino
    journal.deleteEntriesTo(4)
    assert os.stat(journal.path).st_ino != old_inode  # a new file, renamed over the old one
    assert not os.path.exists(journal.path + ".compact")
    assert journal.first_index == 5 and len(journal) == 2
    assert b"cmd-1" not in open(journal.path, "rb").read()
    journal.add(b"cmd-7", 7, 3)
    assert journal.sync()
    journal._destroy()
    again = open_journal(tmp_path)
    assert [e[1] for e in again[:]] == [5, 6, 7]


def test_clear_then_add_restarts_the_log_at_any_index(tmp_path):
    journal = filled(tmp_path, 4)
    journal.clear()
    assert len(journal) == 0
    journal.add(b"dump-prev", 100, 5)
    journal.add(b"dump-last", 101, 5)
    assert journal.sync()
    journal._destroy()
    again = open_journal(tmp_path)
    assert (again.first_index, again.last_index) == (100, 101)
    assert b"cmd-" not in open(again.path, "rb").read()


def test_entries_must_be_contiguous(tmp_path):
    journal = filled(tmp_path, 2)
    with pytest.raises(ValueError, match="contiguous"):
        journal.add(b"gap", 9, 1)


def test_term_and_vote_are_durable_before_set_current_term_returns(tmp_path):
    record = tmp_path / "record.jsonl"
    os.environ[durable.RECORD_ENV] = str(record)
    try:
        journal = open_journal(tmp_path)
        journal.setCurrentTerm(7, "127.0.0.1:7002")
    finally:
        del os.environ[durable.RECORD_ENV]
    meta_path = str(tmp_path / j.META_FILE)
    synced = [json.loads(line) for line in record.read_text().splitlines()]
    assert {"path": meta_path, "size": os.path.getsize(meta_path)} in synced
    again = open_journal(tmp_path)
    assert (again.getCurrentTerm(), again.getVotedForNodeId()) == (7, "127.0.0.1:7002")


def test_commit_index_is_written_once_a_second_and_clamped_to_the_log(tmp_path):
    journal = filled(tmp_path, 3)
    journal.setRaftCommitIndex(9)
    journal.onOneSecondTimer()
    journal._destroy()
    assert open_journal(tmp_path).getRaftCommitIndex() == 3


@pytest.mark.parametrize("damage", ["garbage", "flip", "truncate", "empty"])
def test_a_damaged_meta_file_refuses_to_open(tmp_path, damage):
    journal = open_journal(tmp_path)
    journal.setCurrentTerm(3, None)
    journal._destroy()
    path = tmp_path / j.META_FILE
    raw = bytearray(path.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"\x80\x04}q\x00.")  # pysyncobj's pickled meta
    elif damage == "flip":
        raw[len(j.META_MAGIC) + 6] ^= 0x02
    elif damage == "truncate":
        raw = raw[:-2]
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(DamagedFile) as err:
        open_journal(tmp_path)
    assert str(path) in str(err.value) and "at offset" in str(err.value)
    assert "vote twice" in str(err.value)


class FullDisk:
    """An fdatasync that fails with ENOSPC while `full` is set, for tests only."""

    def __init__(self):
        self.full = True

    def __call__(self, fd):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fdatasync(fd)


def test_a_full_disk_is_reported_and_the_group_is_retried(tmp_path):
    disk = FullDisk()
    reported = []
    disk.full = False
    journal = open_journal(tmp_path, fdatasync=disk, on_disk_full=reported.append)
    disk.full = True
    journal.add(b"a", 1, 1)
    assert not journal.sync()
    assert journal.failing and reported == [journal.path]
    assert journal[0] == (b"a", 1, 1)  # still held, to be written by the next sync
    disk.full = False
    journal.add(b"b", 2, 1)
    assert journal.sync() and not journal.failing
    journal._destroy()
    assert [e[0] for e in open_journal(tmp_path)[:]] == [b"a", b"b"]


def test_install_makes_pysyncobj_use_the_journal(tmp_path):
    import pysyncobj.syncobj

    j.install()
    journal = open_journal(tmp_path)
    assert pysyncobj.syncobj.createJournal(journal) is journal


def test_a_pysyncobj_journal_is_migrated_and_removed(tmp_path):
    from pysyncobj.journal import FileJournal as LegacyJournal

    legacy_path = str(tmp_path / j.LEGACY_JOURNAL_FILE)
    legacy = LegacyJournal(legacy_path)
    for i in range(1, 4):
        legacy.add(b"old-%d" % i, i, 2)
    legacy.setCurrentTerm(5, "127.0.0.1:7003")
    legacy._destroy()
    journal = open_journal(tmp_path)
    assert [e for e in journal[:]] == [(b"old-%d" % i, i, 2) for i in range(1, 4)]
    assert (journal.getCurrentTerm(), journal.getVotedForNodeId()) == (5, "127.0.0.1:7003")
    assert not os.path.exists(legacy_path) and not os.path.exists(legacy_path + ".meta")


def test_leftovers_of_a_crashed_compaction_or_meta_write_are_removed_at_open(tmp_path):
    filled(tmp_path, 2)._destroy()
    for name in (j.JOURNAL_FILE + ".compact", j.META_FILE + ".tmp"):
        (tmp_path / name).write_bytes(b"old records")
    open_journal(tmp_path)._destroy()
    assert not (tmp_path / (j.JOURNAL_FILE + ".compact")).exists()
    assert not (tmp_path / (j.META_FILE + ".tmp")).exists()


def test_a_journal_cut_inside_its_magic_starts_empty(tmp_path):
    (tmp_path / j.JOURNAL_FILE).write_bytes(j.MAGIC[:5])
    journal = open_journal(tmp_path)
    assert len(journal) == 0
    journal.add(b"first", 1, 1)
    assert journal.sync()
    journal._destroy()
    assert (tmp_path / j.JOURNAL_FILE).read_bytes().startswith(j.MAGIC)
    assert open_journal(tmp_path)[0] == (b"first", 1, 1)


def test_the_preallocated_space_is_no_record_and_no_damage(tmp_path, caplog):
    journal = filled(tmp_path, 3)
    end = journal.size_bytes
    journal._destroy()
    path = tmp_path / j.JOURNAL_FILE
    assert path.stat().st_size >= j.PREALLOCATE_BYTES > end
    assert path.read_bytes()[end:].count(0) == path.stat().st_size - end
    caplog.set_level(logging.WARNING)
    journal = open_journal(tmp_path)
    assert len(journal) == 3 and journal.size_bytes == end
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    journal.add(b"next", 4, 2)  # written into the preallocated space, read back after it
    assert journal.sync()
    journal._destroy()
    again = open_journal(tmp_path)
    assert len(again) == 4 and again[-1] == (b"next", 4, 2)


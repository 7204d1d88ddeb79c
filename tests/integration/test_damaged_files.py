"""A node started on a damaged data directory: one line naming file, offset and fix.

Each test writes through a real one-node cluster, stops it, damages one file the way a disk
or a crash would, starts the node process again and checks what an operator sees: the exit
code and the single error line (no traceback, no crash loop), or, for a torn journal tail,
one WARNING and a node that serves.
"""
import os
import re
import signal

import pytest

from sealkv.node.replication import journal as j
from tests.cluster import wait_for
from tests.damage import flip_bits, middle

KEYS = 20


def compacting_config(tmp_path) -> str:
    path = tmp_path / "compact.toml"
    path.write_text("[raft_settings]\nlog_compaction_min_entries = 8\n")
    return str(path)


@pytest.fixture
def stopped_node(make_cluster, tmp_path):
    """A one-node cluster that wrote KEYS keys, compacted at least once, then stopped."""
    cluster = make_cluster(1, extra_args=["--config", compacting_config(tmp_path)])
    with cluster.client() as c:
        for i in range(KEYS):
            c.put(b"k%02d" % i, b"v%02d" % i)
    node = cluster.nodes["n1"]
    raft_dir = os.path.join(node.data_dir, "raft")
    wait_for(lambda: os.path.exists(os.path.join(raft_dir, "raft.dump")), 20, "a dump")
    cluster.kill("n1", signal.SIGTERM)
    return cluster, node, raft_dir


def restart(cluster, node) -> int:
    """Starts the node again and returns only what this run logged."""
    before = len(node.log())
    cluster.start_node(node.name)
    return before


def wait_exit(node, timeout=60.0) -> int:
    try:
        return node.proc.wait(timeout=timeout)
    except Exception:
        raise AssertionError(f"the node did not exit on a damaged directory:\n{node.log()[-3000:]}")


def problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]


def assert_one_line_refusal(node, since: int, path: str, code: int) -> str:
    assert wait_exit(node) == code
    text = node.log()[since:]
    assert "Traceback" not in text, text
    lines = problems(text)
    assert len(lines) == 1, text
    assert path in lines[0] and "at offset" in lines[0] and "sealkv member remove" in lines[0]
    return lines[0]


def journal_offsets(raft_dir: str) -> list[int]:
    return journal_layout(raft_dir)[0]


def journal_layout(raft_dir: str) -> tuple[list[int], int]:
    """The record offsets of a stopped node's journal and where its records end (the file is
    preallocated beyond)."""
    journal = j.FileJournal(raft_dir)
    try:
        return list(journal._offsets), journal.size_bytes
    finally:
        journal._destroy()


def test_a_bit_flipped_record_refuses_the_start(stopped_node):
    cluster, node, raft_dir = stopped_node
    path = os.path.join(raft_dir, j.JOURNAL_FILE)
    offsets = journal_offsets(raft_dir)
    assert len(offsets) >= 2
    with open(path, "r+b") as f:
        f.seek(offsets[0] + j.HEADER_SIZE)
        byte = f.read(1)
        f.seek(offsets[0] + j.HEADER_SIZE)
        f.write(bytes([byte[0] ^ 0x10]))
    since = restart(cluster, node)
    line = assert_one_line_refusal(node, since, path, 1)
    assert f"checksum mismatch at offset {offsets[0]}" in line
    # Started again, it refuses again the same way: no half-repaired state.
    since = restart(cluster, node)
    assert_one_line_refusal(node, since, path, 1)


def test_a_damaged_meta_file_refuses_the_start(stopped_node):
    cluster, node, raft_dir = stopped_node
    path = os.path.join(raft_dir, j.META_FILE)
    flip_bits(path, len(j.META_MAGIC) + 5, 0x20)
    since = restart(cluster, node)
    line = assert_one_line_refusal(node, since, path, 1)
    assert "vote twice" in line


def test_a_damaged_dump_halts_before_loading(stopped_node):
    cluster, node, raft_dir = stopped_node
    path = os.path.join(raft_dir, "raft.dump")
    flip_bits(path, middle(path), 0x01)
    since = restart(cluster, node)
    line = assert_one_line_refusal(node, since, path, 70)
    assert "dump checksum mismatch" in line


def test_a_torn_journal_tail_is_cut_with_one_warning_and_the_node_serves(stopped_node):
    cluster, node, raft_dir = stopped_node
    path = os.path.join(raft_dir, j.JOURNAL_FILE)
    offsets, end = journal_layout(raft_dir)
    with open(path, "r+b") as f:
        f.truncate(end - 5)
    since = restart(cluster, node)
    cluster.wait_leader()
    text = node.log()[since:]
    torn = [line for line in text.splitlines() if "torn tail" in line]
    assert len(torn) == 1 and " WARNING " in torn[0]
    assert f"{path}: torn tail at offset {offsets[-1]}" in torn[0]
    assert not problems(text) and "Traceback" not in text
    with cluster.client() as c:
        c.put(b"after", b"tear")
        assert c.get(b"after").kv.value == b"tear"
        assert c.get(b"k00").kv.value == b"v00"


def test_a_database_left_unflushed_by_another_boot_is_rebuilt_from_dump_and_log(make_cluster,
                                                                                tmp_path):
    """An operating-system crash or power loss may tear a database whose commits were not
    flushed (`--fsync always` flushes the journal, not each database commit): the node
    discards it and rebuilds it from its dump and log, with one WARNING."""
    cluster = make_cluster(1, extra_args=["--config", compacting_config(tmp_path)])
    node = cluster.nodes["n1"]
    with cluster.client() as c:
        for i in range(KEYS):
            c.put(b"k%02d" % i, b"v%02d" % i)
        wait_for(lambda: os.path.exists(os.path.join(node.data_dir, "raft", "raft.dump")), 20,
                 "a dump")
        c.put(b"after-dump", b"in the log only")
    db_dir = os.path.join(node.data_dir, "db")
    cluster.kill("n1", signal.SIGKILL)  # no clean close: db/unsynced stays
    with open(os.path.join(db_dir, "unsynced"), "w") as f:
        f.write("a-boot-before-this-one\n")
    with open(os.path.join(db_dir, "data.mdb"), "r+b") as f:  # torn beyond LMDB's repair
        f.write(b"\0" * os.path.getsize(os.path.join(db_dir, "data.mdb")))
    since = restart(cluster, node)
    cluster.wait_leader()
    text = node.log()[since:]
    assert [line for line in text.splitlines() if "not flushed before the system restarted"
            in line and " WARNING " in line]
    assert not problems(text) and "Traceback" not in text
    with cluster.client() as c:
        assert [c.get(b"k%02d" % i).kv.value for i in range(KEYS)] == \
            [b"v%02d" % i for i in range(KEYS)]
        assert c.get(b"after-dump").kv.value == b"in the log only"

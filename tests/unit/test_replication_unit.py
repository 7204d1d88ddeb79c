"""The replication adapter without a Raft process: secrets, halts and its dump format."""
import os
import time

import pytest
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.node import TCPNode

from sealkv.node.state import commands as cmd
from sealkv.node import errors
from sealkv.node.durable import DamagedFile
from sealkv.node.replication.adapter import ReplicationAdapter, _DumpNotRenamed
from sealkv.node.replication.payload_codec import IdentityCodec
from sealkv.node.replication.settings import RaftSettings
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.base import Entry
from sealkv.node.state.storage.lmdb_store import LmdbStore
from sealkv.node.state.storage.memory import MemoryStore
from tests.damage import flip_bits, middle

SELF = "127.0.0.1:7001"
PEERS = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
N1 = MemberRecord("n1", SELF, "127.0.0.1:9001", cmd.ROLE_VOTER)


class FakeRaft:
    """Stands in for the SyncObj in apply tests, for tests only: just the applied index."""

    def __init__(self, last_applied: int):
        self.raftLastApplied = last_applied


class HaltRecorder:
    """Records halt reasons instead of exiting the process, for tests only."""

    def __init__(self):
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


def adapter(tmp_path, sm=None, halt=None, partners=(), secret=None, last_applied=0):
    a = ReplicationAdapter(sm or StateMachine(MemoryStore(), [N1]), raft_address=SELF,
                           partners=list(partners), data_dir=str(tmp_path), secret=secret,
                           halt=halt)
    a._obj = FakeRaft(last_applied)
    return a


# -- secrets ------------------------------------------------------------------------------


def test_partners_without_secret_are_refused(tmp_path):
    for secret in (None, ""):
        with pytest.raises(ValueError, match="needs a cluster secret \\(--secret-file\\)"):
            ReplicationAdapter(StateMachine(MemoryStore()), raft_address=SELF, partners=PEERS,
                               data_dir=str(tmp_path), secret=secret)


def test_learner_following_voters_needs_a_secret_too(tmp_path):
    with pytest.raises(ValueError, match="secret"):
        ReplicationAdapter(StateMachine(MemoryStore()), raft_address=None, partners=PEERS,
                           data_dir=str(tmp_path), secret=None)


def test_single_node_needs_no_secret_and_own_address_is_not_a_partner(tmp_path):
    a = ReplicationAdapter(StateMachine(MemoryStore()), raft_address=SELF, partners=[SELF],
                           data_dir=str(tmp_path), secret=None)
    assert a.partners == []
    b = ReplicationAdapter(StateMachine(MemoryStore()), raft_address=SELF, partners=PEERS,
                           data_dir=str(tmp_path), secret="0123456789abcdef")
    assert b.partners == PEERS[1:]


def test_invalid_settings_are_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="raft.max_timeout"):
        ReplicationAdapter(StateMachine(MemoryStore()), raft_address=SELF, partners=[],
                           data_dir=str(tmp_path), secret=None,
                           settings=RaftSettings(raft_max_timeout=0.1))


# -- apply and halt -----------------------------------------------------------------------


def test_apply_uses_the_next_log_index(tmp_path):
    a = adapter(tmp_path, last_applied=41)
    result = a._apply(cmd.encode(cmd.Put(b"k", b"v")))
    assert result.revision == 42
    assert a.sm.get(b"k") == (Entry(b"v", 42, 42, 1), 42)


def test_apply_halt_calls_halt_instead_of_raising(tmp_path):
    halt = HaltRecorder()
    a = adapter(tmp_path, halt=halt, last_applied=9)
    a.sm.apply(9, cmd.encode(cmd.Put(b"k", b"v")))
    assert a._apply(b"\x7e\x01garbage") is None  # returns: never raises into pysyncobj
    assert len(halt.reasons) == 1
    assert "entry 10" in halt.reasons[0] and "unknown opcode 0x7e" in halt.reasons[0]
    assert a.halted
    assert a.sm.applied_index == 9
    assert a.sm.get(b"k")[0] == Entry(b"v", 9, 9, 1)


def test_unexpected_exception_from_the_state_machine_also_halts(tmp_path):
    class ExplodingStateMachine(StateMachine):
        """A state machine that breaks its contract by raising, for tests only."""

        def apply(self, index, command):
            raise RuntimeError("secret-value")

    halt = HaltRecorder()
    a = adapter(tmp_path, sm=ExplodingStateMachine(MemoryStore()), halt=halt, last_applied=2)
    a._apply(b"\x01")
    assert len(halt.reasons) == 1
    assert halt.reasons[0].startswith("entry 3: unexpected RuntimeError at test_replication_unit.py:")
    assert "secret-value" not in halt.reasons[0]  # an exception message may carry a value


def test_a_halted_adapter_refuses_proposals(tmp_path):
    a = adapter(tmp_path, halt=HaltRecorder())
    a._apply(b"")
    with pytest.raises(errors.Unavailable, match="halted"):
        a.propose(cmd.encode(cmd.Put(b"k", b"v")), timeout=0.1)


# -- dump files ---------------------------------------------------------------------------


def filled_state_machine():
    sm = StateMachine(MemoryStore(), [N1])
    sm.apply(1, cmd.encode(cmd.Put(b"a", b"1")))
    sm.apply(2, cmd.encode(cmd.Put(b"b", b"\x00\xff")))
    sm.apply(3, cmd.encode(cmd.MemberSet("n2", PEERS[1], "127.0.0.1:9002", cmd.ROLE_VOTER)))
    return sm


def write_dump(a, path, data):
    """Drives a dump the way pysyncobj does: the serializer hook (on LMDB it writes in the
    background and renames the file itself), pysyncobj's rename otherwise, then the checker."""
    try:
        a._dump.start(path + ".tmp", data)
        os.replace(path + ".tmp", path)
    except _DumpNotRenamed:
        pass
    deadline = time.monotonic() + 10
    while (state := a._dump.check()) == SERIALIZER_STATE.SERIALIZING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert state == SERIALIZER_STATE.SUCCESS
    assert not os.path.exists(path + ".tmp")


def test_dump_round_trip_restores_state_and_log_position(tmp_path):
    source = adapter(tmp_path, sm=filled_state_machine())
    last, previous = (b"\x00(3)", 3, 1), (b"\x00(2)", 2, 1)
    path = str(tmp_path / "raft.dump")
    write_dump(source, path, (last, previous, {TCPNode(p) for p in PEERS}))

    target = adapter(tmp_path)
    got_last, got_previous, cluster = target._read_dump(path)
    assert (got_last, got_previous) == (last, previous)
    assert sorted(getattr(n, "address", n) for n in cluster) == PEERS
    assert target.sm.digest() == source.sm.digest()
    assert target.sm.member_directory() == source.sm.member_directory()


def test_read_dump_refuses_a_foreign_file_and_halts(tmp_path):
    path = tmp_path / "raft.dump"
    path.write_bytes(b"\x1f\x8bnot ours")
    halt = HaltRecorder()
    with pytest.raises(DamagedFile, match="not a sealkv dump at offset 0"):
        adapter(tmp_path, halt=halt)._read_dump(str(path))
    assert len(halt.reasons) == 1 and str(path) in halt.reasons[0]


def test_a_flipped_bit_in_a_dump_is_refused_before_anything_is_restored(tmp_path):
    source = adapter(tmp_path, sm=filled_state_machine())
    path = tmp_path / "raft.dump"
    source._write_dump(str(path), ((b"x", 3, 1), (b"y", 2, 1), {TCPNode(p) for p in PEERS}))
    flip_bits(path, middle(path), 0x04)
    halt = HaltRecorder()
    target = adapter(tmp_path, halt=halt)
    before = target.sm.digest()
    with pytest.raises(DamagedFile, match="dump checksum mismatch"):
        target._read_dump(str(path))
    assert target.sm.digest() == before
    assert halt.reasons and "raft.dump" in halt.reasons[0]


def test_a_snapshot_the_state_machine_refuses_halts_and_is_not_acknowledged(tmp_path):
    source = adapter(tmp_path, sm=filled_state_machine())
    path = tmp_path / "raft.dump"
    source._write_dump(str(path), ((b"x", 3, 1), (b"y", 2, 1), {TCPNode(p) for p in PEERS}))

    class RefusingStateMachine(StateMachine):
        def read_snapshot(self, src, **kwargs):
            raise errors.ApplyHalt("the encryption plugin refuses this snapshot")

    halt = HaltRecorder()
    target = adapter(tmp_path, sm=RefusingStateMachine(MemoryStore(), [N1]), halt=halt)
    with pytest.raises(DamagedFile, match="snapshot refused"):
        target._read_dump(str(path))
    assert target.halted and len(halt.reasons) == 1


def test_dump_cluster_entries_compare_equal_to_pysyncobj_nodes(tmp_path):
    source = adapter(tmp_path, sm=filled_state_machine())
    path = str(tmp_path / "raft.dump")
    write_dump(source, path, ((b"x", 3, 1), (b"y", 2, 1), {TCPNode(p) for p in PEERS}))
    _, _, cluster = adapter(tmp_path)._read_dump(path)
    self_node = TCPNode(SELF)
    # Exactly the filter pysyncobj applies when it loads a dump.
    assert [n for n in cluster if n != self_node] == [TCPNode(p) for p in PEERS[1:]]


def lmdb_machine(path):
    store = LmdbStore(str(path), map_size=64 * 1024 * 1024)
    store.open()
    return StateMachine(store, [N1]), store


def test_on_lmdb_the_dump_is_written_from_a_read_transaction_in_the_background(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    for i in range(1, 4):
        sm.apply(i, cmd.encode(cmd.Put(b"k%d" % i, b"v")))
    source = adapter(tmp_path, sm=sm)
    path = str(tmp_path / "raft.dump")
    with pytest.raises(_DumpNotRenamed):  # pysyncobj must not rename: the writer does
        source._dump.start(path + ".tmp", ((b"x", 3, 1), (b"y", 2, 1), set()))
    sm.apply(4, cmd.encode(cmd.Put(b"late", b"v")))  # applying goes on meanwhile
    deadline = time.monotonic() + 10
    while (state := source._dump.check()) == SERIALIZER_STATE.SERIALIZING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert state == SERIALIZER_STATE.SUCCESS and os.path.exists(path)

    target_sm, target_store = lmdb_machine(tmp_path / "db2")
    adapter(tmp_path, sm=target_sm)._read_dump(path)
    assert target_sm.applied_index == 3 and target_sm.get(b"k3")[0] is not None
    assert target_sm.get(b"late")[0] is None  # the view was opened at index 3
    source.wait_dump_written(5)
    store.close()
    target_store.close()


def test_a_dump_the_database_already_covers_is_checked_but_not_loaded(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    sm.apply(1, cmd.encode(cmd.Put(b"a", b"1")))
    a = adapter(tmp_path, sm=sm)
    path = str(tmp_path / "raft.dump")
    write_dump(a, path, ((b"x", 1, 1), (b"y", 0, 1), set()))
    sm.apply(2, cmd.encode(cmd.Put(b"b", b"2")))
    last, _, _ = a._read_dump(path)
    assert last == (b"x", 1, 1)
    assert sm.applied_index == 2 and sm.get(b"b")[0] is not None  # not rolled back to 1
    store.close()


class RecordingCodec(IdentityCodec):
    """The identity codec that records the snapshots it is told of, for tests only."""

    def __init__(self):
        self.snapshots: list[int] = []

    def snapshot_taken(self, index: int) -> None:
        self.snapshots.append(index)


def test_loading_a_dump_tells_the_codec_the_log_before_it_is_gone(tmp_path):
    # A follower installing the leader's snapshot drops its whole log: a codec counting the
    # retained log's users of a key (the raft envelope) must forget the entries before it,
    # or a key nothing uses any more would count as used until this node compacts itself.
    source = adapter(tmp_path, sm=filled_state_machine())
    path = str(tmp_path / "raft.dump")
    write_dump(source, path, ((b"x", 3, 1), (b"y", 2, 1), {TCPNode(p) for p in PEERS}))
    target = adapter(tmp_path)
    target.codec = codec = RecordingCodec()
    target._read_dump(path)
    assert codec.snapshots == [2]  # pysyncobj keeps `previous` and `last` in the log

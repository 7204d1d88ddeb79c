"""The pure state machine: KV semantics, revisions, members, halts and snapshots."""
import io
import threading

import pytest

from sealkv.node.state import commands as cmd
from sealkv.node.replication.membership import MemberRecord
from sealkv.node.state.machine import StateMachine
from sealkv.node.state.storage.base import VALUE_ENCRYPTED, Entry, StorageLayer
from sealkv.node.state.storage.memory import MemoryStore
from sealkv.node.errors import ApplyHalt

N1 = MemberRecord("n1", "127.0.0.1:7001", "127.0.0.1:9001", cmd.ROLE_VOTER)
N2 = MemberRecord("n2", "127.0.0.1:7002", "127.0.0.1:9002", cmd.ROLE_VOTER)


class CounterState:
    """A tiny plugin state for tests only: counts applies of opcode 0x40."""

    def __init__(self):
        self.count = 0

    def handler(self, index, body):
        self.count += 1
        return ("counted", index, body)

    def snapshot_state(self) -> bytes:
        return self.count.to_bytes(4, "big")

    def restore_state(self, data: bytes) -> None:
        self.count = int.from_bytes(data, "big") if data else 0


def make(members=(N1,), plugin=None):
    handlers = {0x40: plugin.handler} if plugin else None
    states = {"counter": plugin} if plugin else None
    return StateMachine(MemoryStore(), members, handlers, states)


def put(sm, index, key, value):
    return sm.apply(index, cmd.encode(cmd.Put(key, value)))


def cas(sm, index, key, value, expected=0, must_not_exist=False):
    mode = cmd.CAS_MUST_NOT_EXIST if must_not_exist else cmd.CAS_BY_REVISION
    return sm.apply(index, cmd.encode(cmd.CompareAndSwap(key, value, mode, expected)))


# -- put / get / delete -------------------------------------------------------------------


def test_put_then_get_uses_log_index_as_revision():
    sm = make()
    result = put(sm, 5, b"a", b"1")
    assert result.revision == 5 and result.prev is None and result.succeeded
    entry, applied = sm.get(b"a")
    assert entry == Entry(b"1", 5, 5, 1)
    assert applied == 5


def test_overwrite_keeps_create_revision_and_counts_versions():
    sm = make()
    put(sm, 3, b"a", b"1")
    put(sm, 4, b"other", b"x")
    result = put(sm, 9, b"a", b"2")
    assert result.prev == Entry(b"1", 3, 3, 1)
    entry, _ = sm.get(b"a")
    assert (entry.value, entry.create_revision, entry.mod_revision, entry.version) == (b"2", 3, 9, 2)
    put(sm, 10, b"a", b"3")
    assert sm.get(b"a")[0].version == 3


def test_get_missing_key():
    sm = make()
    put(sm, 1, b"a", b"1")
    assert sm.get(b"b") == (None, 1)


def test_delete_existing_and_missing():
    sm = make()
    put(sm, 1, b"a", b"1")
    result = sm.apply(2, cmd.encode(cmd.Delete(b"a")))
    assert result.succeeded and result.prev == Entry(b"1", 1, 1, 1)
    assert sm.get(b"a") == (None, 2)
    missing = sm.apply(3, cmd.encode(cmd.Delete(b"a")))
    assert not missing.succeeded and missing.prev is None
    assert sm.applied_index == 3


def test_recreate_after_delete_starts_a_new_lifetime():
    sm = make()
    put(sm, 1, b"a", b"1")
    put(sm, 2, b"a", b"2")
    sm.apply(3, cmd.encode(cmd.Delete(b"a")))
    put(sm, 4, b"a", b"3")
    assert sm.get(b"a")[0] == Entry(b"3", 4, 4, 1)


def test_barrier_changes_nothing_but_applied_index():
    sm = make()
    put(sm, 1, b"a", b"1")
    before = sm.digest()[0]
    assert sm.apply(2, cmd.encode(cmd.Barrier())).revision == 2
    assert sm.applied_index == 2
    assert sm.digest()[0] == before


# -- compare and swap ---------------------------------------------------------------------


def test_cas_by_revision_succeeds_on_current_mod_revision():
    sm = make()
    put(sm, 4, b"a", b"1")
    result = cas(sm, 7, b"a", b"2", expected=4)
    assert result.succeeded
    assert result.current == Entry(b"2", 4, 7, 2)
    assert sm.get(b"a")[0] == Entry(b"2", 4, 7, 2)


@pytest.mark.parametrize("expected", [3, 5, 0])
def test_cas_by_stale_revision_fails_and_changes_nothing(expected):
    sm = make()
    put(sm, 4, b"a", b"1")
    before = sm.digest()[0]
    result = cas(sm, 7, b"a", b"2", expected=expected)
    assert not result.succeeded
    assert result.current == Entry(b"1", 4, 4, 1)
    assert sm.get(b"a")[0] == Entry(b"1", 4, 4, 1)
    assert sm.digest()[0] == before


def test_cas_by_revision_on_missing_key_fails():
    sm = make()
    result = cas(sm, 2, b"a", b"1", expected=1)
    assert not result.succeeded and result.current is None
    assert sm.get(b"a")[0] is None


def test_cas_must_not_exist():
    sm = make()
    created = cas(sm, 2, b"a", b"1", must_not_exist=True)
    assert created.succeeded and created.current == Entry(b"1", 2, 2, 1)
    again = cas(sm, 3, b"a", b"2", must_not_exist=True)
    assert not again.succeeded and again.current == Entry(b"1", 2, 2, 1)
    assert sm.get(b"a")[0].value == b"1"


# -- range --------------------------------------------------------------------------------


@pytest.fixture
def filled():
    sm = make()
    for i, key in enumerate([b"a", b"b", b"ba", b"bb", b"c", b"d"], start=1):
        put(sm, i, key, key.upper())
    return sm


def test_range_bounds_are_half_open(filled):
    pairs, total, applied = filled.range(b"b", b"c", 100, False)
    assert [k for k, _ in pairs] == [b"b", b"ba", b"bb"]
    assert [e.value for _, e in pairs] == [b"B", b"BA", b"BB"]
    assert total == 3 and applied == 6


def test_range_without_end_runs_to_the_last_key(filled):
    pairs, total, _ = filled.range(b"bb", None, 100, False)
    assert [k for k, _ in pairs] == [b"bb", b"c", b"d"] and total == 3


def test_range_limit_truncates_but_count_is_total(filled):
    pairs, total, _ = filled.range(b"", None, 2, False)
    assert [k for k, _ in pairs] == [b"a", b"b"]
    assert total == 6


def test_range_keys_only_and_empty(filled):
    pairs, total, _ = filled.range(b"b", b"c", 100, True)
    assert [k for k, _ in pairs] == [b"b", b"ba", b"bb"] and total == 3
    assert filled.range(b"x", b"z", 100, False)[:2] == ([], 0)


# -- member directory ---------------------------------------------------------------------


def test_member_set_and_remove_bump_config_version():
    sm = make()
    directory, version = sm.member_directory()
    assert directory == {"n1": N1} and version == 0
    sm.apply(4, cmd.encode(cmd.MemberSet(N2.name, N2.raft_address, N2.grpc_address, N2.role)))
    directory, version = sm.member_directory()
    assert directory == {"n1": N1, "n2": N2} and version == 4
    result = sm.apply(6, cmd.encode(cmd.MemberRemove("n1")))
    assert result.succeeded
    directory, version = sm.member_directory()
    assert directory == {"n2": N2} and version == 6
    missing = sm.apply(7, cmd.encode(cmd.MemberRemove("nobody")))
    assert not missing.succeeded


def test_member_directory_is_a_copy():
    sm = make()
    directory, _ = sm.member_directory()
    directory.clear()
    assert sm.member_directory()[0] == {"n1": N1}


# -- batches ------------------------------------------------------------------------------


def batch(*commands):
    return cmd.encode(cmd.Batch(tuple(commands)))


def test_batch_applies_in_order_with_one_result_per_command():
    sm = make()
    put(sm, 3, b"old", b"x")
    results = sm.apply(7, batch(cmd.Put(b"a", b"1"), cmd.Put(b"a", b"2"), cmd.Delete(b"old"),
                                cmd.Delete(b"never"), cmd.Barrier()))
    assert len(results) == 5
    assert [r.revision for r in results] == [7] * 5
    assert results[0].prev is None and results[1].prev == Entry(b"1", 7, 7, 1)
    assert results[2].succeeded and results[2].prev == Entry(b"x", 3, 3, 1)
    assert not results[3].succeeded
    assert sm.get(b"a") == (Entry(b"2", 7, 7, 2), 7)
    assert sm.get(b"old") == (None, 7)
    assert sm.applied_index == 7


def test_cas_failure_inside_a_batch_leaves_siblings_applied():
    sm = make()
    put(sm, 2, b"k", b"v")
    results = sm.apply(5, batch(
        cmd.CompareAndSwap(b"k", b"lost", cmd.CAS_BY_REVISION, 1),      # stale: fails
        cmd.Put(b"other", b"o"),
        cmd.CompareAndSwap(b"k", b"won", cmd.CAS_BY_REVISION, 2),       # current: succeeds
        cmd.CompareAndSwap(b"k", b"late", cmd.CAS_BY_REVISION, 2)))     # now stale: fails
    assert [r.succeeded for r in results] == [False, True, True, False]
    assert results[0].current == Entry(b"v", 2, 2, 1)
    assert results[3].current == Entry(b"won", 2, 5, 2)
    assert sm.get(b"k")[0].value == b"won" and sm.get(b"other")[0].value == b"o"


def test_undecodable_batch_halts_before_applying_any_sub_command():
    sm = make()
    good = cmd.encode(cmd.Put(b"a", b"1"))
    wire = (b"\x12\x01\x00\x02" + len(good).to_bytes(4, "big") + good
            + (5).to_bytes(4, "big") + b"\x01\x01\x00")
    with pytest.raises(ApplyHalt, match="undecodable"):
        sm.apply(4, wire)
    assert sm.get(b"a") == (None, 0) and sm.applied_index == 0


def test_batch_and_single_commands_reach_the_same_state():
    one, many = make(), make()
    commands = [cmd.Put(b"a", b"1"), cmd.Put(b"b", b"2"), cmd.Delete(b"a"),
                cmd.CompareAndSwap(b"c", b"3", cmd.CAS_MUST_NOT_EXIST, 0)]
    # A log index applies once (a second apply at an index is a replay and is skipped), so
    # the single commands take consecutive indexes: compare everything but the revisions.
    for i, c in enumerate(commands):
        one.apply(9 + i, cmd.encode(c))
    many.apply(9, batch(*commands))

    def state(sm):
        pairs, count, _ = sm.range(b"", None, 100, False)
        return count, [(k, e.value, e.version) for k, e in pairs]
    assert state(one) == state(many) == (2, [(b"b", b"2", 1), (b"c", b"3", 1)])


# -- halts --------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"", b"\x01", b"\x7e\x01", b"\x01\x09\x00\x01kv", b"\x02\x01\x00\x05ab", b"\x11\x01\x00",
], ids=["empty", "short", "unknown-opcode", "bad-version", "truncated", "trailing"])
def test_garbage_halts_without_changing_state(garbage):
    sm = make()
    put(sm, 1, b"a", b"1")
    before = sm.digest()
    with pytest.raises(ApplyHalt, match="entry 2"):
        sm.apply(2, garbage)
    assert sm.applied_index == 1
    assert sm.digest() == before
    assert sm.get(b"a")[0] == Entry(b"1", 1, 1, 1)


def test_failing_store_write_halts_and_keeps_applied_index():
    class BrokenLayer(StorageLayer):
        """A layer whose writes fail, for tests only."""

        def put(self, key, entry):
            raise OSError("disk on fire")

    sm = StateMachine(BrokenLayer(MemoryStore()), [N1])
    with pytest.raises(ApplyHalt, match="OSError"):
        put(sm, 1, b"a", b"1")
    assert sm.applied_index == 0


class ReversingLayer(StorageLayer):
    """Stores values reversed and marked encrypted, like an envelope layer; for tests only."""

    def put(self, key, entry):
        self.inner.put(key, Entry(entry.value[::-1], entry.create_revision, entry.mod_revision,
                                  entry.version, VALUE_ENCRYPTED))

    def decode_entry(self, key, entry):
        return Entry(entry.value[::-1], entry.create_revision, entry.mod_revision,
                     entry.version)


def test_write_results_carry_entries_as_stored_and_reveal_decodes_them():
    sm = StateMachine(ReversingLayer(MemoryStore()), [N1])
    put(sm, 1, b"k", b"abc")
    put_again = sm.apply(2, cmd.encode(cmd.Put(b"k", b"def")))
    assert put_again.prev.value == b"cba" and put_again.prev.state == VALUE_ENCRYPTED
    ok = sm.apply(3, cmd.encode(cmd.CompareAndSwap(b"k", b"ghi", cmd.CAS_BY_REVISION, 2)))
    failed = sm.apply(4, cmd.encode(cmd.CompareAndSwap(b"k", b"x", cmd.CAS_BY_REVISION, 2)))
    for result, value in ((ok, b"ghi"), (failed, b"ghi")):
        assert result.current.value == value[::-1] and result.current.state == VALUE_ENCRYPTED
        assert sm.reveal(b"k", result.current) == Entry(value, 1, 3, 3)
    gone = sm.apply(5, cmd.encode(cmd.Delete(b"k")))
    assert sm.reveal(b"k", gone.prev).value == b"ghi"


def test_plugin_handler_receives_index_and_body():
    plugin = CounterState()
    sm = make(plugin=plugin)
    assert sm.apply(3, b"\x40payload") == ("counted", 3, b"payload")
    assert plugin.count == 1 and sm.applied_index == 3


def test_plugin_handler_halt_propagates_unchanged():
    def refuse(index, body):
        raise ApplyHalt("plugin says no")

    sm = StateMachine(MemoryStore(), [N1], {0x41: refuse})
    with pytest.raises(ApplyHalt, match="plugin says no"):
        sm.apply(1, b"\x41")
    assert sm.applied_index == 0


@pytest.mark.parametrize("opcode", sorted(cmd.CORE_OPCODES))
def test_plugin_opcode_clash_with_core_is_refused(opcode):
    with pytest.raises(ValueError, match="clash"):
        StateMachine(MemoryStore(), [N1], {opcode: lambda i, b: None})


# -- snapshots and digests ----------------------------------------------------------------


def build_state(plugin=None):
    sm = make(plugin=plugin)
    put(sm, 1, b"a", b"1")
    put(sm, 2, b"b\x00\xff", b"\x00binary\xff")
    put(sm, 3, b"a", b"1b")
    put(sm, 4, b"empty", b"")
    sm.apply(5, cmd.encode(cmd.MemberSet(N2.name, N2.raft_address, N2.grpc_address, N2.role)))
    if plugin:
        sm.apply(6, b"\x40x")
        sm.apply(7, b"\x40y")
    return sm


def test_snapshot_round_trip_restores_everything():
    source_plugin = CounterState()
    source = build_state(source_plugin)
    buf = io.BytesIO()
    source.write_snapshot(buf)

    target_plugin = CounterState()
    target = make(members=(), plugin=target_plugin)
    put(target, 1, b"stale", b"must disappear")
    buf.seek(0)
    target.read_snapshot(buf)

    assert target.digest() == source.digest()
    assert target.get(b"stale")[0] is None
    assert target.get(b"a")[0] == Entry(b"1b", 1, 3, 2)
    assert target.get(b"b\x00\xff")[0] == Entry(b"\x00binary\xff", 2, 2, 1)
    assert target.get(b"empty")[0] == Entry(b"", 4, 4, 1)
    assert target.member_directory() == ({"n1": N1, "n2": N2}, 5)
    assert target.applied_index == 7
    assert target_plugin.count == 2


def test_a_snapshot_is_written_without_holding_the_state_lock():
    sm = make()
    put(sm, 1, b"a", b"1")
    put(sm, 2, b"b", b"2")
    free = []

    class Probe(io.BytesIO):
        """A snapshot sink for tests only: at each write, can another thread take the lock?"""

        def write(self, data):
            t = threading.Thread(target=lambda: free.append(sm.lock.acquire(blocking=False)
                                                            and (sm.lock.release() or True)))
            t.start()
            t.join()
            return super().write(data)

    out = Probe()
    assert sm.write_snapshot(out) == 2
    assert free and all(free)
    restored = make()
    out.seek(0)
    restored.read_snapshot(out)
    assert restored.digest() == sm.digest()


def test_snapshot_of_empty_state_round_trips():
    source = StateMachine(MemoryStore())
    buf = io.BytesIO()
    source.write_snapshot(buf)
    target = build_state()
    target.read_snapshot(io.BytesIO(buf.getvalue()))
    assert target.range(b"", None, 100, False)[:2] == ([], 0)
    assert target.member_directory() == ({}, 0)
    assert target.applied_index == 0


def test_read_snapshot_refuses_foreign_and_truncated_data():
    sm = build_state()
    buf = io.BytesIO()
    sm.write_snapshot(buf)
    target = make()
    with pytest.raises(ValueError, match="not a sealkv snapshot"):
        target.read_snapshot(io.BytesIO(b"NOTASNAP" + buf.getvalue()[8:]))
    with pytest.raises(ValueError, match="truncated"):
        target.read_snapshot(io.BytesIO(buf.getvalue()[:-5]))


def test_digest_equal_for_equal_states_and_sensitive_to_values():
    a, b = build_state(), build_state()
    assert a.digest() == b.digest()
    digest, count, applied = a.digest()
    assert count == 3 and applied == 5
    put(a, 6, b"a", b"X")
    put(b, 6, b"a", b"Y")
    assert a.digest()[0] != b.digest()[0]


def test_digest_sensitive_to_revisions_and_members():
    a, b = build_state(), build_state()
    put(a, 6, b"z", b"1")
    put(b, 7, b"z", b"1")  # same value, different revision
    assert a.digest()[0] != b.digest()[0]
    c, d = build_state(), build_state()
    d.apply(6, cmd.encode(cmd.MemberRemove("n2")))
    c.apply(6, cmd.encode(cmd.Barrier()))
    assert c.digest()[0] != d.digest()[0]


# -- on LMDB: one transaction per apply or group, restart from the database ----------------

from sealkv.node.state.storage.lmdb_store import LmdbStore  # noqa: E402


def lmdb_machine(path, plugin=None, members=(N1,)):
    store = LmdbStore(str(path), map_size=64 * 1024 * 1024)
    store.open()
    handlers = {0x40: plugin.handler} if plugin else None
    states = {"counter": plugin} if plugin else None
    return StateMachine(store, members, handlers, states), store


def test_restart_loads_the_applied_index_members_and_plugin_state_from_the_database(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db", CounterState())
    put(sm, 1, b"a", b"1")
    sm.apply(2, cmd.encode(cmd.MemberSet("n2", N2.raft_address, N2.grpc_address, N2.role)))
    sm.apply(3, b"\x40body")
    put(sm, 4, b"a", b"2")
    digest = sm.digest()
    store.close()

    plugin = CounterState()
    again, store = lmdb_machine(tmp_path / "db", plugin)
    assert again.load() == 4
    assert again.applied_index == 4 and plugin.count == 1
    assert again.member_directory() == ({"n1": N1, "n2": N2}, 2)
    assert again.digest() == digest
    # Replaying the log from the start skips what the database holds: no double apply.
    for index in range(1, 5):
        assert again.apply(index, cmd.encode(cmd.Put(b"a", b"replayed"))) is None
    assert again.get(b"a")[0].value == b"2" and again.get(b"a")[0].version == 2
    put(again, 5, b"a", b"3")
    assert again.get(b"a") == (Entry(b"3", 1, 5, 3), 5)
    assert (again.applied_entries, again.skipped_entries) == (1, 4)
    store.close()


def test_deferred_commits_are_invisible_to_readers_until_the_group_commits(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    sm.defer_commit = True
    put(sm, 1, b"a", b"1")
    put(sm, 2, b"b", b"2")
    import threading
    seen = []
    t = threading.Thread(target=lambda: seen.append(sm.get(b"a")))
    t.start()
    t.join()
    assert seen == [(None, 0)]
    assert sm.commit() == 2
    assert sm.get(b"b") == (Entry(b"2", 2, 2, 1), 2)
    store.close()


def test_a_halting_entry_aborts_its_whole_group(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    put(sm, 1, b"a", b"1")
    sm.defer_commit = True
    put(sm, 2, b"b", b"2")
    with pytest.raises(ApplyHalt):
        sm.apply(3, b"\x7f")
    assert sm.commit() == 1
    assert sm.get(b"b") == (None, 1)
    store.close()


class JournalingState(CounterState):
    """A plugin state for tests only whose apply decides a file write the node performs
    (`PersistsAfterApply`); `fail` makes the write fail."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.due = False
        self.fail = False

    def handler(self, index, body):
        self.due = True
        return super().handler(index, body)

    def restore_state(self, data: bytes) -> None:
        super().restore_state(data)
        self.due = True

    def persist_applied(self) -> None:
        if not self.due:
            return
        if self.fail:
            raise OSError("disk says no")
        self.path.write_text(str(self.count))
        self.due = False


def test_apply_decides_and_persist_applied_writes(tmp_path):
    plugin = JournalingState(tmp_path / "effect")
    sm, store = lmdb_machine(tmp_path / "db", plugin)
    sm.apply(1, b"\x40body")
    assert not plugin.path.exists()  # apply did no I/O of its own
    sm.persist_applied()
    assert plugin.path.read_text() == "1"
    snapshot = io.BytesIO()
    sm.write_snapshot(snapshot)
    store.close()
    joiner = JournalingState(tmp_path / "joiner-effect")
    other, store = lmdb_machine(tmp_path / "db2", joiner)
    snapshot.seek(0)
    assert other.read_snapshot(snapshot)  # restoring persists before it returns
    assert joiner.path.read_text() == "1"
    store.close()


def test_a_failed_persist_aborts_the_group_and_halts(tmp_path):
    plugin = JournalingState(tmp_path / "effect")
    sm, store = lmdb_machine(tmp_path / "db", plugin)
    put(sm, 1, b"a", b"1")
    sm.defer_commit = True
    put(sm, 2, b"b", b"2")
    sm.apply(3, b"\x40body")
    plugin.fail = True
    with pytest.raises(ApplyHalt, match="OSError"):
        sm.persist_applied()
    assert plugin.due  # never dropped silently
    assert sm.commit() == 1
    assert sm.get(b"b") == (None, 1)
    store.close()


def test_transaction_block_applies_a_batch_in_one_commit(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    with sm.transaction():
        put(sm, 1, b"a", b"1")
        put(sm, 2, b"b", b"2")
        assert store.in_write and sm.applied_index == 0
    assert not store.in_write and sm.applied_index == 2
    store.close()


def test_a_snapshot_the_database_already_covers_is_not_loaded(tmp_path):
    source, s1 = lmdb_machine(tmp_path / "a")
    put(source, 1, b"a", b"1")
    put(source, 2, b"b", b"2")
    out = io.BytesIO()
    assert source.write_snapshot(out) == 2

    ahead, s2 = lmdb_machine(tmp_path / "b")
    for i in range(1, 4):
        put(ahead, i, b"k%d" % i, b"v")
    assert ahead.read_snapshot(io.BytesIO(out.getvalue()), skip_if_covered=True) is False
    assert ahead.get(b"k3")[0] is not None

    behind, s3 = lmdb_machine(tmp_path / "c")
    put(behind, 1, b"zz", b"stale")
    assert behind.read_snapshot(io.BytesIO(out.getvalue()), skip_if_covered=True) is True
    assert behind.digest() == source.digest() and behind.get(b"zz")[0] is None
    for s in (s1, s2, s3):
        s.close()


def test_a_snapshot_from_an_earlier_view_holds_the_plugin_state_and_members_of_that_view(
        tmp_path):
    # The background dump opens its read view on the tick thread and writes it later while
    # apply goes on: entries committed meanwhile must not leak into it, also before the first
    # plugin command or member change ever stored their state in the database.
    sm, store = lmdb_machine(tmp_path / "db", CounterState())
    put(sm, 1, b"a", b"1")
    view = store.begin_read()
    sm.apply(2, b"\x40body")
    sm.apply(3, cmd.encode(cmd.MemberSet("n2", N2.raft_address, N2.grpc_address, N2.role)))
    out = io.BytesIO()
    with store.read_view(view):
        assert sm.write_snapshot(out) == 1
    view.abort()
    restored = make(members=(), plugin=CounterState())
    restored.read_snapshot(io.BytesIO(out.getvalue()))
    assert restored.plugin_states["counter"].count == 0
    assert sorted(restored.member_directory()[0]) == ["n1"]
    store.close()


def test_a_rolled_back_first_plugin_command_leaves_no_plugin_state_behind(tmp_path):
    # A group whose commit found no space is rolled back and applied again: the plugin
    # state must be as before the group also when no plugin state was stored yet.
    sm, store = lmdb_machine(tmp_path / "db", CounterState())
    sm.defer_commit = True
    put(sm, 1, b"a", b"1")
    sm.commit()
    sm.apply(2, b"\x40body")
    assert sm.rollback() == 1
    assert sm.plugin_states["counter"].count == 0
    sm.apply(2, b"\x40body")
    sm.commit()
    assert sm.plugin_states["counter"].count == 1
    store.close()


# -- the replicated NOSPACE alarm -----------------------------------------------------------

def alarm(action, cause, member):
    return cmd.encode(cmd.Alarm(action, cause, member))


def test_a_raised_alarm_refuses_puts_and_cas_on_every_replica_but_not_deletes():
    sm = make()
    put(sm, 1, b"a", b"1")
    sm.apply(2, alarm(cmd.ALARM_RAISE, cmd.CAUSE_DISK_FULL, "n2"))
    assert sm.active_alarms() == {("n2", cmd.CAUSE_DISK_FULL): 2}
    refused = sm.apply(3, cmd.encode(cmd.Put(b"b", b"2")))
    assert refused.refused and not refused.succeeded
    cas = sm.apply(4, cmd.encode(cmd.CompareAndSwap(b"c", b"v", cmd.CAS_MUST_NOT_EXIST, 0)))
    assert cas.refused
    assert sm.get(b"b")[0] is None and sm.get(b"c")[0] is None
    assert sm.apply(5, cmd.encode(cmd.Delete(b"a"))).succeeded
    sm.apply(6, alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n1"))
    sm.apply(7, alarm(cmd.ALARM_DISARM, cmd.CAUSE_ANY, ""))
    assert sm.active_alarms() == {}
    assert not sm.apply(8, cmd.encode(cmd.Put(b"b", b"2"))).refused
    assert sm.get(b"b")[0].value == b"2"


def test_disarm_can_target_one_member_and_alarms_travel_in_snapshots():
    sm = make()
    sm.apply(1, alarm(cmd.ALARM_RAISE, cmd.CAUSE_DISK_FULL, "n2"))
    sm.apply(2, alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n3"))
    sm.apply(3, alarm(cmd.ALARM_RAISE, cmd.CAUSE_QUOTA, "n3"))  # raising twice keeps the first
    sm.apply(4, alarm(cmd.ALARM_DISARM, cmd.CAUSE_ANY, "n2"))
    assert sm.active_alarms() == {("n3", cmd.CAUSE_QUOTA): 2}
    out = io.BytesIO()
    sm.write_snapshot(out)
    other = make()
    other.read_snapshot(io.BytesIO(out.getvalue()))
    assert other.active_alarms() == sm.active_alarms()
    assert other.digest() == sm.digest()


def test_alarms_survive_a_restart_from_the_database(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    sm.apply(1, alarm(cmd.ALARM_RAISE, cmd.CAUSE_DISK_FULL, "n1"))
    store.close()
    again, store = lmdb_machine(tmp_path / "db")
    again.load()
    assert again.active_alarms() == {("n1", cmd.CAUSE_DISK_FULL): 1}
    assert again.apply(2, cmd.encode(cmd.Put(b"k", b"v"))).refused
    store.close()


def test_range_byte_limit_always_returns_at_least_one_pair():
    sm = make()
    put(sm, 1, b"a", b"x" * 100)
    put(sm, 2, b"b", b"y" * 100)
    pairs, total, _ = sm.range(b"", None, 10, False, max_bytes=10)
    assert [k for k, _ in pairs] == [b"a"] and total == 2
    pairs, _, _ = sm.range(b"", None, 10, False, max_bytes=202)
    assert [k for k, _ in pairs] == [b"a", b"b"]
    pairs, _, _ = sm.range(b"", None, 10, False, max_bytes=201)
    assert [k for k, _ in pairs] == [b"a"]


def test_revocations_apply_once_survive_a_snapshot_and_change_the_digest():
    sm = make()
    before = sm.digest()[0]
    assert sm.apply(1, cmd.encode(cmd.Revoke(0xABC))).succeeded
    assert not sm.apply(2, cmd.encode(cmd.Revoke(0xABC))).succeeded  # already revoked
    assert sm.is_revoked(0xABC) and not sm.is_revoked(0xABD)
    assert sm.digest()[0] != before
    buf = io.BytesIO()
    sm.write_snapshot(buf)
    buf.seek(0)
    target = make()
    target.read_snapshot(buf)
    assert target.is_revoked(0xABC) and target.digest() == sm.digest()


def test_revocations_survive_a_restart_from_the_database(tmp_path):
    sm, store = lmdb_machine(tmp_path / "db")
    sm.apply(1, cmd.encode(cmd.Revoke(0xBEEF)))
    digest = sm.digest()
    store.close()
    again, store = lmdb_machine(tmp_path / "db")
    assert again.load() == 1
    assert again.is_revoked(0xBEEF) and again.digest() == digest
    store.close()

"""The whitelist unpickler and protocol 4 that sealkv installs into pysyncobj."""
import os
import pickle
import pickletools
import zlib

import pysyncobj.journal
import pysyncobj.pickle
import pytest
from pysyncobj.node import TCPNode

from sealkv.node.replication import safe_pickle


@pytest.fixture(autouse=True)
def installed():
    safe_pickle.install()
    safe_pickle.install()  # idempotent


class RunsShell:
    """A hostile object whose unpickling would run a shell command, for tests only."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class BuildsAnything:
    """A pickle that names an arbitrary importable callable, for tests only."""

    def __reduce__(self):
        return (os.makedirs, ("/tmp/should-not-exist-sealkv",))


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsShell(f"touch {marker}"), protocol)
    with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
        pysyncobj.pickle.loads(payload)
    # A peer message arrives as zlib(pickle(message)); the journal has its own import.
    with pytest.raises(safe_pickle.ForbiddenPickle):
        pysyncobj.pickle.loads(zlib.decompress(zlib.compress(payload)))
    with pytest.raises(safe_pickle.ForbiddenPickle):
        pysyncobj.journal.loads(payload)
    assert not marker.exists()


def test_hostile_pickle_nested_inside_a_message_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    message = {"type": "append_entries", "entries": [(b"cmd", 1, 1)],
               "extra": RunsShell(f"touch {marker}")}
    with pytest.raises(safe_pickle.ForbiddenPickle, match="system"):
        pysyncobj.pickle.loads(pickle.dumps(message, 4))
    assert not marker.exists()


def test_hostile_pickle_through_file_load_is_refused(tmp_path):
    import io

    marker = tmp_path / "pwned"
    with pytest.raises(safe_pickle.ForbiddenPickle):
        pysyncobj.pickle.load(io.BytesIO(pickle.dumps(RunsShell(f"touch {marker}"))))
    assert not marker.exists()


def test_other_globals_are_refused_too():
    with pytest.raises(safe_pickle.ForbiddenPickle, match="makedirs"):
        pysyncobj.pickle.loads(pickle.dumps(BuildsAnything(), 4))
    assert not os.path.exists("/tmp/should-not-exist-sealkv")


def test_tcp_node_round_trips():
    node = TCPNode("127.0.0.1:7001")
    restored = pysyncobj.pickle.loads(pysyncobj.pickle.dumps(node))
    assert isinstance(restored, TCPNode)
    assert restored == node and restored.address == "127.0.0.1:7001"
    membership = pysyncobj.pickle.loads(pysyncobj.pickle.dumps(["add", node.id, node]))
    assert membership == ["add", node.id, node]


def test_pysyncobj_messages_round_trip():
    message = {
        "type": "append_entries", "term": 3, "commit_index": 10,
        "entries": [(b"\x00" + bytes(range(256)), 11, 3), (b"", 12, 3)],
        "prevLogIdx": 10, "prevLogTerm": 2, "nested": ([1, 2.5, None, True], {"k": "v"}),
        "nodes": {frozenset({1, 2}), "x"},
    }
    assert pysyncobj.pickle.loads(pysyncobj.pickle.dumps(message)) == message
    # A replicated call: (method id, args, kwargs) with opaque command bytes.
    call = (0, (b"\x01\x01\x00\x01kv",), {})
    assert pysyncobj.journal.loads(pysyncobj.journal.dumps(call)) == call


def test_dumps_uses_protocol_4_and_stores_bytes_as_bytes():
    data = os.urandom(1000)
    raw = pysyncobj.pickle.dumps({"entries": [(data, 1, 1)]})
    ops = list(pickletools.genops(raw))
    assert ops[0][0].name == "PROTO" and ops[0][1] == 4
    assert b"_codecs" not in raw
    assert data in raw  # stored verbatim, not re-encoded as latin-1 text
    assert len(raw) < 1100
    assert pysyncobj.journal.dumps is pysyncobj.pickle.dumps


def test_protocol_2_journal_entries_still_load():
    # A journal written before install() holds protocol-2 pickles of bytes (_codecs.encode).
    data = bytes(range(256))
    old = pickle.dumps((0, (data,), {}), 2)
    assert b"_codecs" in old
    assert pysyncobj.journal.loads(old) == (0, (data,), {})

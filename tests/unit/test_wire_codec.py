"""frames.WireCodec: both peer-wire formats, mixed peers, and pysyncobj's own encoding."""
import pickle
import struct
import zlib

import pytest
from pysyncobj import tcp_connection
from pysyncobj.encryptor import getEncryptor

from sealkv.node.replication import adapter  # noqa: F401  (installs the whitelist unpickler)
from sealkv.node.replication import peer_wire
from sealkv.node.replication.frames import WireCodec
from sealkv.node.replication.peer_wire import (
    FORMAT_FERNET, FORMAT_GCM, PeerWire, ROLE_DIALER, ROLE_LISTENER, WireRefused,
)

SECRET = "another-cluster-secret-32-bytes-long!!"
FERNET = getEncryptor(SECRET)
ROOT = peer_wire.root_key(SECRET)
MESSAGE = {"type": "append_entries", "term": 3, "commit_index": 41, "prevLogIdx": 41,
           "prevLogTerm": 3, "entries": [(b"\x00" + bytes(300), 42, 3)]}


def codecs(dialer_sends, listener_sends, secret=SECRET):
    fernet = FERNET if secret == SECRET else getEncryptor(secret)
    root = peer_wire.root_key(secret)
    return (WireCodec(PeerWire(fernet, root, dialer_sends), ROLE_DIALER),
            WireCodec(PeerWire(fernet, root, listener_sends), ROLE_LISTENER))


@pytest.mark.parametrize("dialer_sends", [FORMAT_FERNET, FORMAT_GCM])
@pytest.mark.parametrize("listener_sends", [FORMAT_FERNET, FORMAT_GCM])
def test_every_mix_of_formats_talks_both_ways(dialer_sends, listener_sends):
    dialer, listener = codecs(dialer_sends, listener_sends)
    for i in range(3):
        message = dict(MESSAGE, term=i)
        data = dialer.encode(message)
        assert peer_wire.frame_format(data) == dialer_sends
        assert listener.decode(data) == message
        data = listener.encode(("rand-key", message))
        assert peer_wire.frame_format(data) == listener_sends
        assert dialer.decode(data) == ("rand-key", message)


def test_pysyncobj_connections_and_the_fernet_format_understand_each_other():
    # A node of a version before the peer wire encodes with pysyncobj's own send.
    old = tcp_connection.TcpConnection(poller=None)
    old.encryptor = FERNET
    old.send(MESSAGE)
    framed = old._TcpConnection__writeBuffer
    (length,) = struct.unpack_from("i", framed)
    _, listener = codecs(FORMAT_GCM, FORMAT_FERNET)
    assert listener.decode(framed[4:4 + length]) == MESSAGE
    data = listener.encode(MESSAGE)
    old._TcpConnection__readBuffer = struct.pack("i", len(data)) + data
    assert old._TcpConnection__processParseMessage() == MESSAGE


def test_a_connection_cannot_switch_formats():
    dialer, listener = codecs(FORMAT_GCM, FORMAT_GCM)
    listener.decode(dialer.encode(MESSAGE))
    fernet_dialer, _ = codecs(FORMAT_FERNET, FORMAT_GCM)
    with pytest.raises(WireRefused, match="fernet frame on a connection that began with gcm"):
        listener.decode(fernet_dialer.encode(MESSAGE))


@pytest.mark.parametrize("sends", [FORMAT_FERNET, FORMAT_GCM])
def test_another_cluster_secret_is_refused(sends):
    stranger, _ = codecs(sends, sends, secret=SECRET + "?")
    _, listener = codecs(sends, sends)
    with pytest.raises(WireRefused, match="failed authentication"):
        listener.decode(stranger.encode(MESSAGE))


def test_an_older_fernet_token_is_refused():
    _, listener = codecs(FORMAT_FERNET, FORMAT_FERNET)
    older = FERNET.encrypt_at_time(zlib.compress(pickle.dumps(MESSAGE)), 1000)
    newer = FERNET.encrypt_at_time(zlib.compress(pickle.dumps(MESSAGE)), 2000)
    assert listener.decode(newer) == MESSAGE
    with pytest.raises(WireRefused, match="older than the previous"):
        listener.decode(older)


def test_a_forbidden_or_broken_pickle_inside_a_valid_frame_is_refused():
    _, listener = codecs(FORMAT_GCM, FORMAT_GCM)
    sealer = peer_wire.FrameSealer(ROOT, ROLE_DIALER)
    forged = pickle.dumps(__import__("os").system)
    with pytest.raises(WireRefused, match="undecodable message"):
        listener.decode(sealer.seal(forged))
    _, listener = codecs(FORMAT_GCM, FORMAT_GCM)
    sealer = peer_wire.FrameSealer(ROOT, ROLE_DIALER)
    with pytest.raises(WireRefused, match="undecodable message"):
        listener.decode(sealer.seal(b"not a pickle"))


def test_a_frame_of_neither_format_is_refused():
    _, listener = codecs(FORMAT_GCM, FORMAT_GCM)
    with pytest.raises(WireRefused, match="neither"):
        listener.decode(b"\x80\x04junk")

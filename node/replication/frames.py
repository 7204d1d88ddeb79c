"""Bounds on the raft port, enforced before a byte is decrypted or unpickled.

pysyncobj's `TcpConnection` reads a 4-byte length prefix and buffers until the whole frame has
arrived; only then does it decrypt (the cluster secret) and unpickle. Unpatched, anyone who
reaches the port can announce a 2 GiB frame and make the node buffer it, on the tick thread;
and every accepted connection is kept until it sends something, however many there are.

`install()` (called by the replication adapter before it builds a `SyncObj`) makes pysyncobj
build `BoundedTcpConnection`s instead, which:

- refuse any frame whose length prefix is negative or above `MAX_FRAME_BYTES` (16 x the value
  limit: an AppendEntries batch of `append_entries_batch_size_bytes` after pickling and the
  Fernet encoding stays well below it), checked for every frame in the read buffer as bytes
  arrive, so nothing larger is ever buffered;
- until an incoming connection has delivered one frame that decrypted and unpickled (proof it
  knows the cluster secret), cap its frames at `MAX_FIRST_FRAME_BYTES` (a peer's first
  message is a 32-byte key or its address);
- accept at most `MAX_PENDING_PER_HOST` incoming connections per remote address that have not
  yet proven the secret; the rest are closed at their first event;
- stop reading a connection while it holds `MAX_FRAME_BYTES` of unparsed data, so the buffer
  is drained before more is read.

When the connection's `encryptor` is a `peer_wire.PeerWire` (the replication adapter's
`_RaftObject` hands one to pysyncobj in place of its Fernet), messages go through `WireCodec`
instead of pysyncobj's own `send`/parse: a connection sends the node's configured format
(Fernet as pysyncobj does, or the AES-GCM peer wire of `peer_wire.py`) and accepts either,
told apart by the frame's first byte and fixed for the connection's direction by its first
frame. Either way a message that fails authentication, decoding or pysyncobj's per-connection
random key check closes the connection with a logged reason (pysyncobj closes it silently).

A refused connection is closed (the peer reconnects as usual) and logged with the remote
address and the reason; never any of its bytes. Everything here runs on the tick thread,
except the pending counter, which is guarded by a lock.
"""
from __future__ import annotations

import errno
import logging
import struct
import threading
import zlib

from cryptography.fernet import InvalidToken
from pysyncobj import pickle as raft_pickle
from pysyncobj import tcp_connection, tcp_server, transport
from pysyncobj.monotonic import monotonic as monotonic_time
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE

from sealkv.node.config import MAX_VALUE_BYTES
from sealkv.node.replication import peer_wire
from sealkv.node.replication.peer_wire import PeerWire, WireRefused
from sealkv.node.replication.settings import MAX_BATCH_BYTES

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * MAX_VALUE_BYTES
if MAX_FRAME_BYTES < 4 * MAX_BATCH_BYTES:
    raise ValueError("the raft frame cap must be at least 4 x the AppendEntries batch size")
MAX_FIRST_FRAME_BYTES = 64 * 1024
MAX_PENDING_PER_HOST = 16
# A compressed peer-wire body inflates to at most this (a batch or a dump chunk is at most
# MAX_BATCH_BYTES plus one entry; the frame itself is capped at MAX_FRAME_BYTES).
MAX_MESSAGE_BYTES = 4 * MAX_FRAME_BYTES
FERNET_ZLIB_LEVEL = 3  # pysyncobj's
_PREFIX = struct.Struct("i")  # pysyncobj's own framing: native int, length of the payload

_pending: dict[str, int] = {}
_pending_lock = threading.Lock()
_installed = False

_Base = tcp_connection.TcpConnection


class WireCodec:
    """Encodes and decodes the pysyncobj messages of one connection (tick thread only).

    `role` is this side's (`peer_wire.ROLE_DIALER` if it opened the connection). `encode`
    pickles a message and seals it in `wire.send_format`; `decode` accepts a Fernet token
    or a peer-wire frame (whichever the peer's first frame was, then only that) and raises
    `WireRefused` with a reason for anything it must not accept. A codec lives as long as
    one TCP connection: the connection builds a new one when it (re)connects.
    """

    def __init__(self, wire: PeerWire, role: str):
        self.wire = wire
        self._role = role
        self._sealer = None
        self._opener = None
        self.peer_format = None  # the format of the peer's first frame
        self.announced = False  # whether the connection logged peer_format
        self.sent = 0  # messages this side sent
        self._last_timestamp = 0  # Fernet: pysyncobj refuses tokens older than the last

    def encode(self, message) -> bytes:
        plaintext = raft_pickle.dumps(message)
        wire = self.wire
        if wire.send_format == peer_wire.FORMAT_GCM:
            if self._sealer is None:
                self._sealer = peer_wire.FrameSealer(wire.root, self._role)
            return self._sealer.seal(plaintext)
        return wire.fernet.encrypt_at_time(zlib.compress(plaintext, FERNET_ZLIB_LEVEL),
                                           int(monotonic_time()))

    def decode(self, data: bytes):
        found = peer_wire.frame_format(data)
        if self.peer_format is None:
            self.peer_format = found
        elif found != self.peer_format:
            raise WireRefused(f"a {found} frame on a connection that began with "
                              f"{self.peer_format}")
        if found == peer_wire.FORMAT_GCM:
            if self._opener is None:
                peer = (peer_wire.ROLE_LISTENER if self._role == peer_wire.ROLE_DIALER
                        else peer_wire.ROLE_DIALER)
                self._opener = peer_wire.FrameOpener(self.wire.root, peer, MAX_MESSAGE_BYTES)
            plaintext = self._opener.open(data)
        else:
            plaintext = self._open_fernet(data)
        try:
            return raft_pickle.loads(plaintext)
        except Exception as exc:  # the whitelist unpickler logs a forbidden global itself
            raise WireRefused(f"an undecodable message ({type(exc).__name__})") from None

    def _open_fernet(self, data: bytes) -> bytes:
        fernet = self.wire.fernet
        try:
            timestamp = fernet.extract_timestamp(data)
            if timestamp < self._last_timestamp:
                raise WireRefused("a Fernet token older than the previous one (replayed?)")
            packed = fernet.decrypt(data)
        except InvalidToken:
            raise WireRefused("a Fernet token failed authentication (tampered, truncated or "
                              "sealed under another cluster secret)") from None
        self._last_timestamp = timestamp
        try:
            return zlib.decompress(packed)
        except zlib.error:
            raise WireRefused("a Fernet token's compressed body is corrupt") from None


class BoundedTcpConnection(_Base):
    """A pysyncobj `TcpConnection` with the bounds of the module docstring."""

    def __init__(self, *args, **kwargs):
        self._scan = 0
        self._pending_host = None
        self._refused = False
        self._codec = None
        sock = kwargs.get("socket")
        self._role = peer_wire.ROLE_DIALER if sock is None else peer_wire.ROLE_LISTENER
        super().__init__(*args, **kwargs)
        if sock is None:
            return  # an outgoing connection: we dialled a configured peer
        try:
            host = sock.getpeername()[0]
        except OSError:
            self._refused = True
            return
        with _pending_lock:
            if _pending.get(host, 0) >= MAX_PENDING_PER_HOST:
                self._refused = True
            else:
                _pending[host] = _pending.get(host, 0) + 1
                self._pending_host = host
        if self._refused:
            log.warning("raft port: refused a connection from %s: %d connections from it "
                        "have not proven the cluster secret yet", host, MAX_PENDING_PER_HOST)

    def _release_pending(self) -> None:
        host, self._pending_host = self._pending_host, None
        if host is not None:
            with _pending_lock:
                left = _pending.get(host, 1) - 1
                if left > 0:
                    _pending[host] = left
                else:
                    _pending.pop(host, None)

    def _limit(self) -> int:
        return MAX_FIRST_FRAME_BYTES if self._pending_host is not None else MAX_FRAME_BYTES

    def _TcpConnection__processConnection(self, descr, eventType):
        if self._refused:
            self.disconnect()
            return
        if eventType != POLL_EVENT_TYPE.READ or descr != self._TcpConnection__fileno \
                or self._TcpConnection__state != CONNECTION_STATE.CONNECTED:
            _Base._TcpConnection__processConnection(self, descr, eventType)
            return
        # The common event, data on an established connection: pysyncobj's handling without
        # its getsockopt(SO_ERROR) (a socket error shows as a poll error or fails the recv),
        # one syscall less per message received on every node.
        self._TcpConnection__processConnectionTimeout()
        if self._TcpConnection__state == CONNECTION_STATE.DISCONNECTED:
            return
        self._TcpConnection__tryReadBuffer()
        while self._TcpConnection__state != CONNECTION_STATE.DISCONNECTED:
            message = self._TcpConnection__processParseMessage()
            if message is None:
                return
            received = self._TcpConnection__onMessageReceived
            if received is not None:
                received(message)

    def _TcpConnection__processRead(self):
        if len(self._TcpConnection__readBuffer) >= MAX_FRAME_BYTES + _PREFIX.size:
            return False  # parse what is buffered before reading more
        # pysyncobj's read without its getsockopt(SO_ERROR) after every recv, and without the
        # recv that only finds the socket drained (EAGAIN raised and caught) after a short
        # read: the poll is level-triggered and reports whatever arrives later.
        size = self._TcpConnection__recvBufferSize
        try:
            incoming = self._TcpConnection__socket.recv(size)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return False
        if not incoming:
            self.disconnect()
            return False
        self._TcpConnection__readBuffer += incoming
        more = len(incoming) == size
        buffer = self._TcpConnection__readBuffer
        limit = self._limit()
        pos = self._scan
        while pos + _PREFIX.size <= len(buffer):
            (length,) = _PREFIX.unpack_from(buffer, pos)
            if length < 0 or length > limit:
                self._drop(f"a frame of {length} bytes exceeds the {limit}-byte cap")
                return False
            pos += _PREFIX.size + length
        self._scan = pos
        return more

    def _wire_codec(self):
        """This connection's `WireCodec`, or None when pysyncobj encodes (no `PeerWire`)."""
        wire = self.encryptor
        if not isinstance(wire, PeerWire):
            return None
        if self._codec is None or self._codec.wire is not wire:
            self._codec = WireCodec(wire, self._role)
        return self._codec

    def send(self, message):
        codec = self._wire_codec()
        if codec is None:
            return super().send(message)
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        elif self._role == peer_wire.ROLE_DIALER and codec.sent:
            # pysyncobj sends Raft messages on a connection as soon as TCP connects, before
            # the peer's random key arrived; the peer must refuse them (pysyncobj's receiver
            # drops the connection, and the start-up election reconnects). Raft retransmits.
            return
        codec.sent += 1
        try:
            data = codec.encode(message)
        except WireRefused as exc:  # a counter exhausted: start a new connection
            self._drop(str(exc))
            return
        self._TcpConnection__writeBuffer += _PREFIX.pack(len(data)) + data
        self._TcpConnection__trySendBuffer()

    def _parse_wire_message(self, codec: WireCodec):
        buffer = self._TcpConnection__readBuffer
        if len(buffer) < _PREFIX.size:
            return None
        (length,) = _PREFIX.unpack_from(buffer, 0)
        end = _PREFIX.size + length
        if len(buffer) < end:
            return None
        try:
            message = codec.decode(buffer[_PREFIX.size:end])
            if self.recvRandKey:
                if not (isinstance(message, tuple) and len(message) == 2):
                    raise WireRefused("a message without the connection's random key")
                rand_key, message = message
                if rand_key != self.recvRandKey:
                    raise WireRefused("a message carrying another connection's random key "
                                      "(replayed from another connection?)")
        except WireRefused as exc:
            self._drop(str(exc))
            return None
        except Exception as exc:  # never let a frame raise on the tick thread
            self._drop(f"an undecodable frame ({type(exc).__name__})")
            return None
        self._TcpConnection__readBuffer = buffer[end:]
        if not codec.announced:  # once per connection: shows which peers still send Fernet
            codec.announced = True
            log.info("raft port: %s sends %s frames", self._peer(), codec.peer_format)
        return message

    def _TcpConnection__processParseMessage(self):
        before = len(self._TcpConnection__readBuffer)
        codec = self._wire_codec()
        if codec is None:
            message = _Base._TcpConnection__processParseMessage(self)
        else:
            message = self._parse_wire_message(codec)
        if message is not None:
            self._scan = max(0, self._scan - (before - len(self._TcpConnection__readBuffer)))
            self._release_pending()  # it decrypted: the peer holds the cluster secret
        return message

    def _peer(self, port: bool = True) -> str:
        try:
            sock = self._TcpConnection__socket
            address = sock.getpeername() if sock is not None else None
        except OSError:
            address = None
        if address is None:
            return "?"
        return f"{address[0]}:{address[1]}" if port else address[0]

    def _drop(self, reason: str) -> None:
        log.warning("raft port: dropped the connection from %s: %s", self._peer(port=False),
                    reason)
        self.disconnect()

    def connect(self, host, port):
        self._scan = 0
        self._codec = None
        return super().connect(host, port)

    def disconnect(self):
        self._scan = 0
        self._codec = None
        self._release_pending()
        super().disconnect()


def install() -> None:
    """Makes pysyncobj's server and transport build `BoundedTcpConnection`s (idempotent)."""
    global _installed
    if _installed:
        return
    tcp_server.TcpConnection = BoundedTcpConnection
    transport.TcpConnection = BoundedTcpConnection
    _installed = True


def pending_connections() -> dict[str, int]:
    """Returns a copy of the pending (not yet proven) incoming connections per host."""
    with _pending_lock:
        return dict(_pending)

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

A refused connection is closed (the peer reconnects as usual) and logged with the remote
address and the reason; never any of its bytes. Everything here runs on the tick thread,
except the pending counter, which is guarded by a lock.
"""
from __future__ import annotations

import logging
import struct
import threading

from pysyncobj import tcp_connection, tcp_server, transport

from sealkv.node.config import MAX_VALUE_BYTES
from sealkv.node.replication.settings import MAX_BATCH_BYTES

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 16 * MAX_VALUE_BYTES
if MAX_FRAME_BYTES < 4 * MAX_BATCH_BYTES:
    raise ValueError("the raft frame cap must be at least 4 x the AppendEntries batch size")
MAX_FIRST_FRAME_BYTES = 64 * 1024
MAX_PENDING_PER_HOST = 16
_PREFIX = struct.Struct("i")  # pysyncobj's own framing: native int, length of the payload

_pending: dict[str, int] = {}
_pending_lock = threading.Lock()
_installed = False

_Base = tcp_connection.TcpConnection


class BoundedTcpConnection(_Base):
    """A pysyncobj `TcpConnection` with the bounds of the module docstring."""

    def __init__(self, *args, **kwargs):
        self._scan = 0
        self._pending_host = None
        self._refused = False
        super().__init__(*args, **kwargs)
        sock = kwargs.get("socket")
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
        _Base._TcpConnection__processConnection(self, descr, eventType)

    def _TcpConnection__processRead(self):
        if len(self._TcpConnection__readBuffer) >= MAX_FRAME_BYTES + _PREFIX.size:
            return False  # parse what is buffered before reading more
        more = _Base._TcpConnection__processRead(self)
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

    def _TcpConnection__processParseMessage(self):
        before = len(self._TcpConnection__readBuffer)
        message = _Base._TcpConnection__processParseMessage(self)
        if message is not None:
            self._scan = max(0, self._scan - (before - len(self._TcpConnection__readBuffer)))
            self._release_pending()  # it decrypted: the peer holds the cluster secret
        return message

    def _drop(self, reason: str) -> None:
        try:
            sock = self._TcpConnection__socket
            peer = sock.getpeername()[0] if sock is not None else "?"
        except OSError:
            peer = "?"
        log.warning("raft port: dropped the connection from %s: %s", peer, reason)
        self.disconnect()

    def connect(self, host, port):
        self._scan = 0
        return super().connect(host, port)

    def disconnect(self):
        self._scan = 0
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

"""A background write load for integration tests; for tests only."""
from __future__ import annotations

import os
import threading

from sealkv.node import errors
from tests.cluster import wait_for


class Writer(threading.Thread):
    """Puts `<prefix>NNNNNN` keys with fresh random values one after another through `client`
    (which it closes when done) until `stop` is set; `acked` holds every acknowledged pair,
    `errors` the refusals (their outcome is unknown: a retryable refusal may still apply).

    As a context manager it starts, waits until `first` writes are acknowledged, and on exit
    stops and joins.
    """

    def __init__(self, client, prefix: bytes = b"load/", first: int = 5):
        super().__init__(daemon=True)
        self.client, self.prefix, self.first = client, prefix, first
        self.acked: dict[bytes, bytes] = {}
        self.errors: list[errors.SealkvError] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.client:
            i = 0
            while not self.stop.is_set():
                key, value = self.prefix + b"%06d" % i, os.urandom(16).hex().encode()
                try:
                    self.client.put(key, value)
                    self.acked[key] = value
                except errors.SealkvError as exc:
                    self.errors.append(exc)
                i += 1

    def wait_acked(self, count: int, timeout: float = 30) -> None:
        """Waits until at least `count` writes are acknowledged in all."""
        wait_for(lambda: len(self.acked) >= count, timeout, f"{count} acknowledged writes")

    def __enter__(self) -> "Writer":
        self.start()
        self.wait_acked(self.first)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(60)

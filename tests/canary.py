"""The canary harness: random values that can be found again in every byte on disk.

A canary value is `CNRY` followed by 24 random lowercase hex digits, so a scan finds each one
with one regular expression instead of searching for thousands of strings. `scan` reads every
file under the given directories (whatever its name or format) and reports which canaries it
holds in the clear: as raw bytes, or hex-encoded (the form a JSON header or a hex dump would
take). A scan that finds nothing only proves something if the same scan found canaries when
they were on disk in the clear: the tests check both.
"""
from __future__ import annotations

import binascii
import concurrent.futures
import os
import re
from typing import Iterable

PREFIX = b"CNRY"
_RAW = re.compile(rb"CNRY[0-9a-f]{24}")
_HEX = re.compile(rb"434e5259(?:3[0-9]|6[1-6]){24}")


def make_canaries(count: int) -> list[bytes]:
    """Returns `count` distinct random canary values."""
    values: set[bytes] = set()
    while len(values) < count:
        values.add(PREFIX + os.urandom(12).hex().encode())
    return sorted(values)


def write_canaries(client_factory, items: list[tuple[bytes, bytes]], threads: int = 12) -> None:
    """Puts every (key, value) with `threads` concurrent clients (retrying retryable errors)."""
    from sealkv.node import errors

    chunks = [items[i::threads] for i in range(threads)]

    def work(chunk):
        with client_factory() as client:
            for key, value in chunk:
                for attempt in range(20):
                    try:
                        client.put(key, value)
                        break
                    except (errors.Unavailable, errors.Aborted):
                        if attempt == 19:
                            raise

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chunks))


def files_under(directories: Iterable[str]) -> list[str]:
    """Every regular file under `directories`."""
    out = []
    for directory in directories:
        for root, _, files in os.walk(directory):
            out.extend(os.path.join(root, name) for name in files
                       if os.path.isfile(os.path.join(root, name)))
    return sorted(out)


def scan(directories: Iterable[str]) -> dict[bytes, set[str]]:
    """Returns {canary value: files holding it in the clear} over every file under
    `directories` (raw or hex-encoded)."""
    found: dict[bytes, set[str]] = {}
    for path in files_under(directories):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # replaced meanwhile (a rename); the new file is scanned
            continue
        for match in _RAW.finditer(data):
            found.setdefault(match.group(), set()).add(path)
        for match in _HEX.finditer(data):
            found.setdefault(binascii.unhexlify(match.group()), set()).add(path)
    return found

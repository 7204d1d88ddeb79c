"""Tests of deterministic nonces: layout, uniqueness, epochs, exhaustion, FNV ids."""
from __future__ import annotations

import threading

import pytest

from sealkv.plugins.encryption.nonce import (
    EpochExhausted, NonceExhausted, NonceFactory, full_node_id, node_id16,
)


def test_fnv1a64_known_answers():
    # Published FNV-1a 64-bit test values (Fowler/Noll/Vo): "" and "a".
    assert full_node_id("") == 0xCBF29CE484222325
    assert full_node_id("a") == 0xAF63DC4C8601EC8C
    assert full_node_id("foobar") == 0x85944171F73967E8
    assert node_id16(full_node_id("a")) == 0xEC8C


def test_full_node_id_never_zero(monkeypatch):
    from sealkv.plugins.encryption import nonce
    monkeypatch.setattr(nonce, "FNV64_OFFSET", 0)
    assert nonce.full_node_id("") == 1


def test_layout_and_counter_start():
    factory = NonceFactory(0x1234, 7)
    assert factory.next() == bytes.fromhex("1234" "0007" "0000000000000001")
    assert factory.next() == bytes.fromhex("1234" "0007" "0000000000000002")


def test_million_nonces_unique_and_epochs_disjoint():
    first = NonceFactory(0xBEEF, 1)
    seen = {first.next() for _ in range(1_000_000)}
    assert len(seen) == 1_000_000
    second = NonceFactory(0xBEEF, 2)
    later = {second.next() for _ in range(100_000)}
    assert len(later) == 100_000 and not (seen & later)


def drawn_by_threads(factory: NonceFactory, threads: int, each: int) -> list[bytes]:
    """Every nonce `threads` threads drew from `factory` at once, `each` apiece."""
    results: list[list[bytes]] = [[] for _ in range(threads)]

    def work(out):
        for _ in range(each):
            out.append(factory.next())

    running = [threading.Thread(target=work, args=(out,)) for out in results]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return [n for out in results for n in out]


def test_threads_never_share_a_nonce():
    everything = drawn_by_threads(NonceFactory(1, 1), 4, 20_000)
    assert len(set(everything)) == len(everything) == 80_000


def test_counter_latches_exhausted_instead_of_wrapping():
    factory = NonceFactory(1, 1, counter_limit=3)
    assert [factory.next()[-1] for _ in range(3)] == [1, 2, 3]
    for _ in range(2):
        with pytest.raises(NonceExhausted):
            factory.next()
    assert factory.exhausted


def test_epoch_ffff_refused_and_range_checks():
    with pytest.raises(EpochExhausted):
        NonceFactory(1, 0xFFFF)
    NonceFactory(1, 0xFFFE)
    with pytest.raises(ValueError):
        NonceFactory(0x10000, 1)


def test_without_an_interpreter_lock_the_counter_takes_a_lock_and_stays_unique(monkeypatch):
    from sealkv.plugins.encryption import nonce

    monkeypatch.setattr(nonce, "_GIL", False)
    factory = NonceFactory(1, 1, counter_limit=40_001)
    everything = set(drawn_by_threads(factory, 4, 10_000))
    assert len(everything) == 40_000 and not factory.exhausted
    assert factory.next()[-8:] == (40_001).to_bytes(8, "big") and factory.exhausted
    with pytest.raises(NonceExhausted):
        factory.next()

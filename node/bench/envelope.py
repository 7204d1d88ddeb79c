"""`sealkv bench envelope`: the storage envelope codec alone, in-process (no Raft, no gRPC).

For each value size, every iteration does what the encryption storage layer does for one value
(`plugins/encryption/storage.py`): `seal` takes the next deterministic nonce from a
`NonceFactory`, builds the storage AAD (envelope header | value header | key | mod_revision)
and seals with the data key's `Sealer` (built once, as the layer does); `open` parses the
envelope, looks the data key up by id and rebuilds the AAD from the envelope header, like
`EncryptionStorage.decode_entry`. Each call is timed on its own with
`time.perf_counter_ns`; the round trip is checked outside the timed region.

A reference column times bare AES-256-GCM encrypt+decrypt with one `AESGCM` object and no
envelope work, so the codec's own overhead (parsing, AAD, nonces, lookups) can be read off the
same run.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Optional, Sequence

KEY_ID = 1
KEY = b"k" + b"0" * 15  # a 16-byte user key, like the bench default
DEFAULT_SIZES = (100, 4096)
WARMUP_ITERATIONS = 200


def implementation() -> dict:
    """Which AES-GCM implementation the codec uses (the `cryptography` package over OpenSSL)."""
    import cryptography

    info = {"library": f"cryptography {cryptography.__version__}",
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "machine": platform.machine()}
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        info["openssl"] = backend.openssl_version_text()
    except Exception as exc:  # the text is informative only
        info["openssl"] = f"unknown ({type(exc).__name__})"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        info["cpu_aes_ni"] = " aes " in f" {flags.split(':', 1)[-1].strip()} "
    except OSError:
        info["cpu_aes_ni"] = None
    return info


def _pct_us(ordered_ns: Sequence[int], p: float) -> Optional[float]:
    if not ordered_ns:
        return None
    i = min(len(ordered_ns) - 1, max(0, int(-(-p * len(ordered_ns) // 100)) - 1))
    return round(ordered_ns[i] / 1000.0, 2)


def _stats(samples_ns: list[int]) -> dict:
    ordered = sorted(samples_ns)
    return {"p50_us": _pct_us(ordered, 50), "p99_us": _pct_us(ordered, 99),
            "mean_us": round(sum(ordered) / len(ordered) / 1000.0, 2) if ordered else None}


def measure_size(size: int, iterations: int) -> dict:
    """Times `iterations` seal+open round trips of a `size`-byte value; returns a summary."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from sealkv.node.state.storage.base import VALUE_ENCRYPTED
    from sealkv.plugins.encryption import envelope
    from sealkv.plugins.encryption.nonce import NonceFactory, full_node_id, node_id16

    dek = os.urandom(envelope.DEK_SIZE)
    keys = {KEY_ID: dek}
    nonces = NonceFactory(node_id16(full_node_id("127.0.0.1:7000")), 1)
    value = os.urandom(size)
    header = VALUE_ENCRYPTED
    clock = time.perf_counter_ns
    seal_ns: list[int] = []
    open_ns: list[int] = []
    both_ns: list[int] = []
    sealer = envelope.Sealer(dek, KEY_ID)  # built once per data key, as the layer does
    started = clock()
    for i in range(WARMUP_ITERATIONS + iterations):
        revision = i + 1
        t0 = clock()
        sealed = sealer.seal_stored(nonces.next(), value, header, KEY, revision)
        t1 = clock()
        plain = envelope.open_envelope(
            lambda key_id: keys.get(key_id), sealed,
            lambda h6: envelope.storage_aad(h6, header, KEY, revision))
        t2 = clock()
        if plain != value or len(sealed) != size + envelope.OVERHEAD:
            raise RuntimeError(f"the envelope round trip of a {size}-byte value failed")
        if i == WARMUP_ITERATIONS - 1:
            started = clock()
        if i >= WARMUP_ITERATIONS:
            seal_ns.append(t1 - t0)
            open_ns.append(t2 - t1)
            both_ns.append(t2 - t0)
    wall = (clock() - started) / 1e9

    # Reference: bare AES-256-GCM with one reused key object, same sizes and AAD length.
    aead = AESGCM(dek)
    aad = envelope.storage_aad(envelope.envelope_header(KEY_ID), header, KEY, 1)
    raw_ns: list[int] = []
    for i in range(WARMUP_ITERATIONS + iterations):
        nonce = nonces.next()
        t0 = clock()
        ct = aead.encrypt(nonce, value, aad)
        aead.decrypt(nonce, ct, aad)
        t1 = clock()
        if i >= WARMUP_ITERATIONS:
            raw_ns.append(t1 - t0)

    both = _stats(both_ns)
    raw = _stats(raw_ns)
    return {
        "size": size, "iterations": iterations,
        "seal": _stats(seal_ns), "open": _stats(open_ns), "seal_open": both,
        "aesgcm_only": raw,
        # values/s: seal+open round trips per second of the measured loop (one thread).
        "values_per_sec": round(iterations / (sum(both_ns) / 1e9), 1) if both_ns else 0.0,
        "loop_values_per_sec": round(iterations / wall, 1) if wall > 0 else 0.0,
        "mb_per_sec": round(iterations * size / (sum(both_ns) / 1e9) / 1e6, 2)
        if both_ns else 0.0,
        "codec_over_aesgcm_p50": round(both["p50_us"] / raw["p50_us"], 2)
        if both["p50_us"] and raw["p50_us"] else None,
    }


def run(sizes: Sequence[int], iterations: int,
        log: Callable[[str], None] = lambda msg: None) -> dict:
    """Measures every size in one process; returns {"implementation": ..., "rows": [...]}."""
    rows = []
    for size in sizes:
        log(f"envelope: {iterations} seal+open round trips of {size}-byte values")
        rows.append(measure_size(size, iterations))
    return {"implementation": implementation(), "key_size": len(KEY), "rows": rows,
            "notes": ["in-process, one thread; seal = nonce + storage AAD + AES-256-GCM "
                      "encrypt + header with the key's Sealer, open = parse + key lookup + "
                      "AAD + decrypt, as the storage layer does; aesgcm_only is bare "
                      "encrypt+decrypt with one AESGCM object"]}


HEADERS = ["size B", "seal p50 us", "seal p99 us", "open p50 us", "open p99 us",
           "seal+open p50 us", "seal+open p99 us", "values/s", "MB/s", "aesgcm-only p50 us"]


def table_rows(report: dict) -> list[list]:
    def us(v):
        return "-" if v is None else f"{v:.1f}"

    return [[r["size"], us(r["seal"]["p50_us"]), us(r["seal"]["p99_us"]),
             us(r["open"]["p50_us"]), us(r["open"]["p99_us"]),
             us(r["seal_open"]["p50_us"]), us(r["seal_open"]["p99_us"]),
             f"{r['values_per_sec']:.0f}", f"{r['mb_per_sec']:.1f}",
             us(r["aesgcm_only"]["p50_us"])] for r in report["rows"]]


def describe(report: dict) -> str:
    i = report["implementation"]
    aes = {True: "AES-NI present", False: "no AES-NI flag", None: "AES-NI unknown"}[
        i.get("cpu_aes_ni")]
    return (f"AES-256-GCM: {i['library']} (OpenSSL backend: {i['openssl']}); {i['python']} "
            f"{i['machine']}, {aes}")

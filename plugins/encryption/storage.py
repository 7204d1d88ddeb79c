"""The envelope storage layer: values sealed on `put`, opened on `get`/`scan` (ENCRYPTION.md §2, §3).

`EncryptionStorage` wraps the inner store of the node's storage stack. It seals values into
AES-256-GCM envelopes once the storage envelope is active and opens them on reads,
dispatching on the value header's state bits only, never on the value bytes. It reads the
replicated state and the unwrapped keys the encryption plugin (`layer.py`) keeps; it changes
neither. Nothing here logs a key, a value or key bytes.
"""
from __future__ import annotations

from typing import Callable, Optional

from sealkv.node.errors import IntegrityError
from sealkv.node.state.storage.base import (
    VALUE_CLEARTEXT, VALUE_ENCRYPTED, VALUE_STATE_MASK, Entry, Storage, StorageLayer,
    record_writer,
)

from . import envelope
from .counters import COUNTERS
from .keystore import KeyStore
from .nonce import NonceFactory
from .state import PURPOSE_STORAGE, EncryptionState


class EncryptionUnavailableError(RuntimeError):
    """A write must be encrypted but this node has no usable key or nonce (halts the node)."""


class EncryptionStorage(StorageLayer):
    """A storage layer that stores values in envelopes once the storage envelope is active.

    `state` is the live replicated state (read, never changed here), `keystore` the unwrapped
    keys, and `nonces(dek_id)` returns the `NonceFactory` of this process for a key. `put` runs
    in replicated apply: any exception from it halts the node. `get`/`scan` raise
    `IntegrityError` (DATA_LOSS) for any record that does not decode, never return None for it.
    """

    def __init__(self, inner: Storage, state: EncryptionState, keystore: KeyStore,
                 nonces: Callable[[int], NonceFactory]):
        super().__init__(inner)
        self.state = state
        self.keystore = keystore
        self.nonces = nonces
        # The active storage key's sealer and nonce factory, built on its first use (apply,
        # tick thread). A key id always names the same bytes (the keystore refuses reuse) and
        # its factory lives as long as the process, so they stay valid until the active id
        # changes (a rotation), when the next put builds the new key's pair.
        self._sealing: Optional[tuple[int, envelope.Sealer, Callable[[], bytes]]] = None
        # The sealed record goes down by its fields when `inner` offers `PutsRecords` (the
        # LMDB store): the `Entry` it would otherwise build costs about as much as the seal.
        self._put_record = record_writer(inner)
        # Values sealed by this layer (the seals metric). Writes are serialised by the state
        # machine's lock (the `Storage` threading contract), so a plain count is exact and
        # spares every put the shared counters' lock.
        self.sealed = 0

    def put(self, key: bytes, entry: Entry) -> None:
        """Stores `entry` (plaintext value) sealed or cleartext per the replicated state."""
        header = entry.header
        if header & VALUE_STATE_MASK != VALUE_CLEARTEXT:
            raise ValueError("the storage layer expects plaintext entries")
        state = self.state
        if not state.storage_envelope_active:
            self.inner.put(key, entry)
            return
        key_id = state.active_storage_id
        sealing = self._sealing
        if sealing is None or sealing[0] != key_id:
            sealing = self._sealing = self._sealing_for(key_id)
        _, sealer, next_nonce = sealing
        header = _sealed_header(header)
        sealed = sealer.seal_stored(next_nonce(), entry.value, header, key, entry.mod_revision)
        self.sealed += 1
        self._put_record(key, sealed, entry.create_revision, entry.mod_revision, entry.version,
                         header)

    def _sealing_for(self, dek_id: int) -> tuple[int, envelope.Sealer, Callable[[], bytes]]:
        dek = self.keystore.get_for(dek_id, PURPOSE_STORAGE)
        if dek is None:
            raise EncryptionUnavailableError(f"storage key {dek_id} is not loaded")
        return dek_id, envelope.Sealer(dek, dek_id), self.nonces(dek_id).next

    def decode_entry(self, key: bytes, entry: Entry) -> Entry:
        """Returns the plaintext entry; raises `IntegrityError` when it cannot be trusted."""
        state = entry.state
        if state == VALUE_ENCRYPTED:
            try:
                plaintext = self._open(key, entry, entry.header)
            except envelope.EnvelopeError as error:
                COUNTERS.add("failure", "storage", type(error).__name__)
                raise IntegrityError(f"stored value failed decryption: {error}") from None
            COUNTERS.add("open", "storage")
            return Entry(plaintext, entry.create_revision, entry.mod_revision, entry.version,
                         entry.header & ~VALUE_STATE_MASK)
        if state == VALUE_CLEARTEXT:
            if len(entry.value) >= envelope.OVERHEAD and self._verifies_as_envelope(key, entry):
                raise IntegrityError("a value marked cleartext is an authentic envelope: its "
                                     "encrypted bit was cleared")
            return entry
        raise IntegrityError(f"stored value has the reserved state 0x{state:02x}")

    def _open(self, key: bytes, entry: Entry, value_header: int) -> bytes:
        """Opens `entry.value` as the envelope of `key`'s value stored with `value_header`
        (any loaded storage key); raises an `EnvelopeError` subclass."""
        return envelope.open_envelope(
            self._storage_key, entry.value,
            lambda header6: envelope.storage_aad(header6, value_header, key, entry.mod_revision))

    def _storage_key(self, key_id: int) -> Optional[bytes]:
        return self.keystore.get_for(key_id, PURPOSE_STORAGE)

    def _verifies_as_envelope(self, key: bytes, entry: Entry) -> bool:
        """The rebadge guard: whether a cleartext value opens under a loaded storage key."""
        try:
            self._open(key, entry, _sealed_header(entry.header))
        except envelope.EnvelopeError:
            return False
        return True


def _sealed_header(header: int) -> int:
    """The value header of a value stored sealed: `header` with its state bits "encrypted"."""
    return (header & ~VALUE_STATE_MASK & 0xFF) | VALUE_ENCRYPTED

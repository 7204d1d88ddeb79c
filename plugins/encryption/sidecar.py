"""The node-local encryption sidecar `<data-dir>/encryption/keys.json` (ENCRYPTION.md §5).

The sidecar is a durable copy of the wrapped key table and cutover state plus the node-local
nonce epochs. It holds only wrapped keys, so it is safe to back up with the data. It is JSON
of this shape::

    {"version": 1, "raft_applied_index": 12, "storage_envelope_active": true,
     "storage_envelope_cutover_index": 10, "raft_envelope_cutover_index": 0,
     "active": {"storage": 1, "raft": 2},
     "keys": {"1": {"purpose": "storage", "wrapped": "<base64 of 60 bytes>",
                    "created": 7, "local_epoch": 3}, ...}}

After a KEK rewrap (`sealkv encryption rewrap-keys`) it also holds `"kek_generation": N` and
`"kek_check": "<base64>"`, the check blob of the KEK its keys are wrapped under (a wrap of a
public constant, `kek.KEK_CHECK_PLAINTEXT`): a node started with another KEK is told which
fix applies. An active id of 0 means "none". The content is validated on read and before every
write, and written crash-safely: temp file (exclusive create, 0600) -> write -> fsync ->
rename -> fsync of the directory. A crash at any point leaves either the old or the new file;
a stale temp file from a crash is removed by the next write.
"""
from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from sealkv.plugins.api import StartupRefused, plugin_data_dir

from .nonce import epoch_in_range
from .purpose import PURPOSE_BY_NAME, PURPOSE_NAMES

if TYPE_CHECKING:
    from .state import EncryptionState

SIDECAR_VERSION = 1
DIR_NAME = "encryption"
FILE_NAME = "keys.json"
TEMP_NAME = "keys.json.tmp"

_DECIMAL_ID = re.compile(r"[1-9][0-9]{0,9}")


class SidecarError(ValueError):
    """The sidecar content is invalid; the message names the field."""


@dataclass
class SidecarKey:
    """One wrapped data key and this node's nonce epoch for it."""

    purpose: str
    wrapped: bytes
    created: int
    local_epoch: int = 0


@dataclass
class Sidecar:
    """The content of `keys.json`."""

    version: int = SIDECAR_VERSION
    raft_applied_index: int = 0
    storage_envelope_active: bool = False
    storage_envelope_cutover_index: int = 0
    raft_envelope_cutover_index: int = 0
    active: dict[str, int] = field(default_factory=lambda: {"storage": 0, "raft": 0})
    keys: dict[int, SidecarKey] = field(default_factory=dict)
    kek_generation: int = 0
    kek_check: bytes = b""

    def validate(self) -> None:
        """Raises `SidecarError` unless every field is well-formed and consistent."""
        if self.version != SIDECAR_VERSION:
            raise SidecarError(f"unsupported sidecar version {self.version!r}")
        for name in ("raft_applied_index", "storage_envelope_cutover_index",
                     "raft_envelope_cutover_index"):
            value = getattr(self, name)
            if not _is_uint(value):
                raise SidecarError(f"{name} must be a non-negative integer")
        if not isinstance(self.storage_envelope_active, bool):
            raise SidecarError("storage_envelope_active must be true or false")
        if self.storage_envelope_active != (self.storage_envelope_cutover_index > 0):
            raise SidecarError("storage_envelope_active disagrees with its cutover index")
        if not isinstance(self.active, dict) or set(self.active) != set(PURPOSE_BY_NAME):
            raise SidecarError("active must have exactly the fields storage and raft")
        if not isinstance(self.keys, dict):
            raise SidecarError("keys must be an object")
        if not _is_uint(self.kek_generation) or self.kek_generation > 0xFFFFFFFF:
            raise SidecarError("kek_generation must be a 32-bit non-negative integer")
        if not isinstance(self.kek_check, bytes) or bool(self.kek_check) != bool(
                self.kek_generation):
            raise SidecarError("kek_check must be present exactly when kek_generation is set")
        for key_id, key in self.keys.items():
            if not isinstance(key_id, int) or isinstance(key_id, bool) \
                    or not 0 < key_id <= 0xFFFFFFFF:
                raise SidecarError(f"key id {key_id!r} must be a non-zero 32-bit integer")
            if key.purpose not in PURPOSE_BY_NAME:
                raise SidecarError(f"key {key_id} has unknown purpose {key.purpose!r}")
            if not isinstance(key.wrapped, bytes) or not key.wrapped:
                raise SidecarError(f"key {key_id} has no wrapped bytes")
            if not _is_uint(key.created):
                raise SidecarError(f"key {key_id} has an invalid created index")
            if not _is_uint(key.local_epoch) or not epoch_in_range(key.local_epoch):
                raise SidecarError(f"key {key_id} has an invalid local_epoch")
        for purpose, key_id in self.active.items():
            if not _is_uint(key_id) or key_id > 0xFFFFFFFF:
                raise SidecarError(f"active {purpose} id must be a 32-bit integer")
            if key_id == 0:
                continue
            key = self.keys.get(key_id)
            if key is None:
                raise SidecarError(f"active {purpose} key {key_id} is not in keys")
            if key.purpose != purpose:
                raise SidecarError(f"active {purpose} key {key_id} has purpose {key.purpose}")

    def to_json(self) -> bytes:
        """Returns the validated JSON form (sorted keys, so equal content gives equal bytes)."""
        self.validate()
        document = {
            "version": self.version,
            "raft_applied_index": self.raft_applied_index,
            "storage_envelope_active": self.storage_envelope_active,
            "storage_envelope_cutover_index": self.storage_envelope_cutover_index,
            "raft_envelope_cutover_index": self.raft_envelope_cutover_index,
            "active": dict(self.active),
            "keys": {
                str(key_id): {
                    "purpose": key.purpose,
                    "wrapped": base64.b64encode(key.wrapped).decode("ascii"),
                    "created": key.created,
                    "local_epoch": key.local_epoch,
                }
                for key_id, key in sorted(self.keys.items())
            },
        }
        if self.kek_generation:
            document["kek_generation"] = self.kek_generation
            document["kek_check"] = base64.b64encode(self.kek_check).decode("ascii")
        return (json.dumps(document, sort_keys=True, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "Sidecar":
        """Parses and validates sidecar JSON; raises `SidecarError`."""
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise SidecarError(f"not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise SidecarError("the top level must be an object")
        expected = {"version", "raft_applied_index", "storage_envelope_active",
                    "storage_envelope_cutover_index", "raft_envelope_cutover_index",
                    "active", "keys"}
        rewrapped = {"kek_generation", "kek_check"}
        if len(rewrapped & set(document)) == 1:
            raise SidecarError("kek_generation and kek_check go together")
        if set(document) not in (expected, expected | rewrapped):
            missing = expected - set(document)
            extra = set(document) - expected - rewrapped
            raise SidecarError(f"fields missing {sorted(missing)} or unknown {sorted(extra)}")
        keys_doc = document["keys"]
        if not isinstance(keys_doc, dict):
            raise SidecarError("keys must be an object")
        keys: dict[int, SidecarKey] = {}
        for text, entry in keys_doc.items():
            if not _DECIMAL_ID.fullmatch(text):
                raise SidecarError(f"key id {text!r} must be decimal and non-zero")
            if not isinstance(entry, dict) or set(entry) != {"purpose", "wrapped", "created",
                                                             "local_epoch"}:
                raise SidecarError(f"key {text} must have purpose, wrapped, created, local_epoch")
            wrapped = _base64(entry["wrapped"])
            if wrapped is None:
                raise SidecarError(f"key {text} wrapped is not base64")
            keys[int(text)] = SidecarKey(purpose=entry["purpose"], wrapped=wrapped,
                                         created=entry["created"],
                                         local_epoch=entry["local_epoch"])
        active = document["active"]
        kek_check = b""
        if "kek_check" in document:
            kek_check = _base64(document["kek_check"])
            if kek_check is None:
                raise SidecarError("kek_check is not base64")
        sidecar = cls(
            version=document["version"],
            raft_applied_index=document["raft_applied_index"],
            storage_envelope_active=document["storage_envelope_active"],
            storage_envelope_cutover_index=document["storage_envelope_cutover_index"],
            raft_envelope_cutover_index=document["raft_envelope_cutover_index"],
            active=dict(active) if isinstance(active, dict) else active,
            keys=keys,
            kek_generation=document.get("kek_generation", 0),
            kek_check=kek_check,
        )
        sidecar.validate()
        return sidecar


def _base64(text: Any) -> Optional[bytes]:
    """Returns the bytes of a base64 string, or None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def sidecar_of(state: "EncryptionState", epochs: Mapping[int, int]) -> Sidecar:
    """The sidecar recording `state`'s key table, cutovers and KEK generation, with `epochs`
    as this node's nonce epoch per key id (0 for a key it has no epoch for)."""
    return Sidecar(
        raft_applied_index=state.key_change_index,
        storage_envelope_active=state.storage_envelope_active,
        storage_envelope_cutover_index=state.storage_cutover_index,
        raft_envelope_cutover_index=state.raft_cutover_index,
        active={"storage": state.active_storage_id, "raft": state.active_raft_id},
        keys={key_id: SidecarKey(PURPOSE_NAMES[key.purpose], key.wrapped, key.created,
                                 epochs.get(key_id, 0))
              for key_id, key in state.keys.items()},
        kek_generation=state.kek_generation, kek_check=state.kek_check)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sidecar_dir(data_dir: str) -> str:
    """Returns `<data-dir>/encryption`, the plugin's data directory (`plugin_data_dir`)."""
    return plugin_data_dir(data_dir, DIR_NAME)


def sidecar_path(data_dir: str) -> str:
    """Returns `<data-dir>/encryption/keys.json`."""
    return os.path.join(sidecar_dir(data_dir), FILE_NAME)


def read_sidecar(data_dir: str) -> Optional[Sidecar]:
    """Returns the sidecar, or None when there is none; raises `SidecarError` if invalid."""
    path = sidecar_path(data_dir)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    try:
        return Sidecar.from_json(data)
    except SidecarError as error:
        raise SidecarError(f"{path}: {error}") from None


def write_sidecar(data_dir: str, sidecar: Sidecar) -> None:
    """Validates `sidecar` and replaces the file crash-safely (see the module docstring)."""
    data = sidecar.to_json()  # validates before anything touches the disk
    directory = sidecar_dir(data_dir)
    _ensure_dir(directory)
    temp = os.path.join(directory, TEMP_NAME)
    try:
        os.unlink(temp)  # left by a crash before the rename: the old file is authoritative
    except FileNotFoundError:
        pass
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, os.path.join(directory, FILE_NAME))
    fsync_directory(directory)


def fsync_directory(directory: str) -> None:
    """Makes the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_directory_fsync(data_dir: str) -> None:
    """Refuses start-up (`StartupRefused`) when the sidecar directory cannot be fsynced."""
    directory = sidecar_dir(data_dir)
    try:
        _ensure_dir(directory)
        fsync_directory(directory)
    except OSError as error:
        reason = errno.errorcode.get(error.errno or 0, str(error.errno))
        raise StartupRefused(
            f"the filesystem of {directory} cannot fsync a directory ({reason}): the "
            "encryption sidecar cannot be written crash-safely there; put the data directory "
            "on a local filesystem that supports directory fsync (ext4, xfs)") from None


def _ensure_dir(directory: str) -> None:
    if os.path.isdir(directory):
        return
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fsync_directory(os.path.dirname(os.path.abspath(directory)))

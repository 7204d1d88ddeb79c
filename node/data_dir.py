"""The node's data directory: its exclusive lock and the plugin data it must not ignore."""
from __future__ import annotations

import fcntl
import os
from typing import Iterable, Optional

from sealkv.plugins.api import plugin_data_dir


class DataDirError(RuntimeError):
    """The data directory cannot be used; the message says what to do."""


class DataDirLock:
    """An exclusive `flock` on `<data-dir>/LOCK` (holding this process's pid) while the node runs.

    `acquire` is called once on the start-up thread; `release` once at shutdown.
    """

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Takes the lock; raises `DataDirError` when another process holds it."""
        fd = os.open(os.path.join(self.data_dir, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataDirError(f"data directory {self.data_dir} is in use by another "
                               "sealkv process") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def refuse_disabled_plugin_data(data_dir: str, enabled: Iterable[str],
                                storage_layers: Iterable[str]) -> None:
    """Raises `DataDirError` when a storage layer that is not enabled left data here.

    A storage layer keeps its node-local files under `plugin_data_dir(data_dir, name)` (the
    plugin API's rule); a file there means this node holds data only that layer can read.
    `storage_layers` are the installed storage layer names; nothing is imported.
    """
    enabled = set(enabled)
    for name in storage_layers:
        directory = plugin_data_dir(data_dir, name)
        if name in enabled or not os.path.isdir(directory):
            continue
        files = sorted(f for f in os.listdir(directory)
                       if os.path.isfile(os.path.join(directory, f)))
        if files:
            raise DataDirError(
                f"{os.path.join(directory, files[0])} exists but {name} is not enabled: this "
                f"node holds data of the {name} storage layer; start it with that plugin "
                f"enabled (--plugins {name}, with the plugin's options)")

"""Small real disks for the fault harness: each initial node's data directory on its own
loop-mounted ext4 filesystem, which the nemesis can fill to the last block and free again.

ext4 on a loop device (not tmpfs) gives the nodes real fdatasync and real ENOSPC from the
journal, the meta writer and LMDB alike. Mounting needs root, mkfs.ext4 and a free loop
device; `DataDisks.create` says why when it cannot, and the run goes on without the fault.
The image files are sparse and mounted with `discard`, so a filled and freed disk gives its
blocks back to the host.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from typing import Optional

# Generous for a 40-60 s run: a node's data directory holds 16 MiB journal chunks, the LMDB
# file and dumps (about 20-60 MiB); the disk reserve of the write admission is 1/8 of it.
DISK_BYTES = 384 * 1024 * 1024
BALLAST = "ballast"
_CHUNK = 1024 * 1024


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


class DataDisks:
    """One loop-mounted ext4 filesystem per named node, under `base_dir/disks/NAME`; the
    node's data directory is `data` on it, and the ballast that fills it lives beside that."""

    def __init__(self, base_dir: str) -> None:
        self.root = os.path.join(base_dir, "disks")
        self.mounts: dict[str, str] = {}  # node name -> mount point

    @classmethod
    def create(cls, base_dir: str, names: list[str]) -> tuple[Optional["DataDisks"], str]:
        """Mounts a fresh disk for each of `names`; returns (the disks, "") or (None, why not).
        Nothing stays mounted when it fails."""
        if os.geteuid() != 0:
            return None, "loop-mounted disks need root"
        missing = [tool for tool in ("mkfs.ext4", "mount", "umount")
                   if shutil.which(tool) is None]
        if missing:
            return None, f"loop-mounted disks need {', '.join(missing)}"
        disks = cls(base_dir)
        try:
            for name in names:
                disks._mount(name)
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            disks.close()
            return None, f"cannot loop-mount a disk here: {exc}"
        return disks, ""

    def _mount(self, name: str) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        image = os.path.join(self.root, f"{name}.img")
        mount_point = os.path.join(self.root, name)
        with open(image, "wb") as f:
            f.truncate(DISK_BYTES)
        # -m 0: no blocks kept back for root (the nodes run as root and would use them).
        done = _run("mkfs.ext4", "-q", "-F", "-m", "0", image)
        if done.returncode != 0:
            raise RuntimeError(f"mkfs.ext4: {done.stderr.strip()}")
        os.makedirs(mount_point, mode=0o700)
        done = _run("mount", "-o", "loop,discard", image, mount_point)
        if done.returncode != 0:
            raise RuntimeError(f"mount -o loop: {done.stderr.strip()}")
        self.mounts[name] = mount_point
        os.chmod(mount_point, 0o700)

    def data_dir(self, name: str) -> str:
        """Where node `name` keeps its data (the node creates it)."""
        return os.path.join(self.mounts[name], "data")

    def fill(self, name: str) -> int:
        """Fills node `name`'s disk to the last block with a ballast file (fdatasynced);
        returns the bytes it took. Calling it again fills what was freed since."""
        path = os.path.join(self.mounts[name], BALLAST)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        taken = 0
        try:
            st = os.fstatvfs(fd)
            free = st.f_bavail * st.f_frsize
            size = os.fstat(fd).st_size
            # Most of it at once (no data written), then the rest block by block until the
            # file system says no: what the extents' metadata needs is not known in advance.
            if free > 8 * _CHUNK:
                try:
                    os.posix_fallocate(fd, size, free - 4 * _CHUNK)
                    taken += free - 4 * _CHUNK
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
            os.lseek(fd, 0, os.SEEK_END)
            for chunk in (_CHUNK, 4096, 512):
                block = b"\0" * chunk
                while True:
                    try:
                        taken += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            try:
                os.fdatasync(fd)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        finally:
            os.close(fd)
        return taken

    def free(self, name: str) -> bool:
        """Deletes node `name`'s ballast; returns whether there was one."""
        try:
            os.unlink(os.path.join(self.mounts[name], BALLAST))
        except FileNotFoundError:
            return False
        return True

    def free_all(self) -> None:
        for name in self.mounts:
            self.free(name)

    def close(self, keep_images: bool = False) -> list[str]:
        """Unmounts every disk (lazily when busy) and deletes the images unless
        `keep_images`; returns what could not be unmounted."""
        stuck = []
        for name, mount_point in list(self.mounts.items()):
            if _run("umount", mount_point).returncode != 0 and \
                    _run("umount", "-l", mount_point).returncode != 0:
                stuck.append(mount_point)
                continue
            del self.mounts[name]
        if not keep_images and not stuck and os.path.isdir(self.root):
            for entry in os.listdir(self.root):
                if entry.endswith(".img"):
                    os.unlink(os.path.join(self.root, entry))
        return stuck

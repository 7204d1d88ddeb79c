"""Installs an example package from examples/ into this interpreter for a test module.

A copy is installed (so the build leaves nothing in the repository) and uninstalled at the
end unless it was installed before. Node and CLI processes are new interpreters, so they find
the example's entry points.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _installed_version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _pip_install(source: pathlib.Path) -> None:
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
            "--disable-pip-version-check"]
    first = subprocess.run(base + ["--no-build-isolation", str(source)], capture_output=True,
                           text=True, timeout=300)
    if first.returncode == 0:
        return
    # The environment may lack what a non-isolated build needs: let pip build in isolation.
    second = subprocess.run(base + [str(source)], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (f"pip could not install {source}:\n{first.stderr}\n"
                                    f"{second.stderr}")


@contextlib.contextmanager
def installed_example(folder: str, dist: str, scratch: pathlib.Path, package: str):
    """Installs examples/`folder` (distribution `dist`, import name `package`) for the block.

    On the way out the package's modules leave `sys.modules` too, so a later test that imports
    the example from its source folder is not handed the uninstalled copy."""
    was_installed = _installed_version(dist) is not None
    source = scratch / folder
    shutil.copytree(REPO / "examples" / folder, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    _pip_install(source)
    importlib.invalidate_caches()  # the path finders cache directory listings
    try:
        yield
    finally:
        if not was_installed:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", dist],
                           capture_output=True, timeout=120)
            importlib.invalidate_caches()
            for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
                del sys.modules[name]

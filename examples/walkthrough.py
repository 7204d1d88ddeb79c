"""The sealkv walkthrough: a local cluster switched from cleartext to encryption at rest online.

It starts a 3-node cluster whose nodes are encryption capable (one KEK file, 0600, outside
every node's data directory), puts a value in cleartext, bootstraps the data keys (the
leader generates and wraps them: you never handle key bytes), enables the storage envelope
(showing the capability check of every member) and the raft-log envelope, puts and gets
through both, re-encrypts the value written before (then every member compacts, so no old
copy stays in any file), and shows the encryption and cluster status.

Run it from a clone (the README's first command does):

    python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/python examples/walkthrough.py

It runs the `sealkv` CLI exactly as you would type it, showing each command and its output,
and leaves the cluster running in ./.sealkv so you can keep going (`sealkv get greeting`);
`sealkv cluster down` stops it. Re-running it replaces the cluster it created before.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

DATA_DIR = ".sealkv"
MARKER = os.path.join(DATA_DIR, "created-by-walkthrough")
SEALKV = [sys.executable, "-m", "sealkv.node.cli"]


def sealkv(*args: str, check: bool = True) -> str:
    """Runs `sealkv ARGS`, echoing the command and its output; returns stdout."""
    print(f"\n$ sealkv {shlex.join(args)}", flush=True)
    result = subprocess.run(SEALKV + list(args), capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if check and result.returncode != 0:
        sys.exit(f"walkthrough failed: `sealkv {shlex.join(args)}` exited {result.returncode}")
    return result.stdout


def fresh_data_dir() -> None:
    if not os.path.exists(DATA_DIR):
        return
    if not os.path.exists(MARKER):
        sys.exit(f"{DATA_DIR} exists and was not made by this walkthrough: stop that cluster "
                 "(`sealkv cluster down --purge`) or run the walkthrough elsewhere")
    subprocess.run(SEALKV + ["cluster", "down", "--purge"], capture_output=True)
    shutil.rmtree(DATA_DIR, ignore_errors=True)


def main() -> None:
    fresh_data_dir()
    sealkv("-w", "table", "cluster", "up", "--nodes", "3", "--encryption")
    open(MARKER, "w").close()
    with open(os.path.join(DATA_DIR, "cluster.json")) as f:
        endpoints = [n["grpc"] for n in json.load(f)["nodes"]]
    print("\n# a value written before encryption is enabled is stored in cleartext:")
    sealkv("--endpoints", endpoints[0], "put", "greeting", "hello, sealkv")
    print("\n# the leader generates the data keys and wraps them with the KEK:")
    sealkv("-w", "table", "encryption", "bootstrap")
    print("\n# every member must prove it can read envelopes before the cutover:")
    sealkv("-w", "table", "encryption", "enable-storage-envelope")
    print("\n# from here on every replica stores new values in AES-256-GCM envelopes:")
    sealkv("--endpoints", endpoints[1], "put", "secret", "sealed at rest")
    print("\n# the Raft log still carries commands in the clear: seal every later entry too:")
    sealkv("-w", "table", "encryption", "enable-raft-envelope")
    sealkv("--endpoints", endpoints[1], "put", "secret2", "sealed in the log too")
    print("\n# the value written before the cutover is still cleartext at rest: rewrite it")
    print("# under the active key, then every member compacts (new journal and dump files):")
    sealkv("encryption", "reencrypt")
    print("\n# read both back from another node, linearizably (the default):")
    sealkv("--endpoints", endpoints[2], "get", "secret")
    sealkv("--endpoints", endpoints[2], "get", "greeting")
    sealkv("--endpoints", endpoints[2], "get", "secret2")
    sealkv("-w", "table", "encryption", "status", "--cluster")
    sealkv("-w", "table", "cluster", "status")
    print("\nThe cluster keeps running: try `sealkv get secret`, `sealkv member list -w table`,"
          "\n`sealkv encryption rotate-dek --purpose storage`; stop it with `sealkv cluster down`.")


if __name__ == "__main__":
    main()

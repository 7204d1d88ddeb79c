"""The sealkv walkthrough: a local 3-node cluster, a Put, a Get from another node, the status.

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
    sealkv("-w", "table", "cluster", "up", "--nodes", "3")
    open(MARKER, "w").close()
    with open(os.path.join(DATA_DIR, "cluster.json")) as f:
        endpoints = [n["grpc"] for n in json.load(f)["nodes"]]
    sealkv("--endpoints", endpoints[0], "put", "greeting", "hello, sealkv")
    print("\n# read it back from another node, linearizably (the default):")
    sealkv("--endpoints", endpoints[1], "get", "greeting")
    sealkv("-w", "table", "cluster", "status")
    print("\nThe cluster keeps running: try `sealkv get greeting`, `sealkv member list -w table`;"
          "\nstop it with `sealkv cluster down`.")


if __name__ == "__main__":
    main()

"""Shared pytest configuration: the repo root on sys.path and the test markers."""
import hashlib
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# pytest keeps the last three numbered session directories under one root per user and
# deletes older ones when a session starts: two checkouts testing at once on one machine would
# delete each other's live test directories (data dirs of running nodes). One root per checkout.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", os.path.join(
    tempfile.gettempdir(), "sealkv-tests-" + hashlib.sha1(ROOT.encode()).hexdigest()[:10]))
os.makedirs(os.environ["PYTEST_DEBUG_TEMPROOT"], mode=0o700, exist_ok=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts real node processes on loopback")
    config.addinivalue_line("markers", "faults: fault-injection runs with a linearizability check")


def pytest_addoption(parser):
    group = parser.getgroup("sealkv fault runs")
    group.addoption("--fault-seeds", default="1-12",
                    help="seeds of the fault suite: '7', '1,5,9' or '1-200' (default 1-12)")
    group.addoption("--fault-duration", type=float, default=40.0,
                    help="seconds of faults per seed (default 40: time for the encryption "
                         "operator to get through both cutovers and retire a key under faults)")
    group.addoption("--fault-disks", action="store_true", default=False,
                    help="give each initial node a small loop-mounted ext4 disk and add the "
                         "fill-disk fault (needs root; off by default: it still finds "
                         "violations, see the README's Robustness section)")


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return seeds


def pytest_generate_tests(metafunc):
    if "fault_seed" in metafunc.fixturenames:
        metafunc.parametrize("fault_seed", parse_seeds(metafunc.config.getoption("fault_seeds")))


FAULT_RESULTS: list = []


def pytest_terminal_summary(terminalreporter):
    if FAULT_RESULTS:
        from tests.faults.harness import write_summary

        terminalreporter.write_line(write_summary(FAULT_RESULTS))

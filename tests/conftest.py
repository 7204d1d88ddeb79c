"""Shared pytest configuration: the repo root on sys.path and the test markers."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts real node processes on loopback")
    config.addinivalue_line("markers", "faults: fault-injection runs with a linearizability check")

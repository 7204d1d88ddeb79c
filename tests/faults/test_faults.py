"""The fault suite: seeded runs of the fault harness (see tests/faults/harness.py).

    pytest tests/faults -m faults --fault-seeds 1-200 --fault-duration 30

A failing seed prints the command that replays its fault schedule and keeps its history (and
the nodes' logs) under fault-histories/.
"""
import pytest

from tests import conftest
from tests.faults.harness import replay_command, run_seed
from tests.faults.netns import Network

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def no_leftover_namespaces():
    """Removes what an interrupted earlier run left behind, before and after this module."""
    if Network.available()[0]:
        Network.remove_leftovers()
    yield
    if Network.available()[0]:
        Network.remove_leftovers()


def test_fault_run_keeps_every_promise(fault_seed, tmp_path, request):
    duration = request.config.getoption("fault_duration")
    available, why = Network.available()
    result = run_seed(fault_seed, str(tmp_path), duration, use_netns=available,
                      use_disks=request.config.getoption("fault_disks"))
    conftest.FAULT_RESULTS.append(result)
    if not available:
        print(f"partitions skipped: {why}")
    if request.config.getoption("fault_disks") and result.disks_skipped:
        print(f"fill-disk skipped: {result.disks_skipped}")
    replay = replay_command(fault_seed, duration, result.disks)
    assert not result.problems, (
        f"seed {fault_seed} broke a promise:\n  " + "\n  ".join(result.problems)
        + f"\nhistory: {result.history_file}\nreplay: {replay}")
    assert result.operations > 0 and result.verdict == "ok"

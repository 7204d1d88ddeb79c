"""The fault harness keeps every failure: log scanning for CRITICAL lines and tracebacks,
and the evidence (history, full logs, replay command) it keeps when a run fails."""
import json
import re

from tests.cluster import Cluster
from tests.faults import harness
from tests.faults.history import Operation, load_history

CLEAN = """\
2026-11-30 17:12:22,256 INFO sealkv.node.server: node n1 serving gRPC
2026-11-30 17:12:32,823 WARNING sealkv.node.replication.raft_rules: follower lost entries
"""

BAD = CLEAN + """\
2026-11-30 17:13:00,000 CRITICAL sealkv.node.replication.adapter: halting: entry 9: boom
2026-11-30 17:13:01,000 ERROR pysyncobj.syncobj: failed _onTick in _autoTickThread
Traceback (most recent call last):
  File "syncobj.py", line 593, in _autoTickThread
    self._onTick(self.__conf.autoTickPeriod)
KeyError: 'x'
2026-11-30 17:13:02,000 INFO sealkv.node.server: node n1 stopping
"""


def test_a_clean_log_has_no_events():
    assert harness.log_events(CLEAN) == []


def test_critical_lines_and_tracebacks_are_events():
    events = harness.log_events(BAD)
    assert len(events) == 2
    assert "CRITICAL" in events[0] and "halting" in events[0]
    assert events[1] == ("traceback after [2026-11-30 17:13:01,000 ERROR pysyncobj.syncobj: "
                         "failed _onTick in _autoTickThread]: KeyError: 'x'")


def test_a_traceback_cut_off_by_a_kill_is_still_an_event():
    events = harness.log_events("x\nTraceback (most recent call last):\n  File \"a.py\"\n")
    assert events == ["traceback after [x]: (log ends inside the traceback)"]


def test_only_listed_expected_events_are_forgiven(monkeypatch):
    assert len(harness.log_problems("n1", BAD)) == 2
    monkeypatch.setattr(harness, "EXPECTED_LOG_EVENTS", (
        ("a fault for tests only", re.compile(r"failed _onTick.*KeyError")),))
    problems = harness.log_problems("n1", BAD)
    assert len(problems) == 1 and problems[0].startswith("n1 logged ") and "halting" in problems[0]


def test_a_failed_run_keeps_history_full_logs_and_prints_the_replay(tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setattr(harness, "HISTORY_DIR", str(tmp_path / "kept"))
    cluster = Cluster(str(tmp_path), 3)
    long_log = "".join(f"2026-11-30 17:00:00,000 INFO x: line {i}\n" for i in range(2000))
    for node in cluster.nodes.values():
        with open(node.log_file, "w") as f:
            f.write(long_log + f"last line of {node.name}\n")
    recorder = harness.Recorder()
    recorder.add(Operation(0, "put", b"r0", b"v", None, 1.0, 2.0, None))
    result = harness.RunResult(907, problems=["the run failed: ReadTimeout: read timed out"])
    harness.keep_evidence(907, 30, cluster, recorder, result)
    assert load_history(result.history_file) == recorder.history
    logs = (tmp_path / "kept" / "seed-907.logs.txt").read_text()
    for name in ("n1", "n2", "n3"):
        assert f"--- {name} ---" in logs and f"last line of {name}" in logs
    assert "line 0\n" in logs  # the whole log, not its tail
    out = capsys.readouterr().out
    assert "replay: pytest tests/faults -m faults --fault-seeds 907 --fault-duration 30" in out


def test_cleaning_up_leftovers_never_touches_a_live_run():
    """The machine is shared: one run's cleanup must not delete another live run's network."""
    import random
    import subprocess
    import sys

    import pytest

    from tests.faults.netns import Network

    available, why = Network.available()
    if not available:
        pytest.skip(f"needs network namespaces: {why}")
    cleanup = [sys.executable, "-c",
               "from tests.faults.netns import Network; print(Network.remove_leftovers())"]
    live = Network(random.Random())
    try:
        live.add_host("a")
        out = subprocess.run(cleanup, capture_output=True, text=True, check=True).stdout
        assert live.namespaces["a"] not in out
        assert live.namespaces["a"] in subprocess.run(["ip", "netns", "list"],
                                                      capture_output=True, text=True).stdout
    finally:
        live.close()


def test_the_summary_counts_every_kind_done_and_refused_with_its_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "HISTORY_DIR", str(tmp_path / "kept"))
    first, second = harness.RunResult(1), harness.RunResult(2)
    first.count("retire-dek", False, "RetireDEK: key 3 is still used by 12 stored values")
    first.count("retire-dek", True)
    second.count("retire-dek", False, "RetireDEK: key 5 is still used by 1 stored values")
    second.count("kill-leader", True, since=second.started)
    lines = harness.write_summary([first, second]).splitlines()
    assert lines[0].startswith("fault runs: 2 seeds") and "failing seeds: none" in lines[0]
    assert lines[1] == "  kill-leader: 1 done, 0 refused; done in 1/2 seeds"
    assert lines[2] == ("  retire-dek: 1 done, 2 refused; done in 1/2 seeds; refused: 2x "
                        "RetireDEK: key N is still used by N stored values")
    kept = json.loads((tmp_path / "kept" / "summary.json").read_text())
    assert kept[1]["timeline"][0][2] == "kill-leader" and kept[0]["faults"]["retire-dek"] == 1


def test_every_nemesis_fault_kind_has_its_own_step():
    """Each kind the nemesis draws runs a `do_KIND` of its own (a kind whose step went missing
    would fail every run that draws it, or run another kind's step under its name)."""
    nemesis = harness.Nemesis.__new__(harness.Nemesis)
    nemesis.partitions, nemesis.disks = True, object()
    kinds = nemesis.kinds()
    assert {"fill-disk", "membership", "partition-split"} <= set(kinds)
    steps = [getattr(harness.Nemesis, "do_" + k.replace("-", "_")) for k in kinds]
    assert len({s.__code__ for s in steps}) == len(kinds)
    nemesis.partitions, nemesis.disks = False, None
    assert "fill-disk" not in nemesis.kinds() and "partition-split" not in nemesis.kinds()

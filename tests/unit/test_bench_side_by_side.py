"""The side-by-side envelope rows' arithmetic: a row is the median of its runs, and the
target table's envelope ratios compare the medians of the same run."""
import pytest

from sealkv.node.bench import compare, side_by_side


def run(ops, cpu, errors=None, note="", batch=None):
    return {"puts_per_entry": batch, "name": "x", "clients": 4, "ops": int(ops * 2), "seconds": 2.0,
            "ops_per_sec": ops, "p50_ms": 1000.0 / ops, "p90_ms": None, "p99_ms": None,
            "max_ms": None, "errors": errors or {}, "note": note,
            "client_cpu_us_per_op": 50.0, "server_cpu_us_per_op": cpu,
            "server_cpu_us_per_op_above_idle": cpu - 30, "client_busiest": 0.2}


def test_median_row_takes_the_medians_and_keeps_every_run():
    runs = [run(900, 300, batch=20.0), run(1500, 250, batch=30.0), run(1000, 280, batch=25.0),
            run(400, 500, batch=8.0), run(1100, 260)]
    row = side_by_side.median_row("r", runs)
    assert row["puts_per_entry"] == 22.5 and row["runs_puts_per_entry"][-1] is None
    assert row["server_cpu_us_per_op_above_idle"] == 280 - 30
    assert row["server_cpu_us_per_op_above_idle"] <= row["server_cpu_us_per_op"]
    assert row["name"] == "r"
    assert row["ops_per_sec"] == 1000 and row["server_cpu_us_per_op"] == 280
    assert row["p50_ms"] == pytest.approx(1.0)  # the latencies of the median run
    assert row["runs_ops_per_sec"] == [900, 1500, 1000, 400, 1100]
    assert row["runs_server_cpu_us_per_op"] == [300, 250, 280, 500, 260]
    assert row["ops"] == sum(r["ops"] for r in runs)


def test_median_row_of_an_even_count_averages_the_middle_pair_and_sums_errors():
    row = side_by_side.median_row("r", [run(1000, 200, {"UNAVAILABLE": 1}),
                                        run(2000, 100, {"UNAVAILABLE": 2, "ABORTED": 1},
                                            note="client side saturated")])
    assert row["ops_per_sec"] == 1500 and row["server_cpu_us_per_op"] == 150
    assert row["errors"] == {"ABORTED": 1, "UNAVAILABLE": 3}
    assert row["note"] == "client side saturated"


def test_envelope_targets_compare_the_median_rows():
    rows = {side_by_side.row_name(s, 64, 3): side_by_side.median_row(
        side_by_side.row_name(s, 64, 3), runs)
        for s, runs in (("off", [run(1000, 300), run(1200, 280), run(800, 320)]),
                        ("storage", [run(1100, 310), run(950, 300), run(700, 330)]),
                        ("both", [run(990, 305), run(1300, 290), run(900, 330)]))}
    got = {t["what"]: t for t in compare.targets(rows, 64, 3)}
    storage = got["Put, 64 clients, ops/s: storage envelope on vs off (medians, side by side)"]
    assert storage["ratio"] == pytest.approx(0.95) and storage["holds"] is True
    assert storage["reference"] == "sealkv envelopes off put c=64 median of 3"
    both = got["Put, 64 clients, ops/s: both envelopes (storage + raft log) vs off (medians, "
               "side by side)"]
    assert both["ratio"] == pytest.approx(0.99) and both["holds"] is True
    cpu = got["server CPU per Put at 64 clients, µs: both envelopes vs off (medians)"]
    assert cpu["ratio"] == pytest.approx(305 / 300, abs=0.001) and cpu["holds"] is None


def test_round_ratios_name_each_round_and_their_median():
    runs = {"off": [run(1000, 300), run(2000, 300), run(500, 300)],
            "storage": [run(950, 310), run(1800, 310), run(600, 310)],
            "both": [run(900, 320), run(1900, 320), run(450, 320)]}
    notes = side_by_side.round_ratios(runs)
    assert notes == [
        "storage envelope ÷ envelopes off, ops/s round by round: 0.95, 0.90, 1.20 "
        "(median 0.95)",
        "both envelopes ÷ envelopes off, ops/s round by round: 0.90, 0.95, 0.90 (median 0.90)"]
    assert side_by_side.round_ratios({"off": runs["off"]}) == []


def test_per_entry_is_commands_over_entries_between_two_readings():
    assert side_by_side.per_entry((10, 100), (20, 350)) == 25.0
    assert side_by_side.per_entry(None, (20, 350)) is None
    assert side_by_side.per_entry((20, 350), (20, 350)) is None

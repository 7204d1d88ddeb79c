"""The load generators' shared tally: only operations inside the measured window count."""
from sealkv.node.bench.workers import Tally


def test_a_tally_counts_only_operations_inside_the_window():
    tally = Tally(measure_from=10.0, stop_at=20.0)
    tally.record(9.5, 10.5, None)         # began in the warm-up
    tally.record(12.0, 12.25, None)
    tally.record(13.0, 14.0, "UNAVAILABLE")
    tally.record(14.0, 14.5, "UNAVAILABLE")
    tally.record(19.5, 20.5, None)        # ended after the window
    result = tally.result
    assert (result.ops, list(result.latencies)) == (1, [0.25])
    assert result.errors == {"UNAVAILABLE": 2}
    assert result.seconds == 10.0

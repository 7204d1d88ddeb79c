"""`sealkv bench`: a benchmark that cannot run says so on stderr with exit 1."""
from click.testing import CliRunner

from sealkv.node.bench import envelope
from sealkv.node.cli.main import EXIT_FAILED, register_commands


def test_a_benchmark_that_fails_to_run_is_reported_not_raised(monkeypatch):
    def broken(sizes, iterations):
        raise RuntimeError("no AES-GCM here")

    monkeypatch.setattr(envelope, "run", broken)
    result = CliRunner().invoke(register_commands(), ["bench", "envelope", "--sizes", "100"])
    assert result.exit_code == EXIT_FAILED
    assert "Error: the envelope benchmark did not run: RuntimeError: no AES-GCM here" \
        in result.output

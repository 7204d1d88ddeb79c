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


def test_the_load_generator_writes_a_fresh_value_each_time():
    from sealkv.node.bench.workload import KeyPicker, Workload

    picker = KeyPicker(Workload(value_size=256), seed=1)
    values = [picker.value(256) for _ in range(64)]
    assert all(len(v) == 256 for v in values) and len(set(values)) == 64
    assert KeyPicker(Workload(), seed=1).value(256) == values[0]  # reproducible per seed


def test_bench_peer_wire_times_both_formats_of_each_message():
    import json

    result = CliRunner().invoke(register_commands(),
                                ["-w", "json", "bench", "peer-wire", "--iterations", "3"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert {(r["message"], r["format"]) for r in rows} == {
        (m, f) for m in ("put", "batch64", "reply") for f in ("fernet", "gcm")}
    frame = {(r["message"], r["format"]): r["frame_bytes"] for r in rows}
    # Fernet's base64 inflates by a third (after zlib); GCM adds 26 bytes to the pickle.
    assert frame["batch64", "fernet"] > 1.2 * frame["batch64", "gcm"]

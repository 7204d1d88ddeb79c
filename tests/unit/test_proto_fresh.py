"""The committed generated proto modules must match what proto/generate.py produces now."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto"
COMMITTED = PROTO / "sealkv" / "v1"


def _generate_module():
    spec = importlib.util.spec_from_file_location("sealkv_proto_generate", PROTO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_proto_has_committed_modules():
    protos = sorted(p.stem for p in COMMITTED.glob("*.proto"))
    assert protos, "no .proto sources found"
    for stem in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            assert (COMMITTED / f"{stem}{suffix}").exists(), (
                f"proto/sealkv/v1/{stem}{suffix} is missing: run `python proto/generate.py`")


def test_generated_modules_are_fresh(tmp_path):
    _generate_module().generate(out_dir=tmp_path)
    fresh = {p.relative_to(tmp_path).as_posix(): p.read_bytes()
             for p in tmp_path.rglob("*_pb2*.py")}
    committed = {p.relative_to(PROTO).as_posix(): p.read_bytes()
                 for p in COMMITTED.glob("*_pb2*.py")}
    assert fresh, "proto/generate.py produced no modules"
    stale = sorted(name for name in fresh.keys() | committed.keys()
                   if fresh.get(name) != committed.get(name))
    assert not stale, (f"generated proto modules are stale or missing: {', '.join(stale)}; "
                       "run `python proto/generate.py` and commit the result")

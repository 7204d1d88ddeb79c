"""Regenerates the Python modules of the sealkv.v1 protos, in place.

Run `python proto/generate.py` after editing a .proto file; tests/unit/test_proto_fresh.py fails
while the committed modules are stale.
"""
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent


def generate(out_dir: pathlib.Path = ROOT) -> None:
    """Writes *_pb2.py and *_pb2_grpc.py for every proto under proto/sealkv/v1 into out_dir."""
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "sealkv" / "v1").glob("*.proto"))
    code = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", *sources])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    generate()

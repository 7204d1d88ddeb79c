"""Regenerates the Python modules of the example's protos, in place.

Run `python generate_proto.py` from anywhere after editing a .proto under
`sealkv_consistency_admin/v1/` (it needs `grpcio-tools`). The include root is this folder, so the
proto path mirrors the Python package path and the generated `*_pb2_grpc.py` imports
`sealkv_consistency_admin.v1.consistency_pb2` without rewriting.
"""
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
PROTO_DIR = ROOT / "sealkv_consistency_admin" / "v1"


def generate(out_dir: pathlib.Path = ROOT) -> None:
    """Writes *_pb2.py and *_pb2_grpc.py for every proto under PROTO_DIR below `out_dir`."""
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(ROOT)) for p in PROTO_DIR.glob("*.proto"))
    code = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", *sources])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    generate()

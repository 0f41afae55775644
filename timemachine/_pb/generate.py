"""Regenerate ``timemachine_pb2.py`` from ``proto/timemachine.proto``.

Run ``python -m timemachine._pb.generate`` after changing the .proto; the test
``tests.test_proto`` fails while the generated module is out of date.
"""

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
OUT_DIR = Path(__file__).resolve().parent
PROTO_NAME = "timemachine.proto"
MODULE_NAME = "timemachine_pb2.py"


def generate(out_dir: Path) -> Path:
    """Write the generated module into ``out_dir`` and return its path."""
    from grpc_tools import protoc

    status = protoc.main(
        ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", str(PROTO_DIR / PROTO_NAME)]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    return out_dir / MODULE_NAME


if __name__ == "__main__":
    print(generate(OUT_DIR))
    sys.exit(0)

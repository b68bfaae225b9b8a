"""Regenerates the committed protobuf/gRPC modules from ``opsplane.proto``.

Run ``python -m opsplane.transport.grpc.codegen`` after editing the proto; a unit test fails
while the committed modules are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path(__file__).with_name("opsplane.proto")
SRC_ROOT = Path(__file__).resolve().parents[3]


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules under ``out_dir`` (a src root) and return their paths."""
    from grpc_tools import protoc  # dev-only dependency

    relative = PROTO.resolve().relative_to(SRC_ROOT)
    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{SRC_ROOT}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(relative),
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    base = out_dir / relative.parent
    return [base / "opsplane_pb2.py", base / "opsplane_pb2.pyi", base / "opsplane_pb2_grpc.py"]


if __name__ == "__main__":
    for path in generate(SRC_ROOT):
        sys.stdout.write(f"wrote {path}\n")

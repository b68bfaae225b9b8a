from __future__ import annotations

from pathlib import Path

from opsplane.transport.grpc import codegen


def test_committed_grpc_modules_match_the_proto(tmp_path: Path) -> None:
    for generated in codegen.generate(tmp_path):
        committed = codegen.PROTO.with_name(generated.name)
        assert committed.read_text() == generated.read_text(), (
            f"{committed.name} is stale: run python -m opsplane.transport.grpc.codegen"
        )

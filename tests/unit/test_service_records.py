"""The services the API, the CLI and the links call hand out domain records (copies), never the
store's rows (issue 21): checked on the source, from the return annotations of every public
method of those services, and at run time on a copy."""

from __future__ import annotations

import ast
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

import opsplane
from opsplane.domain.records import HostRecord, UserRecord
from opsplane.store.records import record_of
from opsplane.store.tables import HostRow, UserRow

SRC = Path(opsplane.__file__).parent

# Classes whose public methods are the boundary between the engine/security and their callers.
SERVICES = {
    "engine/service.py": {"TaskService"},
    "engine/hosts.py": {"HostService"},
    "engine/core.py": {"Engine"},
    "engine/templates.py": {"TemplateService"},
    "engine/schedules.py": {"ScheduleService"},
    "security/users.py": {"Users"},
    "security/api_tokens.py": {"Tokens"},
    "security/audit_trail.py": {"AuditTrail"},
    "security/agents.py": {"AgentRegistry"},
    "security/sessions.py": {"Sessions"},
}


def _row_annotations() -> list[str]:
    found = []
    for relative, classes in SERVICES.items():
        tree = ast.parse((SRC / relative).read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ClassDef) and node.name in classes):
                continue
            for item in node.body:
                public = isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                    not item.name.startswith("_")
                )
                if public and item.returns is not None:  # type: ignore[union-attr]
                    text = ast.unparse(item.returns)  # type: ignore[union-attr]
                    names = {n.id for n in ast.walk(item.returns) if isinstance(n, ast.Name)}  # type: ignore[union-attr]
                    if any(name.endswith("Row") for name in names):
                        found.append(f"{relative}: {node.name}.{item.name} -> {text}")
    return found


def test_every_service_class_named_here_exists() -> None:
    for relative, classes in SERVICES.items():
        tree = ast.parse((SRC / relative).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        assert classes <= defined, f"{relative}: {classes - defined}"


def test_no_public_service_method_returns_a_store_row() -> None:
    assert _row_annotations() == []


def test_a_record_is_a_frozen_copy_that_outlives_its_row() -> None:
    now = datetime.now(UTC)
    row = HostRow(name="web-1", link="grpc", groups=["web"], labels={}, status="online",
                  adhoc=False, created_at=now)  # fmt: skip
    record = record_of(HostRecord, row)
    row.status = "offline"
    assert record.status == "online" and record.groups == ["web"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "offline"  # type: ignore[misc]


def test_a_user_record_says_whether_there_is_a_password_without_its_hash() -> None:
    now = datetime.now(UTC)
    row = UserRow(id="u1", name="ann", password_hash="$argon2id$...", role="admin",
                  groups=None, disabled=False, created_at=now, updated_at=now)  # fmt: skip
    record = record_of(UserRecord, row)
    assert record.has_password is True
    assert "password_hash" not in {field.name for field in dataclasses.fields(UserRecord)}

"""Shared test configuration: real-service markers (skip on a laptop, fail under CI)."""

from __future__ import annotations

import os
import socket

import pytest

SERVICES = {
    "postgresql": ("127.0.0.1", 5432),
    "mariadb": ("127.0.0.1", 3306),
    "rabbitmq": ("127.0.0.1", 5672),
}


def services_required() -> bool:
    return (
        os.environ.get("CI", "").lower() == "true"
        or os.environ.get("OPSPLANE_REQUIRE_SERVICES") == "1"
    )


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="service"):
        name = marker.args[0]
        host, port = SERVICES[name]
        if not _reachable(host, port):
            message = f"{name} is not reachable at {host}:{port}"
            if services_required():
                pytest.fail(f"{message} (required: CI=true or OPSPLANE_REQUIRE_SERVICES=1)")
            pytest.skip(message)

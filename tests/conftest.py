"""Shared test configuration: real-service markers (skip on a laptop, fail under CI)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

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


def _sshd_problem() -> str | None:
    # Imported lazily: only the SSH tests need asyncssh and the sshd helpers.
    from tests.integration.sshd import sshd_problem

    return sshd_problem()


# Services the tests start themselves: a check that returns why it cannot run here, or None.
LOCAL_SERVICES: dict[str, Callable[[], str | None]] = {"sshd": _sshd_problem}


def _problem(name: str) -> str | None:
    if name in LOCAL_SERVICES:
        return LOCAL_SERVICES[name]()
    host, port = SERVICES[name]
    return None if _reachable(host, port) else f"{name} is not reachable at {host}:{port}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="service"):
        name = marker.args[0]
        message = _problem(name)
        if message is not None:
            if services_required():
                pytest.fail(f"{message} (required: CI=true or OPSPLANE_REQUIRE_SERVICES=1)")
            pytest.skip(message)

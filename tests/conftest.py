"""Shared test configuration: real-service markers (skip on a laptop, fail under CI)."""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Callable
from typing import NoReturn

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


def unavailable(message: str) -> NoReturn:
    """The one answer to "something this test needs is missing here": skip on a laptop, fail
    under ``CI=true`` (or ``OPSPLANE_REQUIRE_SERVICES=1``), where every test must run."""
    if services_required():
        pytest.fail(f"{message} (required: CI=true or OPSPLANE_REQUIRE_SERVICES=1)")
    pytest.skip(message)


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


def _root_problem() -> str | None:
    return None if os.geteuid() == 0 else "switching users needs root"


def _haproxy_problem() -> str | None:
    # The Debian package installs it in /usr/sbin, which a non-root PATH may lack.
    if shutil.which("haproxy") or os.access("/usr/sbin/haproxy", os.X_OK):
        return None
    return "haproxy is not installed (Debian package haproxy)"


def _nobody_problem() -> str | None:
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return "no user 'nobody' on this host"
    return None


@functools.cache
def _rabbitmqctl_problem() -> str | None:
    """rabbitmqctl must reach the broker's node (as root, or with its Erlang cookie)."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        return "rabbitmqctl is not installed"
    try:
        done = subprocess.run(
            [rabbitmqctl, "list_connections", "-q", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"rabbitmqctl cannot talk to the broker here: {e}"
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["?"])[0]
        return f"rabbitmqctl cannot talk to the broker here: {first}"
    return None


# What the tests need beyond the network services: a check that returns why it is missing
# here, or None. Used as ``@pytest.mark.service("sshd")`` like the network services.
LOCAL_SERVICES: dict[str, Callable[[], str | None]] = {
    "sshd": _sshd_problem,
    "rabbitmqctl": _rabbitmqctl_problem,
    "root": _root_problem,
    "nobody": _nobody_problem,
    "haproxy": _haproxy_problem,
}


def _problem(name: str) -> str | None:
    if name in LOCAL_SERVICES:
        return LOCAL_SERVICES[name]()
    host, port = SERVICES[name]
    return None if _reachable(host, port) else f"{name} is not reachable at {host}:{port}"


# `.ci/run` runs the suite in two steps: every test not marked ``serial`` in two pytest-xdist
# workers, then the ``serial`` ones in one process. Serial are the fault scenarios, whose bounds
# assume no other test loads the machine at the same moment, and every test on RabbitMQ's
# default vhost (a module with that ``AMQP_URL``, or a test marked ``default_vhost``), whose
# shared queues (cmd.result, monitor.heartbeat) two workers would steal from each other. A test
# on a private vhost (tests/rabbitmq.py) needs neither.
DEFAULT_VHOST_URL = "amqp://guest:guest@127.0.0.1:5672/"


def pytest_itemcollected(item: pytest.Item) -> None:
    module = getattr(item, "module", None)
    in_faults = "faults" in item.nodeid.split("/")[:2]
    on_default_vhost = getattr(module, "AMQP_URL", None) == DEFAULT_VHOST_URL or any(
        m.name == "default_vhost" for m in item.iter_markers()
    )
    if in_faults or on_default_vhost:
        item.add_marker(pytest.mark.serial)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="service"):
        name = marker.args[0]
        message = _problem(name)
        if message is not None:
            unavailable(message)

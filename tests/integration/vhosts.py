"""A RabbitMQ virtual host of a test's own: the queue names are a public contract (DESIGN §3.2),
so two control planes on one virtual host share ``cmd.result`` and ``ssh.work``, and the broker
is shared with other test runs. Created with ``rabbitmqctl`` and deleted after."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator


def _rabbitmqctl(*args: str) -> None:
    result = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL on a new virtual host (guest has every right on it); deleted on exit."""
    vhost = f"opsplane-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)

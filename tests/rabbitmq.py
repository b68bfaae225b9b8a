"""A RabbitMQ virtual host of a test's own, created with ``rabbitmqctl`` and deleted after.

The broker is shared (other test runs, other developers) and the queue names are a public
contract (DESIGN §3.2): two control planes on one virtual host would share ``cmd.result`` and
``ssh.work``. A vhost of its own keeps a test's queues and connections apart, and faults are
injected only into connections of that vhost, never into anyone else's (no
``close_all_connections``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST, PORT = "127.0.0.1", 5672
_CONNECTION_NAME = re.compile(r'\{"connection_name","([^"]*)"\}')


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run rabbitmqctl; its stdout. Raises on failure, naming the command."""
    binary = shutil.which("rabbitmqctl")
    assert binary is not None, "rabbitmqctl is not installed"
    done = subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


@dataclass(frozen=True)
class PrivateVhost:
    name: str

    @property
    def url(self) -> str:
        return self.url_at(PORT)

    def url_at(self, port: int) -> str:
        """This vhost's URL through another port of loopback (a proxy in front of the broker)."""
        return f"amqp://guest:guest@{HOST}:{port}/{self.name}"

    def connections(self) -> list[tuple[str, str]]:
        """(pid, connection_name the client gave, or "") of every connection to this vhost."""
        listing = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "pid",
                              "client_properties")  # fmt: skip
        found = []
        for line in listing.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] == self.name:
                named = _CONNECTION_NAME.search(parts[2])
                found.append((parts[1], named.group(1) if named else ""))
        return found

    def close_connections(self, reason: str) -> int:
        """Force-close this vhost's connections (only them); how many were closed."""
        closed = 0
        for pid, _name in self.connections():
            binary = shutil.which("rabbitmqctl")
            assert binary is not None
            # A connection may be gone by itself meanwhile: not an error.
            done = subprocess.run([binary, "close_connection", pid, reason], capture_output=True,
                                  timeout=60, check=False)  # fmt: skip
            closed += done.returncode == 0
        return closed


@contextmanager
def private_vhost(prefix: str = "opsplane-test") -> Iterator[PrivateVhost]:
    """A new virtual host (guest has every right on it); deleted on exit."""
    vhost = PrivateVhost(f"{prefix}-{uuid.uuid4().hex[:10]}")
    rabbitmqctl("add_vhost", vhost.name)
    try:
        rabbitmqctl("set_permissions", "-p", vhost.name, "guest", ".*", ".*", ".*")
        yield vhost
    finally:
        # Deleting it closes what is left of its connections and drops its queues.
        rabbitmqctl("delete_vhost", vhost.name)

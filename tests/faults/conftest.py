"""Fixtures shared by the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rabbitmq import PrivateVhost, private_vhost


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    """A RabbitMQ virtual host of this test's own: its control plane and agents share the
    broker with other tests without sharing queues (tests/rabbitmq.py)."""
    with private_vhost("opsplane-faults") as the_vhost:
        yield the_vhost

"""The durable queues' type (transport/amqp/queues.py, docs/deployment.md): created as quorum
queues when asked; a queue that exists is used as it is, whatever its type, so that instances
(and SSH workers) with another setting, or an operator's own declaration, never clash."""

from __future__ import annotations

from collections.abc import Iterator

import aio_pika
import pytest

from opsplane.transport.amqp.queues import durable_queue
from tests.rabbitmq import PrivateVhost, private_vhost, rabbitmqctl

pytestmark = [pytest.mark.service("rabbitmq"), pytest.mark.service("rabbitmqctl")]


@pytest.fixture
def vhost() -> Iterator[PrivateVhost]:
    with private_vhost("opsplane-queue-type") as the_vhost:
        yield the_vhost


def _types(vhost: PrivateVhost) -> dict[str, str]:
    listing = rabbitmqctl("list_queues", "-p", vhost.name, "-q", "--no-table-headers", "name",
                          "type")  # fmt: skip
    return dict(line.split("\t") for line in listing.splitlines() if line.strip())


async def test_a_missing_queue_is_created_of_the_type_and_an_existing_one_is_used_as_it_is(
    vhost: PrivateVhost,
) -> None:
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        await durable_queue(connection, channel, "cmd.result", "quorum")
        # A classic declaration (another instance, an SSH worker) uses the quorum queue.
        await durable_queue(connection, channel, "cmd.result", "classic")
        await durable_queue(connection, channel, "ssh.work", "classic")
        # And the other way round: an existing classic queue stays classic.
        queue = await durable_queue(connection, channel, "ssh.work", "quorum")
        exchange = channel.default_exchange
        await exchange.publish(aio_pika.Message(b"x"), routing_key="ssh.work")
        assert await queue.get(timeout=5, fail=True) is not None
        assert not channel.is_closed
    finally:
        await connection.close()
    assert _types(vhost) == {"cmd.result": "quorum", "ssh.work": "classic"}

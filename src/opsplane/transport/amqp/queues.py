"""The durable queues' type: classic, or quorum (replicated by a RabbitMQ cluster; the
reference deployment's choice, docs/deployment.md).

A queue's type is fixed when it is created, and RabbitMQ refuses a declaration whose arguments
differ from the existing queue's (``PRECONDITION_FAILED``, channel closed; a policy cannot
change the type before RabbitMQ 3.12's vhost default). So a durable queue is looked up first:
one that exists is used as it is, whatever its type (an operator may have created it as a
quorum queue by hand, or another instance with another setting); only a missing one is created,
of ``queue_type``.
"""

from __future__ import annotations

from typing import Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from pamqp.common import FieldTable

QueueType = Literal["classic", "quorum"]
QUEUE_TYPES: tuple[QueueType, ...] = ("classic", "quorum")


def queue_arguments(queue_type: QueueType) -> FieldTable:
    return {"x-queue-type": queue_type} if queue_type != "classic" else {}


async def durable_queue(
    connection: AbstractConnection,
    channel: AbstractChannel,
    name: str,
    queue_type: QueueType = "classic",
) -> AbstractQueue:
    """``name`` on ``channel``: the existing queue, or a new durable one of ``queue_type``."""
    # A passive declaration of a missing queue closes its channel: probe on a channel of its
    # own, never on ``channel``.
    probe = await connection.channel()
    try:
        await probe.declare_queue(name, passive=True)
        exists = True
    except aio_pika.exceptions.ChannelNotFoundEntity:
        exists = False
    finally:
        if not probe.is_closed:
            await probe.close()
    if exists:
        return await channel.declare_queue(name, passive=True)
    return await channel.declare_queue(name, durable=True, arguments=queue_arguments(queue_type))

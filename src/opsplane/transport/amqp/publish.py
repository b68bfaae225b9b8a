"""Publishing that must reach a queue (a command to an agent's queue, a routed message to
another instance): one place that says what each failure means to the caller."""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from opsplane.domain.errors import ConnectionLost, NotConnected

#: Seconds a publish (and its broker confirm) may take before it counts as failed.
PUBLISH_TIMEOUT = 10.0


async def publish_mandatory(
    exchange: AbstractExchange,
    message: aio_pika.Message,
    routing_key: str,
    *,
    unroutable: str,
    connection: AbstractRobustConnection | None = None,
) -> None:
    """Publish ``message`` ``mandatory`` on a channel with publisher confirms and
    ``on_return_raises``. Raises NotConnected (saying ``unroutable``) when no queue is bound to
    ``routing_key`` — nobody will receive it, at once — and ConnectionLost when RabbitMQ did
    not confirm it in time or the connection failed. With ``connection``, a connection being
    re-dialled is waited for within the same bound: the consuming side may be back already,
    and a run failed now would have gone out a second later."""
    try:
        if connection is not None and not connection.connected.is_set():
            await asyncio.wait_for(connection.connected.wait(), PUBLISH_TIMEOUT)
        await exchange.publish(
            message, routing_key=routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT
        )
    except aio_pika.exceptions.PublishError as e:
        raise NotConnected(unroutable) from e
    except (
        TimeoutError,
        aiormq.exceptions.AMQPError,
        aio_pika.exceptions.AMQPException,
        OSError,
        RuntimeError,
    ) as e:
        raise ConnectionLost(f"publishing to {routing_key} failed: {e!r}") from e

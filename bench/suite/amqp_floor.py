"""The bare aio-pika floor: one message to a queue, a consumer's reply back, one at a time.

What any RabbitMQ request/reply costs on this broker before opsplane does anything: the
reference for the RabbitMQ rows. Server-named exclusive queues only, so nothing is shared
with other users of the broker's default virtual host.
"""

from __future__ import annotations

import asyncio
import time

from bench.suite.common import Figures, Options, Processes, median, percentile

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def _round_trips(count: int) -> list[float]:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        requests = await channel.declare_queue(exclusive=True)
        replies = await channel.declare_queue(exclusive=True)
        waiting: asyncio.Queue[bytes] = asyncio.Queue()

        async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                await channel.default_exchange.publish(
                    aio_pika.Message(message.body), routing_key=replies.name
                )

        async def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                waiting.put_nowait(message.body)

        await requests.consume(answer)
        await replies.consume(collect)
        samples = []
        for i in range(count + 10):  # the first ten warm up
            started = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(str(i).encode()), routing_key=requests.name
            )
            await asyncio.wait_for(waiting.get(), 10)
            if i >= 10:
                samples.append((time.perf_counter() - started) * 1000)
    return samples


def provide(opts: Options, processes: Processes) -> Figures:
    count = 200 if opts.quick else 1000
    samples = asyncio.run(_round_trips(count))
    return {
        "floor.amqp.roundtrip": {
            "peer_value": median(samples),
            "unit": "ms",
            "peer": "bare aio-pika round trip",
            "note": f"p50 of {count}; p99 {percentile(samples, 0.99):.2f} ms; one at a time",
        }
    }

"""An agent written from seed 002's message examples alone: plain aio-pika, no opsplane code.

It is what another team would write: it shows the control plane stays compatible with them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from opsplane.security.signing import public_key_text, sign

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def purge_shared_queues() -> None:
    """Empty the control plane's durable queues: a previous run's leftovers (or other tests'
    agents) must not register ghost hosts or delay this test's heartbeats."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for name in ("cmd.result", "monitor.heartbeat"):
            queue = await channel.declare_queue(name, durable=True)
            await queue.purge()


@dataclass
class SeedAgent:
    hostname: str
    groups: tuple[str, ...] = ()
    control_plane_key: Ed25519PublicKey | None = None
    # An enrolled agent signs what it sends (and names its key in heartbeats).
    key: Ed25519PrivateKey | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    # The broker (and virtual host) to use.
    url: str = AMQP_URL
    # Whether the heartbeat names the groups (an addition; the seed's example has none: its
    # groups then come from the control plane's inventory).
    announce_groups: bool = True
    _connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel()
        commands = await channel.declare_exchange("sys_cmd_exchange", "topic", durable=True)
        self._results = await channel.declare_exchange("sys_result_exchange", "topic", durable=True)
        self._monitor = await channel.declare_exchange(
            "sys_monitor_exchange", "topic", durable=True
        )
        queue = await channel.declare_queue(
            f"cmd.node.{self.hostname}", exclusive=True, auto_delete=True
        )
        for key in (
            f"cmd.node.{self.hostname}",
            "cmd.all",
            *(f"cmd.group.{g}" for g in self.groups),
        ):
            await queue.bind(commands, key)
        await queue.consume(self._on_command)

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def beat_every(self, seconds: float) -> None:
        """Heartbeat until cancelled, like a real agent."""
        while True:
            await self.heartbeat()
            await asyncio.sleep(seconds)

    async def heartbeat(self, status: str = "online") -> None:
        # The seed's example heartbeat, plus its optional groups so group routing can be tested.
        body: dict[str, Any] = {
            "hostname": self.hostname, "status": status, "timestamp": int(time.time()),
            "cpu_usage": 0.5, "memory_usage": 0.7, "signature": "",
        }  # fmt: skip
        if self.announce_groups:
            body["groups"] = list(self.groups)
        if self.key is not None:
            body["public_key"] = public_key_text(self.key.public_key())
            body["signature"] = sign(self.key, body)
        await self._monitor.publish(
            aio_pika.Message(json.dumps(body).encode()), routing_key="heartbeat"
        )

    async def _on_command(self, message: AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        self.received.append(body)
        if self.control_plane_key is not None and not _verify(self.control_plane_key, body):
            self.bad_signatures += 1
            await message.ack()
            return
        process = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            body["command"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        # The seed's example result: no type, no run_id, no hostname (the routing key tells).
        result = {
            "task_id": body["task_id"], "exit_code": process.returncode,
            "stdout": stdout.decode(), "stderr": stderr.decode(),
            "timestamp": int(time.time()), "signature": "",
        }  # fmt: skip
        if self.key is not None:
            result["signature"] = sign(self.key, result)
        await self._results.publish(
            aio_pika.Message(
                json.dumps(result).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=f"result.node.{self.hostname}",
        )
        await message.ack()


def _verify(key: Ed25519PublicKey, body: dict[str, Any]) -> bool:
    unsigned = {k: v for k, v in body.items() if k not in ("sign", "signature")}
    canonical = json.dumps(
        unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()
    try:
        key.verify(base64.b64decode(body.get("sign", "")), canonical)
    except Exception:
        return False
    return True

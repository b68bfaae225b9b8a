"""What both agent links share, in a module that imports neither link's library: an AMQP agent
must not load grpc, nor a gRPC agent aio-pika (docs/scale.md, "Agent footprint")."""

from __future__ import annotations

import random
from typing import Protocol

from google.protobuf.message import Message

from opsplane.transport.grpc import opsplane_pb2 as pb


class LinkHandler(Protocol):
    """What the link asks of the daemon."""

    def hello(self, challenge: str = "") -> pb.Hello:
        """The hello to open a stream with, answering the server's ``challenge``."""

    async def on_connected(self) -> None:
        """The control plane welcomed us; the link now carries messages."""

    async def on_message(self, message: pb.CommandMessage) -> None:
        """A message from the control plane (other than the welcome)."""

    def signature(self, message: Message) -> str:
        """The agent's signature of a heartbeat or result it sends."""


class Backoff:
    """Exponential backoff with full jitter: a uniform delay in ``[0, min(max, initial·2ⁿ)]``."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng or random.Random()
        self._failures = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        # The exponent is capped only to keep the float finite; max() bounds the delay.
        ceiling = min(self._maximum, self._initial * 2 ** min(self._failures, 64))
        self._failures += 1
        return self._rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        """Forget past failures (after a connection that worked)."""
        self._failures = 0

    def jitter(self, ceiling: float) -> float:
        """A uniform delay in ``[0, ceiling]``."""
        return self._rng.uniform(0.0, ceiling)

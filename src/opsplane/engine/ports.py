"""What the engine needs from the security side, as small protocols. The composition root
(``opsplane.app_factory.make_engine``) wires them to ``security.agents.AgentRegistry`` and
``security.secrets.SecretBox``; the engine never imports ``opsplane.security``
(tests/unit/test_import_layers.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from opsplane.domain.records import AgentRecord
from opsplane.engine.changes import Changes
from opsplane.transport.base import RoutedMessage


class AgentIdentity(Protocol):
    """An enrolled agent's key, as a link checks a signature or a hello against it."""

    @property
    def public_key(self) -> str: ...
    @property
    def key(self) -> Ed25519PublicKey: ...
    @property
    def revoked(self) -> bool: ...


class AgentKeys(Protocol):
    """The enrolled agents' keys: looked up per hello and per signed message, so in memory."""

    async def load(self) -> None:
        """Read the keys once the database is migrated."""

    def identity(self, name: str) -> AgentIdentity | None: ...

    def refusal(self, name: str, public_key: str, groups: Iterable[str]) -> str | None:
        """Why an agent with this key may not connect as ``name`` in ``groups`` (None: it may)."""

    async def revoke(self, name: str, *, revoked_by: str) -> AgentRecord: ...

    def on_change(self, listener: Callable[[list[str]], None]) -> None:
        """Call ``listener`` with the names of agents this instance enrolled or revoked."""


class SecretOpener(Protocol):
    """Decrypts a task's secret parameters at dispatch, and only there; seals the secret
    values a template launch or a schedule keeps until then."""

    def seal(self, values: Mapping[str, str]) -> dict[str, str]: ...

    def open(self, sealed: Mapping[str, str]) -> dict[str, str]: ...


# How the composition root builds the agent keys over the engine's own sessions and writes.
AgentKeysFactory = Callable[
    [async_sessionmaker[AsyncSession], Callable[[], AbstractAsyncContextManager[Changes]]],
    AgentKeys,
]


class InstanceRouter(Protocol):
    """How instances sharing the database reach each other (transport/amqp/instances.py)."""

    async def start(
        self,
        instance: str,
        on_routed: Callable[[RoutedMessage], Awaitable[None]],
        on_notice: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None: ...

    async def stop(self) -> None: ...

    async def forward(self, instance: str, message: RoutedMessage) -> None:
        """Raises NotConnected when ``instance`` is gone, ConnectionLost on a broker failure."""

    def notify(self, notice: dict[str, Any]) -> None:
        """Tell the other instances, without waiting."""

    async def alive(self, instances: Iterable[str]) -> set[str]: ...

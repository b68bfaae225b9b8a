"""The one error hierarchy of opsplane.

Library errors are translated into these where they enter (``raise ... from e``); the API maps
them to HTTP status codes in one place (``opsplane.api.errors``). It lives in ``domain``
because every layer may import the domain.
"""

from __future__ import annotations


class OpsplaneError(Exception):
    """Root of every error opsplane raises on purpose."""


class InvalidInput(OpsplaneError):
    """The caller asked for something malformed or impossible (HTTP 422/400)."""


class NotFound(OpsplaneError):
    """A named thing (task, host, run) does not exist (HTTP 404)."""


class Conflict(OpsplaneError):
    """The request collides with the current state (HTTP 409)."""


class Forbidden(OpsplaneError):
    """The caller is known but may not do this, e.g. run on hosts outside its groups (HTTP 403)."""


class Unauthenticated(OpsplaneError):
    """The caller is not known: no credentials, or wrong, expired or revoked ones (HTTP 401)."""


class NameTaken(Conflict):
    """A host name claimed by an agent belongs to another link's host (an SSH host, the
    control plane's own): the agent is refused, the host left as it is."""


class InvalidTransition(Conflict):
    """A state machine was asked for a move it does not allow."""

    def __init__(self, machine: str, current: str, new: str) -> None:
        super().__init__(f"{machine} cannot move from {current!r} to {new!r}")
        self.machine = machine
        self.current = current
        self.new = new


class TransportError(OpsplaneError):
    """A link could not deliver a message."""


class NotConnected(TransportError):
    """The target host has no live connection on this link."""


class ConnectionLost(TransportError):
    """The connection to a host broke while a message was in flight."""


class ConfigError(OpsplaneError):
    """Settings are missing or inconsistent; the process refuses to start."""


class ReportRejected(OpsplaneError):
    """Ingest could not apply a host's report (a value the database refuses, or a bug); the
    other reports of its batch were written. Not retried: the link refuses the message."""


class ReportNotWritten(OpsplaneError):
    """Ingest stopped (or failed as a whole) before it wrote a host's report: nothing is wrong
    with the report; the link leaves it unacknowledged, to be sent again."""

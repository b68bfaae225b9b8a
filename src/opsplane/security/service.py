"""SecurityService: users, API tokens, web sessions and the audit trail over the store.

Like the engine's services it reads with its own sessions and writes through the engine's
``write()`` (one writer per instance: on SQLite a second writer would fail its transaction).
Every change it makes writes its audit record in the same transaction, so a change never
exists without its record. Password hashing runs in worker threads, a few at a time.

One facade over its parts, one module each, all on the shared ``SecurityState``
(service_base.py): start-up (bootstrap.py), authentication and web sessions (sessions.py),
users (users.py), API tokens (api_tokens.py) and reading the audit trail (audit_trail.py).
Callers import the service and its types from here.
"""

from __future__ import annotations

from opsplane.security.api_tokens import Tokens
from opsplane.security.audit_trail import AuditTrail, export_document
from opsplane.security.bootstrap import Bootstrap
from opsplane.security.service_base import (
    AUDIT_BATCH,
    DEMO_CREDENTIALS_FILE,
    INITIAL_TOKEN_FILE,
    SYSTEM,
    SYSTEM_CALLER,
    Caller,
    DemoCredentials,
    Login,
    NewToken,
    SessionAuth,
    Write,
    check_user_name,
)
from opsplane.security.sessions import Sessions
from opsplane.security.users import Users

__all__ = [
    "AUDIT_BATCH",
    "DEMO_CREDENTIALS_FILE",
    "INITIAL_TOKEN_FILE",
    "SYSTEM",
    "SYSTEM_CALLER",
    "Caller",
    "DemoCredentials",
    "Login",
    "NewToken",
    "SecurityService",
    "SessionAuth",
    "Write",
    "check_user_name",
    "export_document",
]


class SecurityService(Bootstrap, Sessions, Users, Tokens, AuditTrail):
    """Users, tokens, sessions and the audit trail: see the module's docstring."""

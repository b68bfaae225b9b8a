"""Roles, permissions and the principal: who is calling and what that allows. No I/O.

Three roles, each including the one before:

- ``viewer``: read everything (tasks, runs, logs, hosts, live streams);
- ``operator``: also run — create, start and cancel tasks, call catalog scripts — but only on
  hosts in the groups granted to it (``groups``; None means every group);
- ``admin``: everything, including users, API tokens and the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from opsplane.domain.errors import Forbidden, InvalidInput


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class Permission(StrEnum):
    READ = "read"
    RUN = "run"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}
# The least role that holds each permission.
_NEEDS = {Permission.READ: Role.VIEWER, Permission.RUN: Role.OPERATOR, Permission.ADMIN: Role.ADMIN}


def parse_role(value: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise InvalidInput(f"role must be one of {roles}, got {value!r}") from None


def role_at_least(role: Role, floor: Role) -> bool:
    return _RANK[role] >= _RANK[floor]


def lesser_role(a: Role, b: Role) -> Role:
    return a if _RANK[a] <= _RANK[b] else b


def normalize_groups(role: Role, groups: list[str] | None) -> list[str] | None:
    """The groups to store for a user or token of ``role``: a sorted, de-duplicated list for an
    operator (None: every group), None for the others, whose role decides alone."""
    if role is not Role.OPERATOR or groups is None:
        return None
    cleaned = sorted({g.strip() for g in groups})
    if "" in cleaned:
        raise InvalidInput("group names must not be blank")
    if not cleaned:
        # Default to safe: an operator with an empty grant could run nowhere, which is never
        # what was meant; every group must be asked for explicitly.
        raise InvalidInput("an operator needs at least one group (or all_groups: true)")
    return cleaned


def intersect_groups(a: list[str] | None, b: list[str] | None) -> frozenset[str] | None:
    """The groups both grants allow (None: unrestricted)."""
    if a is None and b is None:
        return None
    if a is None:
        return frozenset(b or ())
    if b is None:
        return frozenset(a)
    return frozenset(a).intersection(b)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``name`` is what tasks record as ``created_by`` and the audit trail as the actor: the user
    behind a session or token, or the token's own name for a token without an owner (the
    bootstrap token). ``via`` says how it authenticated (``token:<id>``, ``session``,
    ``anonymous:<seed>``); ``anonymous`` marks a caller that sent no credential at all and was
    let in by ``compat_anonymous`` (security.anonymous).
    """

    name: str
    role: Role | str
    groups: frozenset[str] | None = None
    via: str = "token"
    user_id: str | None = None
    token_id: str | None = None
    session_id: str | None = None
    anonymous: bool = False

    @property
    def the_role(self) -> Role:
        return parse_role(str(self.role))

    @property
    def allowed_groups(self) -> frozenset[str] | None:
        """The groups this caller may run on; None means no restriction (admins, and operators
        granted every group). Viewers run nowhere, which the RUN permission already says."""
        if self.the_role is Role.ADMIN:
            return None
        if self.the_role is Role.OPERATOR:
            return self.groups
        return frozenset()

    def can(self, permission: Permission) -> bool:
        return role_at_least(self.the_role, _NEEDS[permission])


def authorize(principal: Principal, permission: Permission) -> None:
    """Forbidden unless ``principal``'s role holds ``permission``. The one role check."""
    if not principal.can(permission):
        raise Forbidden(
            f"{principal.name} ({principal.role}) may not do this: it needs the "
            f"{_NEEDS[permission].value} role or higher"
        )

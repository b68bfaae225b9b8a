"""Request and response models of the security routes (users, tokens, login, audit)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from opsplane.domain.records import AuditRecord, TokenRecord, UserRecord


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    password: str = Field(min_length=1, max_length=1024)


class MeOut(BaseModel):
    name: str
    role: str
    groups: list[str] | None = Field(description="an operator's groups; null: every group")
    via: str = Field(description="token:<id> or session")


class LoginOut(MeOut):
    csrf_token: str = Field(description="send as X-CSRF-Token on state-changing requests")
    expires_at: datetime


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    role: str = Field(description="viewer, operator or admin")
    password: str | None = Field(
        default=None, max_length=1024, description="none: the user logs in with tokens only"
    )
    groups: list[str] | None = Field(default=None, description="operators: the groups granted")
    all_groups: bool = Field(default=False, description="operators: every group")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str | None = None
    password: str | None = Field(default=None, max_length=1024)
    groups: list[str] | None = None
    all_groups: bool = False
    disabled: bool | None = None


class UserOut(BaseModel):
    name: str
    role: str
    groups: list[str] | None
    disabled: bool
    has_password: bool
    created_at: datetime
    updated_at: datetime
    last_login_at: datetime | None

    @classmethod
    def from_row(cls, row: UserRecord) -> UserOut:
        return cls(
            name=row.name,
            role=row.role,
            groups=row.groups,
            disabled=row.disabled,
            has_password=row.has_password,
            created_at=row.created_at,
            updated_at=row.updated_at,
            last_login_at=row.last_login_at,
        )


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=255)
    role: str = Field(description="viewer, operator or admin")
    groups: list[str] | None = Field(default=None, description="operators: the groups granted")
    all_groups: bool = Field(default=False, description="operators: every group")
    expires_in: int | None = Field(
        default=None, ge=1, description="seconds until it expires; null: never"
    )
    user: str | None = Field(
        default=None, max_length=255, description="the user it acts for; default: the caller"
    )


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    groups: list[str] | None
    user: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_row(cls, row: TokenRecord, owner: UserRecord | None) -> TokenOut:
        return cls(
            id=row.id,
            name=row.name,
            role=row.role,
            groups=row.groups,
            user=owner.name if owner is not None else None,
            created_by=row.created_by,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )


class NewTokenOut(TokenOut):
    token: str = Field(description="the token itself: shown this once, stored only as a hash")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    role: str
    source_ip: str | None
    action: str
    target: str | None
    targets: dict[str, Any] | None
    outcome: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: AuditRecord) -> AuditOut:
        return cls(
            id=row.id,
            at=row.at,
            actor=row.actor,
            role=row.role,
            source_ip=row.source_ip,
            action=row.action,
            target=row.target,
            targets=row.targets,
            outcome=row.outcome,
            detail=row.detail,
            prev_hash=row.prev_hash,
            hash=row.hash,
        )


class AuditVerifyOut(BaseModel):
    ok: bool
    checked: int
    first_bad_id: int | None
    problems: list[str]
    last_id: int
    last_hash: str
    past_head: int = Field(description="records stored beyond the chain head")
    checkpoints: int = Field(description="signed checkpoints the trail was held to")

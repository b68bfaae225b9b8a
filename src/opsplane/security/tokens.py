"""API tokens and session secrets: random, shown once, stored only as SHA-256 hashes.

A token is ``ops_`` followed by 32 random bytes in URL-safe base64 (256 bits): the prefix makes
a leaked token easy to recognise (and to redact, see ``redaction``). A plain SHA-256 is the
right hash for such a secret: it has full entropy, so there is nothing for a slow KDF to
protect, and a lookup by hash stays one indexed query per request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from opsplane.domain.errors import InvalidInput

TOKEN_PREFIX = "ops_"
# The bootstrap token is chosen by whoever deploys; refuse one that could be guessed.
MIN_BOOTSTRAP_LENGTH = 16

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_secret() -> str:
    """A session id or CSRF token: 256 random bits."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """The SHA-256 (hex) under which a token or session secret is stored and looked up."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same_secret(secret: str, stored_hash: str) -> bool:
    return secrets.compare_digest(secret_hash(secret), stored_hash)


def parse_duration(text: str) -> timedelta | None:
    """``"30d"`` → 30 days; ``"never"`` → None (no expiry). Units: s, m, h, d, w; seconds
    without a unit."""
    if text.strip().lower() in ("never", "none", "0"):
        return None
    match = _DURATION.match(text.lower())
    if not match:
        raise InvalidInput(f"expected a duration like 30d, 12h or 90m (or never), got {text!r}")
    value = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    return timedelta(seconds=value)

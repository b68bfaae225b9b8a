"""Password hashing with argon2id (memory-hard), through argon2-cffi.

Parameters are argon2-cffi's defaults, RFC 9106's "low memory" profile (64 MiB, 3 passes, 4
lanes): about 0.1 s per hash on a small server. They are encoded in every hash, so a later
change of parameters keeps old hashes valid; ``needs_rehash`` says when to re-hash at login.
Hashing is CPU- and memory-bound: callers run it in a worker thread and bound how many run at
once (``SecurityService``), so a burst of logins cannot exhaust the server's memory.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from opsplane.domain.errors import InvalidInput

MIN_LENGTH = 8
# Long enough for any passphrase; bounds the work an anonymous login can ask for.
MAX_LENGTH = 1024

_HASHER = PasswordHasher()
# Verified against when the user does not exist, so that the answer takes as long as for a
# real user and does not tell which names exist.
_DUMMY_HASH = _HASHER.hash("opsplane: no such user")


def check_password_policy(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise InvalidInput(f"a password needs at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise InvalidInput(f"a password has at most {MAX_LENGTH} characters")


def hash_password(password: str) -> str:
    """The encoded argon2id hash of ``password`` (policy checked first)."""
    check_password_policy(password)
    return _HASHER.hash(password)


def verify_password(encoded: str | None, password: str) -> bool:
    """Whether ``password`` matches ``encoded``; with no hash (no such user, or a user without
    a password) it spends the same time and answers False."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(encoded or _DUMMY_HASH, password) and encoded is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(encoded: str) -> bool:
    return _HASHER.check_needs_rehash(encoded)

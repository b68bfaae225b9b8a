"""Sensitive task parameters encrypted at rest.

An environment value marked secret is stored only as a Fernet token (AES-128-CBC with an
HMAC-SHA256, from ``cryptography``) under the control plane's secret key, a file of its data
directory (mode 0600, created on first use, next to the signing key). It is decrypted only to
build the command sent to a host, and the API never returns it: the database, its backups and
the audit trail hold ciphertext and names. Instances sharing a database must share the key file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from opsplane.domain.errors import ConfigError


class SecretBox:
    def __init__(self, key_path: Path) -> None:
        self._path = key_path
        self._fernet: Fernet | None = None

    def _cipher(self) -> Fernet:
        # Loaded on first use: a control plane that never sees a secret never creates a key.
        if self._fernet is None:
            self._fernet = Fernet(_load_or_create_key(self._path))
        return self._fernet

    def seal(self, values: Mapping[str, str]) -> dict[str, str]:
        cipher = self._cipher()
        return {name: cipher.encrypt(value.encode()).decode() for name, value in values.items()}

    def open(self, sealed: Mapping[str, str]) -> dict[str, str]:
        if not sealed:
            return {}
        cipher = self._cipher()
        try:
            return {name: cipher.decrypt(token.encode()).decode() for name, token in sealed.items()}
        except InvalidToken as e:
            raise ConfigError(
                f"a secret parameter cannot be decrypted with {self._path}: "
                "was the key file replaced, or does another instance use another key?"
            ) from e


def ensure_secret_key(path: Path) -> bool:
    """Create the secrets key at ``path`` unless it exists; whether it was created. `opsplane
    keys init` makes it ahead of use, so that the copy of the keys directory every instance of
    a deployment gets holds it (docs/deployment.md): one instance creating its own on first
    use could not open what another sealed."""
    existed = path.exists()
    _load_or_create_key(path)
    return not existed


def _load_or_create_key(path: Path) -> bytes:
    if path.exists():
        key = path.read_bytes().strip()
        try:
            Fernet(key)
        except ValueError as e:
            raise ConfigError(f"{path} does not hold a secret key: {e}") from e
        return key
    key = Fernet.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key + b"\n")
    return key

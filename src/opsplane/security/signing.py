"""Ed25519 signatures over canonical JSON (DESIGN §3.3).

The signed bytes are the message's canonical JSON: every field except ``sign`` and
``signature``, keys sorted, separators ``,`` and ``:``, UTF-8, no whitespace. Signatures are
base64. The control plane signs commands; each agent signs its results and heartbeats.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from opsplane.domain.errors import ConfigError

SIGNATURE_FIELDS = frozenset({"sign", "signature"})


def canonical_json(message: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers."""
    unsigned = {k: v for k, v in message.items() if k not in SIGNATURE_FIELDS}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(key: Ed25519PrivateKey, message: Mapping[str, Any]) -> str:
    return base64.b64encode(key.sign(canonical_json(message))).decode()


def verify(key: Ed25519PublicKey, message: Mapping[str, Any], field: str) -> bool:
    """Whether ``message[field]`` is a valid signature of the rest of ``message``."""
    signature = message.get(field)
    if not isinstance(signature, str) or not signature:
        return False
    try:
        key.verify(base64.b64decode(signature, validate=True), canonical_json(message))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def public_key_text(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key as base64: short enough for a setting or a hello."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key sent over the network: raw 32 bytes in base64, nothing else (never a file
    name: what a peer sends must not make the control plane read its disk)."""
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not a base64 Ed25519 public key: {e}") from e


def load_public_key(value: str | Path) -> Ed25519PublicKey:
    """A public key from base64 text, or from a file holding base64 text or PEM."""
    text = str(value).strip()
    path = Path(text)
    if len(text) < 200 and path.is_file():
        text = path.read_text().strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("the public key is not an Ed25519 key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as e:
        raise ConfigError(f"not an Ed25519 public key (base64 or PEM): {value}") from e


def load_or_create_private_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The private key stored at ``path`` (PEM, mode 0600), created on first use.

    Returns the key and whether it was created now.
    """
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} does not hold an Ed25519 private key")
        return key, False
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    path.with_suffix(".pub").write_text(public_key_text(key.public_key()) + "\n")
    return key, True

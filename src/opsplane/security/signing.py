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
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from opsplane.domain.errors import ConfigError

SIGNATURE_FIELDS = frozenset({"sign", "signature"})

# An Ed25519 private key in PKCS #8 is these 16 bytes of DER and the 32-byte seed (RFC 8410
# §7), inside a PEM "PRIVATE KEY" block. Written and read here directly: the general PEM code
# (cryptography's serialization package, with SSH formats and every cipher) is about 1 MiB of
# each agent's memory. Any other encoding is left to that code.
_PKCS8_ED25519_PREFIX: Final = bytes.fromhex("302e020100300506032b657004220420")
_PEM_BEGIN: Final = b"-----BEGIN PRIVATE KEY-----"
_PEM_END: Final = b"-----END PRIVATE KEY-----"


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
    return base64.b64encode(key.public_bytes_raw()).decode()


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
            from cryptography.hazmat.primitives import serialization

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
        return _load_private_key(path), False
    key = Ed25519PrivateKey.generate()
    pem = private_key_pem(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    path.with_suffix(".pub").write_text(public_key_text(key.public_key()) + "\n")
    return key, True


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS #8 PEM, as ``private_bytes(PEM, PKCS8, NoEncryption())``
    writes it."""
    body = base64.encodebytes(_PKCS8_ED25519_PREFIX + key.private_bytes_raw())
    return _PEM_BEGIN + b"\n" + body + _PEM_END + b"\n"


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()
    lines = data.strip().splitlines()
    if len(lines) >= 3 and lines[0] == _PEM_BEGIN and lines[-1] == _PEM_END:
        try:
            der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
        except binascii.Error:
            der = b""
        if len(der) == 48 and der.startswith(_PKCS8_ED25519_PREFIX):
            return Ed25519PrivateKey.from_private_bytes(der[16:])
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} does not hold a readable private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} does not hold an Ed25519 private key")
    return key

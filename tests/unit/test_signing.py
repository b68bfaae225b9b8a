"""Ed25519 signatures over canonical JSON (DESIGN §3.3)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.domain.errors import ConfigError
from opsplane.security.signing import (
    canonical_json,
    load_or_create_private_key,
    load_public_key,
    private_key_pem,
    public_key_text,
    sign,
    verify,
)

COMMAND = {
    "type": "command",
    "task_id": "t-1",
    "run_id": "0192e0a4-1111-7222-8333-444455556666",
    "command": "echo 你好",
    "timeout": 30,
    "env": {"B": "2", "A": "1"},
    "timestamp": 1694582400.25,
}


def test_canonical_json_sorts_keys_without_whitespace_and_keeps_utf8() -> None:
    data = canonical_json({"b": 1, "a": {"z": [1, 2], "y": "é"}, "c": "你好"})
    assert data == '{"a":{"y":"é","z":[1,2]},"b":1,"c":"你好"}'.encode()
    # UTF-8 bytes, not \\u escapes.
    assert "你好".encode() in data and b"\\u" not in data


def test_canonical_json_leaves_out_both_signature_fields() -> None:
    signed = {**COMMAND, "sign": "x", "signature": "y"}
    assert canonical_json(signed) == canonical_json(COMMAND)
    assert b"sign" not in canonical_json(signed)


def test_canonical_json_survives_a_json_round_trip() -> None:
    # What the receiver re-derives from the parsed message must be the signed bytes.
    wire = json.dumps(COMMAND, indent=2, ensure_ascii=True)
    assert canonical_json(json.loads(wire)) == canonical_json(COMMAND)


def test_sign_then_verify() -> None:
    key = Ed25519PrivateKey.generate()
    message = {**COMMAND, "sign": sign(key, COMMAND)}
    assert verify(key.public_key(), message, "sign")
    # Signing a message that already carries a signature gives the same signature.
    assert sign(key, message) == message["sign"]
    reply = {"task_id": "t-1", "exit_code": 0, "timestamp": 1.0}
    reply["signature"] = sign(key, reply)
    assert verify(key.public_key(), reply, "signature")


@pytest.mark.parametrize(
    ("field", "value"),
    [("command", "rm -rf /"), ("timestamp", 1694582400.5), ("env", {"A": "1"}), ("extra", 1)],
)
def test_a_tampered_field_fails(field: str, value: object) -> None:
    key = Ed25519PrivateKey.generate()
    message = {**COMMAND, "sign": sign(key, COMMAND)}
    message[field] = value
    assert not verify(key.public_key(), message, "sign")


def test_a_signature_by_another_key_fails() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    message = {**COMMAND, "sign": sign(other, COMMAND)}
    assert not verify(key.public_key(), message, "sign")


@pytest.mark.parametrize("bad", ["", "not base64!", "AAAA", base64.b64encode(b"x" * 64).decode()])
def test_missing_or_malformed_signatures_fail(bad: str) -> None:
    key = Ed25519PrivateKey.generate()
    assert not verify(key.public_key(), {**COMMAND, "sign": bad}, "sign")
    assert not verify(key.public_key(), COMMAND, "sign")  # no field at all
    assert not verify(key.public_key(), {**COMMAND, "sign": 42}, "sign")
    # The signature in the other field does not count.
    assert not verify(key.public_key(), {**COMMAND, "signature": sign(key, COMMAND)}, "sign")


def test_private_key_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.key"
    key, created = load_or_create_private_key(path)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = public_key_text(key.public_key())
    assert path.with_suffix(".pub").read_text().strip() == public

    again, created = load_or_create_private_key(path)
    assert not created
    assert public_key_text(again.public_key()) == public
    assert verify(again.public_key(), {**COMMAND, "sign": sign(key, COMMAND)}, "sign")


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(b"garbage")
    with pytest.raises((ConfigError, ValueError)):
        load_or_create_private_key(path)


def test_public_key_from_base64_a_file_or_pem(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    text = public_key_text(key.public_key())
    assert len(base64.b64decode(text)) == 32
    message = {**COMMAND, "sign": sign(key, COMMAND)}

    file = tmp_path / "cp.pub"
    file.write_text(text + "\n")
    pem = tmp_path / "cp.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for source in (text, f"  {text}\n", str(file), file, str(pem)):
        assert verify(load_public_key(source), message, "sign")


@pytest.mark.parametrize("bad", ["", "not a key", "AAAA", base64.b64encode(b"x" * 31).decode()])
def test_a_malformed_public_key_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        load_public_key(bad)


def test_the_private_key_pem_is_what_cryptography_writes_and_reads() -> None:
    for _ in range(50):
        key = Ed25519PrivateKey.generate()
        pem = private_key_pem(key)
        assert pem == key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        loaded = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(loaded, Ed25519PrivateKey)
        assert loaded.private_bytes_raw() == key.private_bytes_raw()


def test_a_key_wrapped_differently_is_still_read(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = private_key_pem(key)
    lines = pem.splitlines()
    rewrapped = b"\n".join([lines[0], lines[1][:20], lines[1][20:], lines[2]]) + b"\n\n"
    path = tmp_path / "agent.key"
    path.write_bytes(rewrapped)
    loaded, created = load_or_create_private_key(path)
    assert not created and loaded.private_bytes_raw() == key.private_bytes_raw()


def test_a_pem_key_of_another_kind_is_refused_by_the_general_reader(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "agent.key"
    path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="not hold an Ed25519 private key"):
        load_or_create_private_key(path)


def test_a_damaged_private_key_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="readable private key"):
        load_or_create_private_key(path)

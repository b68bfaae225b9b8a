"""Enrollment, the agent's side: once, with a one-time token, register this agent's Ed25519 key
with the control plane and pin the control plane's key (docs/security.md, "Agent enrollment").

What enrollment leaves in the state directory: ``agent.key`` (the agent's key, created if
needed), ``control-plane.pub`` (the pinned key commands must be signed with) and
``enrollment.json`` (name, groups). Later starts read them: no token is needed again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opsplane.domain.errors import ConfigError
from opsplane.security.signing import load_or_create_private_key, public_key_text

ENROLLMENT_FILE = "enrollment.json"
PINNED_KEY_FILE = "control-plane.pub"


@dataclass(frozen=True)
class Enrollment:
    name: str
    groups: tuple[str, ...]
    control_plane_key: str


def agent_key_path(state_dir: Path) -> Path:
    return state_dir / "agent.key"


def enroll(
    api_url: str, token: str, name: str, state_dir: Path, *, ca: Path | None = None
) -> Enrollment:
    """Enroll ``name`` with ``token`` at the control plane's API; raises ConfigError saying why
    not (a spent, expired or unknown token; a name already enrolled)."""
    # Imported here: an HTTP client is needed once, to enroll, not by every start.
    import ssl

    import httpx

    key, _ = load_or_create_private_key(agent_key_path(state_dir))
    body = {"token": token, "name": name, "public_key": public_key_text(key.public_key())}
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
    url = api_url.rstrip("/") + "/api/v1/agents/enroll"
    try:
        answer = httpx.post(url, json=body, timeout=30, verify=verify)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach the control plane at {api_url} to enroll: {e}") from e
    if answer.status_code != 201:
        try:
            detail = answer.json().get("detail", answer.text)
        except ValueError:
            detail = answer.text
        raise ConfigError(f"enrollment refused ({answer.status_code}): {detail}")
    data = answer.json()
    enrollment = Enrollment(
        name=str(data["name"]),
        groups=tuple(str(g) for g in data.get("groups") or ()),
        control_plane_key=str(data["control_plane_key"]),
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / PINNED_KEY_FILE).write_text(enrollment.control_plane_key + "\n")
    record = {"name": enrollment.name, "groups": list(enrollment.groups)}
    (state_dir / ENROLLMENT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return enrollment


def enrolled(state_dir: Path) -> Enrollment | None:
    """What an earlier enrollment left in ``state_dir``, or None."""
    record_path, key_path = state_dir / ENROLLMENT_FILE, state_dir / PINNED_KEY_FILE
    if not record_path.is_file() or not key_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        return Enrollment(
            name=str(record["name"]),
            groups=tuple(str(g) for g in record.get("groups") or ()),
            control_plane_key=key_path.read_text().strip(),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{record_path} is damaged ({e}): enroll again") from e

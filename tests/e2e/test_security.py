"""Issue 9's scenario on a real control plane with real agents: an admin creates an operator
token limited to group web; with it, nothing runs on db (CLI and API), web works; the admin
runs anywhere; every step is in the audit trail, and the trail verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import httpx

from tests.auth import ADMIN_TOKEN
from tests.e2e.fleet import Fleet


def opsplane(
    fleet: Fleet, *args: str, token: str | None = ADMIN_TOKEN, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    env.update(OPSPLANE_URL=fleet.url, COLUMNS="200", NO_COLOR="1")
    if token is not None:
        env["OPSPLANE_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "opsplane", *args],
        capture_output=True, text=True, env=env, input=stdin, timeout=60, check=False,
    )  # fmt: skip


def test_an_operator_token_limited_to_web_cannot_run_on_db_and_an_admin_can(
    fleet: Fleet,
) -> None:
    created = opsplane(
        fleet, "tokens", "create", "--role", "operator", "--group", "web", "--expires", "30d",
        "--name", "web deployer",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("ops_") and "shown this once" in created.stderr

    refused = opsplane(fleet, "run", "--group", "db", "--", "hostname", token=token)
    assert refused.returncode == 2 and "db-1" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    refused_all = opsplane(fleet, "run", "--all", "--", "hostname", token=token)
    assert refused_all.returncode == 2 and "db-1" in refused_all.stderr
    allowed = opsplane(fleet, "run", "--group", "web", "--json", "--", "echo ok", token=token)
    assert allowed.returncode == 0, allowed.stderr
    assert {run["host"] for run in json.loads(allowed.stdout)["runs"]} == {"web-1", "web-2"}

    with fleet.client(token=token) as client:
        body = {"command": "hostname", "targets": {"hosts": ["db-1"]}}
        answer = client.post("/api/v1/tasks", json=body)
        assert answer.status_code == 403 and "db-1" in answer.json()["detail"]
        assert client.get("/api/v1/tasks").status_code == 200  # reading is fine
        assert client.get("/api/v1/audit").status_code == 403  # the trail is the admin's
    admin_run = opsplane(fleet, "run", "--group", "db", "--json", "--", "echo admin")
    assert admin_run.returncode == 0, admin_run.stderr

    # Revoked: refused at once, with the reason.
    token_id = _token_id(fleet, "web deployer")
    assert opsplane(fleet, "tokens", "revoke", token_id).returncode == 0
    gone = opsplane(fleet, "hosts", token=token)
    assert gone.returncode == 2 and "revoked" in gone.stderr

    records = _audit(fleet)
    denied = [r for r in records if r["action"] == "task.create" and r["outcome"] == "denied"]
    # Created with the bootstrap token (no user), the token acts under its own name.
    assert len(denied) >= 3, denied
    assert all((r["actor"], r["role"]) == ("web deployer", "operator") for r in denied)
    assert all("db-1" in r["detail"]["error"] for r in denied)
    assert any(r["action"] == "token.create" and r["target"] == token_id for r in records)
    assert any(r["action"] == "token.revoke" and r["target"] == token_id for r in records)
    verified = opsplane(fleet, "audit", "verify")
    assert verified.returncode == 0 and "intact" in verified.stdout, verified.stderr
    # Held to the signed checkpoint the server wrote at start (issue 14, hole 5).
    anchored = opsplane(
        fleet, "audit", "verify",
        "--checkpoint", str(fleet.data_dir / "audit-checkpoints.jsonl"),
        "--public-key", str(fleet.data_dir / "keys" / "control-plane.pub"),
    )  # fmt: skip
    assert anchored.returncode == 0, anchored.stdout + anchored.stderr
    assert "checkpoint(s) match" in anchored.stdout
    # No secret ever reaches the server's log.
    log = (fleet.root / "server.log").read_text(errors="replace")
    assert ADMIN_TOKEN not in log and token not in log and "bootstrap admin API token" in log


def test_users_are_added_from_the_cli_and_log_in_to_the_web_page(fleet: Fleet) -> None:
    added = opsplane(
        fleet, "users", "add", "viewer-vic", "--role", "viewer", "--password-stdin",
        stdin="a long enough password\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listing = opsplane(fleet, "users", "list", "--json")
    users = {u["name"]: u for u in json.loads(listing.stdout)["items"]}
    assert users["viewer-vic"]["role"] == "viewer" and users["viewer-vic"]["has_password"]
    with httpx.Client(base_url=fleet.url, timeout=10) as browser:
        body = {"name": "viewer-vic", "password": "a long enough password"}
        assert browser.post("/api/v1/auth/login", json=body).status_code == 200
        assert browser.get("/api/v1/hosts").status_code == 200
        csrf = {"X-CSRF-Token": browser.cookies["opsplane_csrf"]}
        run = {"command": "true", "targets": {"all": True}}
        assert browser.post("/api/v1/tasks", json=run, headers=csrf).status_code == 403
    no_admin = opsplane(fleet, "users", "list", token=None)
    assert no_admin.returncode == 2 and "OPSPLANE_TOKEN" in no_admin.stderr


def _token_id(fleet: Fleet, name: str) -> str:
    listing = opsplane(fleet, "tokens", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    (token,) = [t for t in json.loads(listing.stdout)["items"] if t["name"] == name]
    return str(token["id"])


def _audit(fleet: Fleet) -> list[dict[str, Any]]:
    exported = opsplane(fleet, "audit", "export")
    assert exported.returncode == 0, exported.stderr
    return [json.loads(line) for line in exported.stdout.splitlines() if line.strip()]

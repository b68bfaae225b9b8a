"""Credentials every test control plane starts with, so that tests talk to it as an admin.

A real server gets ``OPSPLANE_BOOTSTRAP_ADMIN_TOKEN`` (``tests.e2e.fleet.child_env``); an
in-process app gets ``bootstrap_admin_token`` in its settings. Either way the token exists from
the first start, exactly as in an automated deployment (DESIGN §4).
"""

from __future__ import annotations

ADMIN_TOKEN = "ops_test-bootstrap-admin-token-0123456789"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

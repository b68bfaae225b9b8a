"""Deploying and upgrading agents over the SSH link (``opsplane agents deploy|upgrade``,
docs/operations.md, "Deploying agents")."""

"""Signing, keys and (later) users, tokens, roles and audit."""

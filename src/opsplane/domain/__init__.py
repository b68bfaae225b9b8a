"""opsplane."""

"""opsplane."""

# The one place the version is written: pyproject.toml reads it from here (setuptools
# dynamic version), and agents report it without importlib.metadata, whose import costs an
# agent ~60 ms of CPU at every start (docs/scale.md, "Agent footprint").
__version__ = "0.1.0"

"""Seed 003's "RemoteRun": server-side scripts from configured directories, run as ordinary
script tasks on the control plane's own host, with the seed's routes (docs/remoterun.md)."""

from __future__ import annotations

from opsplane.domain.tasks import params_env
from opsplane.remoterun.scripts import ScriptDirs, ScriptRefused
from opsplane.remoterun.service import (
    LogEnd,
    LogLine,
    RemoteRunDisabled,
    RemoteRunRequest,
    RemoteRunService,
    parse_cursor,
)

__all__ = [
    "LogEnd",
    "LogLine",
    "RemoteRunDisabled",
    "RemoteRunRequest",
    "RemoteRunService",
    "ScriptDirs",
    "ScriptRefused",
    "params_env",
    "parse_cursor",
]

"""Running commands as child processes, shared by the agent and the script catalog."""

from __future__ import annotations

from opsplane.execution.capture import DEFAULT_CAP, OutputCapture
from opsplane.execution.environment import (
    DEFAULT_PASSTHROUGH,
    check_passthrough,
    child_environment,
)
from opsplane.execution.identity import Identity
from opsplane.execution.process import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_KILL_GRACE,
    Outcome,
    OutputCallback,
    ProcessResult,
    ProcessRun,
    StartedCallback,
    Stream,
    run_command,
)

__all__ = [
    "DEFAULT_CAP",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_KILL_GRACE",
    "DEFAULT_PASSTHROUGH",
    "Identity",
    "Outcome",
    "OutputCallback",
    "OutputCapture",
    "ProcessResult",
    "ProcessRun",
    "StartedCallback",
    "Stream",
    "check_passthrough",
    "child_environment",
    "run_command",
]

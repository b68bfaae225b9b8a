"""The opsplane agent: the daemon on each server that runs what the control plane sends.

``Agent(config).run()`` serves until stopped; ``run_agent(config)`` does so in the foreground
with signal handling, for the ``opsplane agent`` command.
"""

from __future__ import annotations

from opsplane.agent.config import AgentConfig
from opsplane.agent.daemon import Agent, run_agent
from opsplane.agent.spool import Spool

__all__ = ["Agent", "AgentConfig", "Spool", "run_agent"]

"""The ``opsplane`` console script: ``agent`` goes straight to its light module, the rest to
the full Typer app (``cli/main.py``), which imports every client verb and, for ``server``,
the control plane. An agent needs none of that (docs/scale.md, "Agent footprint")."""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``opsplane`` with ``sys.argv``."""
    if sys.argv[1:2] == ["agent"]:
        from opsplane.cli.agent_main import main as agent_main

        agent_main(sys.argv[2:], prog="opsplane agent")
        return
    from opsplane.cli.main import main as full_main

    full_main()

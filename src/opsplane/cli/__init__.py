"""opsplane's command lines: ``opsplane`` (cli/main.py) and the agent (cli/agent_main.py)."""

import sys

# httpx's __init__ imports its own command-line tool (click, pygments, rich.progress: a sixth of
# what `opsplane run` imports) inside ``try: … except ImportError``. A None entry makes that
# import fail at once, and httpx falls back to a stub ``httpx.main`` that none of us call. It
# changes nothing when httpx is already loaded (docs/scale.md, "CLI start-up").
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

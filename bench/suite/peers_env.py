"""The peers' own virtual environment, ``bench/.peers-venv`` (gitignored): SaltStack and
parallel-ssh, kept apart from the project's dependencies (Salt pins its own versions of
libraries opsplane uses). Installed once; reinstalled when the requirements below change."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.suite.common import PEERS_VENV

REQUIREMENTS = ("salt==3008.*", "parallel-ssh>=2.12")
INSTALL_BOUND = 1800.0  # seconds; Salt builds a C extension (timelib) from source here
_MARKER = PEERS_VENV / ".requirements"


def ensure() -> str:
    """Create or refresh the venv; a line saying what was done."""
    wanted = "\n".join(REQUIREMENTS)
    if _MARKER.exists() and _MARKER.read_text() == wanted:
        return f"peers' venv up to date ({PEERS_VENV})"
    started = time.monotonic()
    if not (PEERS_VENV / "bin" / "python").exists():
        # The base interpreter, not this venv's: the peers must not see opsplane's packages.
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(PEERS_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "-q", *REQUIREMENTS],
        check=True,
        timeout=INSTALL_BOUND,
    )
    _MARKER.write_text(wanted)
    return f"installed {', '.join(REQUIREMENTS)} in {time.monotonic() - started:.0f} s"


def versions() -> dict[str, str]:
    """Installed versions of the peers, for the report."""
    code = (
        "import importlib.metadata as m, json\nfound = {}\n"
        "for n in ('salt', 'parallel-ssh', 'ssh2-python', 'pyzmq'):\n"
        "    try: found[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(found))"
    )
    done = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), "-c", code],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    import json

    return dict(json.loads(done.stdout)) if done.returncode == 0 else {}

"""What every provider of ``bench/run`` shares: processes that are always cleaned up, ports,
waits with a bound, percentiles and the shape of one measured figure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
PEERS_VENV = BENCH / ".peers-venv"
HOST = "127.0.0.1"

Figures = dict[str, dict[str, Any]]
"""What a provider returns: figure key (``figures.BUDGETS``) → ``value`` (opsplane's),
``peer_value`` (the peer's, same unit), ``unit``, ``peer``, ``note``. Missing keys: not measured."""


@dataclass(frozen=True)
class Options:
    """How big this run is; providers scale themselves from it."""

    quick: bool
    work: Path  # a temporary directory of this run; removed at the end
    iterations: int  # repetitions of each timed operation (medians of at least 3)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sample."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))])


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, step: float = 0.1
) -> float:
    """Poll ``predicate`` until true; the seconds it took. Raises TimeoutError naming ``what``."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - started
        time.sleep(step)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


@dataclass
class Processes:
    """Every process a run starts, each in its own session (so its children die with it).

    ``stop_all`` signals each group (SIGTERM, then SIGKILL after a bound); ``main`` calls it
    on exit, on Ctrl-C and on SIGTERM, so nothing started here outlives the run.
    """

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(
        self,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        out: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """``argv`` with stderr (and stdout, unless ``out`` gets it apart) in ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as handle, (out or log).open("ab") as stdout:
            process = subprocess.Popen(
                list(argv),
                stdout=stdout,
                stderr=handle,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def stop(self, processes: Sequence[subprocess.Popen[bytes]], bound: float = 10.0) -> None:
        """SIGTERM each process group, wait up to ``bound`` seconds in all, then SIGKILL."""
        alive = [p for p in processes if p.poll() is None]
        for process in alive:
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + bound
        for process in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        for process in processes:
            # The group too: a daemon's children may outlive their leader.
            _signal_group(process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        self.started = [p for p in self.started if p not in processes]

    def stop_all(self) -> None:
        self.stop(list(reversed(self.started)))


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The process's own session id is its pid (start_new_session); never a broader group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


@contextlib.contextmanager
def cleanup_on_signals(processes: Processes) -> Iterator[None]:
    """Stop every started process on exit, Ctrl-C (KeyboardInterrupt) or SIGTERM."""

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)


def project_python() -> str:
    """The interpreter of this checkout's venv (the one running ``bench/run``)."""
    return sys.executable


def rss_mib(pid: int, children: bool = False) -> float:
    import psutil

    process = psutil.Process(pid)
    total = process.memory_info().rss
    if children:
        for child in process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return total / 2**20

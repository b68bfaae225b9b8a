"""A watchman that kills what a process started when that process dies, even by ``kill -9``.

The control plane runs scripts on its own host (seed 003, the catalog). If it dies, nobody is
left to time them out or report them: they must die with it, or a retry after the restart
runs them a second time beside the orphan. ``PR_SET_PDEATHSIG`` is not enough: it reaches only
the direct child (the shell, not what the shell started), it must be set in a ``preexec_fn``
(which makes subprocess fork instead of vfork, and fork runs gRPC's atfork handlers that crash
children now and then, see ``identity.py``), and it fires when the *thread* that forked exits.

So a small helper process, the warden, is started once. Its stdin is a pipe whose only write
end the owner holds; the owner tells it which runs' leaders to watch (``+pid``) and which to
forget (``-pid``). When the pipe reaches end of file (the owner exited, however it died; the
kernel closes its descriptors), the warden kills every watched leader's process group and
every descendant it can find through ``/proc`` — ``setsid`` does not help a child escape —
with SIGTERM, then SIGKILL after a grace period, and exits. A leader is recognised by its pid
and its start time, so a recycled pid is never killed.

The warden is plain Python with no imports beyond the standard library (``-I -S``), in a
session of its own so that a terminal's Ctrl-C reaches the owner, not it. The one thing it
cannot cover is a descendant whose chain of parents to a watched leader was already broken
(a daemon that double-forked and whose intermediate parent exited) *and* that left the
leader's process group: that is a command deliberately detaching itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from typing import Final

log = logging.getLogger(__name__)

_WARDEN: Final = """\
import os, signal, sys, time

def stat(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    # state ppid pgrp ... starttime is the 20th field after the command name
    return int(rest[1]), int(rest[2]), rest[19]

def victims(roots):
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            entry = stat(int(name))
            if entry is not None:
                table[int(name)] = entry
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = [pid for pid in table if pid in roots or table[pid][1] in roots]
    found = set()
    while stack:
        pid = stack.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return {pid: table[pid][2] for pid in found}

def kill(targets, sig):
    for pid, started in targets.items():
        entry = stat(pid)
        if entry is not None and entry[2] == started:
            try:
                os.kill(pid, sig)
            except OSError:
                pass

for name in ("SIGINT", "SIGHUP", "SIGPIPE", "SIGTERM"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
grace = float(sys.argv[1])
watched = {}
for line in sys.stdin.buffer:
    try:
        pid = int(line[1:])
    except ValueError:
        continue
    if line[:1] == b"+":
        entry = stat(pid)
        if entry is not None:
            watched[pid] = entry[2]
    else:
        watched.pop(pid, None)
roots = {pid for pid, started in watched.items() if (stat(pid) or (0, 0, b""))[2] == started}
if roots:
    sys.stderr.write("opsplane warden: owner gone; killing %d runs\\n" % len(roots))
    targets = victims(roots)
    kill(targets, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(stat(pid) for pid in targets):
        time.sleep(0.05)
    for _ in range(20):
        targets.update(victims(roots))
        kill(targets, signal.SIGKILL)
        time.sleep(0.05)
        if not any((stat(pid) or (0, 0, b""))[2] == s for pid, s in targets.items()):
            break
"""


class Warden:
    """The owner's side of the warden process (see the module's docstring).

    ``start()`` spawns it; ``watch(pid)`` right after starting a run's leader, ``release(pid)``
    once the run is over; ``stop()`` lets it exit (it kills whatever is still watched, which
    after a clean stop is nothing). Linux only (``/proc``); elsewhere it does nothing. A warden
    killed by someone is noticed at the next ``watch``/``release`` and replaced once, the new
    one watching what is watched then.
    """

    def __init__(self, grace: float = 2.0) -> None:
        self._grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        self._watched: set[int] = set()
        self._failed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        if self._process is not None or not os.path.isdir("/proc/self"):
            return
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WARDEN, str(self._grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def watch(self, pid: int) -> None:
        self._watched.add(pid)
        self._send(f"+{pid}\n")

    def release(self, pid: int) -> None:
        self._watched.discard(pid)
        self._send(f"-{pid}\n")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=self._grace + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _send(self, line: str) -> None:
        process = self._process
        if process is None or process.stdin is None:
            return
        try:
            # A few bytes into a pipe the warden keeps draining: does not block in practice.
            process.stdin.write(line.encode())
            process.stdin.flush()
        except OSError as e:
            if self._failed:
                return
            # Killed by someone: a new warden takes over what is watched now, once.
            self._failed = True
            log.error("the process warden is gone (%s); starting another", e)
            with contextlib.suppress(OSError):
                process.stdin.close()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                process.wait(timeout=1)
            self._process = None
            try:
                self.start()
            except OSError:
                log.exception("could not start a new warden: runs may outlive this process")
                return
            for pid in self._watched:
                self._send(f"+{pid}\n")

"""Real OpenSSH daemons on loopback for the SSH link's tests and bench.

``SshLab`` starts ``/usr/sbin/sshd`` processes on free ``127.0.0.1`` ports, each with its own
generated host key, config and log file, all accepting one dedicated unprivileged user
(``opsplane-sshtest``, created once with ``useradd``; root's shell start-up on these machines
is slow and would distort timings). The user's key pair and a second, unauthorized key are
generated per lab. ``stop()`` terminates exactly the daemons the lab spawned.

The daemons run with ``LogLevel DEBUG1`` so that a test can read from a bastion's log that a
connection was forwarded through it (``server_request_direct_tcpip``) and count logins on a
target (``Accepted publickey``).

Starting sshd needs root (it switches to the test user) and the binary. ``require_sshd()``
skips the test on a laptop without them and fails it under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from tests.conftest import unavailable

SSHD = Path("/usr/sbin/sshd")
TEST_USER = "opsplane-sshtest"
HOST = "127.0.0.1"

_START_BOUND = 10.0  # seconds for a daemon to answer with its banner
_STOP_BOUND = 5.0  # seconds for a daemon to exit after SIGTERM before SIGKILL
# sshd refuses to start without its privilege-separation directory; a system that never ran
# the ssh service (a CI container) does not have it yet.
_PRIVSEP_DIR = Path("/run/sshd")


def sshd_problem() -> str | None:
    """Why real sshd daemons cannot be started here, or None when they can."""
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (apt-get install openssh-server)"
    if os.geteuid() != 0:
        return "starting sshd for a test user needs root"
    return None


def require_sshd() -> None:
    """Skip the test when sshd cannot run here; fail it under CI=true instead."""
    problem = sshd_problem()
    if problem is not None:
        unavailable(problem)


@dataclass(frozen=True)
class TestUser:
    __test__ = False  # not a test class, despite the name

    name: str
    uid: int
    gid: int
    home: Path
    password: str = field(repr=False)


def ensure_test_user(name: str = TEST_USER) -> TestUser:
    """Create the unprivileged login user once (idempotent) and set its password.

    A password is also what unlocks the account: with ``UsePAM no`` sshd refuses even key
    logins to an account whose password is locked, as ``useradd`` leaves it.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", name],
            check=True,
            capture_output=True,
            timeout=30,
        )
        entry = pwd.getpwnam(name)
    # One password per machine, kept root-only: test processes that run side by side (several
    # modules, a bench, a second checkout) must not change it under each other's feet.
    stored = Path.home() / f".{name}-password"
    if stored.exists():
        password = stored.read_text().strip()
    else:
        password = secrets.token_urlsafe(18)
        descriptor = os.open(stored, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(password)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True, timeout=30)
    return TestUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), password)


@dataclass
class Sshd:
    """One running daemon."""

    name: str
    port: int
    host_key: asyncssh.SSHKey
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def known_hosts_line(self, key: asyncssh.SSHKey | None = None) -> str:
        """A known_hosts line for this daemon, with its own key or the one given."""
        public = (key or self.host_key).export_public_key("openssh").decode().split()
        return f"[{HOST}]:{self.port} {public[0]} {public[1]}\n"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, needle: str) -> int:
        return self.log().count(needle)

    def wait_for_log(self, needle: str, count: int = 1, timeout: float = 5.0) -> int:
        """Wait (bounded) until ``needle`` appears ``count`` times; returns the final count.

        sshd writes its log lines as it goes, so a line about something the client just saw
        can land a moment later.
        """
        deadline = time.monotonic() + timeout
        while (seen := self.count(needle)) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return seen


class SshLab:
    """A set of sshd daemons for one test module or one bench run.

    ``root`` is a world-traversable directory: the authorized_keys file is read with the
    test user's privileges. Host keys stay root-only, as sshd demands.
    """

    def __init__(self, user: TestUser) -> None:
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="opsplane-sshd-"))
        self.root.chmod(0o755)
        self.daemons: dict[str, Sshd] = {}
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key_path = self.root / "id_ed25519"
        self.client_key.write_private_key(self.client_key_path)
        self.client_key_path.chmod(0o600)
        # A well-formed key the daemons do not accept, for the auth-failure case.
        self.stranger_key = asyncssh.generate_private_key("ssh-ed25519")
        self.stranger_key_path = self.root / "id_stranger"
        self.stranger_key.write_private_key(self.stranger_key_path)
        self.stranger_key_path.chmod(0o600)
        authorized = self.root / "authorized_keys"
        authorized.write_bytes(self.client_key.export_public_key("openssh"))
        authorized.chmod(0o644)
        self._authorized = authorized

    # -- daemons -------------------------------------------------------------------------

    def start(
        self, names: Iterable[str], *, forwarding: bool = False, max_sessions: int = 50
    ) -> list[Sshd]:
        """Start one daemon per name (all at once, then wait for every banner)."""
        _PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        pending = [
            self._spawn(name, forwarding=forwarding, max_sessions=max_sessions) for name in names
        ]
        return [
            self._await_banner(daemon, forwarding=forwarding, max_sessions=max_sessions)
            for daemon in pending
        ]

    def _spawn(self, name: str, *, forwarding: bool, max_sessions: int) -> Sshd:
        if name in self.daemons:
            raise ValueError(f"a daemon named {name!r} already runs")
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        key_path = self.root / f"{name}.host_key"
        host_key.write_private_key(key_path)
        key_path.chmod(0o600)
        port = _free_port()
        config = self.root / f"{name}.sshd_config"
        config.write_text(
            self._config(name, port, key_path, forwarding=forwarding, max_sessions=max_sessions)
        )
        log_path = self.root / f"{name}.log"
        process = subprocess.Popen(
            [str(SSHD), "-D", "-f", str(config), "-E", str(log_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own session: a Ctrl-C in the terminal reaches pytest, which stops it.
            start_new_session=True,
        )
        daemon = Sshd(name, port, host_key, log_path, process)
        self.daemons[name] = daemon
        return daemon

    def _await_banner(self, daemon: Sshd, *, forwarding: bool, max_sessions: int) -> Sshd:
        deadline = time.monotonic() + _START_BOUND
        while time.monotonic() < deadline:
            if daemon.process.poll() is not None:
                # Most likely the port was taken between choosing it and binding it.
                self.daemons.pop(daemon.name, None)
                stderr = daemon.process.stderr.read().decode() if daemon.process.stderr else ""
                if "Address already in use" in daemon.log() + stderr:
                    retry = self._spawn(
                        daemon.name, forwarding=forwarding, max_sessions=max_sessions
                    )
                    return self._await_banner(
                        retry, forwarding=forwarding, max_sessions=max_sessions
                    )
                raise RuntimeError(f"sshd {daemon.name} exited: {stderr}{daemon.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((HOST, daemon.port), timeout=1.0) as sock,
            ):
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    return daemon
            time.sleep(0.02)
        raise RuntimeError(f"sshd {daemon.name} did not answer within {_START_BOUND}s")

    def _config(
        self, name: str, port: int, key_path: Path, *, forwarding: bool, max_sessions: int
    ) -> str:
        return "\n".join(
            [
                f"ListenAddress {HOST}:{port}",
                f"HostKey {key_path}",
                f"PidFile {self.root / name}.pid",
                f"AuthorizedKeysFile {self._authorized}",
                # The files live in a temporary directory, not in the user's home.
                "StrictModes no",
                "UsePAM no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication yes",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin no",
                f"AllowUsers {self.user.name}",
                f"AllowTcpForwarding {'yes' if forwarding else 'no'}",
                "X11Forwarding no",
                "UseDNS no",
                "Subsystem sftp internal-sftp",
                # The bench opens 50 connections at once through one bastion.
                "MaxStartups 200:30:400",
                f"MaxSessions {max_sessions}",
                "LogLevel DEBUG1",
                "",
            ]
        )

    def stop(self) -> None:
        """Terminate exactly the daemons this lab spawned, then remove its files."""
        for daemon in self.daemons.values():
            if daemon.process.poll() is None:
                daemon.process.terminate()
        for daemon in self.daemons.values():
            try:
                daemon.process.wait(timeout=_STOP_BOUND)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait(timeout=_STOP_BOUND)
            if daemon.process.stderr is not None:
                daemon.process.stderr.close()
        self.daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- client-side files ---------------------------------------------------------------

    def known_hosts(self, path: Path, daemons: Iterable[Sshd]) -> Path:
        """Write a known_hosts file trusting exactly ``daemons`` (their real keys)."""
        path.write_text("".join(d.known_hosts_line() for d in daemons))
        return path

    def user_dir(self, name: str) -> Path:
        """A fresh directory in the test user's home, owned by the test user."""
        path = self.user.home / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        os.chown(path, self.user.uid, self.user.gid)
        return path


@contextlib.contextmanager
def ssh_lab() -> Iterator[SshLab]:
    """A lab with no daemons yet; every daemon started in it is stopped on exit."""
    require_sshd()
    lab = SshLab(ensure_test_user())
    try:
        yield lab
    finally:
        lab.stop()


def sleep_marker() -> str:
    """A ``sleep`` duration unique to this call, to find exactly that process with pgrep.

    Unique per call, so that a process left behind by an earlier, crashed run never counts.
    """
    return f"{secrets.randbelow(900) + 100}.{secrets.randbelow(10**6):06d}"


def remote_pids(marker: str) -> list[int]:
    """The test user's processes whose command line contains ``marker``."""
    result = subprocess.run(
        ["pgrep", "-u", TEST_USER, "-f", marker], capture_output=True, text=True, timeout=10
    )
    return [int(pid) for pid in result.stdout.split()]


def wait_remote_process(marker: str, timeout: float = 10.0) -> list[int]:
    """Wait (bounded) until a process of the test user matches ``marker``: the channel's exec
    request is answered before sshd's child has exec'd the command."""
    deadline = time.monotonic() + timeout
    while not (pids := remote_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def wait_no_remote_process(marker: str, timeout: float = 15.0) -> list[int]:
    """Wait (bounded) until no process of the test user matches ``marker``; returns the rest."""
    deadline = time.monotonic() + timeout
    while (pids := remote_pids(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port

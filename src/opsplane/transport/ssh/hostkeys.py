"""Host-key verification against a known_hosts file, with opt-in trust on first use.

asyncssh checks a server's key against the known_hosts entries we hand it and, for a key it
does not trust, asks the client object's ``validate_host_public_key``. That hook is where the
policy lives: refuse (recording why, so that the error can say "unknown" or "changed"), or —
only with trust-on-first-use and only for a server with no entry at all — accept and append
the key to the file, as ``StrictHostKeyChecking=accept-new`` does.
"""

from __future__ import annotations

import logging
import os

import asyncssh

from opsplane.transport.ssh.endpoints import HostKeyPolicy, SshEndpoint

log = logging.getLogger(__name__)


def fingerprint(key: asyncssh.SSHKey) -> str:
    return f"{key.algorithm.decode()} {key.get_fingerprint('sha256')}"


class KnownHosts:
    """The policy's known_hosts file, re-read whenever it changes on disk."""

    def __init__(self, policy: HostKeyPolicy) -> None:
        self.policy = policy
        self.path = policy.path
        self._stamp: tuple[int, int] | None = None
        self._parsed = asyncssh.SSHKnownHosts()

    def current(self) -> asyncssh.SSHKnownHosts:
        """The parsed file as it is now (a cheap ``stat`` when it did not change)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._parsed = None, asyncssh.SSHKnownHosts()
            return self._parsed
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._parsed = asyncssh.import_known_hosts(self.path.read_text(errors="replace"))
            self._stamp = stamp
        return self._parsed

    def has_entry(self, host: str, addr: str, port: int) -> bool:
        """Whether the file says anything about this server (keys, CAs, X.509 names)."""
        trusted, cas, _revoked, x509, _, subjects, _ = self.current().match(host, addr, port)
        return bool(trusted or cas or x509 or subjects)

    def record(self, endpoint: SshEndpoint, key: asyncssh.SSHKey) -> None:
        """Append ``key`` for ``endpoint`` (trust on first use)."""
        public = key.export_public_key("openssh").decode().split()
        line = f"{endpoint.known_hosts_name} {public[0]} {public[1]}\n"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_APPEND keeps concurrent writers (several workers) from interleaving one line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.lseek(fd, 0, os.SEEK_END) > 0 and not self._ends_with_newline():
                os.write(fd, b"\n")
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        log.warning(
            "trusting %s on first use: recorded its host key %s in %s",
            endpoint.address,
            fingerprint(key),
            self.path,
        )

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


class VerifyingClient(asyncssh.SSHClient):
    """The asyncssh client object of one connection: applies the policy, remembers why not.

    One instance per connection attempt: ``problem`` is read after a failed connect.
    """

    def __init__(self, known_hosts: KnownHosts, endpoint: SshEndpoint) -> None:
        self._known_hosts = known_hosts
        self._endpoint = endpoint
        self.problem: str | None = None
        self.recorded = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        # Only reached for a key the file does not list for this server. Runs on the event
        # loop, so the check and the append below are atomic with respect to other
        # connection attempts of this process.
        known = self._known_hosts
        path = known.path
        if key in known.current().match(host, addr, port)[0]:
            return True  # recorded meanwhile by a concurrent first connection
        if known.has_entry(host, addr, port):
            self.problem = (
                f"host key mismatch: the server presented {fingerprint(key)}, which is not "
                f"the key {path} lists for {self._endpoint.known_hosts_name} (the key changed "
                "or someone is intercepting the connection; if the change is expected, "
                "remove the old entry)"
            )
            return False
        if not known.policy.trust_on_first_use:
            missing = "" if path.exists() else ", which does not exist"
            self.problem = (
                f"unknown host key: {self._endpoint.known_hosts_name} ({fingerprint(key)}) is "
                f"not in {path}{missing}; add it (ssh-keyscan) or enable trust on first use"
            )
            return False
        try:
            known.record(self._endpoint, key)
        except OSError as e:
            self.problem = f"unknown host key {fingerprint(key)} could not be recorded: {e}"
            return False
        self.recorded = True
        return True

"""Agentless hosts over SSH, through bastions (DESIGN §3.4, seed 000). Needs ``opsplane[ssh]``.

- ``endpoints``: ``SshEndpoint``, ``SshTarget``, ``HostKeyPolicy`` — plain values.
- ``hostkeys``: known_hosts checking on every hop, opt-in trust on first use.
- ``connections``: shared bastion connections, reuse, idle close, per-hop errors.
- ``sessions``: a command's session: command line, output queue, remote kill.
- ``uploads``: SFTP copies of a file or a tree, per-file results.
- ``executor``: ``SshExecutor.run`` / ``upload`` on one target, results per host.
- ``link``: ``SshLink``, the engine's ``ssh`` link on top of the executor.
"""

from __future__ import annotations

from opsplane.transport.base import SSH_LINK
from opsplane.transport.ssh.connections import ConnectFailure, SshConnectError
from opsplane.transport.ssh.endpoints import HostKeyPolicy, SshEndpoint, SshTarget
from opsplane.transport.ssh.executor import SshExecutor, SshResult
from opsplane.transport.ssh.link import SshLink
from opsplane.transport.ssh.uploads import UploadResult

__all__ = [
    "SSH_LINK",
    "ConnectFailure",
    "HostKeyPolicy",
    "SshConnectError",
    "SshEndpoint",
    "SshExecutor",
    "SshLink",
    "SshResult",
    "SshTarget",
    "UploadResult",
]

"""The control plane's signature on gRPC commands: once per host, or once per batch.

A command for one host is signed as it always was: every field, its ``run_id`` and ``target``
among them (DESIGN §3.3). The runs of a task that the engine dispatches together
(``CommandEnvelope.batch``) share every other field, so their content is signed once, with
``run_id`` and ``target`` empty and the root of the Merkle tree over the batch's (host, run id)
pairs in ``run_root``; each host gets its run id, its name, its leaf index and the sibling
hashes that lead to the root (security/signing_tree.py, docs/security.md). One Ed25519
signature and one ``MessageToDict`` per batch instead of per host: about 85 µs per host before,
a protobuf copy and ~15 hashes per host now (docs/scale.md, "Signatures").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.security.signing import sign
from opsplane.security.signing_tree import RunTree
from opsplane.transport.base import CommandBatch, CommandEnvelope
from opsplane.transport.grpc import convert
from opsplane.transport.grpc import opsplane_pb2 as pb

if TYPE_CHECKING:
    from opsplane.transport.filepush import Manifest


@dataclass(frozen=True)
class _Sealed:
    """A batch's signed content (``run_id`` and ``target`` empty, ``run_root`` set)."""

    content: pb.CommandContent
    tree: RunTree
    task_id: str
    attempt: int


class CommandSigner:
    """Makes the command messages of one gRPC link, signed with ``key`` (None: unsigned, for
    agents that pinned no key)."""

    def __init__(self, key: Ed25519PrivateKey | None) -> None:
        self._key = key
        # Ed25519 signatures made for commands since the start (one per host or per batch).
        self.signatures = 0

    def command(
        self,
        hostname: str,
        envelope: CommandEnvelope,
        now: float,
        manifest: Manifest | None = None,
        batch_signed: bool = False,
    ) -> pb.CommandMessage:
        """The message carrying ``envelope`` to ``hostname``, signed; with the batch's one
        signature when ``batch_signed`` (the agent said it checks that form)."""
        batch = envelope.batch
        if (
            self._key is not None
            and batch_signed
            and batch is not None
            # An upload's manifest is read per run (files.py): signed per host, as before.
            and envelope.upload is None
            and len(batch.run_ids) > 1
            and batch.run_ids.get(hostname) == envelope.run_id
        ):
            sealed = self._sealed(batch, envelope, now)
            # The batch's content is its first sender's: a run of another task or attempt in
            # it (not what the engine builds) is signed on its own rather than sent that.
            if sealed.task_id == envelope.task_id and sealed.attempt == envelope.attempt:
                return _bound(sealed, hostname, envelope.run_id)
        message = convert.command_to_pb(envelope, now, target=hostname, manifest=manifest)
        if self._key is not None:
            content = message.command_content
            content.sign = sign(self._key, convert.signed_fields(content))
            self.signatures += 1
        return message

    def _sealed(self, batch: CommandBatch, envelope: CommandEnvelope, now: float) -> _Sealed:
        sealed = batch.sealed.get(convert.LINK_NAME)
        if isinstance(sealed, _Sealed):
            return sealed
        assert self._key is not None
        # Hashing the batch's leaves and nodes: ~20 ms for 10,000 hosts, once.
        tree = RunTree(batch.run_ids)
        content = convert.command_to_pb(envelope, now, target="").command_content
        content.run_id = ""
        content.run_root = tree.root
        content.sign = sign(self._key, convert.command_claims(content))
        self.signatures += 1
        sealed = _Sealed(content, tree, envelope.task_id, envelope.attempt)
        batch.sealed[convert.LINK_NAME] = sealed
        return sealed


def _bound(sealed: _Sealed, hostname: str, run_id: str) -> pb.CommandMessage:
    message = pb.CommandMessage()
    content = message.command_content
    content.CopyFrom(sealed.content)
    position = sealed.tree.index[hostname]
    content.run_id = run_id
    content.target = hostname
    content.run_index = position
    content.run_path.extend(sealed.tree.path(position))
    return message

"""One signature for many hosts: a Merkle tree over the (target, run id) pairs of a batch.

The control plane signs a command's content once, with ``run_id`` and ``target`` empty and the
root of this tree in a signed field; each host gets its own run id, target, leaf index and the
sibling hashes from its leaf to the root (docs/security.md, "One signature per batch"). A host
recomputes its leaf from its own name and the run id it was given, and the path must lead to the
signed root: a command captured on its way to one host proves nothing for any other.

Leaves are ``sha256("opsplane-run\\0" + target + "\\0" + run_id)``; inner nodes are
``sha256("opsplane-node\\0" + left + right)``, so no inner node can pass for a leaf nor a leaf for
an inner node. A level of odd length pairs its last node with ``PAD`` (a constant nobody knows a
preimage of), so that the leaf index alone says, bit by bit, on which side each sibling is: a
verifier needs no leaf count.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final

LEAF_PREFIX: Final = b"opsplane-run\0"
NODE_PREFIX: Final = b"opsplane-node\0"
PAD: Final = hashlib.sha256(b"opsplane-pad\0").digest()
DIGEST_SIZE: Final = 32
# 2**32 leaves is far past any batch; a longer path is refused before any hashing.
MAX_DEPTH: Final = 32


def leaf(target: str, run_id: str) -> bytes:
    """The leaf binding ``run_id`` to host ``target``. A NUL in either would make two pairs
    share a leaf ("a\\0b", "c" and "a", "b\\0c"), so it is refused (ValueError)."""
    if "\0" in target or "\0" in run_id:
        raise ValueError("a target or run id with a NUL byte cannot be bound")
    return hashlib.sha256(LEAF_PREFIX + target.encode() + b"\0" + run_id.encode()).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


class RunTree:
    """The tree over ``run_ids`` (host → run id), leaves in the mapping's order."""

    def __init__(self, run_ids: Mapping[str, str]) -> None:
        if not run_ids:
            raise ValueError("a run tree needs at least one run")
        self.index: dict[str, int] = {}
        level: list[bytes] = []
        for position, (target, run_id) in enumerate(run_ids.items()):
            self.index[target] = position
            level.append(leaf(target, run_id))
        self._levels = [level]
        while len(level) > 1:
            if len(level) % 2:
                level = [*level, PAD]
                self._levels[-1] = level
            level = [_node(level[i], level[i + 1]) for i in range(0, len(level), 2)]
            self._levels.append(level)

    @property
    def root(self) -> bytes:
        return self._levels[-1][0]

    def path(self, position: int) -> list[bytes]:
        """The sibling hashes from leaf ``position`` up to the root, lowest first."""
        siblings = []
        for level in self._levels[:-1]:
            siblings.append(level[position ^ 1])
            position >>= 1
        return siblings


def proves(root: bytes, target: str, run_id: str, position: int, path: Sequence[bytes]) -> bool:
    """Whether ``path`` leads from the leaf of (``target``, ``run_id``) at ``position`` to
    ``root``."""
    if len(path) > MAX_DEPTH or not 0 <= position < 2 ** len(path):
        return False
    if len(root) != DIGEST_SIZE or any(len(sibling) != DIGEST_SIZE for sibling in path):
        return False
    try:
        digest = leaf(target, run_id)
    except ValueError:
        return False
    for sibling in path:
        digest = _node(digest, sibling) if position % 2 == 0 else _node(sibling, digest)
        position >>= 1
    return hmac.compare_digest(digest, root)

"""The Merkle tree that binds each host of a batch to its run (security/signing_tree.py), and
the gRPC link's one signature per batch (transport/grpc/signer.py)."""

from __future__ import annotations

import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.security.signing import sign, verify
from opsplane.security.signing_tree import PAD, RunTree, leaf, proves
from opsplane.transport.base import CommandBatch, CommandEnvelope
from opsplane.transport.grpc import convert
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc.signer import CommandSigner


def _runs(count: int) -> dict[str, str]:
    return {f"host-{i}": f"run-{i}" for i in range(count)}


def test_a_leaf_is_the_documented_hash_and_refuses_a_nul() -> None:
    expected = hashlib.sha256(b"opsplane-run\0web-1\0run-7").digest()
    assert leaf("web-1", "run-7") == expected
    with pytest.raises(ValueError, match="NUL"):
        leaf("a\0b", "c")


@pytest.mark.parametrize("count", [1, 2, 3, 1000])
def test_every_leaf_proves_its_own_pair_and_no_other(count: int) -> None:
    runs = _runs(count)
    tree = RunTree(runs)
    depth = max(count - 1, 0).bit_length()
    for host, run_id in runs.items():
        position = tree.index[host]
        path = tree.path(position)
        assert len(path) == depth
        assert proves(tree.root, host, run_id, position, path)
    if count == 1:
        assert tree.root == leaf("host-0", "run-0") and tree.path(0) == []
    if count == 3:
        assert tree.path(2)[0] == PAD  # the odd level's last node pairs with the pad


def test_a_proof_for_one_host_fails_for_another() -> None:
    runs = _runs(1000)
    tree = RunTree(runs)
    path = tree.path(tree.index["host-5"])
    assert proves(tree.root, "host-5", "run-5", 5, path)
    # Another host's name, with A's run or its own, at A's index or its own.
    assert not proves(tree.root, "host-6", "run-5", 5, path)
    assert not proves(tree.root, "host-6", "run-6", 5, path)
    assert not proves(tree.root, "host-6", "run-6", 6, path)
    # A's name with another run id, or at another index.
    assert not proves(tree.root, "host-5", "run-6", 5, path)
    assert not proves(tree.root, "host-5", "run-5", 4, path)
    # An index past the path's reach is refused outright.
    assert not proves(tree.root, "host-5", "run-5", 5 + 2 ** len(path), path)


def test_a_tampered_sibling_or_a_wrong_root_fails() -> None:
    runs = _runs(3)
    tree = RunTree(runs)
    path = tree.path(1)
    assert proves(tree.root, "host-1", "run-1", 1, path)
    for i in range(len(path)):
        tampered = list(path)
        tampered[i] = bytes([tampered[i][0] ^ 1]) + tampered[i][1:]
        assert not proves(tree.root, "host-1", "run-1", 1, tampered)
    assert not proves(tree.root, "host-1", "run-1", 1, path[:-1])
    assert not proves(tree.root, "host-1", "run-1", 1, [*path, PAD])
    assert not proves(tree.root, "host-1", "run-1", 1, [path[0][:31], *path[1:]])
    other = RunTree({**runs, "host-3": "run-3"})
    assert not proves(other.root, "host-1", "run-1", 1, path)
    assert not proves(b"\0" * 32, "host-1", "run-1", 1, path)
    assert not proves(tree.root[:16], "host-1", "run-1", 1, path)


def _batch(hosts: list[str]) -> tuple[CommandBatch, dict[str, CommandEnvelope]]:
    batch = CommandBatch({host: f"run-{host}" for host in hosts})
    envelopes = {
        host: CommandEnvelope(
            task_id="task-1",
            run_id=f"run-{host}",
            attempt=1,
            command="uptime",
            timeout=60,
            env={"A": "1"},
            batch=batch,
        )
        for host in hosts
    }
    return batch, envelopes


def _agent_accepts(key: Ed25519PrivateKey, name: str, cmd: pb.CommandContent) -> bool:
    """The checks of agent/grpc_link.py's ``_command_refusal`` but the clock."""
    claims = {**convert.command_claims(cmd), "sign": cmd.sign}
    if not verify(key.public_key(), claims, "sign") or cmd.target != name:
        return False
    return not cmd.run_root or proves(
        cmd.run_root, cmd.target, cmd.run_id, cmd.run_index, cmd.run_path
    )


def test_a_batch_is_signed_once_and_each_host_accepts_only_its_own_command() -> None:
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    hosts = [f"web-{i}" for i in range(5)]
    _, envelopes = _batch(hosts)
    now = time.time()
    sent = {
        host: signer.command(host, envelopes[host], now, batch_signed=True).command_content
        for host in hosts
    }
    assert signer.signatures == 1
    assert len({cmd.sign for cmd in sent.values()}) == 1
    for host, cmd in sent.items():
        assert cmd.run_id == f"run-{host}" and cmd.target == host and cmd.run_root
        assert _agent_accepts(key, host, cmd)
    captured = sent["web-0"]
    assert not _agent_accepts(key, "web-1", captured)
    # Re-addressed to web-1 (its name as target): its leaf does not lead to the root.
    forged = pb.CommandContent()
    forged.CopyFrom(captured)
    forged.target = "web-1"
    assert not _agent_accepts(key, "web-1", forged)
    # web-1's own path with web-0's run id: refused, so a run id cannot be moved either.
    forged.CopyFrom(sent["web-1"])
    forged.run_id = "run-web-0"
    assert not _agent_accepts(key, "web-1", forged)
    # The root stripped: the signature no longer matches.
    forged.CopyFrom(sent["web-1"])
    forged.ClearField("run_root")
    assert not _agent_accepts(key, "web-1", forged)


def test_a_single_host_keeps_the_per_host_signature_and_both_forms_verify() -> None:
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    _, envelopes = _batch(["solo"])
    cmd = signer.command("solo", envelopes["solo"], time.time(), batch_signed=True).command_content
    assert not cmd.run_root and not cmd.run_path and cmd.run_id == "run-solo"
    assert _agent_accepts(key, "solo", cmd)
    # The old form as an older control plane signs it (no batch at all).
    old = convert.command_to_pb(envelopes["solo"], time.time(), target="solo").command_content
    old.sign = sign(key, convert.signed_fields(old))
    assert _agent_accepts(key, "solo", old)
    # A path added to a per-host command is covered by its signature: refused.
    old.run_path.append(PAD)
    assert not _agent_accepts(key, "solo", old)


def test_a_run_the_batch_does_not_name_is_signed_on_its_own() -> None:
    key = Ed25519PrivateKey.generate()
    signer = CommandSigner(key)
    batch, envelopes = _batch(["a", "b"])
    stray = CommandEnvelope(
        task_id="task-1", run_id="run-other", attempt=1, command="uptime", timeout=60, batch=batch
    )
    cmd = signer.command("a", stray, time.time(), batch_signed=True).command_content
    assert not cmd.run_root and _agent_accepts(key, "a", cmd)
    assert signer.signatures == 1
    signer.command("a", envelopes["a"], time.time(), batch_signed=True)
    signer.command("b", envelopes["b"], time.time(), batch_signed=True)
    assert signer.signatures == 2
    # An agent that did not say it checks the batch form gets its command signed for it alone.
    older = signer.command("b", envelopes["b"], time.time()).command_content
    assert not older.run_root and _agent_accepts(key, "b", older)
    assert signer.signatures == 3

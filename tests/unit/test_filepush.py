"""The agent's receiver and the control plane's manifest (docs/filepush.md), without a link:
the receiver's requests are answered by a function standing for the control plane."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import time
import tracemalloc
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.agent.files import WINDOW, FileReceiver, UploadRefused, allowed_root, sweep_parts
from opsplane.security.signing import sign, verify
from opsplane.transport.base import CommandEnvelope, UploadSpec
from opsplane.transport.filepush import build_manifest
from opsplane.transport.grpc import convert
from opsplane.transport.grpc import opsplane_pb2 as pb
from opsplane.transport.grpc.files import ChunkServer

MIB = 1024 * 1024


def _receiver(
    root: Path, local: Path, remote: str, tamper: bool = False, euid: int | None = None
) -> tuple[FileReceiver, pb.FileManifest, list[str]]:
    manifest = build_manifest(local, remote)
    asked: list[str] = []
    receiver: FileReceiver

    async def send(request: pb.ChunkRequest) -> bool:
        for digest in request.hashes:
            asked.append(digest)
            data = manifest.read_chunk(digest)
            if tamper:
                data = b"X" + data[1:]
            chunk = pb.FileChunk(run_id=request.run_id, hash=digest, data=data)
            asyncio.get_running_loop().call_soon(receiver.on_chunk, chunk)
        return True

    receiver = FileReceiver([root], send, euid=euid)
    return receiver, convert.manifest_to_pb(manifest), asked


async def test_chunks_are_asked_once_and_the_file_lands_whole(tmp_path: Path) -> None:
    local = tmp_path / "src.bin"
    # Two identical chunks: content-addressed, asked for once.
    block = os.urandom(MIB)
    local.write_bytes(block + block + b"tail")
    root = tmp_path / "root"
    receiver, manifest, asked = _receiver(root, local, f"{root}/a/dst.bin")
    result = await receiver.push("run-1", "task-1", manifest)
    assert result.written == [f"{root}/a/dst.bin"] and not result.failed
    assert (root / "a/dst.bin").read_bytes() == local.read_bytes()
    assert len(asked) == 2
    assert not [p for p in (root / "a").iterdir() if p.name.endswith(".part")]
    again = await receiver.push("run-2", "task-1", manifest)
    assert again.unchanged == [f"{root}/a/dst.bin"] and len(asked) == 2


async def test_a_tampered_chunk_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    local = tmp_path / "src.bin"
    local.write_bytes(os.urandom(MIB + 10))
    root = tmp_path / "root"
    root.mkdir()
    (root / "dst.bin").write_bytes(b"old")
    receiver, manifest, _ = _receiver(root, local, f"{root}/dst.bin", tamper=True)
    result = await receiver.push("run-1", "task-1", manifest)
    assert not result.written
    ((path, why),) = result.failed
    assert path == f"{root}/dst.bin" and "does not match its hash" in why
    assert (root / "dst.bin").read_bytes() == b"old"
    assert sorted(p.name for p in root.iterdir()) == ["dst.bin"]


async def test_a_symlink_at_the_destination_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    local = tmp_path / "src.txt"
    local.write_bytes(b"new\n")
    root = tmp_path / "root"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep\n")
    (root / "dst.txt").symlink_to(victim)
    receiver, manifest, _ = _receiver(root, local, f"{root}/dst.txt")
    result = await receiver.push("run-1", "task-1", manifest)
    assert result.written == [f"{root}/dst.txt"]
    assert victim.read_bytes() == b"keep\n"
    assert not (root / "dst.txt").is_symlink() and (root / "dst.txt").read_bytes() == b"new\n"


def test_destinations_are_checked_against_the_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert allowed_root(f"{root}/x/y", [root]) == root
    for bad in (f"{root}/../etc/passwd", "relative/path", f"{tmp_path}/other/x"):
        with pytest.raises(UploadRefused):
            allowed_root(bad, [root])
    with pytest.raises(UploadRefused, match="accepts no uploads"):
        allowed_root(f"{root}/x", [])


def test_the_command_signature_covers_every_chunk_hash(tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"data")
    key = Ed25519PrivateKey.generate()
    envelope = CommandEnvelope("t", "r", 1, "upload", 10, upload=UploadSpec(str(local), "/dest/f"))
    message = convert.command_to_pb(envelope, 1.0, "host", build_manifest(local, "/dest/f"))
    content = message.command_content
    content.sign = sign(key, convert.signed_fields(content))
    public = key.public_key()
    assert verify(public, {**convert.signed_fields(content), "sign": content.sign}, "sign")
    content.manifest.files[0].chunks[0] = "0" * 64
    assert not verify(public, {**convert.signed_fields(content), "sign": content.sign}, "sign")


async def test_the_receiver_holds_no_more_than_its_window(tmp_path: Path) -> None:
    """A 48 MiB file through the receiver: at most a window of chunks alive at once (it once
    kept every chunk it had written until the file was done)."""
    local = tmp_path / "src.bin"
    with local.open("wb") as handle:
        for _ in range(48):
            handle.write(os.urandom(MIB))
    root = tmp_path / "root"
    receiver, manifest, _ = _receiver(root, local, f"{root}/dst.bin")
    tracemalloc.start()
    try:
        result = await receiver.push("run-1", "task-1", manifest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.written == [f"{root}/dst.bin"]
    assert peak < (2 * WINDOW + 4) * MIB, f"peak {peak / MIB:.0f} MiB"


async def test_chunks_go_only_to_the_host_the_run_was_sent_to(tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"secret data")
    server = ChunkServer()
    spec = UploadSpec(str(local), "/dest/f")
    manifest = await server.manifest_for("task-1", "run-1", "web-1", spec)
    digest = manifest.files[0].chunks[0]
    sent: list[pb.FileChunk] = []

    async def write(message: pb.CommandMessage) -> None:
        sent.append(message.file_chunk)

    request = pb.ChunkRequest(run_id="run-1", task_id="task-1", hashes=[digest, "0" * 64])
    await server.serve("web-2", request, write)
    await server.serve("web-1", request, write)
    assert [(c.data, bool(c.error)) for c in sent] == [
        (b"", True),
        (b"", True),
        (b"secret data", False),
        (b"", True),
    ]
    server.finished("run-1")
    await server.serve("web-1", request, write)
    assert sent[-2].error == "no upload of this run was sent to this host"


async def test_an_agent_that_stops_reading_does_not_hold_the_others_up(tmp_path: Path) -> None:
    local = tmp_path / "f"
    local.write_bytes(b"data")
    server = ChunkServer(serving=2, slot_hold=0.05)
    spec = UploadSpec(str(local), "/dest/f")
    stuck = asyncio.Event()

    async def never(message: pb.CommandMessage) -> None:
        await stuck.wait()

    sent: list[pb.FileChunk] = []

    async def write(message: pb.CommandMessage) -> None:
        sent.append(message.file_chunk)

    manifests = {
        host: await server.manifest_for("task-1", f"run-{host}", host, spec)
        for host in ("slow", "fast")
    }
    digest = manifests["slow"].files[0].chunks[0]
    slow = [
        asyncio.ensure_future(
            server.serve("slow", pb.ChunkRequest(run_id="run-slow", hashes=[digest]), never)
        )
        for _ in range(3)
    ]
    await asyncio.sleep(0.01)  # the slow agent's writes have both slots
    async with asyncio.timeout(2):
        await server.serve("fast", pb.ChunkRequest(run_id="run-fast", hashes=[digest]), write)
    assert [c.data for c in sent] == [b"data"]
    stuck.set()
    await asyncio.gather(*slow)
    await asyncio.sleep(0.01)
    assert server.chunks_served == 4


async def test_an_agent_not_root_refuses_to_give_files_away_before_writing(
    tmp_path: Path,
) -> None:
    """Issue 19: only root may chown to another user; the refusal is per file, says why,
    and comes before any chunk is asked for. Its own uid is fine; an unknown name too is
    refused up front."""
    local = tmp_path / "src.txt"
    local.write_bytes(b"data\n")
    root = tmp_path / "root"
    receiver, manifest, asked = _receiver(root, local, f"{root}/a.txt", euid=65534)
    manifest.owner = "root"
    result = await receiver.push("run-1", "task-1", manifest)
    assert result.failed == [
        (f"{root}/a.txt", "this agent runs as uid 65534, not root: it may not give files to root")
    ]
    assert asked == [] and not (root / "a.txt").exists()
    manifest.owner = "no-such-user-19"
    result = await receiver.push("run-2", "task-1", manifest)
    assert result.failed == [(f"{root}/a.txt", "no user 'no-such-user-19' on this host")]
    # As root (this test's account), owner and group are set, by name or number.
    receiver, manifest, _ = _receiver(root, local, f"{root}/a.txt")
    manifest.owner, manifest.group = "nobody", "65534"
    result = await receiver.push("run-3", "task-1", manifest)
    assert result.written == [f"{root}/a.txt"], result.failed
    info = (root / "a.txt").stat()
    assert (info.st_uid, info.st_gid) == (65534, 65534)


async def test_a_part_file_left_by_a_killed_writer_is_resumed_not_asked_again(
    tmp_path: Path,
) -> None:
    """The ``.part`` file is named by the content it will hold, so a later run (a retry, a
    new task) finds it; each chunk in it is checked against the manifest, and only the
    chunks missing or wrong are asked for."""
    local = tmp_path / "src.bin"
    local.write_bytes(os.urandom(5 * MIB + 7))
    root = tmp_path / "root"
    root.mkdir()
    receiver, manifest, asked = _receiver(root, local, f"{root}/dst.bin")
    digest = manifest.files[0].sha256
    part = root / f".dst.bin.{digest[:16]}.part"
    data = local.read_bytes()
    # What a killed agent left: chunks 0, 1 and 3 written, 2 not, 4 half, the tail not.
    part.write_bytes(
        data[: 2 * MIB] + bytes(MIB) + data[3 * MIB : 4 * MIB] + data[4 * MIB : 4 * MIB + 100]
    )
    result = await receiver.push("run-2", "task-1", manifest)
    assert result.written == [f"{root}/dst.bin"], result.failed
    assert (root / "dst.bin").read_bytes() == data
    chunks = list(manifest.files[0].chunks)
    assert sorted(asked) == sorted([chunks[2], chunks[4], chunks[5]])
    assert receiver.chunks_reused == 3
    assert not part.exists()


def test_old_part_files_are_swept_young_and_locked_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    digest = hashlib.sha256(b"x").hexdigest()[:16]
    old = root / f"a/b/.conf.{digest}.part"
    by_run = root / "a/.site.0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.part"
    young = root / f"a/.young.{digest}.part"
    locked = root / f".locked.{digest}.part"
    theirs = root / ".notes.part"  # not one of ours: never touched
    for path in (old, by_run, young, locked, theirs):
        path.write_bytes(b"partial")
    day_ago = time.time() - 25 * 3600
    for path in (old, by_run, locked, theirs):
        os.utime(path, (day_ago, day_ago))
    with locked.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = sweep_parts([root])
    assert sorted(removed) == sorted([old, by_run])
    assert young.exists() and locked.exists() and theirs.exists()
    sweep_parts([root], max_age=0.0, now=time.time() + 1)
    assert not young.exists() and not locked.exists() and theirs.exists()

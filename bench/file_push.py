"""File push (issue 19): one file to K gRPC agents, next to the SSH link's push to K sshd.

A control plane in process (API through ASGI, a real gRPC port, SQLite), K real agent
processes (``opsplane agent --upload-root``, each in a mount namespace of its own so that
each writes its own copy: needs root and ``unshare``), and K target sshd daemons on loopback
(``tests/integration/sshd.py``; skipped without root or sshd). Each round is one
``kind: upload`` task through ``POST /api/v1/tasks`` to every host of the link, timed from
the request to the task's end; every round (``--runs``) writes a fresh file, so every
round sends the bytes (no ``unchanged`` shortcut). Every agent's copy is checked byte-exact
after each round, and the chunks the control plane served are counted. A ``true`` command
to the same agents gives the floor any task to them costs.

With ``--salt K[,K...]`` (needs the peers' venv of ``bench/run``, ``bench/.peers-venv``, with
Salt 3008): one salt-master and K salt-minions on loopback (``bench/suite/salt_side.py``'s
configs), and ``salt-cp '*' FILE DEST`` timed the same way, a fresh file every round, every
minion's return checked. ``--agents`` takes a list too (``10,100``): one control plane and
fleet per K, the SSH side at the first K only.

Run: ``python bench/file_push.py [--agents 10,100] [--size-mib 1] [--runs 3] [--no-ssh]
[--salt 10,50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite.common import PEERS_VENV, Processes
from bench.suite.salt_side import _probe, _salt_configs
from opsplane.transport.grpc.server import GrpcLink
from tests.auth import ADMIN_HEADERS
from tests.e2e.fleet import child_env
from tests.integration.apps import admin_api
from tests.integration.sshd import SshLab, ssh_lab, sshd_problem

MIB = 1024 * 1024


async def _push(client: Any, engine: Any, local: Path | None, remote: str, group: str) -> float:
    """One task to ``group``: an upload, or with no ``local`` the command ``true`` (the
    floor: what any task to those hosts costs)."""
    body: dict[str, Any] = {"targets": {"groups": [group]}, "timeout": 120}
    if local is None:
        body["command"] = "true"
    else:
        body |= {"kind": "upload", "upload": {"local_path": str(local), "remote_path": remote}}
    began = time.perf_counter()
    created = await client.post("/api/v1/tasks", json=body, headers=ADMIN_HEADERS)
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    await engine.wait_task(task_id)
    elapsed = time.perf_counter() - began
    task = (await client.get(f"/api/v1/tasks/{task_id}", headers=ADMIN_HEADERS)).json()
    if task["status"] != "succeeded":
        runs = await client.get(
            f"/api/v1/tasks/{task_id}/runs", params={"output": "true"}, headers=ADMIN_HEADERS
        )
        raise SystemExit(f"push to {group} ended {task['status']}: {runs.text[:2000]}")
    return elapsed


def _random_file(path: Path, size: int) -> None:
    """Written a MiB at a time: the harness must not hold the file (its RSS is measured)."""
    with path.open("wb") as handle:
        for offset in range(0, size, MIB):
            handle.write(os.urandom(min(MIB, size - offset)))


def _digest(path: Path) -> str:
    whole = hashlib.sha256()
    with path.open("rb") as handle:
        while data := handle.read(MIB):
            whole.update(data)
    return whole.hexdigest()


def _peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _until_online(client: Any, names: list[str], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    for name in names:
        while True:
            host = await client.get(f"/api/v1/hosts/{name}", headers=ADMIN_HEADERS)
            if host.status_code == 200 and host.json()["status"] == "online":
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"agent {name} did not come online")
            await asyncio.sleep(0.1)


async def main_async(args: argparse.Namespace, work: Path, lab: SshLab | None) -> dict[str, Any]:
    known = None
    settings: dict[str, Any] = {"require_enrollment": False}
    if lab is not None:
        known = lab.known_hosts(work / "known_hosts", lab.daemons.values())
        settings["ssh_known_hosts"] = known
    async with admin_api(work / "cp", **settings) as (app, client):
        engine = app.state.engine
        grpc_link = engine.links["grpc"]
        assert isinstance(grpc_link, GrpcLink)
        uploads = engine.settings.effective_upload_roots[0]
        uploads.mkdir(parents=True, exist_ok=True)
        dest = work / "agent-dest"
        names = [f"push-agent-{i}" for i in range(args.agents)]
        agents = []
        dest.mkdir()
        for name in names:
            log = (work / f"{name}.log").open("ab")
            # Each agent its own disk at ``dest`` (a bind mount in a mount namespace of its
            # own): they share this machine, and one must not find another's copy unchanged.
            own = work / "views" / name
            own.mkdir(parents=True)
            bind = f'mount --bind {own} {dest} && exec "$@"'
            argv = [
                "unshare", "-m", "--propagation", "private", "sh", "-c", bind, "sh",
                sys.executable, "-m", "opsplane", "agent",
                "--server", f"127.0.0.1:{grpc_link.bound_port}", "--name", name,
                "--state-dir", str(work / "agents" / name), "--group", "pushbench",
                "--upload-root", str(dest),
            ]  # fmt: skip
            agents.append(
                await asyncio.create_subprocess_exec(
                    *argv, stdout=log, stderr=subprocess.STDOUT, env=child_env()
                )
            )
        try:
            # 100 agent processes starting at once on 2 busy cores take minutes.
            await _until_online(client, names, within=60.0 + 3.0 * len(names))
            if lab is not None:
                for name, daemon in lab.daemons.items():
                    added = await client.post(
                        "/api/v1/hosts",
                        json={
                            "name": name,
                            "ssh": f"{lab.user.name}@{daemon.address}",
                            "key_file": str(lab.client_key_path),
                            "groups": ["sshpush"],
                        },
                        headers=ADMIN_HEADERS,
                    )
                    assert added.status_code == 201, added.text
            figures: dict[str, list[float]] = {"grpc": [], "ssh": [], "grpc_true": []}
            for round_ in range(args.runs):
                figures["grpc_true"].append(await _push(client, engine, None, "", "pushbench"))
                source = uploads / f"payload-{round_}.bin"
                _random_file(source, int(args.size_mib * MIB))
                expected = _digest(source)
                figures["grpc"].append(
                    await _push(client, engine, source, f"{dest}/r{round_}/f.bin", "pushbench")
                )
                for name in names:
                    landed = _digest(work / "views" / name / f"r{round_}" / "f.bin")
                    assert landed == expected, f"{name}'s copy differs"
                if lab is not None:
                    remote = f"{lab.user.home}/pushbench-{os.getpid()}-r{round_}.bin"
                    figures["ssh"].append(await _push(client, engine, source, remote, "sshpush"))
            peaks = [_peak_rss_mib(process.pid) for process in agents]
            return {
                "agent_peak_rss_mib": max(peaks),
                "control_plane_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                / 1024,
                "agents": args.agents,
                "size_mib": args.size_mib,
                "chunks_served": grpc_link.chunks_served,
                "grpc_s": figures["grpc"],
                "ssh_s": figures["ssh"],
                "grpc_true_s": figures["grpc_true"],
            }
        finally:
            for process in agents:
                process.terminate()
            for process in agents:
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()


def salt_cp(work: Path, k: int, size: int, runs: int) -> list[float]:
    """``salt-cp`` of a fresh ``size``-byte file to K minions, ``runs`` times: the seconds of
    each, from the command's start to its exit with every minion's return in."""
    processes = Processes()
    salt_bin = PEERS_VENV / "bin"
    root = work / f"salt-k{k}"
    master_dir, minion_dirs = _salt_configs(root, k)
    try:
        master = processes.spawn(
            [str(salt_bin / "salt-master"), "-c", str(master_dir)], root / "master.out"
        )
        time.sleep(3)
        if master.poll() is not None:
            raise SystemExit(f"salt-master exited: see {root / 'master.out'}")
        for d in minion_dirs:
            processes.spawn([str(salt_bin / "salt-minion"), "-c", str(d)], d / "minion.out")
        for attempt in range(4):
            # A master still writing its keys on a busy machine refuses the first clients.
            try:
                _probe(master_dir, "wait", str(k), "480", timeout=540)
                break
            except RuntimeError:
                if attempt == 3:
                    raise
                time.sleep(10)
        samples = []
        for round_ in range(runs):
            source = work / f"salt-payload-{k}-{round_}.bin"
            _random_file(source, size)
            destination = work / f"salt-dest-{k}-{round_}.bin"
            began = time.perf_counter()
            done = subprocess.run(
                [str(salt_bin / "salt-cp"), "-c", str(master_dir), "--out", "json", "--chunked",
                 "-t", "300", "*", str(source), str(destination)],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            elapsed = time.perf_counter() - began
            good = done.stdout.count(": true")
            if done.returncode != 0 or good != k:
                raise SystemExit(
                    f"salt-cp to {k}: rc {done.returncode}, {good}/{k} true: "
                    f"{(done.stdout + done.stderr)[-600:]}"
                )
            # The minions share this machine's disk and salt-cp --chunked appends chunk by
            # chunk: ten writers of one path interleave, so the copy is not checked here;
            # every minion's ``true`` is.
            samples.append(elapsed)
        return samples
    finally:
        processes.stop_all()


def _ms(samples: list[float]) -> str:
    shown = ", ".join(f"{s * 1000:.0f}" for s in samples)
    return f"median {statistics.median(samples) * 1000:.0f} ms (rounds: {shown} ms)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="10", help="K, or a list: 10,100")
    parser.add_argument("--size-mib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-ssh", action="store_true")
    parser.add_argument("--salt", default="", help="salt-cp to K minions too: 10 or 10,50")
    args = parser.parse_args()
    ks = [int(k) for k in str(args.agents).split(",") if k]
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="opsplane-push-") as tmp:
        work = Path(tmp)
        for index, k in enumerate(ks):
            args.agents = k
            kwork = work / f"k{k}"
            kwork.mkdir()
            problem = None if not args.no_ssh and index == 0 else "--no-ssh or not the first K"
            problem = problem or sshd_problem()
            if problem is not None:
                result = asyncio.run(main_async(args, kwork, None))
            else:
                with ssh_lab() as lab:
                    lab.start([f"sshpush-{i}" for i in range(k)])
                    result = asyncio.run(main_async(args, kwork, lab))
            _report(args, result)
        for k in [int(k) for k in args.salt.split(",") if k]:
            try:
                samples = salt_cp(work, k, int(args.size_mib * MIB), args.runs)
            except (SystemExit, RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"salt-cp   {args.size_mib:g} MiB to {k}: failed: {e}")
            else:
                print(f"salt-cp   {args.size_mib:g} MiB to {k}: {_ms(samples)}")
    print(f"whole run: {time.monotonic() - began:.0f} s")
    return 0


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    for link in ("grpc_true", "grpc", "ssh"):
        samples = result[f"{link}_s"]
        if samples:
            shown = ", ".join(f"{s * 1000:.0f}" for s in samples)
            what = "`true`" if link == "grpc_true" else f"{args.size_mib:g} MiB"
            print(
                f"{link:9} {what} to {args.agents}: median "
                f"{statistics.median(samples) * 1000:.0f} ms (rounds: {shown} ms)"
            )
    print(f"chunks served over gRPC: {result['chunks_served']}")
    print(
        f"peak RSS: agents {result['agent_peak_rss_mib']:.0f} MiB (the largest), control "
        f"plane with this harness {result['control_plane_peak_rss_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    raise SystemExit(main())

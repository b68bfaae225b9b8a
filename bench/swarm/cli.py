"""The swarm's orchestrator: control plane, worker processes, phases, figures (see __init__)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import httpx
import psutil

from bench.swarm.simulator import Mode

# The repository root: workers run `python -m bench.swarm.worker` from it.
_ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"succeeded", "failed", "canceled", "timed_out"}
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
# A worker busier than this share of one core may be what bounds the figures.
BUSY_WORKER = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        return float(times.user + times.system)
    return 0.0


def _rss_mib(process: psutil.Process | None) -> float | None:
    if process is None:
        return None
    with contextlib.suppress(psutil.Error):
        return round(process.memory_info().rss / 2**20, 1)
    return None


@dataclass
class ControlPlane:
    """One we started (``process`` set) or one we attach to (``pid`` maybe given)."""

    grpc: str
    api: str
    token: str
    process: asyncio.subprocess.Process | None = None
    data_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    log: Path | None = None

    @property
    def ps(self) -> psutil.Process | None:
        pid = self.process.pid if self.process is not None else self.pid
        if pid is None:
            return None
        try:
            return psutil.Process(pid)
        except psutil.Error:
            return None


async def start_control_plane(
    data_dir: Path, *, database_url: str | None, extra_env: dict[str, str], grpc: str, api: str
) -> ControlPlane:
    """``opsplane server`` in a subprocess on SQLite (or ``database_url``) with enrollment
    off (the swarm's agents choose their names and keys), an admin token for the API."""
    token = "ops_swarm_" + secrets.token_hex(12)
    env = {
        **os.environ,
        "OPSPLANE_REQUIRE_ENROLLMENT": "false",
        "OPSPLANE_BOOTSTRAP_ADMIN_TOKEN": token,
        **extra_env,
    }
    if database_url:
        env["OPSPLANE_DATABASE_URL"] = database_url
    control_plane = ControlPlane(grpc=grpc, api=api, token=token, data_dir=data_dir, env=env)
    await _launch(control_plane)
    return control_plane


async def _launch(control_plane: ControlPlane) -> None:
    assert control_plane.data_dir is not None
    listen = control_plane.api.removeprefix("http://")
    log = control_plane.data_dir / "server.log"
    control_plane.log = log
    with log.open("ab") as out:
        control_plane.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "opsplane",
            "server",
            "--listen",
            listen,
            "--grpc-listen",
            control_plane.grpc,
            "--data-dir",
            str(control_plane.data_dir),
            env=control_plane.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    async with httpx.AsyncClient(base_url=control_plane.api, timeout=5) as client:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if control_plane.process.returncode is not None:
                raise RuntimeError(f"the control plane exited; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the control plane was not ready within 60 s; see {log}")


async def stop_control_plane(control_plane: ControlPlane) -> None:
    process = control_plane.process
    if process is None or process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    stats: dict[str, Any] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            with contextlib.suppress(ValueError):
                self.stats = json.loads(line)


def _link_args(args: argparse.Namespace) -> list[str]:
    """What a worker needs beyond the gRPC address to speak the RabbitMQ link."""
    if args.link != "amqp":
        return []
    extra = ["--link", "amqp", "--amqp-url", args.amqp_url]
    extra += ["--amqp-connections", str(args.amqp_connections)]
    extra += ["--heartbeat-interval", str(args.heartbeat_interval)]
    return extra + (["--cp-key", args.cp_key] if args.cp_key else [])


def _record_args(args: argparse.Namespace) -> list[str]:
    return ["--record", args.record] if getattr(args, "record", None) else []


async def start_workers(args: argparse.Namespace, address: str) -> list[Worker]:
    per = -(-args.agents // args.procs)
    workers: list[Worker] = []
    for first in range(0, args.agents, per):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.swarm.worker",
            "--address",
            address,
            "--first",
            str(first),
            "--count",
            str(min(per, args.agents - first)),
            "--prefix",
            args.prefix,
            "--groups",
            args.group,
            "--mode",
            args.mode,
            *_link_args(args),
            *_record_args(args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=_ROOT,
        )
        workers.append(Worker(process))
    for worker in workers:
        assert worker.process.stdout is not None
        line = await asyncio.wait_for(worker.process.stdout.readline(), 300)
        if not line.startswith(b'{"ready"'):
            raise RuntimeError(f"a swarm worker did not start: {line!r}")
        worker.reader = asyncio.create_task(worker.read())
    return workers


async def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.process.stdin is not None:
            with contextlib.suppress(OSError):
                worker.process.stdin.close()
    for worker in workers:
        try:
            await asyncio.wait_for(worker.process.wait(), 10)
        except TimeoutError:
            worker.process.kill()
            await worker.process.wait()
        if worker.reader is not None:
            await asyncio.wait([worker.reader], timeout=2)


def _sum_stats(workers: list[Worker]) -> dict[str, Any]:
    total: dict[str, Any] = {"errors": {}}
    for worker in workers:
        for key, value in worker.stats.items():
            if key == "errors":
                for code, n in value.items():
                    total["errors"][code] = total["errors"].get(code, 0) + n
            else:
                total[key] = total.get(key, 0) + value
    return total


class Meter:
    """CPU seconds of the control plane and of each worker over a phase."""

    def __init__(self, control_plane: ControlPlane, workers: list[Worker]) -> None:
        self._cp = control_plane.ps
        self._workers = [psutil.Process(w.process.pid) for w in workers]
        self._start = time.monotonic()
        self._cp_cpu = _cpu_seconds(self._cp)
        self._worker_cpu = [_cpu_seconds(w) for w in self._workers]

    def read(self) -> dict[str, Any]:
        wall = max(1e-6, time.monotonic() - self._start)
        worker_pct = [
            100 * (_cpu_seconds(w) - before) / wall
            for w, before in zip(self._workers, self._worker_cpu, strict=True)
        ]
        return {
            "wall_s": round(wall, 2),
            "cp_cpu_pct": round(100 * (_cpu_seconds(self._cp) - self._cp_cpu) / wall, 1)
            if self._cp is not None
            else None,
            "cp_rss_mib": _rss_mib(self._cp),
            "swarm_cpu_pct": round(sum(worker_pct), 1),
            "swarm_worker_max_cpu_pct": round(max(worker_pct, default=0.0), 1),
        }


async def _online(client: httpx.AsyncClient) -> int:
    response = await client.get("/api/v1/fleet/summary")
    response.raise_for_status()
    return int(response.json()["online"])


async def wait_online(
    client: httpx.AsyncClient,
    control_plane: ControlPlane,
    workers: list[Worker],
    want: int,
    limit: float,
) -> dict[str, Any]:
    """Until the API counts ``want`` hosts online (or ``limit`` seconds passed)."""
    meter = Meter(control_plane, workers)
    started = time.monotonic()
    seen = 0
    while time.monotonic() - started < limit:
        with contextlib.suppress(httpx.HTTPError):
            seen = await _online(client)
        if seen >= want:
            break
        await asyncio.sleep(0.25)
    elapsed = time.monotonic() - started
    stats = _sum_stats(workers)
    return {
        "online": seen,
        "all_online_s": round(elapsed, 2) if seen >= want else None,
        "give_ups": stats.get("give_ups", 0),
        "reconnects": max(0, stats.get("dials", 0) - want),
        "shed": stats.get("shed", 0),
        "errors": stats.get("errors", {}),
        **meter.read(),
    }


async def broadcast(
    client: httpx.AsyncClient,
    control_plane: ControlPlane,
    workers: list[Worker],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """POST one task to every swarm agent; time until every run is terminal."""
    meter = Meter(control_plane, workers)
    targets = {"all": True} if args.target == "all" else {"groups": [args.group]}
    started = time.monotonic()
    response = await client.post(
        "/api/v1/tasks",
        json={"command": args.command, "targets": targets, "timeout": 60, "name": "swarm"},
        timeout=120,
    )
    response.raise_for_status()
    posted = time.monotonic() - started
    task = response.json()
    while task["status"] not in TERMINAL and time.monotonic() - started < args.broadcast_timeout:
        await asyncio.sleep(0.2)
        with contextlib.suppress(httpx.HTTPError):
            task = (await client.get(f"/api/v1/tasks/{task['id']}")).json()
    done = time.monotonic() - started
    return {
        "runs": task["counts"]["total"],
        "status": task["status"],
        "post_s": round(posted, 2),
        "terminal_s": round(done, 2) if task["status"] in TERMINAL else None,
        "succeeded": task["counts"].get("succeeded", 0),
        **meter.read(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "agents": args.agents,
        "procs": args.procs,
        "mode": args.mode,
        "link": args.link,
        "enrollment": "require_enrollment=false (agents choose their keys)",
    }
    with tempfile.TemporaryDirectory(prefix="swarm-") as tmp:
        if args.api:
            control_plane = ControlPlane(args.grpc or "", args.api, args.token, pid=args.cp_pid)
        else:
            data_dir = Path(args.data_dir) if args.data_dir else Path(tmp)
            data_dir.mkdir(parents=True, exist_ok=True)
            extra_env = dict(item.split("=", 1) for item in args.cp_env)
            if args.link == "amqp":
                extra_env.setdefault("OPSPLANE_AMQP_URL", args.amqp_url)
            control_plane = await start_control_plane(
                data_dir,
                database_url=args.database_url,
                extra_env=extra_env,
                grpc=f"127.0.0.1:{_free_port()}",
                api=f"http://127.0.0.1:{_free_port()}",
            )
            if args.link == "amqp" and not args.no_verify and not args.cp_key:
                # The key an enrolled agent would pin: its commands are checked against it.
                args.cp_key = str(data_dir / "keys" / "control-plane.pub")
        report["database"] = args.database_url or "sqlite"
        workers: list[Worker] = []
        headers = {"Authorization": f"Bearer {control_plane.token}"}
        try:
            async with httpx.AsyncClient(
                base_url=control_plane.api, headers=headers, timeout=30
            ) as client:
                baseline = await _online(client)
                report["cp_rss_mib_before"] = _rss_mib(control_plane.ps)
                workers = await start_workers(args, control_plane.grpc)
                for worker in workers:
                    assert worker.process.stdin is not None
                    worker.process.stdin.write(b"go\n")
                    await worker.process.stdin.drain()
                report["connect"] = await wait_online(
                    client, control_plane, workers, baseline + args.agents, args.online_timeout
                )
                report["connect"]["online"] -= baseline
                report["broadcasts"] = []
                for _ in range(args.broadcasts):
                    report["broadcasts"].append(
                        await broadcast(client, control_plane, workers, args)
                    )
                if args.restart and control_plane.process is not None:
                    await stop_control_plane(control_plane)
                    await _launch(control_plane)
                    report["restart"] = await wait_online(
                        client, control_plane, workers, args.agents, args.online_timeout
                    )
                report["cp_rss_mib_after"] = _rss_mib(control_plane.ps)
        finally:
            await stop_workers(workers)
            if control_plane.process is not None:
                await stop_control_plane(control_plane)
    # The workers' last counters (each prints them once more as it stops).
    report["swarm"] = _sum_stats(workers)
    busy = [
        phase.get("swarm_worker_max_cpu_pct", 0)
        for phase in [report.get("connect", {}), *report.get("broadcasts", [])]
    ]
    report["swarm_bound"] = any(b > BUSY_WORKER for b in busy)
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    setup = (
        f"{report['agents']} / {report['procs']} / {report['mode']} over {report['link']}, "
        f"{report['database']}"
    )
    rows: list[tuple[str, Any]] = [("agents / worker processes / mode", setup)]
    phases = [("connect", report.get("connect"))]
    phases += [(f"broadcast {i + 1}", b) for i, b in enumerate(report.get("broadcasts", []))]
    phases += [("restart", report.get("restart"))]
    for name, p in phases:
        if not p:
            continue
        if "runs" in p:
            done = f"{p['terminal_s']} / {p['post_s']} ({p['succeeded']}/{p['runs']} succeeded)"
            rows.append((f"{name}: runs terminal / POST returned (s)", done))
        else:
            online = f"{p['all_online_s']} ({p['online']} online)"
            rows.append((f"{name}: all online per API (s)", online))
            churn = f"{p['give_ups']} / {p['reconnects']} / {p['shed']}"
            rows.append((f"{name}: give-ups / reconnects / shed", churn))
        rows.append((f"{name}: control plane CPU % / RSS MiB", f"{p['cp_cpu_pct']} / "
                     f"{p['cp_rss_mib']}"))  # fmt: skip
        swarm = f"{p['swarm_cpu_pct']} / {p['swarm_worker_max_cpu_pct']}"
        rows.append((f"{name}: swarm CPU % (all workers / busiest)", swarm))
    if report.get("swarm_bound"):
        rows.append(("WARNING", "a swarm worker was past 90 % of a core: add --procs"))
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.swarm", description="simulated agents")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--procs", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    p.add_argument("--mode", choices=get_args(Mode), default="reply")
    p.add_argument("count", nargs="?", type=int, help="the number of agents (as --agents)")
    p.add_argument("--link", choices=["grpc", "amqp"], default="grpc")
    p.add_argument("--amqp-url", default=AMQP_URL, help="amqp: the broker URL, with its vhost")
    p.add_argument("--amqp-connections", type=int, default=2,
                   help="amqp: connections per worker (its agents share them)")  # fmt: skip
    p.add_argument("--cp-key", help="amqp: the control plane's public key (own: read from it)")
    p.add_argument("--no-verify", action="store_true", help="amqp: skip command signatures")
    p.add_argument("--heartbeat-interval", type=float, default=10.0,
                   help="amqp: seconds between heartbeats (as the CP's setting)")  # fmt: skip
    p.add_argument("--record", metavar="FILE",
                   help="grpc: append 'NAME RUN_ID ATTEMPT' to FILE for every command an agent "
                   "runs (count executions on the hosts' side)")  # fmt: skip
    p.add_argument("--grpc", help="attach: the control plane's gRPC endpoint")
    p.add_argument("--api", help="attach: the control plane's API URL")
    p.add_argument("--token", help="attach: an admin API token")
    p.add_argument("--cp-pid", type=int, help="attach: the control plane's pid, for CPU/RSS")
    p.add_argument("--database-url", help="own control plane: a database instead of SQLite")
    p.add_argument("--data-dir", help="own control plane: keep its data (and server.log) here")
    p.add_argument("--cp-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--prefix", default="swarm", help="agent names: PREFIX-00000 …")
    p.add_argument("--group", default="swarm")
    p.add_argument("--broadcasts", type=int, default=1)
    p.add_argument("--command", default="true")
    p.add_argument("--target", choices=["group", "all"], default="group")
    p.add_argument("--online-timeout", type=float, default=120.0)
    p.add_argument("--broadcast-timeout", type=float, default=120.0)
    p.add_argument("--restart", action="store_true", help="own control plane: restart it once")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.count is not None:
        args.agents = args.count
    grpc_half = args.link == "grpc" and bool(args.grpc) != bool(args.api)
    if (args.api and not args.token) or grpc_half:
        parser().error("attaching needs --api, --token (and --grpc on the gRPC link)")
    args.procs = max(1, min(args.procs, args.agents))
    report = asyncio.run(run(args))
    print(json.dumps(report) if args.json else table(report))
    connect = report.get("connect", {})
    return 0 if connect.get("all_online_s") is not None else 1

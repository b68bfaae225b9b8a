"""The agent's own footprint: K real ``opsplane agent`` processes started at once against a real
control plane on loopback (gRPC): time until the API shows all K online, then, after an idle
spell, each agent's memory (RSS, and USS: what it alone holds) and CPU time.

    python bench/agent_footprint.py [--k 10 50 100] [--idle 10] [--json]
        [--agent-pythonpath DIR]   # agents from another checkout's src (a before/after)
        [--salt-venv PATH]         # also salt-minions side by side, if that venv has salt

The control plane is ``python -m opsplane server`` (this checkout, SQLite, a temporary data
directory, enrollment not required) started once per K; the agents are
``python -m opsplane agent`` from this checkout or from ``--agent-pythonpath``. Time to online
is wall time from the first spawn until ``GET /api/v1/hosts?status=online`` lists all K; it
depends on the load of the machine, so the table also gives each agent's CPU seconds when it
was online (user + system, summed over the K agents: ``cpu_total_s``), which does not. Every
wait is bounded; every process started is stopped.

Before the agents start, the opsplane package they import is byte-compiled (``compileall``),
as installing a wheel does: from an editable checkout under ``PYTHONDONTWRITEBYTECODE`` (this
machine sets it) every agent would otherwise compile every opsplane module from source, about
15 % of its start-up CPU (``--no-compile`` measures that case). ``redials`` counts the agents
whose log says they had to dial again (``reconnecting in``) before all were online.

``--salt-venv``: the seam for the salt-minion side of the comparison (bench/peers sets up the
salt master and minions); here the row says whether salt is importable there and is otherwise
left empty.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

TOKEN = "agent-footprint-bench-admin-token-0123456789"
GROUP = "footprint"
ONLINE_TIMEOUT = 300.0
POLL = 0.1


@dataclass
class Row:
    who: str
    k: int
    online_s: float | None
    online_of_k: int
    cpu_total_s: float
    cpu_per_agent_s: float
    rss_mib_median: float
    rss_mib_max: float
    uss_mib_median: float
    server_cpu_s: float
    redials: int = 0
    load_1m: float = 0.0
    note: str = ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(pythonpath: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSPLANE_")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


@contextlib.contextmanager
def _control_plane(root: Path) -> Iterator[tuple[str, str, psutil.Process]]:
    http, grpc_port = _free_port(), _free_port()
    env = _env()
    env.update(
        OPSPLANE_REQUIRE_ENROLLMENT="false",
        OPSPLANE_BOOTSTRAP_ADMIN_TOKEN=TOKEN,
    )
    url = f"http://127.0.0.1:{http}"
    with (root / "server.log").open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "opsplane", "server", "--listen", f"127.0.0.1:{http}",
             "--grpc-listen", f"127.0.0.1:{grpc_port}", "--data-dir", str(root / "data")],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the control plane exited; see {root / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the control plane did not get ready within 60 s")
            time.sleep(0.2)
        yield url, f"127.0.0.1:{grpc_port}", psutil.Process(server.pid)
    finally:
        _stop([server])


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _online(client: httpx.Client) -> int:
    try:
        answer = client.get("/api/v1/hosts", params={"status": "online", "group": GROUP,
                                                     "size": 1000})  # fmt: skip
    except httpx.HTTPError:
        return 0
    if answer.status_code != 200:
        return 0
    return sum(1 for host in answer.json().get("items", []) if host.get("status") == "online")


def _cpu(process: psutil.Process) -> float:
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        return float(times.user + times.system)
    return 0.0


def compile_package(pythonpath: str | None) -> None:
    """Byte-compile the opsplane package the agents will import (see the module docstring)."""
    env = _env(pythonpath)
    probe = "import opsplane, os; print(os.path.dirname(opsplane.__file__))"
    where = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()
    subprocess.run([sys.executable, "-m", "compileall", "-q", where], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def _redials(root: Path, k: int) -> tuple[int, Counter[str]]:
    """Agents whose log shows a second dial (a failed or refused first attempt), and why
    (the reason the link logged, ``cannot reach HOST: REASON; reconnecting in …``)."""
    count, reasons = 0, Counter[str]()
    for i in range(k):
        log = root / f"agent-{i}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        redials = [line for line in lines if "reconnecting in" in line]
        if redials:
            count += 1
        for line in redials:
            # "… opsplane.agent.grpc_link: cannot reach HOST:PORT: REASON; reconnecting in …"
            said = line.rsplit("; reconnecting in", 1)[0]
            reason = said.split(" reach ", 1)[-1].split(" at ", 1)[-1].split(": ", 1)[-1]
            reasons[reason[:80]] += 1
    return count, reasons


def measure_opsplane(k: int, idle: float, pythonpath: str | None, label: str) -> Row:
    """K agents at once: seconds to all online, CPU they used by then, memory after ``idle``."""
    with tempfile.TemporaryDirectory(prefix="agent-footprint-") as tmp:
        root = Path(tmp)
        with _control_plane(root) as (url, grpc_address, server):
            server_cpu_before = _cpu(server)
            agents: list[subprocess.Popen[bytes]] = []
            env = _env(pythonpath)
            try:
                started = time.monotonic()
                for i in range(k):
                    with (root / f"agent-{i}.log").open("ab") as log:
                        agents.append(subprocess.Popen(
                            [sys.executable, "-m", "opsplane", "agent", "--server", grpc_address,
                             "--name", f"fp-{i:04d}", "--group", GROUP,
                             "--state-dir", str(root / "agents" / str(i))],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                        ))  # fmt: skip
                online_s: float | None = None
                count = 0
                with httpx.Client(
                    base_url=url, timeout=10, headers={"Authorization": f"Bearer {TOKEN}"}
                ) as client:
                    while time.monotonic() - started < ONLINE_TIMEOUT:
                        count = _online(client)
                        if count >= k:
                            online_s = time.monotonic() - started
                            break
                        time.sleep(POLL)
                processes = [psutil.Process(a.pid) for a in agents if a.poll() is None]
                cpu_at_online = sum(_cpu(p) for p in processes)
                redials, reasons = _redials(root, k)
                load = os.getloadavg()[0]
                time.sleep(idle)
                rss, uss = [], []
                for p in processes:
                    with contextlib.suppress(psutil.Error):
                        full = p.memory_full_info()
                        rss.append(full.rss / 2**20)
                        uss.append(full.uss / 2**20)
                server_cpu = _cpu(server) - server_cpu_before
            finally:
                _stop(agents)
    return Row(
        who=label,
        k=k,
        online_s=None if online_s is None else round(online_s, 2),
        online_of_k=count,
        cpu_total_s=round(cpu_at_online, 2),
        cpu_per_agent_s=round(cpu_at_online / max(1, k), 3),
        rss_mib_median=round(statistics.median(rss), 1) if rss else 0.0,
        rss_mib_max=round(max(rss), 1) if rss else 0.0,
        uss_mib_median=round(statistics.median(uss), 1) if uss else 0.0,
        server_cpu_s=round(server_cpu, 2),
        redials=redials,
        load_1m=round(load, 1),
        note="; ".join(
            ([] if online_s is not None else [f"not all online within {ONLINE_TIMEOUT:g} s"])
            + [f"{n} x {reason}" for reason, n in reasons.most_common(2)]
        ),
    )


def measure_salt(k: int, venv: Path) -> Row:
    """The salt-minion side: the seam for bench/peers' salt setup (master and K minions)."""
    python = venv / "bin" / "python"
    found = python.exists() and subprocess.run(
        [str(python), "-c", "import salt.scripts"], capture_output=True, check=False
    ).returncode == 0  # fmt: skip
    note = "salt importable; minions are started by bench/peers" if found else "no salt there"
    return Row("salt-minion", k, None, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, note=note)


def _table(rows: list[Row]) -> str:
    head = (
        "| who | K | all online (s) | agent CPU to online, total / per agent (s) | "
        "RSS median / max (MiB) | USS median (MiB) | control-plane CPU (s) | redials | "
        "load | note |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        online = f"{r.online_s:.2f}" if r.online_s is not None else f"— ({r.online_of_k}/{r.k})"
        lines.append(
            f"| {r.who} | {r.k} | {online} | {r.cpu_total_s:.2f} / {r.cpu_per_agent_s:.3f} | "
            f"{r.rss_mib_median:.1f} / {r.rss_mib_max:.1f} | {r.uss_mib_median:.1f} | "
            f"{r.server_cpu_s:.2f} | {r.redials} | {r.load_1m:g} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle before memory")
    parser.add_argument("--agent-pythonpath", help="run the agents from this src directory")
    parser.add_argument("--label", default="opsplane agent")
    parser.add_argument("--salt-venv", type=Path)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave the agents to compile opsplane from source")  # fmt: skip
    args = parser.parse_args()
    if not args.no_compile:
        compile_package(args.agent_pythonpath)
    rows: list[Row] = []
    for k in args.k:
        rows.append(measure_opsplane(k, args.idle, args.agent_pythonpath, args.label))
        if args.salt_venv is not None:
            rows.append(measure_salt(k, args.salt_venv))
        if not args.json:
            print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    conditions = {
        "cpus": os.cpu_count(),
        "load_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "idle_s": args.idle,
    }
    if args.json:
        print(json.dumps({"conditions": conditions, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(f"conditions: {conditions}")
        print(_table(rows))


if __name__ == "__main__":
    main()

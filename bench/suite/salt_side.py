"""SaltStack side by side: ``cmd.run 'echo ok'`` on K local opsplane agents vs K salt-minions.

For each K (10, 50) one salt-master and K salt-minions (each with its own config and root
directory, auto-accepted keys, loopback ports) and K ``opsplane agent`` processes in a new
group of one control plane are started at once; then, in rounds, the time to the last return:

- API: opsplane ``POST /api/v1/tasks`` → terminal SSE event; Salt ``LocalClient.cmd``
  (``salt_probe.py`` in the peers' venv), each with one untimed warm-up;
- CLI, the whole process: ``opsplane run --group G -- echo ok`` vs ``salt '*' cmd.run 'echo ok'``.

Also, from the same start: processes started at once → all online (opsplane: the hosts API
says online; Salt: every minion answers ``test.ping``), and each side's idle RSS per agent.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.suite.common import (
    HOST,
    PEERS_VENV,
    Figures,
    Options,
    Processes,
    free_port,
    median,
    rss_mib,
)
from bench.suite.controlplane import ControlPlane, run_to_end, timed_cli

PROBE = Path(__file__).with_name("salt_probe.py")
ONLINE_BOUND = 480.0  # seconds for K processes to be online (Salt, K=50, loaded: 284 s)


def _salt_configs(root: Path, k: int) -> tuple[Path, list[Path]]:
    """A master's and K minions' config dirs under ``root``; every path under its root_dir."""
    publish, ret = free_port(), free_port()
    master_dir = root / "master"
    master_dir.mkdir(parents=True)
    (master_dir / "master").write_text(
        f"root_dir: {master_dir}\n"
        f"interface: {HOST}\npublish_port: {publish}\nret_port: {ret}\n"
        "auto_accept: true\nuser: root\nlog_level: warning\nlog_level_logfile: warning\n"
        f"file_roots:\n  base:\n    - {master_dir}/srv\n"
    )
    minions = []
    for i in range(k):
        minion_dir = root / f"minion-{i:03d}"
        minion_dir.mkdir()
        (minion_dir / "minion").write_text(
            f"root_dir: {minion_dir}\nid: salt-k{k}-{i:03d}\n"
            f"master: {HOST}\nmaster_port: {ret}\npublish_port: {publish}\n"
            "user: root\nlog_level: warning\nlog_level_logfile: warning\n"
            "acceptance_wait_time: 1\nrandom_startup_delay: 0\n"
        )
        minions.append(minion_dir)
    return master_dir, minions


def _probe(master_dir: Path, *args: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), str(PROBE), str(master_dir), *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    answer: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 or "error" in answer:
        raise RuntimeError(f"salt probe {args}: {answer.get('error') or done.stderr[-800:]}")
    return answer


def _salt_cli(master_dir: Path, k: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [str(PEERS_VENV / "bin" / "salt"), "-c", str(master_dir), "--out", "json",
         "--static", "-t", "60", "*", "cmd.run", "echo ok"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0 or done.stdout.count('"ok"') != k:
        raise RuntimeError(f"salt CLI: rc {done.returncode}, {done.stdout[-300:]!r}")
    return seconds


def _tree_rss(processes: list[subprocess.Popen[bytes]]) -> float:
    return median([rss_mib(p.pid, children=True) for p in processes if p.poll() is None])


def measure_k(
    plane: ControlPlane, processes: Processes, opts: Options, k: int, rounds: int
) -> Figures:
    root = opts.work / f"salt-k{k}"
    master_dir, minion_dirs = _salt_configs(root, k)
    salt_bin = PEERS_VENV / "bin"
    # Salt's master first: it must be listening before the minions' start can be timed.
    master = processes.spawn(
        [str(salt_bin / "salt-master"), "-c", str(master_dir)], root / "master.out"
    )
    time.sleep(3)
    if master.poll() is not None:
        raise RuntimeError(f"salt-master exited: see {root / 'master.out'}")
    group = f"k{k}"
    started_at = time.monotonic()
    agents = plane.start_agents([f"ops-k{k}-{i:03d}" for i in range(k)], group)
    plane.wait_online(group, k, ONLINE_BOUND)
    opsplane_online = time.monotonic() - started_at
    minions_started = time.monotonic()
    minions = [
        processes.spawn([str(salt_bin / "salt-minion"), "-c", str(d)], d / "minion.out")
        for d in minion_dirs
    ]
    _probe(master_dir, "wait", str(k), str(ONLINE_BOUND), timeout=ONLINE_BOUND + 60)
    salt_online = time.monotonic() - minions_started
    time.sleep(5)  # let both sides settle before idle memory and timings
    agent_rss, minion_rss = _tree_rss(agents), _tree_rss(minions)

    api: dict[str, list[float]] = {"opsplane": [], "salt": []}
    cli: dict[str, list[float]] = {"opsplane": [], "salt": []}
    targets = {"groups": [group]}
    with plane.client() as client:
        run_to_end(client, "echo ok", targets)  # warm-up, as the probe does
        for _ in range(rounds):
            for _ in range(opts.iterations):
                t0 = time.perf_counter()
                run_to_end(client, "echo ok", targets)
                api["opsplane"].append(time.perf_counter() - t0)
            api["salt"] += _probe(master_dir, "cmd", str(k), str(opts.iterations), timeout=600)[
                "samples"
            ]
            for _ in range(opts.iterations):
                cli["opsplane"].append(timed_cli(plane, ["run", "--group", group, "--", "echo ok"]))
                cli["salt"].append(_salt_cli(master_dir, k))
    processes.stop([*minions, master, *agents])
    n = len(api["opsplane"])
    return {
        f"salt.api.k{k}": {
            "value": median(api["opsplane"]),
            "peer_value": median(api["salt"]),
            "unit": "s",
            "peer": f"Salt LocalClient.cmd, {k} salt-minions",
            "note": f"median of {n}; opsplane: POST /api/v1/tasks → terminal SSE event",
        },
        f"salt.cli.k{k}": {
            "value": median(cli["opsplane"]),
            "peer_value": median(cli["salt"]),
            "unit": "s",
            "peer": f"`salt '*' cmd.run 'echo ok'`, {k} salt-minions",
            "note": f"median of {len(cli['opsplane'])}; `opsplane run --group G -- echo ok`",
        },
        f"agents.online.k{k}": {
            "value": opsplane_online,
            "peer_value": salt_online,
            "unit": "s",
            "peer": f"{k} salt-minions started at once → all answer test.ping",
            "note": f"{k} `opsplane agent` processes started at once → all online (one sample)",
        },
        f"agent.rss.k{k}": {
            "value": agent_rss,
            "peer_value": minion_rss,
            "unit": "MiB",
            "peer": "salt-minion (process tree), idle",
            "note": f"median over {k} idle processes of each, started together",
        },
    }


def provide(opts: Options, processes: Processes) -> Figures:
    """Both K, one control plane (a fresh group of agents per K)."""
    plane = ControlPlane(opts.work / "opsplane-salt", processes)
    plane.start()
    figures: Figures = {}
    # Two rounds at K=10, one at K=50 (its Salt CLI call alone takes 5 to 20 s): the whole run
    # stays under 25 minutes on 2 cores.
    for k, rounds in ((10, 1),) if opts.quick else ((10, 2), (50, 1)):
        figures |= measure_k(plane, processes, opts, k, rounds)
    processes.stop([plane.server])
    return figures

"""``hostname`` on N sshd targets through one bastion, cold: opsplane's seed-000 API
(``POST /api/ssh/task``, then ``GET`` until done) vs a bare asyncssh script
(``bench/ssh_fanout.floor``) vs parallel-ssh (``pssh_probe.py`` in the peers' venv).

Each opsplane sample gets a fresh control plane, so that its SSH connections are opened
inside the timing, as the floor's and parallel-ssh's are. Methods rotate between rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.suite.common import HOST, PEERS_VENV, Figures, Options, Processes, median
from bench.suite.controlplane import ControlPlane

PROBE = Path(__file__).with_name("pssh_probe.py")
POLL = 0.01  # seconds between GETs of the seed-000 result: small next to the whole


def _opsplane_once(
    opts: Options, processes: Processes, lab: Any, bastion: Any, targets: list[Any],
    known: Path, expected: str, sample: int,
) -> float:  # fmt: skip
    key = str(lab.client_key_path)
    plane = ControlPlane(
        opts.work / f"opsplane-ssh-{sample}",
        processes,
        extra_env={"OPSPLANE_SSH_KNOWN_HOSTS": str(known)},
    )
    plane.start()
    try:
        request = {
            "proxy_host": HOST, "proxy_port": bastion.port, "proxy_username": lab.user.name,
            "proxy_key_file": key, "commands": ["hostname"],
            "targets": [{"host": HOST, "port": d.port, "username": lab.user.name,
                         "key_file": key} for d in targets],
        }  # fmt: skip
        with plane.client() as client:
            started = time.perf_counter()
            created = client.post("/api/ssh/task", json=request)
            created.raise_for_status()
            path = f"/api/ssh/task/{created.json()['task_id']}"
            deadline = started + 120
            while time.perf_counter() < deadline:
                answer = client.get(path).json()
                if answer.get("status") != "PENDING":
                    break
                time.sleep(POLL)
            seconds = time.perf_counter() - started
    finally:
        processes.stop([plane.server])
    if answer.get("status") != "SUCCESS":
        raise RuntimeError(f"/api/ssh/task: {json.dumps(answer)[:500]}")
    wrong = [r for r in answer["results"] if r.get("stdout") != expected]
    if wrong or len(answer["results"]) != len(targets):
        raise RuntimeError(f"/api/ssh/task: {len(wrong)} wrong results, e.g. {wrong[:1]}")
    return seconds


def _pssh_once(lab: Any, bastion: Any, targets: list[Any], expected: str) -> float:
    spec = {
        "user": lab.user.name, "key": str(lab.client_key_path), "bastion_port": bastion.port,
        "ports": [d.port for d in targets], "expected": expected,
    }  # fmt: skip
    done = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), str(PROBE), json.dumps(spec)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {"error": done.stderr[-800:]}
    if "error" in answer:
        raise RuntimeError(f"parallel-ssh: {answer['error']}")
    return float(answer["seconds"])


def provide(opts: Options, processes: Processes) -> Figures:
    from bench.ssh_fanout import floor
    from tests.integration.sshd import ssh_lab, sshd_problem

    problem = sshd_problem()
    if problem is not None:
        raise RuntimeError(problem)
    count = 20 if opts.quick else 100
    expected = f"{os.uname().nodename}\n"
    samples: dict[str, list[float]] = {"opsplane": [], "asyncssh": [], "pssh": []}
    with ssh_lab() as lab:
        (bastion,) = lab.start(["bastion"], forwarding=True, max_sessions=count + 10)
        targets = lab.start([f"t{i:03d}" for i in range(count)])
        known = lab.known_hosts(opts.work / "known_hosts", lab.daemons.values())

        def run_floor() -> None:
            outputs, seconds = asyncio.run(floor(lab, bastion, targets, known))
            if any(o != expected for o in outputs):
                raise RuntimeError("asyncssh floor: wrong output")
            samples["asyncssh"].append(seconds)

        def run_opsplane() -> None:
            sample = len(samples["opsplane"])
            samples["opsplane"].append(
                _opsplane_once(opts, processes, lab, bastion, targets, known, expected, sample)
            )

        def run_pssh() -> None:
            samples["pssh"].append(_pssh_once(lab, bastion, targets, expected))

        methods = [run_floor, run_opsplane, run_pssh]
        for round_ in range(opts.iterations):
            for method in methods[round_ % 3 :] + methods[: round_ % 3]:
                method()
    ops = median(samples["opsplane"])
    note = f"{count} targets, median of {opts.iterations} cold runs, methods rotated"
    return {
        "ssh.vs_asyncssh": {
            "value": ops,
            "peer_value": median(samples["asyncssh"]),
            "unit": "s",
            "peer": "bare asyncssh script (one bastion connection)",
            "note": note,
        },
        "ssh.vs_pssh": {
            "value": ops,
            "peer_value": median(samples["pssh"]),
            "unit": "s",
            "peer": "parallel-ssh ParallelSSHClient (proxy_host)",
            "note": note,
        },
    }

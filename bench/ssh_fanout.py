"""SSH fan-out through one bastion: opsplane's executor against parallel-ssh and bare asyncssh.

Starts one bastion and N target sshd daemons on loopback (``tests/integration/sshd.py``: a
dedicated unprivileged user, generated keys), then times ``hostname`` on every target through
the bastion, cold (connections opened inside the timing), ``--runs`` times per method:

- asyncssh floor: one shared bastion connection, every target in parallel, nothing else;
- opsplane ``SshExecutor``: the same path with its host-key policy, pool, per-host results;
- opsplane, warm: a second round on the executor's pooled connections;
- parallel-ssh ``ParallelSSHClient`` with ``proxy_host`` (libssh2, gevent).

Needs root and /usr/sbin/sshd; ``pip install -e '.[ssh,bench]'``. Run:
``python bench/ssh_fanout.py [--targets 50] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opsplane.transport.ssh import HostKeyPolicy, SshEndpoint, SshExecutor, SshTarget
from tests.integration.sshd import HOST, Sshd, SshLab, ssh_lab, sshd_problem

FORWARDED = "server_request_direct_tcpip"
LOGIN = "Accepted publickey"


def _endpoint(lab: SshLab, daemon: Sshd) -> SshEndpoint:
    return SshEndpoint(HOST, daemon.port, lab.user.name, key_file=str(lab.client_key_path))


async def floor(
    lab: SshLab, bastion: Sshd, targets: list[Sshd], known: Path
) -> tuple[list[str], float]:
    """The least a client can do: one bastion connection, all targets at once.

    Timed from the first connect to the last output; closing happens after the timing, as
    for the other methods.
    """
    options = {
        "username": lab.user.name,
        "client_keys": [lab.client_key],
        "known_hosts": asyncssh.read_known_hosts(str(known)),
        "config": None,
        "gss_auth": False,
        "gss_kex": False,
        "agent_path": None,
    }
    conns: list[asyncssh.SSHClientConnection] = []

    async def one(tunnel: asyncssh.SSHClientConnection, daemon: Sshd) -> str:
        conn = await asyncssh.connect(HOST, daemon.port, tunnel=tunnel, **options)
        conns.append(conn)
        result = await conn.run("hostname", check=True)
        return str(result.stdout)

    t0 = time.perf_counter()
    tunnel = await asyncssh.connect(HOST, bastion.port, **options)
    try:
        outputs = await asyncio.gather(*(one(tunnel, d) for d in targets))
        seconds = time.perf_counter() - t0
    finally:
        for conn in [*conns, tunnel]:
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn in [*conns, tunnel]))
    return outputs, seconds


async def opsplane_cold(executor: SshExecutor, targets: list[SshTarget]) -> list[str]:
    results = await asyncio.gather(*(executor.run(t, "hostname", timeout=30) for t in targets))
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed, e.g. {failed[0]}")
    return [r.stdout for r in results]


def parallel_ssh(lab: SshLab, bastion: Sshd, targets: list[Sshd]) -> tuple[list[str], float]:
    # Imported here: gevent is loaded only for this method.
    from pssh.clients import ParallelSSHClient  # type: ignore[import-untyped]
    from pssh.config import HostConfig  # type: ignore[import-untyped]

    key = str(lab.client_key_path)
    config = [
        HostConfig(
            port=d.port,
            user=lab.user.name,
            private_key=key,
            proxy_host=HOST,
            proxy_port=bastion.port,
            proxy_user=lab.user.name,
            proxy_pkey=key,
        )
        for d in targets
    ]
    client = ParallelSSHClient(
        [HOST] * len(targets),
        host_config=config,
        pool_size=len(targets),
        allow_agent=False,
        num_retries=1,
        timeout=30,
    )
    try:
        t0 = time.perf_counter()
        output = client.run_command("hostname", stop_on_errors=True)
        client.join(output)
        lines = ["".join(f"{line}\n" for line in host.stdout) for host in output]
        seconds = time.perf_counter() - t0
    finally:
        # ParallelSSHClient has no close of its own; its per-host clients do.
        for host_client in list(getattr(client, "_host_clients", {}).values()):
            if host_client is not None:
                host_client.disconnect()
    return lines, seconds


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _check(outputs: list[str], expected: str, what: str) -> None:
    wrong = [o for o in outputs if o != expected]
    if wrong:
        raise RuntimeError(f"{what}: {len(wrong)} wrong outputs, e.g. {wrong[0]!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    problem = sshd_problem()
    if problem is not None:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 2

    expected = f"{os.uname().nodename}\n"
    with ssh_lab() as lab:
        started = time.monotonic()
        (bastion,) = lab.start(["bastion"], forwarding=True)
        daemons = lab.start([f"t{i:02d}" for i in range(args.targets)])
        print(f"started 1 bastion + {len(daemons)} targets in {time.monotonic() - started:.1f}s")
        known = lab.known_hosts(lab.root / "known_hosts", lab.daemons.values())
        targets = [
            SshTarget(d.name, _endpoint(lab, d), (_endpoint(lab, bastion),)) for d in daemons
        ]
        samples: dict[str, list[float]] = {}
        logins: dict[str, int] = {}
        notes: dict[str, str] = {}

        def record(name: str, seconds: float, outputs: list[str], bastion_logins: int) -> None:
            _check(outputs, expected, name)
            samples.setdefault(name, []).append(seconds)
            logins[name] = bastion_logins

        def timed(name: str, call: Callable[[], tuple[list[str], float]]) -> None:
            forwarded_before, logins_before = bastion.count(FORWARDED), bastion.count(LOGIN)
            outputs, seconds = call()
            # Proof that the traffic went through the bastion: one forwarded channel each.
            want = forwarded_before + len(daemons)
            forwarded = bastion.wait_for_log(FORWARDED, want) - forwarded_before
            if forwarded < len(daemons):
                notes[name] = f"only {forwarded} forwarded channels seen on the bastion"
            record(name, seconds, outputs, bastion.count(LOGIN) - logins_before)

        def run_floor() -> None:
            timed("asyncssh floor", lambda: asyncio.run(floor(lab, bastion, daemons, known)))

        def run_opsplane() -> None:
            async def cold_then_warm() -> tuple[list[str], float, list[str], float]:
                executor = SshExecutor(HostKeyPolicy(known), max_parallel=len(targets))
                try:
                    t0 = time.perf_counter()
                    cold = await opsplane_cold(executor, targets)
                    t1 = time.perf_counter()
                    warm = await opsplane_cold(executor, targets)
                    t2 = time.perf_counter()
                finally:
                    await executor.close()
                return cold, t1 - t0, warm, t2 - t1

            logins_before = bastion.count(LOGIN)
            cold, cold_s, warm, warm_s = asyncio.run(cold_then_warm())
            used = bastion.count(LOGIN) - logins_before
            record("opsplane SshExecutor", cold_s, cold, used)
            record("opsplane SshExecutor, warm (pooled)", warm_s, warm, 0)

        def run_pssh() -> None:
            name = "parallel-ssh (proxy_host)"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # gevent's import-time chatter
                    timed(name, lambda: parallel_ssh(lab, bastion, daemons))
            except Exception as e:  # report and go on: the other numbers still stand
                notes[name] = f"failed: {type(e).__name__}: {e}"

        methods = [run_floor, run_opsplane, run_pssh]
        for round_ in range(args.runs):
            # Rotated, so that no method always runs first (or right after another).
            for method in methods[round_ % 3 :] + methods[: round_ % 3]:
                method()

        floor_ms = _median_ms(samples["asyncssh floor"])
        print(
            f"\nhostname on {len(daemons)} sshd targets through one bastion, median of "
            f"{args.runs} runs (cold: connections opened inside the timing)\n"
        )
        header = f"{'method':38} {'median ms':>10} {'min ms':>8} {'x floor':>8}"
        print(f"{header} {'bastion logins':>15}")
        for name, values in samples.items():
            median = _median_ms(values)
            print(
                f"{name:38} {median:10.0f} {min(values) * 1000:8.0f} {median / floor_ms:8.2f}"
                f" {logins[name]:>15}"
            )
        for name, note in notes.items():
            print(f"note: {name}: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

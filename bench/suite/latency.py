"""One agent, two figures: a trivial command's submit → result committed (p50/p99), and live
output: the agent's command writes a line → an SSE client of the task receives it (p99).

One control plane (``opsplane server``, SQLite) and one ``opsplane agent`` on the gRPC link.
Submit → committed is ``POST /api/v1/tasks`` → the terminal ``task`` event on the task's SSE
stream, which the server sends only after the run's result is committed. The live-output
command prints its wall clock (``date +%s.%N``) every 50 ms; each line's latency is the
client's clock at receipt minus the clock in the line (one machine, one clock).
"""

from __future__ import annotations

import time
from datetime import datetime

from bench.suite.common import Figures, Options, Processes, median, percentile
from bench.suite.controlplane import ControlPlane, events, run_to_end, submit

LINES_PER_TASK = 20
# The first line waits for the SSE subscription, so that no line arrives as replayed history.
LIVE_COMMAND = f"sleep 1; for i in $(seq 1 {LINES_PER_TASK}); do date +%s.%N; sleep 0.05; done"


def provide(opts: Options, processes: Processes) -> Figures:
    plane = ControlPlane(opts.work / "opsplane-latency", processes)
    plane.start()
    name = "latency-agent"
    agents = plane.start_agents([name], "latency")
    plane.wait_online("latency", 1, 120)
    targets = {"hosts": [name]}
    iterations = 30 if opts.quick else 200
    submit_ms: list[float] = []
    server_ms: list[float] = []
    live_ms: list[float] = []
    with plane.client() as client:
        for _ in range(3):
            run_to_end(client, "true", targets)  # warm-up: connections, caches
        for _ in range(iterations):
            started = time.perf_counter()
            done = run_to_end(client, "true", targets)
            submit_ms.append((time.perf_counter() - started) * 1000)
            if done.get("created_at") and done.get("finished_at"):
                created = datetime.fromisoformat(done["created_at"])
                finished = datetime.fromisoformat(done["finished_at"])
                server_ms.append((finished - created).total_seconds() * 1000)
        for _ in range(2 if opts.quick else 5):
            task_id = submit(client, LIVE_COMMAND, targets)
            pending = ""
            for kind, data in events(client, task_id):
                if kind != "output" or not isinstance(data.get("data"), str):
                    continue
                now = time.time()
                pending += data["data"]
                *lines, pending = pending.split("\n")
                live_ms += [(now - float(line)) * 1000 for line in lines if line.strip()]
    processes.stop([*agents, plane.server])
    note = f"1 agent, median/p99 of {iterations} tasks of `true`, one at a time"
    if server_ms:
        note += f"; server created→finished p50 {median(server_ms):.1f} ms"
    return {
        "latency.p50": {"value": median(submit_ms), "unit": "ms", "note": note},
        "latency.p99": {"value": percentile(submit_ms, 0.99), "unit": "ms", "note": note},
        "live.p99": {
            "value": percentile(live_ms, 0.99),
            "unit": "ms",
            "note": f"{len(live_ms)} lines, median {median(live_ms):.1f} ms",
        },
    }

"""Fault scenario 8 (issue 13): output abuse.

A real control plane and a real gRPC agent (processes). Commands print a 64 KiB line with no
line break, a flood of output (``OPSPLANE_FAULT_OUTPUT_BYTES``, default 200 MiB; the issue's
1 GiB measured once, docs/reliability.md), random bytes, and multi-byte characters that chunk
edges split. Throughout, /healthz is polled: the control plane stays responsive. Its memory stays
bounded, each run keeps the head and tail of its output, flagged ``truncated``, and the archive
keeps the bytes as printed, cut at the per-run cap with a mark.

A watch on the control plane's event loop (``loopwatch/sitecustomize.py``, test instrumentation
loaded through ``PYTHONPATH``) tells a slow /healthz answer that the loop caused (a step of
much CPU time) from one the machine caused (a step that waited for a core): the figures carry
both, and the CPU time of the longest step is held to the issue's bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from opsplane.engine.archive import cap_marker
from tests.e2e.fleet import Fleet

FLOOD = int(os.environ.get("OPSPLANE_FAULT_OUTPUT_BYTES", str(200 * 1024 * 1024)))
# The archive keeps this much of one run (archive_max_bytes_per_run).
ARCHIVE_CAP = 32 * 1024 * 1024
AGENT = "loud-1"
# The flood is ``yes`` output: 32-byte lines (FLOOD a multiple of 32 ends on a whole line).
FLOOD_LINE = b"opsplane flood 0123456789abcdef\n"
# Loose bounds for a loaded 2-core machine; the figures measured go in the report.
HEALTHZ_WITHIN = 1.0  # seconds, the slowest /healthz answer
# CPU time of the event loop's thread in its longest step while probed: the 200 ms.
# Measured 4-6 ms (docs/reliability.md, scenario 8); a busy machine stretches wall time, not this.
LOOP_STEP_CPU_WITHIN = 0.2
LOOP_WATCH = Path(__file__).parent / "loopwatch"
RSS_GROWTH_WITHIN = 400 * 1024 * 1024  # bytes the control plane may grow by
FLOOD_WITHIN = max(120.0, FLOOD / (2 * 1024 * 1024))  # seconds for the flood run to end

pytestmark = pytest.mark.timeout(int(FLOOD_WITHIN) + 240)

# Multi-byte characters of 2, 3 and 4 bytes: 64 KiB chunks cut some of them in two.
MULTIBYTE = "\u00e9\u20ac\U0001f600" * 30_000
_SCRIPT = r"import sys; sys.stdout.buffer.write(('\u00e9\u20ac\U0001f600' * 30000).encode())"


def _run(fleet: Fleet, command: str) -> dict[str, Any]:
    return fleet.create_task(command, timeout=int(FLOOD_WITHIN), hosts=[AGENT])


class _Prober:
    """Polls /healthz every 50 ms on a thread; keeps every answer's time."""

    def __init__(self, url: str, server: psutil.Process) -> None:
        self._url = url
        self._server = server
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss_peak = server.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self._url, timeout=10.0) as client:
            while not self._stop.is_set():
                began = time.monotonic()
                try:
                    status = client.get("/healthz").status_code
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                else:
                    self.latencies.append(time.monotonic() - began)
                    if status != 200:
                        self.failures.append(f"HTTP {status}")
                self.rss_peak = max(self.rss_peak, self._server.memory_info().rss)
                self._stop.wait(0.05)


def _archived(fleet: Fleet, run: dict[str, Any]) -> bytes:
    with fleet.client() as client:
        response = client.get(f"/api/v1/tasks/{run['task_id']}/runs/{run['id']}/log")
    assert response.status_code == 200, response.text
    return response.content


def test_output_abuse_keeps_the_control_plane_responsive_and_bounded(tmp_path: Path) -> None:
    fleet = Fleet(
        tmp_path,
        server_env={
            "OPSPLANE_ARCHIVE_MAX_BYTES_PER_RUN": str(ARCHIVE_CAP),
            # Tests beat every second; a flood on a loaded 2-core machine may delay a beat a
            # few seconds (the default interval is 10 s, offline after 30 s).
            "OPSPLANE_OFFLINE_AFTER_MISSED": "10",
            "OPSPLANE_LOST_GRACE": "30",
            "TEST_LOOP_WATCH": str(tmp_path / "loop-steps.jsonl"),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(LOOP_WATCH), os.environ.get("PYTHONPATH")) if p
            ),
        },
    )
    try:
        fleet.start_server()
        fleet.start_agent(AGENT)
        fleet.wait_online(AGENT)
        assert fleet.server is not None
        server = psutil.Process(fleet.server.pid)
        random_file = tmp_path / "random.bin"
        random_file.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
        rss_before = server.memory_info().rss
        with _Prober(fleet.url, server) as prober:
            probed_from = time.time()
            began = time.monotonic()
            flood = _run(fleet, f"yes '{FLOOD_LINE.decode().strip()}' | head -c {FLOOD}; echo done")
            line = _run(fleet, "head -c 65536 /dev/zero | tr '\\0' 'x'")
            multibyte = _run(fleet, f"python3 -c {shlex.quote(_SCRIPT)}")
            noise = _run(fleet, f"cat {random_file}")
            done = {
                name: fleet.wait_task_done(task["id"], timeout=FLOOD_WITHIN)
                for name, task in (
                    ("line", line),
                    ("multibyte", multibyte),
                    ("noise", noise),
                    ("flood", flood),
                )
            }
            flood_took = time.monotonic() - began
            probed_until = time.time()
        assert {name: task["status"] for name, task in done.items()} == dict.fromkeys(
            done, "succeeded"
        )
        runs = {name: fleet.runs(done[name]["id"])[AGENT] for name in done}

        # The long line: whole in the row and in the archive.
        assert (runs["line"]["stdout"], runs["line"]["truncated"]) == ("x" * 65536, False)
        assert _archived(fleet, runs["line"]) == b"x" * 65536
        # Characters split across chunks: intact in the archive and in the row's head.
        assert _archived(fleet, runs["multibyte"]) == MULTIBYTE.encode()
        stored = runs["multibyte"]["stdout"]
        assert runs["multibyte"]["truncated"] is True
        head = stored.split("\n... [")[0]
        assert "\ufffd" not in head and MULTIBYTE.startswith(head) and len(head) > 10_000
        # Random bytes: archived as they were; the row holds text.
        noise_log = _archived(fleet, runs["noise"])
        expected = random_file.read_bytes()
        assert hashlib.sha256(noise_log).digest() == hashlib.sha256(expected).digest()
        assert runs["noise"]["truncated"] is True
        # The flood: head and tail in the row, flagged; the archive cut at the cap, marked.
        row = runs["flood"]
        assert row["truncated"] is True
        assert row["stdout"].startswith(FLOOD_LINE.decode() * 100)
        assert row["stdout"].endswith(f"{FLOOD_LINE.decode()}done\n")
        assert len(row["stdout"].encode()) < 200 * 1024
        flood_log = _archived(fleet, row)
        assert len(flood_log) == ARCHIVE_CAP + len(cap_marker(ARCHIVE_CAP))
        assert flood_log.endswith(cap_marker(ARCHIVE_CAP))
        whole_lines = FLOOD_LINE * (ARCHIVE_CAP // len(FLOOD_LINE) + 1)
        assert flood_log[:ARCHIVE_CAP] == whole_lines[:ARCHIVE_CAP]

        assert prober.failures == []
        slowest = max(prober.latencies)
        ordered = sorted(prober.latencies)
        figures = {
            "scenario": "output abuse",
            "flood_bytes": FLOOD,
            "flood_run_s": round(flood_took, 1),
            "healthz_probes": len(ordered),
            "healthz_max_ms": round(slowest * 1000, 1),
            "healthz_p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1),
            **_loop_steps(tmp_path / "loop-steps.jsonl", probed_from, probed_until),
            "server_rss_mib_before": rss_before // 2**20,
            "server_rss_mib_peak": prober.rss_peak // 2**20,
            "database_mib": _database_size(fleet) // 2**20,
            # The machine's load when the flood ended: a pause of the whole process on a
            # busy machine is not one of the event loop (docs/reliability.md, scenario 8).
            "load_1m": os.getloadavg()[0],
        }
        print(json.dumps(figures))
        assert slowest < HEALTHZ_WITHIN, figures
        assert figures["loop_step_max_cpu_ms"] < LOOP_STEP_CPU_WITHIN * 1000, figures
        assert prober.rss_peak - rss_before < RSS_GROWTH_WITHIN, figures
    finally:
        fleet.stop()


def _database_size(fleet: Fleet) -> int:
    return sum(p.stat().st_size for p in fleet.data_dir.glob("opsplane.db*"))


def _loop_steps(path: Path, since: float, until: float) -> dict[str, Any]:
    """The control plane's longest event-loop steps while probed (as its loop watch wrote
    them): by CPU time of the loop's thread, and by wall time. None recorded: no step took
    over 50 ms of wall time or 10 ms of CPU (the watch's bounds)."""
    # The watch creates the file as it loads: no file, no watch (figures of 0 would mislead).
    assert path.exists(), "the loop watch did not load in the control plane"
    steps = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [step for step in steps if since <= step["at"] <= until]
    by_cpu = max(steps, key=lambda step: step["cpu"], default=None)
    by_wall = max(steps, key=lambda step: step["wall"], default=None)
    return {
        "loop_step_max_cpu_ms": round(by_cpu["cpu"] * 1000, 1) if by_cpu else 0.0,
        "loop_step_max_cpu_what": by_cpu["what"] if by_cpu else "",
        "loop_step_max_wall_ms": round(by_wall["wall"] * 1000, 1) if by_wall else 0.0,
        "loop_step_max_wall_cpu_ms": round(by_wall["cpu"] * 1000, 1) if by_wall else 0.0,
    }

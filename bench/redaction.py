"""Redaction cost by input shape and size: the default patterns as they were (whole input, the
first pattern starting with ``[\\w.-]*``) against today's (linear patterns, bounded windows,
trigger words found with ``find``).

Each cell is the CPU time (``time.process_time``, so a busy machine inflates it less than wall
time) of one ``Redactor.data`` call on a single line of that size, the way ingest sees output.
The old patterns run in a child process that is stopped after ``--budget`` seconds (">N").

    python bench/redaction.py [--budget 20] [--sizes 4096,65536,1048576,10485760]
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import time
from collections.abc import Callable

from opsplane.domain.redaction import DEFAULT_REDACT_PATTERNS, Redactor

# The default patterns before issue 13 (commit 14a6ee1), matched over the whole input at once.
OLD_PATTERNS = (
    r"(?i)[\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*[\"']?[ \t]*[=:][ \t]*"
    r"[\"']?([^\s\"',;&]+)",
    r"(?i)\bauthorization[\"']?[ \t]*[=:][ \t]*(?:(?:bearer|basic|token|digest)[ \t]+)?"
    r"([^\s\"',;]+)",
    r"(?i)\bbearer[ \t]+([A-Za-z0-9._~+/-]{8,}=*)",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@",
)


def _repeat(unit: bytes) -> Callable[[int], bytes]:
    return lambda size: (unit * (size // len(unit) + 1))[:size]


def _random(size: int) -> bytes:
    return random.Random(0).randbytes(size)


def _log(size: int) -> bytes:
    lines = [
        b"2026-12-03T09:00:00Z INFO GET /api/v1/hosts 200 12ms user=alice",
        b"2026-12-03T09:00:01Z DEBUG connecting mysql://app:pa55w0rd@db:3306/app",
        b"2026-12-03T09:00:02Z WARN retrying with token=ops_" + b"x" * 43,
        b"2026-12-03T09:00:03Z INFO Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc",
    ]
    return _repeat(b"\n".join(lines) + b"\n")(size)


SHAPES: dict[str, Callable[[int], bytes]] = {
    "one letter": _repeat(b"a"),
    "a.a.a.": _repeat(b"a."),
    "keyword only": _repeat(b"password"),
    "secret pairs": _repeat(b"password=hunter2 "),
    "log lines": _log,
    "random bytes": _random,
}


def _timed_old(shape: str, size: int, results: multiprocessing.SimpleQueue[float]) -> None:
    # One window as large as the input: each pattern's plain ``sub`` over all of it, as before.
    redactor = Redactor(OLD_PATTERNS, window=1 << 40)
    data = SHAPES[shape](size)
    start = time.process_time()
    redactor.data(data)
    results.put(time.process_time() - start)


def old_seconds(shape: str, size: int, budget: float) -> str:
    results: multiprocessing.SimpleQueue[float] = multiprocessing.SimpleQueue()
    child = multiprocessing.Process(target=_timed_old, args=(shape, size, results))
    child.start()
    child.join(budget)
    if child.is_alive():
        child.kill()
        child.join()
        return f">{budget:g}"
    return f"{results.get():.3f}"


def new_seconds(shape: str, size: int) -> str:
    redactor = Redactor(DEFAULT_REDACT_PATTERNS)
    data = SHAPES[shape](size)
    start = time.process_time()
    redactor.data(data)
    return f"{time.process_time() - start:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per old cell")
    parser.add_argument("--sizes", default="4096,65536,1048576,10485760")
    parser.add_argument("--no-old", action="store_true", help="today's patterns only")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"{'shape':<14} {'bytes':>10} {'old s':>8} {'new s':>8}")
    for shape in SHAPES:
        over = False  # the old patterns ran out of budget at a smaller size: larger ones will
        for size in sizes:
            old = "-" if args.no_old else f">{args.budget:g}" if over else ""
            if not old:
                old = old_seconds(shape, size, args.budget)
                over = old.startswith(">")
            print(f"{shape:<14} {size:>10} {old:>8} {new_seconds(shape, size):>8}", flush=True)


if __name__ == "__main__":
    main()

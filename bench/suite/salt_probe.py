"""Runs inside the peers' virtual environment (``bench/.peers-venv``), never in the project's:
times Salt's Python API, ``salt.client.LocalClient``, against a master of ``bench/run``.

    python salt_probe.py CONF_DIR wait K TIMEOUT   → {"seconds": s}  (all K answer test.ping)
    python salt_probe.py CONF_DIR cmd K N          → {"samples": [s, ...]} (cmd.run 'echo ok')

Prints one JSON object on the last line of stdout. Only the standard library and Salt.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    conf_dir, mode, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # Imported after the argv checks: it takes a second. Salt ships no type hints.
    import salt.client  # type: ignore[import-not-found]
    import salt.exceptions  # type: ignore[import-not-found]

    client = salt.client.LocalClient(c_path=f"{conf_dir}/master")
    if mode == "wait":
        bound = float(sys.argv[4])
        started = time.monotonic()
        answered = 0
        while time.monotonic() - started < bound:
            try:
                answered = len(client.cmd("*", "test.ping", timeout=5) or {})
            except salt.exceptions.SaltClientError:
                # The master's workers are still loading: its publish request timed out.
                answered = 0
            if answered >= k:
                print(json.dumps({"seconds": time.monotonic() - started}))
                return 0
            time.sleep(0.2)
        print(json.dumps({"error": f"{answered}/{k} minions answered within {bound:.0f} s"}))
        return 1
    iterations = int(sys.argv[4])
    samples = []
    for i in range(iterations + 1):  # the first is a warm-up, untimed
        started = time.perf_counter()
        returns = client.cmd("*", "cmd.run", ["echo ok"], timeout=60)
        seconds = time.perf_counter() - started
        good = sum(1 for value in (returns or {}).values() if value == "ok")
        if good != k:
            print(json.dumps({"error": f"{good}/{k} minions returned ok: {returns!r:.300}"}))
            return 1
        if i:
            samples.append(seconds)
    print(json.dumps({"samples": samples}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runs inside the peers' virtual environment: parallel-ssh (libssh2, gevent) runs ``hostname``
on every target through one bastion (``proxy_host``), cold, and prints the seconds.

    python pssh_probe.py '{"user": …, "key": …, "bastion_port": …, "ports": […], "expected": …}'

Prints one JSON object (``{"seconds": s}`` or ``{"error": …}``) on the last line.
"""

from __future__ import annotations

import json
import sys
import time
import warnings


def main() -> int:
    spec = json.loads(sys.argv[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gevent's import-time chatter
        from pssh.clients import ParallelSSHClient  # type: ignore[import-not-found]
        from pssh.config import HostConfig  # type: ignore[import-not-found]

    config = [
        HostConfig(
            port=port, user=spec["user"], private_key=spec["key"], proxy_host="127.0.0.1",
            proxy_port=spec["bastion_port"], proxy_user=spec["user"], proxy_pkey=spec["key"],
        )
        for port in spec["ports"]
    ]  # fmt: skip
    client = ParallelSSHClient(
        ["127.0.0.1"] * len(config), host_config=config, pool_size=len(config),
        allow_agent=False, num_retries=1, timeout=30,
    )  # fmt: skip
    try:
        started = time.perf_counter()
        output = client.run_command("hostname", stop_on_errors=True)
        client.join(output)
        lines = ["".join(f"{line}\n" for line in host.stdout) for host in output]
        seconds = time.perf_counter() - started
    finally:
        for host_client in list(getattr(client, "_host_clients", {}).values()):
            if host_client is not None:
                host_client.disconnect()
    wrong = [line for line in lines if line != spec["expected"]]
    if wrong:
        print(json.dumps({"error": f"{len(wrong)} wrong outputs, e.g. {wrong[0]!r}"}))
        return 1
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

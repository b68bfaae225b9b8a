"""bench/agent_footprint.py's own bookkeeping (the measurement itself needs a whole fleet)."""

from __future__ import annotations

from pathlib import Path

from bench import agent_footprint


def test_redials_count_the_agents_that_had_to_dial_again(tmp_path: Path) -> None:
    (tmp_path / "agent-0.log").write_text("connected to 127.0.0.1:1 as fp-0000\n")
    (tmp_path / "agent-1.log").write_text(
        "2026-12-03 16:00:00,001 WARNING opsplane.agent.grpc_link: cannot reach 127.0.0.1:1: "
        "UNAVAILABLE: x; reconnecting in 0.42s\n"
        "2026-12-03 16:00:01,001 WARNING opsplane.agent.grpc_link: lost the control plane at "
        "127.0.0.1:1: UNAVAILABLE: x; reconnecting in 0.91s\n"
        "connected to 127.0.0.1:1 as fp-0001\n"
    )
    # agent-2 never wrote a log: not a redial.
    count, reasons = agent_footprint._redials(tmp_path, 3)
    assert count == 1
    assert reasons == {"UNAVAILABLE: x": 2}

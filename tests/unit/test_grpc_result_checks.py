"""Results' signatures on the gRPC link are checked off the event loop, many per thread call
(transport/grpc/server.py ``_ResultChecks``; docs/scale.md, "Fan-out"): a forged one is still
refused, each stream gets its own result's outcome, and results arriving together cost a few
thread hand-overs, not one each."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from opsplane.security.signing import sign
from opsplane.transport.grpc import convert, server
from opsplane.transport.grpc import opsplane_pb2 as pb

RESULTS = 200


def _result(key: Ed25519PrivateKey, run: int) -> pb.CommandResult:
    message = pb.CommandResult(run_id=f"r-{run}", status="succeeded", exit_code=0, stdout="ok")
    message.signature = sign(key, convert.signed_fields(message))
    return message


async def test_results_arriving_together_are_checked_in_a_few_thread_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    messages = [_result(other if run % 7 == 0 else agent, run) for run in range(RESULTS)]
    calls: list[int] = []
    check_all = server._all_signed

    def counted(checks: list[tuple[object, object]]) -> list[bool]:
        calls.append(len(checks))
        return check_all(checks)  # type: ignore[arg-type]

    monkeypatch.setattr(server, "_all_signed", counted)
    checks = server._ResultChecks()
    checks.start()
    try:
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(
                *(checks.signed(agent.public_key(), m) for m in messages)
            )
    finally:
        checks.stop()
    assert outcomes == [run % 7 != 0 for run in range(RESULTS)]
    assert sum(calls) == RESULTS
    assert len(calls) <= 3, f"thread calls for {RESULTS} results: {calls}"


async def test_a_result_is_checked_inline_when_the_link_never_started() -> None:
    agent = Ed25519PrivateKey.generate()
    message = _result(agent, 1)
    checks = server._ResultChecks()
    assert await checks.signed(agent.public_key(), message)
    message.stdout = "tampered"
    assert not await checks.signed(agent.public_key(), message)


async def test_stopping_cancels_the_results_waiting_for_their_check() -> None:
    agent = Ed25519PrivateKey.generate()
    checks = server._ResultChecks()
    checks.start()
    waiting = asyncio.ensure_future(checks.signed(agent.public_key(), _result(agent, 1)))
    await asyncio.sleep(0)
    checks.stop()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await waiting

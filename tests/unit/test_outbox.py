"""The agent's output journal and sender (agent/outbox.py): numbered, kept, sent in order,
re-sent after a reconnect, bounded."""

from __future__ import annotations

import asyncio
from pathlib import Path

from opsplane.agent.outbox import (
    Connections,
    OutputJournal,
    RunOutput,
    lost_marker,
    utf8_cut,
)
from opsplane.transport.grpc import opsplane_pb2 as pb

RUN = "0190b3c4-0000-7000-8000-000000000001"


class FakeLink:
    def __init__(self, *, confirms: bool = False) -> None:
        self.connected = True
        self.confirms_delivery = confirms
        self.sent: list[tuple[int, bytes]] = []

    async def send(self, message: pb.CommandMessage, *, droppable: bool = False) -> bool:
        if not self.connected:
            return False
        self.sent.append((message.output.seq, message.output.data))
        return True


def test_a_split_character_waits_for_its_other_half() -> None:
    rocket = "🚀".encode()
    assert utf8_cut(b"ab" + rocket[:2]) == 2
    assert utf8_cut(b"ab" + rocket) == 2 + len(rocket)
    assert utf8_cut(b"plain") == 5
    assert utf8_cut(b"\xff\xfe") == 2  # not UTF-8 at all: nothing to wait for


def test_the_journal_survives_a_restart_and_drops_a_torn_last_record(tmp_path: Path) -> None:
    journal = OutputJournal(tmp_path, limit=1 << 20)
    assert journal.append(RUN, "stdout", b"one\n") == 1
    assert journal.append(RUN, "stderr", b"two\n") == 2
    journal.seal(RUN)
    with (tmp_path / f"{RUN}.out").open("ab") as handle:
        handle.write(b"\x00\x00\x00")  # a crash in the middle of a record
    (tmp_path / "0190b3c4-0000-7000-8000-000000000002.out").write_bytes(b"acknowledged")
    again = OutputJournal(tmp_path, limit=1 << 20)
    again.load([RUN])
    assert again.last_seq(RUN) == 2
    assert again.read(RUN, 2) == ("stderr", b"two\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{RUN}.out"]
    again.discard(RUN)
    assert again.total == 0 and not list(tmp_path.iterdir())


def test_the_journal_is_bounded(tmp_path: Path) -> None:
    journal = OutputJournal(tmp_path, limit=100)
    assert journal.append(RUN, "stdout", b"x" * 50) == 1
    assert journal.append(RUN, "stdout", b"x" * 50) == 0
    assert journal.append(RUN, "stderr", b"marker", force=True) == 2


async def test_output_is_sent_in_order_and_again_after_a_reconnect(tmp_path: Path) -> None:
    link = FakeLink()
    connections = Connections()
    output = RunOutput(RUN, "task", OutputJournal(tmp_path, 1 << 20), link, connections)
    output.add("stdout", b"a\n")
    output.add("stdout", b"b\n")
    await asyncio.sleep(0.05)
    assert link.sent == [(1, b"a\n"), (2, b"b\n")]
    link.connected = False
    output.add("stdout", b"c\n")
    await asyncio.sleep(0.05)
    link.connected = True
    connections.reconnected()
    output.wake()
    output.end()
    assert await output.drain()
    # gRPC confirms nothing: all of it again, the control plane drops what it has.
    assert link.sent[2:] == [(1, b"a\n"), (2, b"b\n"), (3, b"c\n")]


async def test_confirmed_output_is_not_sent_again(tmp_path: Path) -> None:
    link = FakeLink(confirms=True)
    connections = Connections()
    output = RunOutput(RUN, "task", OutputJournal(tmp_path, 1 << 20), link, connections)
    output.add("stdout", b"a\n")
    await asyncio.sleep(0.05)
    connections.reconnected()
    output.add("stdout", b"b\n")
    output.end()
    assert await output.drain()
    assert link.sent == [(1, b"a\n"), (2, b"b\n")]


async def test_output_beyond_the_spool_is_sent_once_and_then_only_counted(
    tmp_path: Path,
) -> None:
    link = FakeLink()
    link.connected = False
    journal = OutputJournal(tmp_path, 32)  # room for one small chunk and one placeholder
    output = RunOutput(RUN, "task", journal, link, Connections())
    output.add("stdout", b"kept\n")
    output.add("stdout", b"y" * 100)  # not kept: a placeholder, the data held to send once
    output.add("stdout", b"z" * 10)  # neither kept nor recorded: counted as lost
    output.end()
    link.connected = True
    assert await output.drain()
    assert link.sent == [(1, b"kept\n"), (2, b"y" * 100), (3, lost_marker(10))]
    assert journal.read(RUN, 2) == ("stdout", None)

"""Derived run ids (domain/ids.py): the control plane and an agent compute the same id for a
host's run of a task, so a group or broadcast message needs no per-host map (issue 15)."""

from __future__ import annotations

import uuid

from opsplane.agent.spool import check_run_id
from opsplane.domain.ids import new_id, run_id_for
from opsplane.transport.amqp import messages
from opsplane.transport.base import CommandEnvelope


def test_a_derived_run_id_is_stable_distinct_and_keeps_the_tasks_time_prefix() -> None:
    task = new_id()
    first = run_id_for(task, "web-1", 1)
    assert first == run_id_for(task, "web-1", 1)
    others = {
        run_id_for(task, "web-2", 1),
        run_id_for(task, "web-1", 2),
        run_id_for(new_id(), "web-1", 1),
    }
    assert first not in others and len(others) == 3
    parsed = uuid.UUID(first)
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert first[:13] == task[:13]  # the 48-bit time prefix: runs sort with their task
    assert check_run_id(first) == first  # an agent's spool takes it as a file name
    # Not one of our ids: still a valid, stable run id.
    assert check_run_id(run_id_for("123456", "agent-1", 1)) == run_id_for("123456", "agent-1", 1)


def test_a_fanout_body_does_not_grow_with_the_fleet() -> None:
    envelope = CommandEnvelope(
        task_id=new_id(), run_id="", attempt=1, command="true", timeout=30, submitted_by="admin"
    )
    body = messages.command_body(envelope, 1.0, target=messages.ALL_TARGET, fanout=True)
    assert "run_id" not in body and "run_ids" not in body
    assert (body["user"], body["submitted_by"], body["target"]) == ("", "admin", "all")
    unicast = messages.command_body(envelope, 1.0, target="web-1")
    assert "run_id" in unicast

"""Signed checkpoints of the audit head and what ``verify`` makes of them, without a database:
a chain held to its checkpoints, records past the head, and ``opsplane audit verify --file …
--checkpoint …`` on an export."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from opsplane.cli.main import app
from opsplane.security.audit import GENESIS, Anchor, AuditEntry, chain_hash, document, verify_chain
from opsplane.security.checkpoints import make_checkpoint, read_checkpoints
from opsplane.security.signing import public_key_text

AT = datetime(2030, 1, 1, tzinfo=UTC)


def _chain(count: int, actor: str = "a") -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    prev = GENESIS
    for i in range(1, count + 1):
        entry = AuditEntry(actor=actor, role="admin", action="task.create", detail={"n": i})
        doc = document(entry, i, AT + timedelta(seconds=i))
        doc["prev_hash"], doc["hash"] = prev, chain_hash(prev, doc)
        prev = doc["hash"]
        docs.append(doc)
    return docs


def test_a_chain_is_held_to_each_checkpoint_and_to_its_head() -> None:
    docs = _chain(6)
    anchor = Anchor(4, docs[3]["hash"], "then")
    report = verify_chain(docs, 6, docs[-1]["hash"], anchors=[anchor])
    assert report.ok and report.checkpoints == 1
    # Cut after record 2, head moved back to it: consistent, but not what was signed.
    cut = verify_chain(docs[:2], 2, docs[1]["hash"], anchors=[anchor])
    assert cut.problems == [
        "record 4, signed in the checkpoint of then, is missing: the chain ends at record 2, "
        "so records were removed from the end (and the head moved back)"
    ]
    # A fresh chain of the same length: every hash differs from the signed one.
    forged = _chain(6, actor="mallory")
    rewritten = verify_chain(forged, 6, forged[-1]["hash"], anchors=[anchor])
    assert rewritten.first_bad_id == 4 and "record 4 is not the one" in rewritten.problems[0]
    # Records past the head: the head vouches for 1-4 only.
    past = verify_chain(docs[:4], 4, docs[3]["hash"], past_head=[5, 6])
    assert past.past_head == 2 and past.first_bad_id == 5
    assert past.problems == [
        "records 5-6 (2) past the chain head (record 4): appended without moving the head, "
        "or the head was moved back"
    ]


def test_checkpoints_verify_only_unedited_and_with_the_pinned_key() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good = make_checkpoint(key, 3, "ab" * 32, AT)
    edited = {**make_checkpoint(key, 5, "cd" * 32, AT), "id": 4}
    foreign = make_checkpoint(other, 6, "ef" * 32, AT)
    lines = [json.dumps(d) for d in (good, edited, foreign)] + ["not json", "{}"]
    found = read_checkpoints(lines, key.public_key())
    assert found.anchors == [Anchor(3, "ab" * 32, good["at"])]
    assert [p.split(": ", 1)[0].split(" (")[0] for p in found.problems] == [
        "checkpoint file line 2",
        "checkpoint file line 3",
        "checkpoint file line 4 is not JSON",
        "checkpoint file line 5 is not an audit checkpoint",
    ]
    # Without a pinned key, the first checkpoint's own key is used, and said to be.
    unpinned = read_checkpoints([json.dumps(foreign), json.dumps(good)], None)
    assert unpinned.key_from_file and unpinned.key == public_key_text(other.public_key())
    assert [a.id for a in unpinned.anchors] == [6] and len(unpinned.problems) == 1


def test_verify_holds_an_export_file_to_a_checkpoint_file(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    docs = _chain(5)
    export, checkpoints, public = (tmp_path / n for n in ("export.jsonl", "cp.jsonl", "cp.pub"))
    checkpoints.write_text(json.dumps(make_checkpoint(key, 5, docs[-1]["hash"], AT)) + "\n")
    public.write_text(public_key_text(key.public_key()))
    args = ["audit", "verify", "--file", str(export), "--checkpoint", str(checkpoints),
            "--public-key", str(public)]  # fmt: skip
    runner = CliRunner()

    export.write_text("".join(json.dumps(d) + "\n" for d in docs))
    intact = runner.invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert intact.exit_code == 0 and "1 checkpoint(s) match" in intact.output, intact.output

    # The export's last two records cut off: nothing in the file itself shows it.
    export.write_text("".join(json.dumps(d) + "\n" for d in docs[:3]))
    cut = runner.invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert cut.exit_code == 1
    assert "record 5, signed in the checkpoint of" in cut.output, cut.output

    # A record the server marked as past its head is reported, not chained on.
    export.write_text("".join(json.dumps(d | {"past_head": d["id"] == 5}) + "\n" for d in docs))
    past = runner.invoke(app, args[:4], env={"NO_COLOR": "1", "COLUMNS": "300"})
    assert past.exit_code == 1 and "record 5 (1) past the chain head" in past.output, past.output

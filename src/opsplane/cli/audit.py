"""``opsplane audit``: read, export and verify the hash-chained audit trail (admin).

``verify`` recomputes the chain itself rather than trusting the server: from the API's export,
from the database directly (``--database-url``, ``--data-dir`` or ``--config``; no server
needed), or from an export file (``--file``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.table import Table
from rich.text import Text

from opsplane.cli.client import ApiClient, CliError, Json
from opsplane.cli.output import (
    dump_json,
    make_console,
    print_error,
    reporting_errors,
)
from opsplane.cli.run import client_options
from opsplane.domain.errors import ConfigError
from opsplane.security.audit import ChainReport, ChainVerifier
from opsplane.security.checkpoints import load_checkpoints
from opsplane.security.signing import load_public_key

app = typer.Typer(no_args_is_help=True, help="Read, export and verify the audit trail (admin).")

ActorOpt = Annotated[str | None, typer.Option("--actor", help="Only this actor.")]
ActionOpt = Annotated[
    str | None, typer.Option("--action", help="Only this action (task, or task.create).")
]
SinceOpt = Annotated[str | None, typer.Option("--since", help="From this time (ISO 8601, UTC).")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="Before this time (ISO 8601).")]


def _filters(actor: str | None, action: str | None, since: str | None, until: str | None) -> Json:
    return {"actor": actor, "action": action, "since": since, "until": until}


def audit_table(records: Iterable[Json]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "AT", "ACTOR", "FROM", "ACTION", "TARGET", "OUTCOME", "DETAIL"):
        table.add_column(column, no_wrap=column not in ("TARGET", "DETAIL"), overflow="fold")
    for record in records:
        outcome = str(record.get("outcome"))
        detail = {k: v for k, v in (record.get("detail") or {}).items() if k != "via"}
        table.add_row(
            str(record.get("id")),
            str(record.get("at"))[:19].replace("T", " "),
            f"{record.get('actor')} ({record.get('role') or '-'})",
            str(record.get("source_ip") or "-"),
            str(record.get("action")),
            str(record.get("target") or "-"),
            Text(outcome, style="green" if outcome == "ok" else "red"),
            json.dumps(detail, ensure_ascii=False)[:200],
        )
    return table


@app.command("list")
def list_audit(
    ctx: typer.Context,
    actor: ActorOpt = None,
    action: ActionOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    page: Annotated[int, typer.Option("--page", min=1)] = 1,
    size: Annotated[int, typer.Option("--size", min=1, max=1000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON.")] = False,
) -> None:
    """Audit records, newest first: who, when, from where, what, on which targets, outcome."""
    err = make_console(stderr=True)
    params = {**_filters(actor, action, since, until), "page": page, "size": size}
    with reporting_errors(err), ApiClient(client_options(ctx)) as api:
        result = api.list_audit(params)
    if as_json:
        typer.echo(dump_json(result))
        return
    items = [r for r in result.get("items", []) if isinstance(r, dict)]
    if not items:
        err.print(Text("no audit records match", style="dim"))
        return
    make_console().print(audit_table(items))
    err.print(Text(f"page {page} · {result.get('total')} records", style="dim"))


@app.command("export")
def export_audit(
    ctx: typer.Context,
    actor: ActorOpt = None,
    action: ActionOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
) -> None:
    """Every matching record as JSON lines on stdout, oldest first, hashes included. An
    unfiltered export can be verified later with ``opsplane audit verify --file``."""
    err = make_console(stderr=True)
    with (
        reporting_errors(err),
        ApiClient(client_options(ctx)) as api,
        api.audit_export(_filters(actor, action, since, until)) as export,
    ):
        for line in export.lines:
            if line:
                typer.echo(line)


@app.command("verify")
def verify_audit(
    ctx: typer.Context,
    database_url: Annotated[
        str | None, typer.Option(help="Read the database directly (no server needed).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="The data directory of a SQLite control plane.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="The control plane's YAML settings.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", help="An export (opsplane audit export > FILE).")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            help="Signed checkpoints (<data dir>/audit-checkpoints.jsonl, or a copy): every one "
            "must verify, and the trail must hold each checkpointed record unchanged.",
        ),
    ] = None,
    public_key: Annotated[
        str | None,
        typer.Option(
            "--public-key",
            help="The control plane's public key (base64 or a file) the checkpoints must be "
            "signed with [<data dir>/keys/control-plane.pub with --data-dir or --config].",
        ),
    ] = None,
) -> None:
    """Recompute the hash chain and say which record was edited or deleted, which records lie
    past the chain head, and (--checkpoint) which signed checkpoint the trail no longer
    matches. Exit 0 when the trail is intact, 1 when it is not."""
    err = make_console(stderr=True)
    with reporting_errors(err):
        verifier = ChainVerifier()
        if checkpoint is not None:
            verifier = _checkpointed_verifier(
                checkpoint, _pinned_key(public_key, data_dir, config, database_url)
            )
        if file is not None:
            report = _verify_file(file, verifier)
        elif database_url or data_dir or config:
            report = asyncio.run(_verify_database(database_url, data_dir, config, verifier))
        else:
            with ApiClient(client_options(ctx)) as api, api.audit_export({}) as export:
                report = _verify_lines(export.lines, verifier, export.head_id, export.head_hash)
    _print_report(report)


def _pinned_key(
    value: str | None, data_dir: Path | None, config: Path | None, database_url: str | None
) -> Ed25519PublicKey | None:
    """The key checkpoints must be signed with: --public-key, else the control plane's own
    public key file when its data directory is known; None: the checkpoints' own key."""
    try:
        if value:
            return load_public_key(value)
        if data_dir or config:
            from opsplane.config import load_settings

            settings = load_settings(
                database_url=database_url, data_dir=data_dir, config_file=config
            )
            path = settings.signing_key_path.with_suffix(".pub")
            if path.is_file():
                return load_public_key(path)
    except ConfigError as e:
        raise CliError(str(e)) from e
    return None


def _checkpointed_verifier(path: Path, key: Ed25519PublicKey | None) -> ChainVerifier:
    try:
        found = load_checkpoints(path, key)
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {e}") from e
    if found.key_from_file:
        make_console(stderr=True).print(
            Text(
                f"checkpoint signatures checked with the key the file carries ({found.key}); "
                "pass --public-key to pin the control plane's",
                style="yellow",
            ),
            soft_wrap=True,
        )
    if not found.anchors and not found.problems:
        raise CliError(f"{path} holds no checkpoint")
    verifier = ChainVerifier(found.anchors)
    for problem in found.problems:
        verifier.problem(0, problem)
    return verifier


def _verify_lines(
    lines: Iterable[str], verifier: ChainVerifier, head_id: int | None, head_hash: str | None
) -> ChainReport:
    """Feed an export's lines; those marked ``past_head`` (or beyond ``head_id``) are records
    the chain head does not vouch for, reported as such rather than chained on."""
    past: list[int] = []
    for line in lines:
        if not line.strip():
            continue
        record = _record(line)
        if record.get("past_head") or (head_id is not None and int(record["id"]) > head_id):
            past.append(int(record["id"]))
        else:
            verifier.feed(record)
    return verifier.finish(head_id, head_hash, past)


def _record(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise CliError(f"not an audit export line: {e}") from e
    if not isinstance(record, dict) or "id" not in record:
        raise CliError("not an audit export line: no record id")
    return record


def _verify_file(path: Path, verifier: ChainVerifier) -> ChainReport:
    try:
        with path.open(encoding="utf-8") as lines:
            # A file carries no chain head: records deleted from its end cannot be told,
            # unless a checkpoint names them.
            return _verify_lines(lines, verifier, None, None)
    except OSError as e:
        raise CliError(f"cannot read {path}: {e}") from e


async def _verify_database(
    database_url: str | None, data_dir: Path | None, config: Path | None, verifier: ChainVerifier
) -> ChainReport:
    from opsplane.config import load_settings
    from opsplane.security.service import AUDIT_BATCH, export_document
    from opsplane.store import security_queries as sq
    from opsplane.store.database import create_engine, session_factory

    try:
        settings = load_settings(database_url=database_url, data_dir=data_dir, config_file=config)
        engine = create_engine(settings.effective_database_url)
    except ConfigError as e:
        raise CliError(str(e)) from e
    sessions = session_factory(engine)
    try:
        async with sessions() as session:
            head = await sq.audit_head(session)
        head_id, head_hash = head if head is not None else (0, None)
        after = 0
        while after < head_id:
            async with sessions() as session:
                rows = await sq.audit_after(session, after, AUDIT_BATCH)
            for row in rows:
                if row.id <= head_id:
                    verifier.feed(export_document(row))
            if len(rows) < AUDIT_BATCH:
                break
            after = rows[-1].id
        async with sessions() as session:
            past = [row.id for row in await sq.audit_past_head(session, AUDIT_BATCH)]
    except Exception as e:  # an unreachable database, or one without the audit tables
        raise CliError(f"cannot read the audit trail from the database: {e}") from e
    finally:
        await engine.dispose()
    return verifier.finish(head_id, head_hash, past)


def _print_report(report: ChainReport) -> None:
    out = make_console()
    err = make_console(stderr=True)
    if report.ok:
        anchored = f"; {report.checkpoints} checkpoint(s) match" if report.checkpoints else ""
        out.print(
            f"audit trail intact: {report.checked} records, head {report.last_id} "
            f"{report.last_hash[:16]}…{anchored}",
            soft_wrap=True,
        )
        return
    for problem in report.problems:
        print_error(err, problem)
    out.print(
        f"audit trail BROKEN: {len(report.problems)} problem(s) in {report.checked} records; "
        f"first bad record {report.first_bad_id}",
        soft_wrap=True,
    )
    raise typer.Exit(1)

"""Runs by id: ``GET /api/v1/runs/{run_id}/log`` downloads a run's archived output, with HTTP
range requests (resume a download, or fetch only the tail of a long log)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response
from fastapi.responses import StreamingResponse

from opsplane.api.deps import Principal, get_engine, require_principal
from opsplane.engine.core import Engine

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

EngineDep = Annotated[Engine, Depends(get_engine)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
_CHUNK = 64 * 1024
_MEDIA_TYPE = "text/plain; charset=utf-8"


class _Unsatisfiable(Exception):
    pass


@router.get(
    "/{run_id}/log",
    response_class=StreamingResponse,
    responses={206: {"description": "the requested range"}, 416: {"description": "bad range"}},
)
async def run_log(
    run_id: str,
    engine: EngineDep,
    _principal: PrincipalDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    """The whole archived output of a run (stdout and stderr in arrival order), redacted as it
    was stored. ``Range: bytes=…`` answers 206 with that part. A running run's log is served
    as far as it is written when the request arrives."""
    run = await engine.tasks.run_by_id(run_id)
    path = (
        Path(run.log_path) if run.log_path else engine.archive.legacy_path_for(run.task_id, run.id)
    )
    size = await asyncio.to_thread(_size, path)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{run.id}.log"',
        "Cache-Control": "no-cache",
    }
    try:
        span = _parse_range(range_header, size)
    except _Unsatisfiable:
        headers["Content-Range"] = f"bytes */{size}"
        return Response(status_code=416, headers=headers)
    status = 200
    start, end = 0, size
    if span is not None:
        status, (start, end) = 206, span
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        _chunks(path, start, end), status_code=status, media_type=_MEDIA_TYPE, headers=headers
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0  # no output yet


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) of a single ``bytes=`` range, end exclusive; None to send the whole file.
    A malformed header or several ranges are ignored, as HTTP allows (RFC 9110 §14.2)."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # the last N bytes
        count = int(last)
        if count == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - count), size
    start = int(first)
    if last and not last.isdigit():
        return None
    end = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        return None
    if start >= size:
        raise _Unsatisfiable
    return start, end


async def _chunks(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    # Exactly end - start bytes: the file may grow meanwhile, the length was promised.
    position = start
    while position < end:
        data = await asyncio.to_thread(_read, path, position, min(_CHUNK, end - position))
        if not data:
            return
        position += len(data)
        yield data


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)

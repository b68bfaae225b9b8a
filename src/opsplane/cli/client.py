"""A small synchronous client for the opsplane REST API, used by the CLI commands.

Every failure a user can cause or fix (a 4xx answer, an unreachable server, a malformed URL)
surfaces as a :class:`CliError` carrying the message to print and the exit code to use, so
the commands never show a traceback for them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, SSEError, connect_sse

from opsplane.cli.options import ClientOptions as ClientOptions
from opsplane.domain.states import TERMINAL_TASK_STATUSES

Json = dict[str, Any]

API_PREFIX = "/api/v1"
#: Timeouts for ordinary requests; creating a task fans it out, so reads may take a moment.
REQUEST_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
#: The event stream is quiet while hosts run silently; the server pings well within this.
# A deployment answers when every host is done: minutes for a large group.
DEPLOY_TIMEOUT = httpx.Timeout(3600.0, connect=5.0)
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
#: How many consecutive failed (re)connections to the event stream before giving up.
STREAM_RETRIES = 5


class CliError(Exception):
    """A failure to report as one line on stderr, then exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class ApiError(CliError):
    """The API answered with an error status."""

    def __init__(self, status_code: int, detail: str) -> None:
        exit_code = 2 if 400 <= status_code < 500 else 1
        message = (
            detail if status_code < 500 else f"the opsplane API failed ({status_code}): {detail}"
        )
        super().__init__(message, exit_code)
        self.status_code = status_code
        self.detail = detail


class ApiUnreachable(CliError):
    """Nothing answers at the API's address."""

    def __init__(self, url: str) -> None:
        super().__init__(
            f"cannot reach the opsplane API at {url}: "
            "is `opsplane server` (or `opsplane demo`) running?"
        )
        self.url = url


@dataclass(frozen=True)
class AuditExport:
    """An audit export being read: the chain head when it was taken, and its JSON lines."""

    head_id: int
    head_hash: str | None
    lines: Iterator[str]


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event of a task's stream, its data decoded from JSON."""

    id: int | None
    event: str
    data: Json


def format_detail(detail: Any) -> str:
    """A readable message from a FastAPI ``detail``: a string, or a list of validation errors."""
    if detail is None:
        return ""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        parts: list[str] = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = [str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path")]
                msg = str(item.get("msg", item))
                parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, Mapping) and "msg" in detail:
        return str(detail["msg"])
    return json.dumps(detail)


def error_message(response: httpx.Response) -> str:
    """The message to show for an error response: its ``detail``, else its text or reason."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, Mapping) and "detail" in body:
        message = format_detail(body["detail"])
        if message:
            return message
    text = response.text.strip()
    if text and len(text) <= 500:
        return text
    return f"{response.status_code} {response.reason_phrase}".strip()


def _seg(value: str) -> str:
    """One URL path segment, escaped (host names and ids are user input)."""
    return quote(value, safe="")


def is_terminal_task(task: Mapping[str, Any]) -> bool:
    return task.get("status") in {s.value for s in TERMINAL_TASK_STATUSES}


def parse_event(sse: ServerSentEvent) -> StreamEvent | None:
    """The decoded event, or None for one without a JSON object as its data (e.g. a ping)."""
    try:
        data = json.loads(sse.data) if sse.data else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        event_id: int | None = int(sse.id) if sse.id else None
    except ValueError:
        event_id = None
    return StreamEvent(id=event_id, event=sse.event, data=data)


class ApiClient:
    """The REST API, one method per endpoint the CLI uses; use it as a context manager."""

    def __init__(
        self,
        options: ClientOptions,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = options.url.rstrip("/") or options.url
        headers = {"Accept": "application/json", "User-Agent": "opsplane-cli"}
        if options.token:
            headers["Authorization"] = f"Bearer {options.token}"
        self._has_token = bool(options.token)
        self._sleep = sleep
        try:
            self._http = httpx.Client(
                base_url=self.url,
                headers=headers,
                timeout=REQUEST_TIMEOUT,
                transport=transport,
            )
        except httpx.InvalidURL as exc:
            raise CliError(f"invalid API URL {options.url!r}: {exc}") from exc

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _transport_error(self, exc: httpx.TransportError) -> CliError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ApiUnreachable(self.url)
        if isinstance(exc, httpx.UnsupportedProtocol):
            return CliError(f"invalid API URL {self.url!r}: use http:// or https://")
        if isinstance(exc, httpx.TimeoutException):
            return CliError(f"the opsplane API at {self.url} did not answer in time")
        return CliError(f"request to the opsplane API at {self.url} failed: {exc}")

    def _check(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        message = error_message(response)
        if response.status_code == 401 and not self._has_token:
            message += " (pass --token or set OPSPLANE_TOKEN)"
        raise ApiError(response.status_code, message)

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method,
                API_PREFIX + path,
                params=clean or None,
                json=body,
                timeout=timeout or REQUEST_TIMEOUT,
            )
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        self._check(response)
        return response

    def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: httpx.Timeout | None = None,
    ) -> Json:
        response = self._request(method, path, params=params, body=body, timeout=timeout)
        try:
            data = response.json()
        except ValueError as exc:
            raise CliError(f"the opsplane API sent a response that is not JSON ({path})") from exc
        if not isinstance(data, dict):
            raise CliError(f"the opsplane API sent an unexpected response ({path})")
        return cast(Json, data)

    # -- tasks ------------------------------------------------------------------------------

    def create_task(
        self,
        command: str,
        *,
        hosts: list[str] | None = None,
        groups: list[str] | None = None,
        all_hosts: bool = False,
        timeout: int | None = None,
        name: str | None = None,
        upload: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        extra: Json | None = None,
    ) -> Json:
        """``extra``: more body fields (policy, environment); ``upload``: the upload's
        fields (``local_path``, ``remote_path``, ``owner``, ``group``)."""
        body: Json = {
            **(extra or {}),
            "command": command,
            "targets": {
                "hosts": list(hosts or []),
                "groups": list(groups or []),
                "all": all_hosts,
                "labels": dict(labels or {}),
            },
        }
        if upload is not None:
            body["kind"] = "upload"
            body["upload"] = dict(upload)
        if timeout is not None:
            body["timeout"] = timeout
        if name is not None:
            body["name"] = name
        return self._json("POST", "/tasks", body=body)

    def list_tasks(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        page: int = 1,
        size: int = 50,
    ) -> Json:
        params = {"status": status, "name": name, "page": page, "size": size}
        return self._json("GET", "/tasks", params=params)

    def get_task(self, task_id: str) -> Json:
        return self._json("GET", f"/tasks/{_seg(task_id)}")

    def rerun_task(self, task_id: str, only: str) -> Json:
        return self._json("POST", f"/tasks/{_seg(task_id)}/rerun", body={"only": only})

    def cancel_task(self, task_id: str) -> Json:
        return self._json("POST", f"/tasks/{_seg(task_id)}/cancel")

    def list_runs(self, task_id: str, *, output: bool = True) -> list[Json]:
        """Every run of the task (following the pages), with its kept output unless
        ``output`` is false."""
        params = {"output": "true" if output else "false", "size": 1000}
        return self._every(f"/tasks/{_seg(task_id)}/runs", params)

    def _every(self, path: str, params: Mapping[str, Any] | None = None) -> list[Json]:
        """Every item of a paged list, following ``next_cursor`` (bounded: a cursor that
        repeats, or a thousand pages, ends the walk)."""
        found: list[Json] = []
        cursor: str | None = None
        for _ in range(1000):
            answer = self._json("GET", path, params={**(params or {}), "cursor": cursor})
            found.extend(item for item in answer.get("items", []) if isinstance(item, dict))
            following = answer.get("next_cursor")
            if not isinstance(following, str) or not following or following == cursor:
                break
            cursor = following
        return found

    def get_run_log(self, task_id: str, run_id: str) -> str:
        return self._request("GET", f"/tasks/{_seg(task_id)}/runs/{_seg(run_id)}/log").text

    # -- hosts ------------------------------------------------------------------------------

    def list_hosts(
        self,
        *,
        group: str | None = None,
        status: str | None = None,
        page: int = 1,
        size: int = 100,
        adhoc: bool = False,
        cursor: str | None = None,
    ) -> Json:
        params: dict[str, Any] = {"group": group, "status": status, "size": size}
        if cursor is None:
            params["page"] = page
        else:
            params["cursor"] = cursor
        if adhoc:
            params["adhoc"] = "true"
        return self._json("GET", "/hosts", params=params)

    def list_all_hosts(
        self,
        *,
        group: str | None = None,
        status: str | None = None,
        size: int = 100,
        adhoc: bool = False,
    ) -> list[Json]:
        """Every host matching the filters, following the pages (with ``adhoc``, seed-000's
        ad-hoc SSH targets too)."""
        params: dict[str, Any] = {"group": group, "status": status, "size": size}
        if adhoc:
            params["adhoc"] = "true"
        return self._every("/hosts", params)

    def get_host(self, name: str) -> Json:
        return self._json("GET", f"/hosts/{_seg(name)}")

    def add_ssh_host(self, body: Json) -> Json:
        return self._json("POST", "/hosts", body=body)

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> Json | None:
        """One API call under ``/api/v1``: its JSON object, or None for an empty answer (204).
        For verb groups whose routes need no more than this (templates, schedules)."""
        if method in ("DELETE",):
            response = self._request(method, path, params=params, body=body)
            return None if not response.content else cast(Json, response.json())
        return self._json(method, path, params=params, body=body)

    def remove_host(self, name: str) -> None:
        self._request("DELETE", f"/hosts/{_seg(name)}")

    # -- users, tokens and the audit trail (issue 9) ----------------------------------------

    def me(self) -> Json:
        return self._json("GET", "/auth/me")

    def list_users(self) -> list[Json]:
        return self._every("/users")

    def create_user(self, body: Json) -> Json:
        return self._json("POST", "/users", body=body)

    def update_user(self, name: str, body: Json) -> Json:
        return self._json("PATCH", f"/users/{_seg(name)}", body=body)

    def list_tokens(self, *, include_inactive: bool = False) -> list[Json]:
        return self._every("/tokens", {"all": "true"} if include_inactive else None)

    def create_token(self, body: Json) -> Json:
        return self._json("POST", "/tokens", body=body)

    def revoke_token(self, token_id: str) -> Json:
        return self._json("POST", f"/tokens/{_seg(token_id)}/revoke")

    def create_enrollment_token(self, body: Json) -> Json:
        return self._json("POST", "/agents/tokens", body=body)

    def deploy_agents(self, body: Json, *, upgrade: bool = False) -> Json:
        """POST /agents/deploy (or /agents/upgrade): answered when every host is done."""
        path = "/agents/upgrade" if upgrade else "/agents/deploy"
        return self._json("POST", path, body=body, timeout=DEPLOY_TIMEOUT)

    def deploy_agents_streamed(self, body: Json, *, upgrade: bool = False) -> Iterator[Json]:
        """POST /agents/deploy (or /agents/upgrade) with ``stream``: each host's line as it
        finishes (``type`` host), then the report (``type`` report)."""
        path = API_PREFIX + ("/agents/upgrade" if upgrade else "/agents/deploy")
        try:
            with self._http.stream(
                "POST", path, json={**body, "stream": True}, timeout=DEPLOY_TIMEOUT
            ) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if line.strip():
                        yield cast(Json, json.loads(line))
        except httpx.TransportError as e:
            raise self._transport_error(e) from e

    def list_agents(self) -> list[Json]:
        return self._every("/agents")

    def revoke_agent(self, name: str) -> Json:
        return self._json("POST", f"/agents/{_seg(name)}/revoke")

    def list_audit(self, params: Mapping[str, Any]) -> Json:
        return self._json("GET", "/audit", params=params)

    @contextmanager
    def audit_export(self, params: Mapping[str, Any]) -> Iterator[AuditExport]:
        """The JSON-lines export, streamed: the chain head it was taken at, and its lines."""
        clean = {k: v for k, v in params.items() if v is not None}
        clean["format"] = "jsonl"
        try:
            with self._http.stream(
                "GET", API_PREFIX + "/audit", params=clean, timeout=STREAM_TIMEOUT
            ) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                head_id = int(response.headers.get("X-Audit-Head-Id") or 0)
                head_hash = response.headers.get("X-Audit-Head-Hash") or None
                yield AuditExport(head_id, head_hash, response.iter_lines())
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc

    # -- the event stream -------------------------------------------------------------------

    def follow_events(
        self,
        task_id: str,
        *,
        last_event_id: int | None = None,
        retries: int = STREAM_RETRIES,
    ) -> Iterator[StreamEvent]:
        """The task's events until its status is terminal, reconnecting with ``Last-Event-ID``.

        A stream the server closes early, a dropped connection or a refused reconnection are
        retried with a growing delay, ``retries`` times in a row at most; then the last error
        is raised. The last event yielded is always a ``task`` event with a terminal status.
        """
        path = f"{API_PREFIX}/tasks/{_seg(task_id)}/events"
        last_id = last_event_id
        failures = 0
        while True:
            headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
            failure: CliError | None = None
            try:
                with connect_sse(
                    self._http, "GET", path, headers=headers, timeout=STREAM_TIMEOUT
                ) as source:
                    response = source.response
                    if not response.is_success:
                        response.read()
                        self._check(response)
                    for sse in source.iter_sse():
                        event = parse_event(sse)
                        if event is None:
                            continue
                        if event.id is not None:
                            if last_id is not None and event.id <= last_id:
                                continue  # already seen before a reconnection
                            last_id = event.id
                        failures = 0
                        yield event
                        if event.event == "task" and is_terminal_task(event.data):
                            return
            except httpx.ReadTimeout:
                # Connected but idle for a long while: reconnect without counting a failure.
                continue
            except httpx.TransportError as exc:
                failure = self._transport_error(exc)
            except SSEError as exc:
                failure = CliError(f"the opsplane API sent no event stream: {exc}")
            except ApiError as exc:
                if exc.status_code < 500:
                    raise
                failure = exc  # e.g. a server restarting: try again
            if failure is None:
                # The stream ended without a terminal task event: did we miss the end?
                try:
                    task = self.get_task(task_id)
                except ApiError as exc:
                    if exc.status_code < 500:
                        raise
                    failure = exc
                except CliError as exc:
                    failure = exc
                else:
                    if is_terminal_task(task):
                        yield StreamEvent(id=None, event="task", data=task)
                        return
                    failure = CliError(f"the event stream of task {task_id} keeps closing early")
            failures += 1
            if failures > retries:
                raise failure
            self._sleep(min(0.25 * 2**failures, 5.0))

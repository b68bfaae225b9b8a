"""The catalog of seed 004: external tasks declared in YAML and in-process handlers, each
exposed as a sync and an async route.

Loading validates everything a run would otherwise trip over later, so that a bad catalog
stops the control plane at start with the entry and the reason, never at 3 a.m. when a
scheduler first calls the route. Building the argv of a call follows the seed's rules
literally (see ``ExternalEntry.argv``).
"""

from __future__ import annotations

import abc
import json
import os
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.domain.tasks import MAX_TIMEOUT_SECONDS, ExecSpec
from opsplane.remoterun.scripts import SCRIPT_PATH_ENV, parse_sha256

# ``shell`` is not in the seed's validation tag but its prose says "sh, shell" run as
# ``sh -c``: accepted, and run exactly like ``sh``.
Language = Literal["python", "python2", "python3", "perl", "sh", "shell", "bash", "binary"]
LANGUAGES: tuple[str, ...] = get_args(Language)
SHELL_LANGUAGES = frozenset({"sh", "shell", "bash"})
# The shell a shell language runs: ``shell`` is ``sh``.
_SHELLS = {"sh": "sh", "shell": "sh", "bash": "bash"}

# A name is a path segment of the routes and the stem of ``logs/<name>.log``: nothing in it may
# reach another directory or need escaping in a URL.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_FIRST_WORD = re.compile(r"\s*(\S+)\s*(.*)", re.DOTALL)

# The fixed routes every catalog has, listed after the entries' own (the seed's order).
FIXED_ROUTES: tuple[tuple[str, str], ...] = (
    ("POST", "/async/kill"),
    ("POST", "/async/query"),
    ("GET", "/list"),
)


class CatalogError(ConfigError):
    """The catalog cannot be loaded; the message names the file, the entry and the reason."""


_Fail = Callable[[str], CatalogError]


def kebab_case(value: str) -> str:
    """The path segment of a cluster type: ``TendbCluster`` → ``tendb-cluster``,
    ``TendbHA`` → ``tendb-ha``, ``MongoDB`` → ``mongo-db``, ``sqlsvr`` → ``sqlsvr``.

    Words start at a lower-to-upper change and at the last capital of a run of capitals that
    is followed by a lower-case letter (``HTTPServer`` → ``http-server``); spaces and
    underscores separate words too.
    """
    text = re.sub(r"[\s_]+", "-", value.strip())
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1-\2", text)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1-\2", text)
    return re.sub(r"-{2,}", "-", text).lower()


def route_slug(cluster_type: str, name: str) -> str:
    """The cluster type's path segment, or ValueError saying why the pair makes no route."""
    if not _NAME.match(name):
        raise ValueError(
            "name must be letters, digits, '.', '_' or '-' (at most 128, not starting with "
            f"'.', '_' or '-'): it is a URL segment and a log file name, got {name!r}"
        )
    slug = kebab_case(cluster_type)
    if not _SLUG.match(slug):
        raise ValueError(
            f"cluster_type {cluster_type!r} does not make a path segment "
            f"(kebab-case {slug!r}); use letters, digits, '-' or '_'"
        )
    return slug


class ExternalTask(BaseModel):
    """One YAML entry, field for field the seed's ``ExternalTask`` struct (plus ``timeout``)."""

    # Unknown keys are refused: a misspelt ``colected`` must not silently fall back to a
    # default. Numbers in ``args`` are taken as their text, as the seed's YAML decoder does.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: str = Field(min_length=1)
    cluster_type: str = Field(min_length=1)
    language: Language
    executable: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    collected: bool
    # opsplane's addition: the run's execution timeout in seconds (default: the server's).
    timeout: int | None = Field(default=None, gt=0, le=MAX_TIMEOUT_SECONDS)
    # opsplane's addition: the SHA-256 of the approved script file; a changed file is refused.
    sha256: str | None = None


# Body parsing -------------------------------------------------------------------------------


def parse_string_array(raw: bytes) -> tuple[str, ...]:
    """The POST body of an external task: a JSON array of strings; an empty body is ``[]``.

    Raises ``BodyError`` with ``status`` 400 (not JSON) or 422 (JSON of the wrong shape).
    """
    if not raw.strip():
        return ()
    value = _json(raw)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BodyError(422, 'body must be a JSON array of strings, e.g. ["123", "456"]')
    if any("\x00" in item for item in value):
        raise BodyError(422, "arguments must not contain NUL characters")
    return tuple(value)


def parse_any_json(raw: bytes) -> Any:
    """The POST body of an in-process handler: any JSON value; an empty body is ``null``."""
    return _json(raw) if raw.strip() else None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BodyError(400, f"body is not valid JSON: {e}") from e


class BodyError(InvalidInput):
    """A request body the route cannot take; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Entries ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogEntry(abc.ABC):
    """What every entry has: its route, and how a call becomes an opsplane script task."""

    name: str
    cluster_type: str
    slug: str
    timeout: int | None

    @property
    def sync_path(self) -> str:
        return f"/sync/{self.slug}/{self.name}"

    @property
    def async_path(self) -> str:
        return f"/async/{self.slug}/{self.name}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.slug, self.name)

    @abc.abstractmethod
    def parse_body(self, raw: bytes) -> Any:
        """The call's arguments from the raw POST body, or ``BodyError``."""

    @abc.abstractmethod
    def exec_spec(self, body: Any) -> ExecSpec:
        """How the script task of a call with this (parsed) body executes."""

    @abc.abstractmethod
    def command_text(self, body: Any) -> str:
        """What the task shows as its command in ``/api/v1/tasks``."""


@dataclass(frozen=True)
class ExternalEntry(CatalogEntry):
    """An external task from the YAML file, validated and with its paths resolved."""

    language: str
    executable: str
    args: tuple[str, ...]
    collected: bool
    collect_dir: Path
    # The pinned SHA-256 of ``script_file`` (lower-case hex), or None.
    sha256: str | None = None
    # Set per call (``CatalogService``) for a pinned entry: the verified copy that runs in
    # place of ``script_file``.
    run_path: Path | None = None

    @property
    def script_file(self) -> Path | None:
        """The file this entry runs (what ``sha256`` pins): the collected script, or an
        absolute program path of a non-shell entry. None for an inline shell command or a
        program looked up on ``$PATH``."""
        if self.language in SHELL_LANGUAGES:
            head = _split_first_word(self.executable)[0]
            return self._collected_path(head) if self.collected else None
        path = shlex.split(self.executable)[0]
        if self.collected:
            return self._collected_path(path)
        return Path(path) if PurePosixPath(path).is_absolute() else None

    def parse_body(self, raw: bytes) -> tuple[str, ...]:
        return parse_string_array(raw)

    def argv(self, body: Sequence[str] = ()) -> tuple[str, ...]:
        """The argv of a call with ``body`` as the extra arguments (the seed's rules).

        - ``sh``/``shell``/``bash``: ``[sh|bash, "-c", "<executable> <args…> <body…>"]``, joined
          with single spaces into one shell string. The executable string is kept as written
          (it is shell); ``args`` and the body are NOT quoted: they reach the shell as text,
          exactly as the seed does. Only a path resolved under ``collect/`` is quoted, since
          opsplane, not the operator, wrote it.
        - ``binary``: ``[path, *extras, *args, *body]``, no shell.
        - any other language: ``[language, path, *extras, *args, *body]``, no shell.

        ``path`` and ``extras`` are the executable string split like a shell would
        (``shlex.split``); with ``collected: true`` the path lies under ``collect/``.
        """
        if self.language in SHELL_LANGUAGES:
            head, rest = _split_first_word(self.executable)
            if self.run_path is not None:
                head = shlex.quote(str(self.run_path))
            elif self.collected:
                head = shlex.quote(str(self._collected_path(head)))
            words = [head, rest] if rest else [head]
            return (_SHELLS[self.language], "-c", " ".join([*words, *self.args, *body]))
        path, *extras = shlex.split(self.executable)
        program = str(self._collected_path(path)) if self.collected else path
        if self.run_path is not None:
            program = str(self.run_path)
        tail = (*extras, *self.args, *body)
        if self.language == "binary":
            return (program, *tail)
        return (self.language, program, *tail)

    def exec_spec(self, body: Any) -> ExecSpec:
        if self.run_path is not None and self.script_file is not None:
            # The script runs from its verified copy; this says where it came from.
            return ExecSpec(argv=self.argv(body), env={SCRIPT_PATH_ENV: str(self.script_file)})
        return ExecSpec(argv=self.argv(body))

    def command_text(self, body: Any) -> str:
        return shlex.join(self.argv(body))

    def _collected_path(self, path: str) -> Path:
        return self.collect_dir / path


@dataclass(frozen=True)
class InternalEntry(CatalogEntry):
    """An in-process handler (``catalog.handlers``); its body is any JSON value."""

    handler: str

    def parse_body(self, raw: bytes) -> Any:
        return parse_any_json(raw)

    def exec_spec(self, body: Any) -> ExecSpec:
        # The link hands handlers strings; the JSON text travels as the one argument.
        return ExecSpec(handler=self.handler, args=(json.dumps(body),))

    def command_text(self, body: Any) -> str:
        return f"{self.handler} {json.dumps(body)}"


@dataclass
class Catalog:
    """Every entry of the catalog, by route; what ``GET /list`` shows."""

    entries: list[CatalogEntry] = field(default_factory=list)
    source: Path | None = None

    def __post_init__(self) -> None:
        self._by_key: dict[tuple[str, str], CatalogEntry] = {}
        for entry in self.entries:
            if entry.key in self._by_key:
                raise CatalogError(f"duplicate route {entry.sync_path}")
            self._by_key[entry.key] = entry

    def find(self, slug: str, name: str) -> CatalogEntry | None:
        return self._by_key.get((slug, name))

    def routes(self) -> list[tuple[str, str]]:
        """``(method, path)`` of every route, entries first, in catalog order."""
        routes: list[tuple[str, str]] = []
        for entry in self.entries:
            routes += [("POST", entry.sync_path), ("POST", entry.async_path)]
        return [*routes, *FIXED_ROUTES]


# Loading ------------------------------------------------------------------------------------


class InternalEntries(Protocol):
    """The in-process handlers' entries (``handlers.HandlerRegistry``, which builds on this
    module: the registry never imports it)."""

    def entries(self) -> Iterable[InternalEntry]: ...


def load_catalog(
    path: Path | None,
    collect_dir: Path | None = None,
    handlers: InternalEntries | None = None,
) -> Catalog:
    """The catalog from a YAML file (none: only the in-process handlers), validated.

    ``collect_dir`` defaults to ``collect/`` next to the file. Raises ``CatalogError`` naming
    the file, the entry (its position and name) and the reason.
    """
    internal: list[CatalogEntry] = list(handlers.entries()) if handlers is not None else []
    where = {entry.key: f"in-process handler {entry.sync_path}" for entry in internal}
    if path is None:
        return Catalog(internal)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CatalogError(f"catalog {path}: cannot read it: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogError(f"catalog {path}: not valid YAML: {e}") from e
    collect = (collect_dir or path.parent / "collect").resolve()
    external = parse_entries(data, collect, source=str(path))
    for index, entry in enumerate(external, start=1):
        label = _label(index, entry.name)
        if entry.key in where:
            raise CatalogError(
                f"catalog {path}: {label}: duplicate route {entry.sync_path} "
                f"(already used by {where[entry.key]})"
            )
        where[entry.key] = label
    return Catalog([*external, *internal], source=path)


def parse_entries(data: Any, collect_dir: Path, *, source: str = "catalog") -> list[ExternalEntry]:
    """Validate the YAML document (a list of mappings) into entries; see ``load_catalog``."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise CatalogError(
            f"catalog {source}: must be a YAML list of tasks, got a {type(data).__name__}"
        )
    return [_entry(index, item, collect_dir, source) for index, item in enumerate(data, start=1)]


def _entry(index: int, item: Any, collect_dir: Path, source: str) -> ExternalEntry:
    name = item.get("name") if isinstance(item, Mapping) else None
    label = _label(index, name if isinstance(name, str) else None)

    def fail(reason: str) -> CatalogError:
        return CatalogError(f"catalog {source}: {label}: {reason}")

    if not isinstance(item, Mapping):
        raise fail(f"must be a mapping of fields, got a {type(item).__name__}")
    try:
        task = ExternalTask.model_validate(item)
    except ValidationError as e:
        raise fail(_describe(e)) from e
    try:
        slug = route_slug(task.cluster_type, task.name)
    except ValueError as e:
        raise fail(str(e)) from e
    path = _executable_path(task, fail)
    if task.collected:
        _check_collected(task, path, collect_dir, fail)
    sha256 = _check_pin(task, path, fail) if task.sha256 is not None else None
    return ExternalEntry(
        name=task.name,
        cluster_type=task.cluster_type,
        slug=slug,
        timeout=task.timeout,
        language=task.language,
        executable=task.executable.strip(),
        args=tuple(task.args),
        collected=task.collected,
        collect_dir=collect_dir,
        sha256=sha256,
    )


def _check_pin(task: ExternalTask, path: str, fail: _Fail) -> str:
    """The entry's pin in lower case, once it is one and pins a script file."""
    try:
        sha256 = parse_sha256(task.sha256)
    except ValueError as e:
        raise fail(f"sha256: {e}") from e
    if task.collected:
        return sha256
    if task.language in SHELL_LANGUAGES:
        raise fail(
            f"sha256 pins a script file, but with language {task.language} and collected: "
            "false the executable is an inline shell command; collect the script "
            "(collected: true) or use language binary with its absolute path"
        )
    if not PurePosixPath(path).is_absolute():
        raise fail(
            f"sha256 pins a script file: with collected: false, executable {path!r} must be "
            "an absolute path (not one looked up on $PATH or relative to the working directory)"
        )
    if not Path(path).is_file():
        raise fail(f"executable {path!r} not found (its sha256 cannot be checked)")
    return sha256


def _executable_path(task: ExternalTask, fail: _Fail) -> str:
    if not task.executable.strip():
        raise fail("executable must not be blank")
    if "\x00" in task.executable or any("\x00" in a for a in task.args):
        raise fail("executable and args must not contain NUL characters")
    if task.language in SHELL_LANGUAGES:
        return _split_first_word(task.executable)[0]
    try:
        words = shlex.split(task.executable)
    except ValueError as e:
        raise fail(f"executable {task.executable!r} cannot be split into words: {e}") from e
    if not words:
        raise fail("executable must not be blank")
    return words[0]


def _check_collected(task: ExternalTask, path: str, collect_dir: Path, fail: _Fail) -> None:
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise fail(
            f"executable {path!r} must be a path relative to the collect directory "
            "when collected is true"
        )
    if ".." in pure.parts:
        raise fail(f"executable {path!r} must not contain '..' when collected is true")
    resolved = collect_dir / pure
    if not resolved.is_file():
        raise fail(f"executable {path!r} not found in the collect directory {collect_dir}")
    # A script run through ``sh -c`` or directly needs its execute bit, as the seed says;
    # one given to an interpreter does not.
    needs_exec = task.language in SHELL_LANGUAGES or task.language == "binary"
    if needs_exec and not os.access(resolved, os.X_OK):
        raise fail(f"executable {resolved} is not executable (chmod +x)")


def _split_first_word(text: str) -> tuple[str, str]:
    """``" ./s.sh  a 'b c'"`` → ``("./s.sh", "a 'b c'")``: the rest is kept as written."""
    match = _FIRST_WORD.match(text)
    return (match[1], match[2].strip()) if match else ("", "")


def _label(index: int, name: str | None) -> str:
    return f"entry #{index} ({name!r})" if name else f"entry #{index}"


def _describe(error: ValidationError) -> str:
    reasons = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(part) for part in problem["loc"]) or "entry"
        kind = problem["type"]
        if where == "collected" and (kind == "missing" or problem["input"] is None):
            # The seed's ``*bool`` with ``required``: null is as missing as an absent key.
            reasons.append("collected is required (true or false)")
        elif kind == "missing":
            reasons.append(f"{where} is required")
        elif kind == "extra_forbidden":
            reasons.append(f"unknown field {where!r}")
        elif kind == "literal_error":
            reasons.append(
                f"{where} must be one of {', '.join(LANGUAGES)}, got {problem['input']!r}"
            )
        else:
            reasons.append(f"{where}: {problem['msg']} (got {problem['input']!r})")
    return "; ".join(reasons)


def describe_routes(entries: Iterable[CatalogEntry]) -> list[str]:
    """One line per entry for the start-up log: route, then what it runs."""
    lines = []
    for entry in entries:
        if isinstance(entry, ExternalEntry):
            what = f"{entry.language} {entry.executable}"
            if entry.sha256 is not None:
                what += f" (pinned sha256 {entry.sha256[:12]}…)"
        elif isinstance(entry, InternalEntry):
            what = f"in-process {entry.handler}"
        else:  # pragma: no cover - no other kinds
            what = type(entry).__name__
        lines.append(f"{entry.sync_path} → {what}")
    return lines

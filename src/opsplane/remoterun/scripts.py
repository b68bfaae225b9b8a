"""Which script a seed-003 request may run, and how its params reach it.

A ``script_path`` names a file inside one of the configured script directories, in one of three
spellings: the file's absolute path (``/srv/scripts/backup.sh``), the directory's base name as
the root (``/scripts/backup.sh`` for a directory ``/srv/scripts``, the seed's own spelling), or
a path relative to the directories, tried in order (``backup.sh``). Whatever the spelling, the
file must really be inside that directory once symbolic links are followed, be a regular file,
be executable, and not be writable by everyone. ``..`` and a trailing ``/`` are refused
outright; a file with more than one hard link runs only when pinned (its other name may be
outside the directory, writable by someone else).

Pinning (docs/remoterun.md, docs/catalog.md): a script may be pinned to the SHA-256 of its
approved content. A pinned script never runs in place: its bytes are read once, hashed while
they are copied into a read-only, content-addressed copy (``VerifiedCopies``), and the copy is
what runs, so a change made after the check cannot run unnoticed. Seed 003's pins are the file
``<data dir>/script-pins.yaml`` (``ScriptPins``, written by ``opsplane scripts approve``); the
catalog's are its entries' ``sha256`` fields.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import yaml

from opsplane.domain.errors import ConfigError, Conflict, InvalidInput, NotFound, OpsplaneError

MAX_PATH = 4096


class ScriptRefused(InvalidInput):
    """``script_path`` names something that may not run (outside the directories, not
    executable, …)."""


class ScriptNotFound(NotFound):
    """No script of that name in the script directories."""


@dataclass(frozen=True)
class _Dir:
    configured: Path  # absolute, as configured (may itself be a symbolic link)
    real: Path  # with every symbolic link resolved


class ScriptDirs:
    """The configured script directories; ``resolve`` turns a ``script_path`` into the real
    path of a script that may run, or says why not."""

    def __init__(self, dirs: Sequence[Path]) -> None:
        self._dirs: list[_Dir] = []
        for configured in dirs:
            absolute = configured.expanduser().absolute()
            if not absolute.is_dir():
                raise ConfigError(f"script directory not found: {absolute}")
            self._dirs.append(_Dir(absolute, absolute.resolve(strict=True)))

    def __bool__(self) -> bool:
        return bool(self._dirs)

    @property
    def roots(self) -> list[str]:
        """How the directories are named in a ``script_path``: ``/<base name>``."""
        return [f"/{d.configured.name}" for d in self._dirs]

    def resolve(self, script_path: str) -> Path:
        if not script_path or len(script_path) > MAX_PATH:
            raise ScriptRefused(f"script_path must have 1 to {MAX_PATH} characters")
        if "\x00" in script_path:
            raise ScriptRefused("script_path must not contain NUL")
        if script_path.endswith("/"):
            # PurePosixPath drops it, and open() would then take the file: name a file as one.
            raise ScriptRefused(f"script_path {script_path!r} ends with '/': name a file")
        pure = PurePosixPath(script_path)
        if ".." in pure.parts:
            raise ScriptRefused("script_path must not contain '..'")
        candidates = self._candidates(pure)
        if not candidates:
            raise ScriptRefused(
                f"script_path {script_path!r} is outside the script directories "
                f"(name a script as /<directory>/<file> or <file>; directories: "
                f"{', '.join(self.roots)})"
            )
        for directory, relative in candidates:
            found = self._check(directory, relative, script_path)
            if found is not None:
                return found
        raise ScriptNotFound(f"no script {script_path!r} in the script directories")

    def _candidates(self, pure: PurePosixPath) -> list[tuple[_Dir, PurePosixPath]]:
        if not pure.is_absolute():
            return [(d, pure) for d in self._dirs]
        found: list[tuple[_Dir, PurePosixPath]] = []
        for d in self._dirs:
            for root in (d.configured, d.real):
                if pure.is_relative_to(root):
                    found.append((d, pure.relative_to(root)))
            # The seed's spelling: /scripts/backup.sh with /scripts the directory's base name.
            if len(pure.parts) > 2 and pure.parts[1] == d.configured.name:
                found.append((d, PurePosixPath(*pure.parts[2:])))
        return found

    @staticmethod
    def _check(directory: _Dir, relative: PurePosixPath, given: str) -> Path | None:
        if not relative.parts:
            return None
        try:
            real = (directory.real / relative).resolve(strict=True)
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError) as e:  # a symbolic-link loop, a permission problem
            raise ScriptRefused(f"script_path {given!r} cannot be resolved: {e}") from e
        if not real.is_relative_to(directory.real):
            raise ScriptRefused(
                f"script_path {given!r} leads outside its script directory "
                "(through a symbolic link)"
            )
        mode = real.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ScriptRefused(f"script_path {given!r} is not a regular file")
        if not os.access(real, os.X_OK):
            raise ScriptRefused(f"script {given!r} is not executable (chmod +x)")
        if mode & stat.S_IWOTH:
            raise ScriptRefused(f"script {given!r} is writable by everyone; refusing to run it")
        return real


# Pinning ------------------------------------------------------------------------------------

PINS_FILE = "script-pins.yaml"
VERIFIED_DIR = "verified-scripts"
# The environment variable naming a pinned script's own path: it runs from its verified copy,
# so ``$0`` is the copy's path.
SCRIPT_PATH_ENV = "OPSPLANE_SCRIPT_PATH"
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_CHUNK = 1024 * 1024
_PINS_HEADER = (
    "# Approved seed-003 scripts: real path -> SHA-256 of the approved content.\n"
    "# Written by `opsplane scripts approve PATH...`; read again at every POST /tasks.\n"
)


class ScriptNotApproved(Conflict, InvalidInput):
    """The script may not run until it is approved: its content is not the pinned content, or
    pins are required and it has none. Nothing ran. A ``Conflict`` (HTTP 409); also an
    ``InvalidInput``, so that routes mapping only their own kinds of error (seed 004's
    envelope routes) still answer 4xx, never 503."""


class ScriptChanged(ScriptNotApproved):
    """A pinned script's content changed since it was approved."""


def parse_sha256(value: object) -> str:
    """A pin as written (64 hexadecimal digits, either case) in lower case; ValueError if not."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _SHA256.match(text):
        raise ValueError(f"a SHA-256 is 64 hexadecimal digits, got {value!r}")
    return text


def short_hash(digest: str) -> str:
    """How messages name a hash: its first 12 digits."""
    return f"{digest[:12]}…"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, read in chunks (OSError when it cannot be read)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class VerifiedCopies:
    """Read-only copies of approved scripts, content-addressed: ``<root>/<sha256>/<name>``.

    ``verified`` reads the script once, hashing the very bytes it copies, and hands back the
    copy only when the hash is the pinned one, so the bytes that run are the bytes that were
    checked (no time-of-check/time-of-use gap, even for a task that waits for a worker). A copy
    is never rewritten with other content: new content is a new directory. Copies are small and
    may be deleted when no queued task still names them.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def verified(self, source: Path, expected: str, *, label: str, hint: str) -> Path:
        """The verified copy of ``source``, or ``ScriptChanged`` naming the expected and the
        actual hash (``label`` names the script, ``hint`` says how to re-approve it)."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=self.root, prefix=".incoming-")
        except OSError as e:
            raise OpsplaneError(f"cannot make the verified copy of {label}: {e}") from e
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _copy_hashing(source, out, label)
            if actual != expected:
                raise ScriptChanged(
                    f"{label} changed since it was approved: expected sha256 "
                    f"{short_hash(expected)}, found {short_hash(actual)}; it was not run. "
                    f"{hint}"
                )
            return self._keep(Path(temp), actual, source.name, label)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

    def _keep(self, temp: Path, digest: str, name: str, label: str) -> Path:
        target = self.root / digest / name
        try:
            # An earlier copy of the same content is reused, once it proves to be that content.
            with contextlib.suppress(OSError):
                if target.is_file() and file_sha256(target) == digest:
                    return target
            target.parent.mkdir(mode=0o700, exist_ok=True)
            # Executable (it runs as argv[0]) and read-only.
            temp.chmod(0o500)
            os.replace(temp, target)
        except OSError as e:
            raise OpsplaneError(f"cannot make the verified copy of {label}: {e}") from e
        return target


def _copy_hashing(source: Path, out: IO[bytes], label: str) -> str:
    digest = hashlib.sha256()
    try:
        # O_NONBLOCK: a FIFO put in the script's place must not hang the open.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ScriptRefused(f"{label} is not a regular file")
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except OSError as e:
        raise ScriptRefused(f"{label} cannot be read: {e.strerror or e}") from e
    return digest.hexdigest()


@dataclass(frozen=True)
class Approved:
    """What a seed-003 submission runs: the verified copy of a pinned script (``sha256`` its
    pin), or the script itself when it is not pinned and pins are not required."""

    path: Path
    sha256: str | None = None


class ScriptPins:
    """Seed 003's approved hashes: ``<data dir>/script-pins.yaml``, a YAML mapping of each
    script's real path (symbolic links resolved) to the SHA-256 of its approved content.

    ``opsplane scripts approve`` writes it (atomically, under a lock); the server reads it again
    at every submission, so an approval needs no restart. ``required``: a script without a pin
    is refused too.
    """

    def __init__(self, data_dir: Path, *, required: bool = False) -> None:
        self.path = data_dir / PINS_FILE
        self.required = required
        self.copies = VerifiedCopies(data_dir / VERIFIED_DIR)

    def load(self) -> dict[str, str]:
        """Every pin; ``{}`` without a pins file. ``ConfigError`` when the file is not a
        mapping of absolute paths to SHA-256 values."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise ConfigError(f"script pins {self.path}: cannot read it: {e.strerror or e}") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"script pins {self.path}: not valid YAML: {e}") from e
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"script pins {self.path}: must be a mapping of path: sha256")
        pins: dict[str, str] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key.startswith("/"):
                raise ConfigError(f"script pins {self.path}: {key!r} is not an absolute path")
            try:
                pins[key] = parse_sha256(value)
            except ValueError as e:
                raise ConfigError(f"script pins {self.path}: {key}: {e}") from e
        return pins

    def check(self, script: Path, given: str) -> Approved:
        """What a submission of ``script`` (its real path; ``given`` as the caller spelt it)
        runs; ``ScriptNotApproved``/``ScriptChanged`` when it may not run."""
        expected = self.load().get(str(script))
        approve = f"opsplane scripts approve {shlex.quote(str(script))}"
        if expected is None:
            if self.required:
                raise ScriptNotApproved(
                    f"script {given!r} is not approved and script_pins_required is on; it was "
                    f"not run. Approve it with `{approve}`"
                )
            links = script.stat().st_nlink
            if links > 1:
                # Another name of the same file may live outside the script directory, where
                # whoever can write it changes what runs here. A pin runs a verified copy.
                raise ScriptRefused(
                    f"script {given!r} has {links} hard links (it can be changed through a name "
                    f"outside the script directory); it was not run. Pin it with `{approve}`"
                )
            return Approved(script)
        copy = self.copies.verified(
            script,
            expected,
            label=f"script {given!r}",
            hint=f"If the change is wanted, re-approve it with `{approve}`",
        )
        return Approved(copy, expected)

    def approve(self, scripts: Iterable[Path]) -> list[tuple[Path, str, str | None]]:
        """Pin each script (a real path) to its current content; ``(path, sha256, previous
        pin or None)`` for each."""
        done: list[tuple[Path, str, str | None]] = []
        with self._locked():
            pins = self.load()
            for script in scripts:
                try:
                    digest = file_sha256(script)
                except OSError as e:
                    raise ConfigError(f"cannot read {script}: {e.strerror or e}") from e
                done.append((script, digest, pins.get(str(script))))
                pins[str(script)] = digest
            self._write(pins)
        return done

    def revoke(self, scripts: Iterable[str]) -> list[str]:
        """Remove the pins of these real paths; the ones that had a pin."""
        with self._locked():
            pins = self.load()
            removed = [key for key in scripts if pins.pop(key, None) is not None]
            if removed:
                self._write(pins)
        return removed

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two approvals at once must not lose one another's pins.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(self.path.name + ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, pins: Mapping[str, str]) -> None:
        text = _PINS_HEADER + (yaml.safe_dump(dict(sorted(pins.items()))) if pins else "{}\n")
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)

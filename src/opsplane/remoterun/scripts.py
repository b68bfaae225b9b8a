"""Which script a seed-003 request may run, and how its params reach it.

A ``script_path`` names a file inside one of the configured script directories, in one of three
spellings: the file's absolute path (``/srv/scripts/backup.sh``), the directory's base name as
the root (``/scripts/backup.sh`` for a directory ``/srv/scripts``, the seed's own spelling), or
a path relative to the directories, tried in order (``backup.sh``). Whatever the spelling, the
file must really be inside that directory once symbolic links are followed, be a regular file,
be executable, and not be writable by everyone. ``..`` is refused outright.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from opsplane.domain.errors import ConfigError, InvalidInput, NotFound

MAX_PATH = 4096
MAX_PARAMS = 256
MAX_PARAMS_BYTES = 128 * 1024
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PARAM_PREFIX = "PARAM_"
PARAMS_JSON = "PARAMS_JSON"


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


def params_env(params: Mapping[str, object]) -> dict[str, str]:
    """The environment a script gets for ``params``: ``PARAM_<NAME>`` per param (name upper-
    cased), and all of them as one JSON object in ``PARAMS_JSON``. Strings are passed as
    they are; numbers, booleans, lists and objects as JSON; null as the empty string. Nothing
    is ever interpreted by a shell."""
    if len(params) > MAX_PARAMS:
        raise InvalidInput(f"at most {MAX_PARAMS} params")
    env: dict[str, str] = {}
    for name, value in params.items():
        if not _PARAM_NAME.match(name):
            raise InvalidInput(
                f"param name {name!r} must be letters, digits and _, not starting with a digit"
            )
        key = PARAM_PREFIX + name.upper()
        if key in env:
            raise InvalidInput(f"two params become the same variable {key}: names ignore case")
        if isinstance(value, str):
            text = value
        elif value is None:
            text = ""
        else:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if "\x00" in text:
            raise InvalidInput(f"param {name!r} must not contain NUL")
        env[key] = text
    env[PARAMS_JSON] = json.dumps(params, ensure_ascii=False, separators=(",", ":"))
    if sum(len(k) + len(v) for k, v in env.items()) > MAX_PARAMS_BYTES:
        raise InvalidInput(f"params take more than {MAX_PARAMS_BYTES} bytes")
    return env

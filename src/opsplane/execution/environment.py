"""The environment a command starts with: an allow-list of the parent's variables, never all.

The processes that spawn commands hold credentials in their environment: an agent started
as the README shows has ``OPSPLANE_TOKEN``, the control plane has
``OPSPLANE_BOOTSTRAP_ADMIN_TOKEN`` and its database URL. Inheriting the whole environment
would hand them to every command an operator sends and to every catalog or seed-003 script.
So a child gets only the variables that describe the machine and the locale (``PATH``,
``HOME``, ``LANG``, ``LC_*``, ``TZ``, ``USER``, ``SHELL``…), the extra names an
administrator allowed (``env_passthrough``), and what the task itself sets — the task has
the last word. ``OPSPLANE_*`` is never passed from the parent, whatever the list says.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Final

from opsplane.domain.errors import InvalidInput

# What a login shell would give a command, and nothing that authenticates anyone.
DEFAULT_PASSTHROUGH: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TERM",
    "TMPDIR",
)
# opsplane's own settings and credentials: never inherited, not even when allowed by name.
NEVER_PREFIX: Final = "OPSPLANE_"


def check_passthrough(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or InvalidInput naming the first entry that cannot be used: a
    variable name, or a prefix ending in ``*`` (``LC_*``), never one of ``OPSPLANE_*``."""
    checked: list[str] = []
    for name in names:
        stem = name[:-1] if name.endswith("*") else name
        if not stem or not all(c.isalnum() or c == "_" for c in stem) or stem[0].isdigit():
            raise InvalidInput(
                f"env_passthrough: {name!r} is not a variable name or a prefix ending in '*'"
            )
        if stem.startswith(NEVER_PREFIX) or (stem != name and NEVER_PREFIX.startswith(stem)):
            raise InvalidInput(
                f"env_passthrough: {name!r} would pass opsplane's own settings and tokens "
                f"({NEVER_PREFIX}*) to commands; they are never passed"
            )
        checked.append(name)
    return tuple(checked)


def child_environment(
    task_env: Mapping[str, str] | None = None,
    *,
    passthrough: Iterable[str] = (),
    identity_env: Mapping[str, str] | None = None,
    parent: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The whole environment of a command: the allowed variables of ``parent`` (default: this
    process's), then ``identity_env`` (``HOME``/``USER``/``LOGNAME`` of a ``run_as`` user),
    then ``task_env``, each overriding the one before."""
    source = os.environ if parent is None else parent
    names: set[str] = set()
    prefixes: list[str] = []
    for entry in (*DEFAULT_PASSTHROUGH, *passthrough):
        if entry.endswith("*"):
            prefixes.append(entry[:-1])
        else:
            names.add(entry)
    env = {
        key: value
        for key, value in source.items()
        if not key.startswith(NEVER_PREFIX)
        and (key in names or any(key.startswith(prefix) for prefix in prefixes))
    }
    env.update(identity_env or {})
    env.update(task_env or {})
    return env

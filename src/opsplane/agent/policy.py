"""What an agent refuses to run, and as whom it runs the rest (docs/agent-policy.md).

Both are the agent's own settings, enforced on the host whatever the control plane sends:

* deny and allow patterns, regular expressions over the command text. A command matching a
  deny pattern anywhere (``re.search``) is refused; with an allow list, a command is refused
  unless one allow pattern matches all of it (``re.fullmatch``), so that allowing ``uptime``
  does not allow ``uptime; rm -rf /``. A refused command never starts.
* ``run_as``: the user every command runs as, which needs the agent to run as root.
* the account a command asks for (seed 002's ``user``, a task's ``run_as``): honoured as
  :class:`RunAsPolicy` says, else the command is refused and never starts.

Pattern matching on command text is a guard-rail against mistakes, not a sandbox: a shell
offers endless ways to spell a command. ``run_as`` is what actually limits what runs.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from opsplane.domain.errors import ConfigError
from opsplane.execution.identity import Identity

# An allow list in a refusal names at most this many patterns: the error field of a result
# is for people, not for a copy of the configuration.
_NAMED_IN_REFUSAL: Final = 5


@dataclass(frozen=True)
class Rule:
    """One deny or allow pattern, compiled."""

    kind: Literal["deny", "allow"]
    pattern: str
    regex: re.Pattern[str]

    @classmethod
    def compile(cls, kind: Literal["deny", "allow"], pattern: str) -> Rule:
        """The rule for ``pattern``; ConfigError if it is empty or not a regular expression."""
        if not pattern:
            # An empty deny pattern would refuse everything: surely not what was meant.
            raise ConfigError(f"{kind} pattern must not be empty")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(
                f"{kind} pattern '{pattern}' is not a valid regular expression: {e}"
            ) from e
        return cls(kind, pattern, regex)

    def matches(self, text: str) -> bool:
        """Deny rules match anywhere in ``text``; allow rules must match all of it."""
        if self.kind == "deny":
            return self.regex.search(text) is not None
        return self.regex.fullmatch(text) is not None


class CommandPolicy:
    """The deny and allow patterns of one agent; without any, every command may run."""

    def __init__(self, deny: Iterable[str] = (), allow: Iterable[str] = ()) -> None:
        self.deny = tuple(Rule.compile("deny", p) for p in deny)
        self.allow = tuple(Rule.compile("allow", p) for p in allow)

    @property
    def active(self) -> bool:
        """Whether any command can be refused."""
        return bool(self.deny or self.allow)

    def refusal(self, command: str | Sequence[str]) -> str | None:
        """Why ``command`` must not run, or None if it may.

        ``command`` is a shell command line, or an argv matched as its shell-quoted join
        (``shlex.join``). Deny rules are checked first: a command both denied and allowed
        is refused.
        """
        text = command_text(command)
        for rule in self.deny:
            if rule.matches(text):
                return f"refused by the agent's deny rule '{rule.pattern}'"
        if self.allow and not any(rule.matches(text) for rule in self.allow):
            named = ", ".join(f"'{r.pattern}'" for r in self.allow[:_NAMED_IN_REFUSAL])
            more = len(self.allow) - _NAMED_IN_REFUSAL
            if more > 0:
                named += f" and {more} more"
            return f"refused by the agent's allow list: the command matches none of {named}"
        return None


def command_text(command: str | Sequence[str]) -> str:
    """The text patterns are matched against: a command line as is, an argv shell-quoted."""
    if isinstance(command, str):
        return command
    return shlex.join(command)


def resolve_run_as(user: str, setting: str = "run_as") -> Identity:
    """The user named (or numbered) ``user``, checked to be one this agent can run as.

    ConfigError if there is no such user, or if it is another user and the agent is not root:
    both are mistakes to report at startup, not on every command. ``setting`` names the
    setting in the message.
    """
    if not user:
        raise ConfigError(f"{setting} must name a user (a name or a uid)")
    try:
        identity = Identity.lookup(user)
    except LookupError as e:
        raise ConfigError(f"{setting}: {e}") from e
    euid = os.geteuid()
    if euid != 0 and identity.uid != euid:
        raise ConfigError(
            f"{setting} {user!r} needs the agent to run as root; it runs as uid {euid}, "
            "and may only run commands as itself"
        )
    return identity


class RunAsRefused(Exception):
    """A command asked for an account this agent may not run it as; str() says why."""


@dataclass(frozen=True)
class RunAsPolicy:
    """Which accounts a command may ask for (docs/agent-policy.md, "Asked accounts").

    ``default`` is the account commands run as when none is asked (the configured
    ``run_as``, or None: the agent's own, ``own_uid``). Asking for that account is always
    fine. Another one needs the agent to be root, and to be in ``allowed`` when that is set;
    without ``allowed`` a root agent without ``run_as`` may switch to anyone (it could run
    anything as root already), while a configured ``run_as`` is the only account there is.
    """

    default: Identity | None = None
    allowed: frozenset[str] | None = None
    own_uid: int = -1
    root: bool = False

    @classmethod
    def of(cls, default: Identity | None, allowed: Iterable[str] | None) -> RunAsPolicy:
        """The policy of this process; ConfigError for an ``allowed`` user that does not exist
        or that a non-root agent could never switch to."""
        euid = os.geteuid()
        names: set[str] | None = None
        if allowed is not None:
            names = set()
            for user in allowed:
                names.add(resolve_run_as(user, "allowed_run_as").name)
        return cls(default, None if names is None else frozenset(names), euid, euid == 0)

    def identity_for(self, asked: str) -> Identity | None:
        """The identity a command asking for ``asked`` runs as (None: the agent's own, no
        switch); RunAsRefused, its message for the run's error, when it may not run."""
        if not asked:
            return self.default
        try:
            identity = Identity.lookup(asked)
        except (LookupError, ValueError):
            # ValueError: a name no user database accepts (a NUL byte in it, say).
            raise RunAsRefused(_refused(asked, "no such user on this host")) from None
        default_uid = self.default.uid if self.default is not None else self.own_uid
        if identity.uid == default_uid:
            return self.default
        if self.allowed is not None:
            if identity.name not in self.allowed:
                listed = ", ".join(sorted(self.allowed)) or "none"
                raise RunAsRefused(_refused(asked, f"not in the agent's allowed_run_as ({listed})"))
        elif self.default is not None:
            raise RunAsRefused(
                _refused(
                    asked,
                    f"the agent runs commands as {self.default.name} only (its run_as); "
                    "list other accounts in allowed_run_as",
                )
            )
        if not self.root:
            raise RunAsRefused(
                _refused(
                    asked,
                    f"the agent is not root (uid {self.own_uid}) and runs commands only as "
                    "its own account",
                )
            )
        return identity


def _refused(asked: str, why: str) -> str:
    # Cut: the name comes from the message, and the error is for people, not a copy of it.
    return f"run-as {asked[:64]} refused: {why}; not executed"


def working_dir(identity: Identity) -> str:
    """Where commands run as ``identity`` start: its home, or ``/`` if that is no directory.

    Not the agent's own directory, which the user may be unable to enter.
    """
    return identity.home if os.path.isdir(identity.home) else "/"

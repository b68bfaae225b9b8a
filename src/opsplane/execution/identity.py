"""Who a command runs as: a user of this host, its groups, and the environment naming it."""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# Switches user, then execs the command in its place (same pid, so the same process group).
#
# Not subprocess's user=/group=/extra_groups=: with those it must fork() rather than vfork(),
# and fork() runs gRPC's atfork handlers, which crash the child now and then (SIGSEGV/SIGABRT
# before exec) and can break the agent's own gRPC polling. The helper is spawned like any
# other command (vfork, no preexec_fn). It restores the signals Python ignores at startup,
# which exec would otherwise pass on to the command (a shell pipeline ignoring SIGPIPE).
# Everything it imports is imported before the switch: the user may not be able to read
# Python's own library (one installed under /root, say), and os.execvp imports warnings.
_SWITCH_USER: Final = """\
import os, signal, sys, warnings
for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ"):
    if hasattr(signal, name):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
uid, gid, groups, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
try:
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
except OSError as e:
    sys.stderr.write(f"cannot switch to uid {uid}: {e}\\n")
    sys.exit(126)
try:
    os.execvp(argv[0], argv)
except OSError as e:
    sys.stderr.write(f"could not start {argv[0]}: {e}\\n")
    sys.exit(127)
"""


@dataclass(frozen=True)
class Identity:
    """A user of this host that a command runs as, resolved once from the user database.

    ``groups`` are the supplementary groups the command gets: the user's own, as at login.
    They replace the parent's, so that a command dropped from root keeps none of root's.
    """

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, user: str) -> Identity:
        """The user called ``user``, or with that numeric uid; LookupError if there is none."""
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise LookupError(f"no user {user!r} on this host") from None
            try:
                entry = pwd.getpwuid(int(user))
            except (KeyError, OverflowError):
                raise LookupError(f"no user with uid {user} on this host") from None
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
        return cls(
            name=entry.pw_name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            groups=tuple(dict.fromkeys(groups)),
            home=entry.pw_dir,
        )

    def env(self) -> dict[str, str]:
        """What a login would set to name this user."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def argv_for(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` as this user: through :data:`_SWITCH_USER`, or as is.

        As is when the child would be this user anyway: then there is nothing to switch, and
        an unprivileged process could not set groups, not even those it already has.
        """
        euid = os.geteuid()
        if euid != 0 and euid == self.uid:
            return list(argv)
        groups = ",".join(str(g) for g in self.groups)
        return [
            sys.executable, "-I", "-S", "-c", _SWITCH_USER,
            str(self.uid), str(self.gid), groups, *argv,
        ]  # fmt: skip

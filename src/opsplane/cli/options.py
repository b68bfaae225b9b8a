"""What the root ``opsplane`` callback hands to every client verb, in a module light enough for
``cli/main.py`` to import before it knows which verb runs (cli/lazy.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ClientOptions:
    """Where the API is and how to authenticate; the CLI callback stores it as ``ctx.obj``."""

    url: str
    token: str | None = None


#: Settings for ``opsplane run``: words after the first COMMAND word are not options, so
#: ``opsplane run --all uname -a`` works as well as ``opsplane run --all -- uname -a``.
RUN_CONTEXT_SETTINGS = {"allow_interspersed_args": False}

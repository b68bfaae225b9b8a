"""Verbs of the ``opsplane`` app that are imported only when invoked.

``opsplane run`` needs httpx and rich, ``opsplane audit verify`` needs cryptography,
``opsplane scripts`` the settings (pydantic): importing every verb group to start any one of
them cost most of the CLI's start-up (docs/scale.md, "CLI start-up"). The root group knows each lazy
verb by its name and one line of help; ``opsplane --help`` lists them from that, and the verb's
module is imported when the verb is resolved (to run it, or to print its own help).

Typer vendors its own copy of click in recent releases, so the click objects here are only
ever Typer's (``TyperCommand``, the context it passes): this module never imports ``click``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

import typer
from typer.core import DEFAULT_MARKUP_MODE, TyperCommand, TyperGroup
from typer.models import CommandInfo


@dataclass(frozen=True)
class LazyVerb:
    """A verb defined in ``module``: ``attribute`` is a ``typer.Typer`` (a verb group) or a
    command function. ``help`` is what ``opsplane --help`` lists without importing it."""

    module: str
    attribute: str
    help: str
    context_settings: Mapping[str, Any] = field(default_factory=dict)

    def load(self, name: str) -> Any:
        """The verb as Typer builds it (a ``TyperGroup`` or a ``TyperCommand``)."""
        target = getattr(importlib.import_module(self.module), self.attribute)
        if isinstance(target, typer.Typer):
            group = typer.main.get_group(target)
            group.name, group.help = name, self.help
            return group
        info = CommandInfo(name=name, callback=target, context_settings=dict(self.context_settings))
        return typer.main.get_command_from_info(
            info, pretty_exceptions_short=True, rich_markup_mode=DEFAULT_MARKUP_MODE
        )


class LazyGroup(TyperGroup):
    """A Typer root group whose ``lazy`` verbs are imported on first resolution.

    Subclass and set ``lazy`` (name → verb) and ``order`` (how ``--help`` lists the names;
    any name not in it comes after)."""

    lazy: Mapping[str, LazyVerb] = {}
    order: tuple[str, ...] = ()

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self._loaded: dict[str, Any] = {}
        self._listing = False

    def list_commands(self, ctx: Any) -> list[str]:
        rank: dict[str, int] = {}
        for name in self.order:
            rank.setdefault(name, len(rank))
        names = [*self.lazy, *super().list_commands(ctx)]
        return sorted(names, key=lambda n: rank.get(n, len(rank)))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        verb = self.lazy.get(cmd_name)
        if verb is None:
            return super().get_command(ctx, cmd_name)
        if cmd_name in self._loaded:
            return self._loaded[cmd_name]
        if self._listing:
            # ``opsplane --help`` shows only the name and the line of help.
            return TyperCommand(cmd_name, help=verb.help, short_help=verb.help)
        command = self._loaded[cmd_name] = verb.load(cmd_name)
        return command

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        # Typer suggests a verb for a typo from the verbs it holds; the lazy ones count too.
        names = self.list_commands(ctx)
        if args and args[0] not in names and not ctx.resilient_parsing:
            matches = get_close_matches(args[0], names)
            if matches:
                suggestions = ", ".join(repr(m) for m in matches)
                ctx.fail(f"No such command {args[0]!r}. Did you mean {suggestions}?")
        return super().resolve_command(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

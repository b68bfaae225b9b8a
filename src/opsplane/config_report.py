"""The settings as an operator reads them: ``opsplane config show`` (each setting's effective
value and where it came from, secrets masked) and docs/configuration.md (the reference,
generated from :class:`~opsplane.config.Settings`, so that it cannot drift from the code)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import EnvSettingsSource, YamlConfigSettingsSource

from opsplane.config import Settings
from opsplane.domain.addresses import mask_url

Source = Literal["flag", "env", "file", "default"]

# Settings whose value is a credential: shown only as set or not.
SECRET_SETTINGS = frozenset({"bootstrap_admin_token"})
# Settings holding URLs, which may carry a password.
URL_SETTINGS = frozenset(
    {"database_url", "amqp_url", "public_url", "alert_webhooks", "audit_checkpoint_webhooks"}
)
# A default longer than this is not spelled out in the reference.
_MAX_DEFAULT = 60


@dataclass(frozen=True)
class ShownSetting:
    name: str
    value: str
    source: Source


def shown_settings(settings: Settings, flags: Mapping[str, Any]) -> list[ShownSetting]:
    """Every setting's effective value (secrets masked) and its source: ``flags`` are the
    overrides the command line gave (None: not given), as for :func:`load_settings`."""
    env = _keys_given(EnvSettingsSource(Settings)())
    file: set[str] = set()
    if settings.config_file is not None:
        file = _keys_given(YamlConfigSettingsSource(Settings, yaml_file=settings.config_file)())
    shown = []
    for name in Settings.model_fields:
        source: Source
        if flags.get(name) is not None:
            source = "flag"
        elif name in env:
            source = "env"
        elif name in file:
            source = "file"
        else:
            source = "default"
        shown.append(ShownSetting(name, _masked(name, getattr(settings, name)), source))
    return shown


def reference_markdown() -> str:
    """docs/configuration.md: one row per setting, from the settings class itself."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `opsplane.config.Settings` by `opsplane config reference`; a test fails",
        "when this file is stale. Every setting has one name in three places (DESIGN §4): a YAML",
        "key of the `--config` file, an environment variable, and, for the settings",
        "`opsplane server` lists in `--help`, a flag; precedence is flag > environment > file >",
        "default. `opsplane config show` prints the effective values and where each came from.",
        "",
        "| setting (YAML key) | environment | type | default | what it does |",
        "|---|---|---|---|---|",
    ]
    for name, info in Settings.model_fields.items():
        env = " / ".join(f"`{variable}`" for variable in _env_names(name, info))
        lines.append(
            f"| `{name}` | {env} | {_type_name(info)} | {_default_text(info)} | "
            f"{_cell(info.description or '')} |"
        )
    return "\n".join(lines) + "\n"


def _keys_given(values: Mapping[str, Any]) -> set[str]:
    """Field names of a source's values, whichever alias the source used for each."""
    given = set(values)
    for name, info in Settings.model_fields.items():
        if any(key in given for key in _aliases(info)):
            given.add(name)
    return given


def _aliases(info: FieldInfo) -> list[str]:
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return [alias] if isinstance(alias, str) else []


def _env_names(name: str, info: FieldInfo) -> list[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return _aliases(info) or [f"{prefix}{name}".upper()]


def _masked(name: str, value: Any) -> str:
    if value is None:
        return "—"
    if name in SECRET_SETTINGS:
        return "(set)"
    if name in URL_SETTINGS:
        value = [mask_url(v) for v in value] if isinstance(value, list) else mask_url(value)
    return _text(value)


def _text(value: Any) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value, default=str)


def _type_name(info: FieldInfo) -> str:
    text = str(info.annotation).replace("typing.", "").replace("pathlib.", "")
    return _cell(text.replace("<class '", "").replace("'>", ""))


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        if getattr(info.default_factory, "__name__", "") == "_default_data_dir":
            return "`$XDG_DATA_HOME/opsplane` (`~/.local/share/opsplane`)"
        default: Any = info.default_factory()  # type: ignore[call-arg]
    elif info.default is PydanticUndefined:
        return "required"
    else:
        default = info.default
    if default is None:
        return "—"
    text = _text(default)
    if len(text) > _MAX_DEFAULT:
        return "(long: see `opsplane config show`)"
    return f"`{_cell(text)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")

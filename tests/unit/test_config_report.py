"""``opsplane config show`` and the generated settings reference (docs/configuration.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opsplane.cli.main import app
from opsplane.config import Settings
from opsplane.config_report import reference_markdown

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_reference_in_docs_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == reference_markdown(), (
        "docs/configuration.md is stale: run `opsplane config reference > docs/configuration.md`"
    )


def test_every_setting_is_described_in_the_reference() -> None:
    text = reference_markdown()
    for name, info in Settings.model_fields.items():
        assert info.description, f"setting {name} has no description"
        assert f"| `{name}` |" in text


def test_show_names_each_settings_source_and_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "opsplane.yaml"
    config.write_text("listen: 127.0.0.9:8000\nalert_webhooks: [https://u:hook-pw@h/x]\n")
    monkeypatch.setenv("OPSPLANE_AMQP_URL", "amqp://agent:mq-pw@rabbit:5672/")
    monkeypatch.setenv("OPSPLANE_BOOTSTRAP_ADMIN_TOKEN", "tok-secret")
    monkeypatch.setenv("CS_EXTERNAL_TASK", str(tmp_path / "catalog.yaml"))
    args = ["config", "show", "--json", "--config", str(config), "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    shown = {row["name"]: row for row in map(json.loads, result.output.splitlines())}
    assert set(shown) == set(Settings.model_fields)
    assert shown["data_dir"] == {"name": "data_dir", "value": str(tmp_path), "source": "flag"}
    assert (shown["listen"]["value"], shown["listen"]["source"]) == ("127.0.0.9:8000", "file")
    assert shown["amqp_url"] == {
        "name": "amqp_url",
        "value": "amqp://agent:******@rabbit:5672/",
        "source": "env",
    }
    assert shown["catalog"]["source"] == "env"  # the seed's own variable counts as env
    assert shown["bootstrap_admin_token"]["value"] == "(set)"
    assert shown["grpc_listen"]["source"] == "default"
    for secret in ("mq-pw", "tok-secret", "hook-pw"):
        assert secret not in result.output


def test_show_refuses_a_bad_setting_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSPLANE_LISTEN", "nowhere")
    result = CliRunner().invoke(app, ["config", "show", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "expected HOST:PORT" in result.output

"""``opsplane catalog-service run``: seed 004's ``celery-service run`` flags and variables, each
mapped to opsplane's setting (the process itself: tests/e2e/test_catalog_api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from opsplane.cli.catalog_service import SeedFlags, to_settings
from opsplane.cli.main import app
from opsplane.domain.errors import ConfigError


def test_address_is_listen_and_gos_port_only_form_means_every_interface() -> None:
    assert to_settings(SeedFlags(address="10.0.0.5:8080"))[0] == {"listen": "10.0.0.5:8080"}
    assert to_settings(SeedFlags(address=":80"))[0] == {"listen": "0.0.0.0:80"}


def test_the_result_database_flags_make_opsplanes_database_url() -> None:
    flags = SeedFlags(db_address="db:3306", db_user="cs", db_password="p@ss:/", db_name="results")
    settings, warnings = to_settings(flags)
    assert settings == {"database_url": "mysql+asyncmy://cs:p%40ss%3A%2F@db:3306/results"}
    assert "all of its state" in warnings[0]
    no_user = to_settings(SeedFlags(db_address="db", db_name="r"))[0]
    assert no_user == {"database_url": "mysql+asyncmy://db/r"}


@pytest.mark.parametrize(
    "flags",
    [
        SeedFlags(db_address="db:3306"),
        SeedFlags(db_name="results", db_user="cs"),
        SeedFlags(db_address="db", db_name="r", db_password="p"),
    ],
)
def test_incomplete_database_flags_are_refused_with_the_reason(flags: SeedFlags) -> None:
    with pytest.raises(ConfigError, match="--db-"):
        to_settings(flags)


def test_catalog_and_log_console_flags(tmp_path: Path) -> None:
    settings, warnings = to_settings(SeedFlags(external_task_config=tmp_path / "e.yaml"))
    assert settings == {"catalog": tmp_path / "e.yaml"} and warnings == []
    assert to_settings(SeedFlags(log_console=True)) == ({}, [])
    settings, warnings = to_settings(SeedFlags(log_console=False))
    assert settings == {} and "stderr" in warnings[0]


def test_the_seeds_help_flags_are_accepted() -> None:
    runner = CliRunner()
    for flag in ("--help", "--help-long", "--help-man"):
        result = runner.invoke(app, ["catalog-service", "run", flag])
        assert result.exit_code == 0 and "--db-address" in result.output, result.output


def test_a_bad_flag_combination_exits_2_without_a_traceback() -> None:
    result = CliRunner().invoke(app, ["catalog-service", "run", "--db-address", "db:3306"])
    assert result.exit_code == 2 and "--db-address and --db-name go together" in result.output

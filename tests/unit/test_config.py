from __future__ import annotations

from pathlib import Path

import pytest

from opsplane.config import is_loopback, load_settings, split_host_port
from opsplane.domain.errors import ConfigError


def test_precedence_is_flag_then_env_then_file_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "opsplane.yaml"
    config.write_text(
        "listen: 127.0.0.1:7001\ngrpc_listen: 127.0.0.1:7002\nheartbeat_interval: 7\n"
    )
    monkeypatch.setenv("OPSPLANE_CONFIG_FILE", str(config))
    monkeypatch.setenv("OPSPLANE_GRPC_LISTEN", "127.0.0.1:7102")
    settings = load_settings(listen=None, grpc_listen=None, data_dir=tmp_path)
    assert settings.listen == "127.0.0.1:7001"  # file
    assert settings.grpc_listen == "127.0.0.1:7102"  # env beats file
    assert settings.heartbeat_interval == 7
    assert settings.default_timeout == 600  # default
    assert load_settings(grpc_listen="127.0.0.1:7202").grpc_listen == "127.0.0.1:7202"  # flag


def test_default_database_is_sqlite_in_the_data_directory(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    assert settings.effective_database_url == f"sqlite+aiosqlite:///{tmp_path / 'opsplane.db'}"


def test_bad_values_and_missing_config_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load_settings(listen="8000")
    with pytest.raises(ConfigError, match="not found"):
        load_settings(config_file=tmp_path / "missing.yaml")


def test_host_port_parsing_and_loopback() -> None:
    assert split_host_port("[::1]:50051") == ("::1", 50051)
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.1") and not is_loopback("example.org")

"""``opsplane hosts add --link amqp``: the inventory entry of a RabbitMQ agent's host (issue 16
item 2). What the CLI refuses before it calls the API; the API path is tested in
tests/integration/test_seed002_agents.py."""

from __future__ import annotations

from typer.testing import CliRunner

from opsplane.cli.main import app


def test_hosts_add_checks_link_and_ssh_before_calling_the_api() -> None:
    runner = CliRunner()
    # The URL answers nothing: these must be refused before any request is made.
    base = ["--url", "http://127.0.0.1:9", "hosts", "add", "web-7"]
    cases = {
        "--link amqp takes no --ssh": [*base, "--link", "amqp", "--ssh", "ops@10.0.0.7"],
        "--link ssh needs --ssh": [*base, "--group", "web"],
        "--link is ssh or amqp": [*base, "--link", "grpc"],
    }
    for message, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output

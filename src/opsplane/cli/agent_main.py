"""``opsplane-agent``, which ``opsplane agent`` is: the agent daemon's whole command line.

argparse, not Typer, and nothing else of the CLI: Typer validates parameters with pydantic,
and the ``opsplane`` app imports every client verb and their rich output; an idle agent
would hold all of that (docs/scale.md, "Agent footprint"). ``cli/entry.py`` hands
``opsplane agent …`` to :func:`main` before the full app is imported; the full app's
``agent`` verb (``opsplane --url … agent …``) forwards its arguments here too, so both
spellings take the same flags and print the same help.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from opsplane.domain.addresses import DEFAULT_GRPC_ENDPOINT as DEFAULT_SERVER
from opsplane.domain.errors import ConfigError

if TYPE_CHECKING:
    from opsplane.agent.config import AgentConfig

# Everything else is imported in main(), once the flags say which link the agent uses: see
# _without_python_ssl.

DESCRIPTION = (
    "Start an agent: dial the control plane (or join RabbitMQ with --amqp-url), run what it "
    "sends, stream results back."
)


def parser(prog: str = "opsplane-agent") -> argparse.ArgumentParser:
    """The agent's flags; each ``OPSPLANE_AGENT_*`` variable named in a help text is the
    flag's default."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add = p.add_argument
    add(
        "--server",
        default=env("OPSPLANE_AGENT_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT[,HOST:PORT...]",
        help="control plane HOST:PORT; a comma-separated list names several instances, "
        f"tried in turn [env OPSPLANE_AGENT_SERVER; {DEFAULT_SERVER}]",
    )
    add(
        "--name",
        default=env("OPSPLANE_AGENT_NAME"),
        help="host name [env OPSPLANE_AGENT_NAME; hostname]",
    )
    add("--group", action="append", default=[], help="group membership (repeatable)")
    add("--label", action="append", default=[], metavar="KEY=VALUE", help="label (repeatable)")
    add(
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=env("OPSPLANE_AGENT_STATE_DIR"),
        help="durable spool of runs and results [env OPSPLANE_AGENT_STATE_DIR; "
        "~/.local/share/opsplane-agent/NAME]",
    )
    # TLS (issue 9, docs/tls.md).
    add(
        "--tls-ca",
        metavar="PATH",
        type=Path,
        default=env("OPSPLANE_AGENT_TLS_CA"),
        help="CA certificate: connect with TLS, verifying the server against this CA only "
        "(the control plane's <data dir>/tls/ca.pem) [env OPSPLANE_AGENT_TLS_CA]",
    )
    add(
        "--tls-cert",
        metavar="PATH",
        type=Path,
        default=env("OPSPLANE_AGENT_TLS_CERT"),
        help="client certificate for mutual TLS (opsplane keys client-cert NAME) "
        "[env OPSPLANE_AGENT_TLS_CERT]",
    )
    add(
        "--tls-key",
        metavar="PATH",
        type=Path,
        default=env("OPSPLANE_AGENT_TLS_KEY"),
        help="the client certificate's key [env OPSPLANE_AGENT_TLS_KEY]",
    )
    add(
        "--tls-server-name",
        metavar="NAME",
        help="check the server's certificate for this name, not --server's host",
    )
    add(
        "--amqp-tls-ca",
        metavar="PATH",
        type=Path,
        help="CA that RabbitMQ's certificate must chain to (amqps://) [system CAs]",
    )
    add(
        "--amqp-tls-cert",
        type=Path,
        metavar="PATH",
        help="client certificate for RabbitMQ (amqps://)",
    )
    add("--amqp-tls-key", type=Path, metavar="PATH", help="the RabbitMQ client certificate's key")
    add(
        "--allow-plaintext",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="allow plaintext to a non-loopback server (trusted networks)",
    )
    add(
        "--amqp-url",
        metavar="URL",
        default=env("OPSPLANE_AGENT_AMQP_URL"),
        help="RabbitMQ URL (amqp://, amqps://): use the RabbitMQ link; --server is unused "
        "[env OPSPLANE_AGENT_AMQP_URL]",
    )
    add(
        "--control-plane-key",
        metavar="KEY",
        default=env("OPSPLANE_AGENT_CONTROL_PLANE_KEY"),
        help="the control plane's public key (base64, or a file): required with --amqp-url "
        "[env OPSPLANE_AGENT_CONTROL_PLANE_KEY]",
    )
    add(
        "--heartbeat-interval",
        metavar="SECONDS",
        type=float,
        default=env("OPSPLANE_AGENT_HEARTBEAT_INTERVAL", "10.0"),
        help="seconds between heartbeats on RabbitMQ; must match the control plane's "
        "[env OPSPLANE_AGENT_HEARTBEAT_INTERVAL; 10]",
    )
    add(
        "--output-spool-bytes",
        metavar="BYTES",
        type=int,
        default=env("OPSPLANE_AGENT_OUTPUT_SPOOL_BYTES", str(256 * 1024 * 1024)),
        help="disk kept for output not yet delivered, all runs together; beyond it output is "
        "lost (and marked so) [env OPSPLANE_AGENT_OUTPUT_SPOOL_BYTES; 268435456]",
    )
    add(
        "--replay-window",
        metavar="SECONDS",
        type=float,
        default=env("OPSPLANE_AGENT_REPLAY_WINDOW", "300.0"),
        help="refuse RabbitMQ commands whose timestamp is further off than this (seconds) "
        "[env OPSPLANE_AGENT_REPLAY_WINDOW; 300]",
    )
    # Agent-side policy (issue 9, docs/agent-policy.md).
    add(
        "--deny",
        action="append",
        default=[],
        metavar="PATTERN",
        help="refuse commands this regular expression matches anywhere (repeatable)",
    )
    add(
        "--allow",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only commands one of these regular expressions matches whole (repeatable)",
    )
    add(
        "--run-as",
        default=env("OPSPLANE_AGENT_RUN_AS"),
        metavar="USER",
        help="run every command as this user (name or uid); needs the agent to be root "
        "[env OPSPLANE_AGENT_RUN_AS]",
    )
    add(
        "--allow-run-as",
        action="append",
        default=None,
        metavar="USER",
        help="a command may ask to run as this user (repeatable); without any, a root agent "
        "without --run-as may run a command as any user it asks for (docs/agent-policy.md)",
    )
    add(
        "--env-passthrough",
        action="append",
        default=[],
        metavar="NAME",
        help="also pass this variable of the agent's environment to commands (a name, or a "
        "prefix ending in '*'; repeatable; never OPSPLANE_*)",
    )
    add(
        "--upload-root",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a directory uploads may write under (repeatable; none: uploads are refused; "
        "docs/filepush.md)",
    )
    add(
        "--upload-part-max-age",
        type=float,
        default=24 * 3600.0,
        metavar="SECONDS",
        help="at start, delete the temporary files of interrupted uploads untouched this long "
        "(younger ones are kept to resume from; default: a day)",
    )
    # Enrollment (issue 9, docs/security.md).
    add(
        "--enroll",
        dest="enroll_token",
        default=env("OPSPLANE_AGENT_ENROLL_TOKEN"),
        metavar="TOKEN",
        help="enroll once with this token (opsplane agents token), then run "
        "[env OPSPLANE_AGENT_ENROLL_TOKEN]",
    )
    add(
        "--api-url",
        metavar="URL",
        default=env("OPSPLANE_AGENT_API_URL"),
        help="the control plane's HTTP API, for --enroll (https with --tls-ca) "
        "[env OPSPLANE_AGENT_API_URL]",
    )
    add("-v", "--verbose", action="store_true", help="debug logging")
    add(
        "--log-format",
        choices=("text", "json"),
        default=env("OPSPLANE_LOG_FORMAT", "text"),
        help="text, or json: one object per line with run_id where one applies "
        "[env OPSPLANE_LOG_FORMAT; text]",
    )
    return p


def config_from(args: argparse.Namespace) -> AgentConfig:
    """The agent's settings from its parsed flags, after enrolling (``--enroll``) or reading an
    earlier enrollment; ConfigError says what is wrong."""
    from opsplane.agent.config import AgentConfig, default_state_dir

    labels: dict[str, str] = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label wants KEY=VALUE, got {item!r}")
        labels[key] = value
    name = args.name or socket.gethostname()
    groups, pinned_key = _enrollment(
        name,
        args.state_dir or default_state_dir(name),
        args.enroll_token,
        args.api_url,
        groups=tuple(args.group),
        ca=args.tls_ca,
    )
    config = AgentConfig(
        server=args.server,
        name=name,
        groups=groups,
        labels=labels,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name or None,
        amqp_tls_ca=args.amqp_tls_ca,
        amqp_tls_cert=args.amqp_tls_cert,
        amqp_tls_key=args.amqp_tls_key,
        allow_plaintext=args.allow_plaintext,
        amqp_url=args.amqp_url or None,
        control_plane_key=args.control_plane_key or pinned_key,
        heartbeat_interval=args.heartbeat_interval,
        replay_window=args.replay_window,
        output_spool_bytes=args.output_spool_bytes,
        deny=tuple(args.deny),
        allow=tuple(args.allow),
        run_as=args.run_as or None,
        allowed_run_as=tuple(args.allow_run_as) if args.allow_run_as is not None else None,
        env_passthrough=tuple(args.env_passthrough),
        upload_roots=tuple(args.upload_root),
        upload_part_max_age=args.upload_part_max_age,
    )
    if args.state_dir is not None:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    return config


def _enrollment(
    name: str,
    state_dir: Path,
    token: str | None,
    api_url: str | None,
    *,
    groups: tuple[str, ...],
    ca: Path | None,
) -> tuple[tuple[str, ...], str | None]:
    """The agent's groups and pinned control-plane key: enroll now (``--enroll``), or read an
    earlier enrollment from the state directory; without either, the given groups and no key.
    An enrolled agent takes its token's groups; asking for others is refused."""
    from opsplane.agent.enroll import PINNED_KEY_FILE, enroll, enrolled

    if token:
        if not api_url:
            raise ConfigError("--enroll needs --api-url: where the control plane's API listens")
        enrollment = enroll(api_url, token, name, state_dir, ca=ca)
        groups_text = ", ".join(enrollment.groups) or "-"
        print(f"enrolled as {enrollment.name} for groups: {groups_text}", file=sys.stderr)
    else:
        found = enrolled(state_dir)
        if found is None:
            return groups, None
        enrollment = found
    if enrollment.name != name:
        raise ConfigError(f"{state_dir} holds the enrollment of {enrollment.name}, not {name}")
    extra = set(groups) - set(enrollment.groups)
    if extra:
        raise ConfigError(f"--group {', '.join(sorted(extra))}: not allowed by the enrollment")
    return groups or enrollment.groups, str(state_dir / PINNED_KEY_FILE)


def _without_python_ssl() -> None:
    """Keep Python's ``ssl`` module (and the system OpenSSL it maps, 4 MiB of RSS) out of a
    gRPC agent that does not enroll now.

    Such an agent never uses it: gRPC brings its own TLS (BoringSSL, inside grpcio), and only
    the RabbitMQ link (aio-pika, amqps://) and enrollment (httpx) speak TLS through ``ssl``.
    asyncio imports it anyway, for its TLS transports, and does without it when the import
    fails, which a ``None`` in ``sys.modules`` makes it do. A process that has imported
    ``ssl`` already (``opsplane --url … agent`` through the full app) keeps it.
    """
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]


def _fail(message: str) -> NoReturn:
    # Red on a terminal, as the Typer verbs print their errors.
    red = sys.stderr.isatty()
    print(f"\033[31merror: {message}\033[0m" if red else f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None, prog: str = "opsplane-agent") -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the agent in the foreground until
    SIGTERM or SIGINT; exit status 2 for bad flags or settings."""
    args = parser(prog).parse_args(sys.argv[1:] if argv is None else list(argv))
    if not (args.amqp_url or args.enroll_token):
        _without_python_ssl()
    from opsplane.agent.daemon import run_agent
    from opsplane.cli.logs import configure_logging

    try:
        config = config_from(args)
    except ConfigError as e:
        _fail(str(e))
    configure_logging(args.verbose, args.log_format)
    try:
        run_agent(config)
    except ConfigError as e:  # e.g. an unreadable agent key or a state dir in use
        _fail(str(e))

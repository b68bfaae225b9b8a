"""Settings: one pydantic-settings class, built in the entry point and passed down.

Every setting has one name in three places (DESIGN §4): flag ``--database-url``, environment
``OPSPLANE_DATABASE_URL``, YAML key ``database_url``; precedence flag > env > file > default.

One class on purpose, longer than the house's 500 lines: each field carries the description
that ``opsplane config show`` and docs/configuration.md are generated from (config_report.py).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

# Re-exported: the control plane's modules import them from here.
from opsplane.domain.addresses import is_loopback as is_loopback
from opsplane.domain.addresses import split_host_port as split_host_port
from opsplane.domain.errors import ConfigError, InvalidInput
from opsplane.domain.redaction import DEFAULT_REDACT_PATTERNS, Redactor
from opsplane.execution.environment import check_passthrough

DEFAULT_LISTEN = "127.0.0.1:8000"
DEFAULT_GRPC_LISTEN = "127.0.0.1:50051"


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "opsplane"


class Settings(BaseSettings):
    """Control-plane and agent settings."""

    # populate_by_name: a field with env aliases (catalog) still takes its own name as a flag
    # override and as a YAML key.
    model_config = SettingsConfigDict(env_prefix="OPSPLANE_", extra="ignore", populate_by_name=True)

    config_file: Path | None = Field(
        default=None,
        description="YAML file with settings (keys are the settings' names)",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="data directory: the SQLite database, run logs, keys, TLS files",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the database (MySQL/MariaDB, PostgreSQL); default: SQLite in the "
            "data directory"
        ),
    )
    listen: str = Field(default=DEFAULT_LISTEN, description="HTTP API and page address HOST:PORT")
    grpc_listen: str = Field(
        default=DEFAULT_GRPC_LISTEN, description="gRPC agent endpoint HOST:PORT"
    )
    grpc_allow_insecure: bool = Field(
        default=False,
        description="serve gRPC in plaintext on a non-loopback address (a trusted network only)",
    )
    grpc_tls_cert: Path | None = Field(
        default=None,
        description=(
            "gRPC server certificate (PEM); default: <data dir>/tls/server.pem once `opsplane "
            "keys init` made it (docs/tls.md)"
        ),
    )
    grpc_tls_key: Path | None = Field(default=None, description="the gRPC server certificate's key")
    # TLS (docs/tls.md). Without grpc_tls_cert/key the gRPC endpoint serves <data_dir>/tls/
    # server.pem once `opsplane keys init` made it. grpc_tls_client_ca: require client
    # certificates signed by this CA (mutual TLS). tls_cert/tls_key: HTTPS for the API
    # (`listen`). amqp_tls_*: the CA and client certificate for an amqps:// amqp_url.
    grpc_tls_client_ca: Path | None = Field(
        default=None, description="require gRPC client certificates signed by this CA (mutual TLS)"
    )
    tls_cert: Path | None = Field(
        default=None, description="certificate (PEM): serve the API over HTTPS"
    )
    tls_key: Path | None = Field(default=None, description="the HTTPS certificate's key")
    amqp_tls_ca: Path | None = Field(
        default=None,
        description="CA that an amqps:// amqp_url's server certificate is checked against",
    )
    amqp_tls_cert: Path | None = Field(
        default=None, description="client certificate for an amqps:// amqp_url"
    )
    amqp_tls_key: Path | None = Field(default=None, description="the AMQP client certificate's key")
    # Agentless hosts (seed 000): host keys verified against known_hosts on every hop.
    ssh_known_hosts: Path | None = Field(
        default=None,
        description="OpenSSH known_hosts checked on every SSH hop; default ~/.ssh/known_hosts",
    )
    ssh_trust_on_first_use: bool = Field(
        default=False, description="accept and record unknown SSH host keys (never changed ones)"
    )
    ssh_max_parallel: int = Field(default=50, gt=0, description="SSH runs executed at once")
    # SSH runs go to `opsplane worker` processes over RabbitMQ (needs amqp_url; docs/ssh.md).
    ssh_workers: bool = Field(
        default=False,
        description=(
            "send SSH runs to `opsplane worker` processes over RabbitMQ (needs amqp_url; "
            "docs/ssh.md)"
        ),
    )
    upload_roots: list[Path] = Field(
        default_factory=list,
        description="directories whose files upload tasks may send; default: <data dir>/uploads",
    )
    upload_max_bytes: int = Field(
        default=1024 * 1024 * 1024,
        gt=0,
        description="the most bytes one upload task may send (docs/filepush.md)",
    )
    # Jump chains by group ("web": "ops@edge:22,ops@inner"), for SSH hosts added without one.
    ssh_group_bastions: dict[str, str] = Field(
        default_factory=dict,
        description=(
            'jump chains by group ("web": "ops@edge:22,ops@inner") for SSH hosts added without one'
        ),
    )
    # Seed 000's configured defaults; request values override them.
    ssh_proxy: str = Field(
        default="",
        description=(
            "seed 000: the default bastion (jump host) of ad-hoc SSH targets; a request's own "
            "overrides it"
        ),
    )
    ssh_proxy_key_file: str | None = Field(
        default=None, description="seed 000: the private key for ssh_proxy"
    )
    ssh_user: str | None = Field(
        default=None, description="seed 000: the default SSH user of ad-hoc targets"
    )
    ssh_key_file: str | None = Field(
        default=None, description="seed 000: the default private key of ad-hoc targets"
    )
    # RabbitMQ link (seed 002): off unless a URL is given.
    amqp_url: str | None = Field(
        default=None,
        description="RabbitMQ URL: enables the RabbitMQ link (seed 002); off when unset",
    )
    amqp_queue_type: Literal["classic", "quorum"] = Field(
        default="classic",
        description=(
            "type of the durable queues (cmd.result, monitor.heartbeat, ssh.work) when this "
            "instance creates them; quorum: replicated by a RabbitMQ cluster "
            "(docs/deployment.md); an existing queue is used as it is"
        ),
    )

    heartbeat_interval: float = Field(
        default=10.0,
        gt=0,
        description=(
            "seconds between two agent heartbeats (RabbitMQ agents), and the monitor's pace"
        ),
    )
    offline_after_missed: int = Field(
        default=3, ge=1, description="heartbeats missed before a RabbitMQ agent's host is offline"
    )
    # gRPC agents, whose liveness is their stream: how often they send metrics (sooner on a
    # significant change). AMQP agents beat every heartbeat_interval (seed 002).
    metrics_interval: float = Field(
        default=60.0,
        gt=0,
        description=(
            "seconds between two metrics reports of a gRPC agent (sooner on a significant "
            "change); its liveness is its stream"
        ),
    )
    lost_grace: float = Field(
        default=60.0,
        ge=0,
        description="seconds an offline host's in-flight runs wait for it before they end lost",
    )
    # Several instances on one database (docs/instances.md): each renews its own liveness
    # lease and the singleton duties' leases every third of this; a `kill -9`ed instance's
    # hosts and duties are taken over once it has passed.
    instance_lease_ttl: float = Field(
        default=15.0,
        ge=1,
        description=(
            "seconds an instance's liveness and singleton-duty leases last unrenewed: the "
            "takeover time after an instance dies"
        ),
    )
    # A dispatched run whose host has not reported it started by then was never received.
    start_timeout: float = Field(
        default=60.0,
        gt=0,
        description=(
            "seconds a dispatched run may wait for its host to report it started before it is "
            "undeliverable"
        ),
    )
    # The control plane's own timeout clock: a run with no result this long after its task's
    # timeout (counted from its start, or from its dispatch if the host never reported one)
    # ends timed_out (or lost, never started) and a cancel goes to its host.
    timeout_grace: float = Field(
        default=30.0,
        ge=0,
        description=(
            "seconds past a run's timeout before the control plane ends it timed_out (or lost) "
            "itself and sends a cancel"
        ),
    )
    # Shared capacity (0: no limit): runs on hosts at once in all, and on one host. When short,
    # higher-priority tasks go first, equal priorities in the order they were created.
    max_running_runs: int = Field(
        default=0,
        ge=0,
        description="runs on hosts at once in all (0: no limit); higher-priority tasks go first",
    )
    max_runs_per_host: int = Field(
        default=0, ge=0, description="runs at once on one host (0: no limit)"
    )
    # Scripts running at once on the control plane's own host (seed 003's worker pool); 0: no
    # limit. Overrides max_runs_per_host for that host.
    script_workers: int = Field(
        default=10,
        ge=0,
        description=(
            "scripts running at once on the control plane's own host (seed 003's worker pool; 0: "
            "no limit)"
        ),
    )
    default_timeout: int = Field(
        default=600, gt=0, description="a task's timeout in seconds when it asks for none"
    )
    output_cap: int = Field(
        default=64 * 1024,
        gt=0,
        description=(
            "bytes of each stream a run keeps in the database (head and tail; the archive keeps "
            "all)"
        ),
    )
    # Run log archive retention (docs/operations.md): 0 keeps every log / sets no size cap.
    log_retention_days: float = Field(
        default=0, ge=0, description="days run logs are kept in the archive (0: forever)"
    )
    log_retention_bytes: int = Field(
        default=0,
        ge=0,
        description="the archive's size cap in bytes (0: none); the oldest logs go first",
    )
    # Seconds between two retention passes over the archive.
    log_prune_interval: float = Field(
        default=3600.0, gt=0, description="seconds between two retention passes over the archive"
    )
    # Database retention (docs/operations.md, "Database retention"). Output events kept per run
    # and stream for the live stream's replay; the rest is published live only (the archive and
    # the run's head and tail keep it). Task events of ended tasks are deleted after
    # event_retention_days (0 keeps them); hosts offline for host_retention_days are forgotten
    # (0, the default, keeps them). retention_interval: seconds between two passes.
    event_output_cap: int = Field(
        default=64 * 1024,
        gt=0,
        description="bytes of output events kept per run and stream for the live stream's replay",
    )
    event_retention_days: float = Field(
        default=30, ge=0, description="days task events of ended tasks are kept (0: forever)"
    )
    host_retention_days: float = Field(
        default=0,
        ge=0,
        description="days an offline agent host is kept after it was last heard from (0: forever)",
    )
    retention_interval: float = Field(
        default=600.0, gt=0, description="seconds between two database retention passes"
    )
    # The most one run's log keeps (0: no cap); the cut is marked in the log.
    archive_max_bytes_per_run: int = Field(
        default=1024**3,
        ge=0,
        description="the most one run's log keeps (0: no cap); the cut is marked in the log",
    )
    ingest_batch_size: int = Field(
        default=1000, gt=0, description="host reports written in one ingest transaction at most"
    )
    # Agents' connections are written in batches of at most this many, gathered for up to
    # connect_linger seconds (docs/scale.md, "Connect path").
    connect_batch_size: int = Field(
        default=500,
        gt=0,
        description=(
            'agent connections written in one batch at most (docs/scale.md, "Connect path")'
        ),
    )
    connect_linger: float = Field(
        default=0.05,
        ge=0,
        description="seconds a batch of agent connections is gathered for at most",
    )
    # Hellos being verified at once on the gRPC endpoint; past it, a new stream is refused
    # with RESOURCE_EXHAUSTED and a retry hint of about grpc_retry_after_ms.
    grpc_max_handshakes: int = Field(
        default=1000,
        gt=0,
        description=(
            "hellos verified at once on the gRPC endpoint; past it a new stream is refused with "
            "RESOURCE_EXHAUSTED and a retry hint"
        ),
    )
    grpc_retry_after_ms: int = Field(
        default=1000,
        gt=0,
        description="the retry hint, in milliseconds, sent with a refused stream",
    )
    # New streams gRPC core queues for the handler before it cancels some (twice as many:
    # all); 0 keeps its defaults, 1,000 and 3,000. docs/scale.md, "gRPC core's own backlog".
    grpc_pending_streams: int = Field(
        default=20_000,
        ge=0,
        description=(
            "new streams gRPC core queues for the handler (0: gRPC's own defaults, 1,000 and 3,000)"
        ),
    )
    ingest_linger: float = Field(
        default=0.0,
        ge=0,
        description="seconds ingest waits to fill a batch (0: writes what is there)",
    )
    # Bytes of host reports (mostly output) queued for ingest at most; past it, links wait
    # (backpressure) and hosts keep what they have not been acknowledged (docs/reliability.md).
    ingest_queue_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description=(
            "bytes of host reports queued for ingest at most; past it links wait (backpressure)"
        ),
    )
    bootstrap_admin_token: str | None = Field(
        default=None,
        description=(
            "the initial admin token; default: generated at first start and written to a file in "
            "the data directory"
        ),
    )
    # Refuse agents that never enrolled (opsplane agents token / opsplane agent --enroll): an
    # agent that chose its own groups would receive those groups' commands. Off only for
    # agents that cannot enroll (a minimal seed-002 agent) on a trusted network.
    require_enrollment: bool = Field(
        default=True,
        description=(
            "refuse agents that never enrolled; off only for agents that cannot enroll (a minimal"
            " seed-002 agent) on a trusted network"
        ),
    )
    # A request body longer than this is refused with 413 before it is parsed
    # (docs/operations.md, "Request limits").
    max_request_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=64 * 1024,
        description="request bodies longer than this are refused with 413 before they are parsed",
    )
    # Web logins last this many seconds, then the page asks for the password again.
    session_lifetime: float = Field(
        default=8 * 3600.0, gt=0, description="seconds a web login lasts"
    )
    # The control plane's own host, which runs catalog scripts; distinct from any agent's name.
    local_host: str = Field(
        default="control-plane",
        description="the control plane's own host name, which runs catalog and seed-003 scripts",
    )
    # Seed 004's catalog of external tasks (docs/catalog.md). The seed's own variable
    # CS_EXTERNAL_TASK works too; a bare CATALOG variable deliberately does not.
    catalog: Path | None = Field(
        description=(
            "seed 004's catalog of external tasks (YAML; docs/catalog.md); CS_EXTERNAL_TASK works"
            " too"
        ),
        default=None,
        validation_alias=AliasChoices("OPSPLANE_CATALOG", "CS_EXTERNAL_TASK"),
    )
    # Where collected scripts live; default: collect/ next to the catalog file.
    catalog_collect_dir: Path | None = Field(
        default=None,
        description="where collected catalog scripts live; default: collect/ next to the catalog",
    )
    # Where <name>.log files go; default: logs_dir.
    catalog_logs_dir: Path | None = Field(
        default=None, description="where catalog <name>.log files go; default: <data dir>/logs"
    )
    # Seconds a finished async session stays in /async/query.
    catalog_session_retention: float = Field(
        default=3600.0,
        ge=0,
        description="seconds a finished async catalog session stays in /async/query",
    )
    # Seed 003 (POST /tasks): scripts run only from these directories (docs/remoterun.md).
    script_dirs: list[Path] = Field(
        default_factory=list,
        description=(
            "seed 003: POST /tasks runs scripts only from these directories (docs/remoterun.md)"
        ),
    )
    # Refuse seed-003 scripts without a pin in <data dir>/script-pins.yaml (`opsplane scripts
    # approve`); pinned scripts are checked either way (docs/remoterun.md, "Pinning").
    script_pins_required: bool = Field(
        default=False,
        description="refuse seed-003 scripts without a pin in <data dir>/script-pins.yaml",
    )
    # Secrets masked in run output before it is stored, archived or streamed; [] turns it off.
    redact_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_PATTERNS),
        description=(
            "regular expressions of secrets masked in run output before it is stored, archived or"
            " streamed ([] turns it off)"
        ),
    )
    # opsplane agents deploy|upgrade (docs/operations.md, "Deploying agents").
    agent_deploy_install: Literal["auto", "zipapp", "venv"] = Field(
        default="auto",
        description=(
            "how deployed agents get their dependencies: auto (the bundle's where the host's "
            "python3 loads them, else its own, else a venv made by pip), zipapp (never a "
            "venv) or venv (always); a deploy's --install overrides it"
        ),
    )
    agent_deploy_index_url: str | None = Field(
        default=None,
        description=(
            "a package index the hosts reach, for the venv fallback's pip install; default: "
            "a wheelhouse fetched by the control plane (pip download) and pushed over SFTP"
        ),
    )
    # Failure alerts (docs/alerts.md): webhooks POSTed when a task ends failed or timed_out.
    alert_webhooks: list[str] = Field(
        default_factory=list,
        description="URLs POSTed when a task ends failed or timed_out (docs/alerts.md)",
    )
    alert_format: Literal["json", "slack", "dingtalk"] = Field(
        default="json", description="the alert body: json, slack or dingtalk"
    )
    alert_attempts: int = Field(default=3, ge=1, le=10, description="deliveries tried per alert")
    alert_backoff: float = Field(
        default=1.0,
        ge=0,
        description="seconds before the first retry of an alert, doubled each time",
    )
    # Where operators reach this control plane, for links in alerts; default http://<listen>.
    public_url: str | None = Field(
        default=None,
        description=(
            "where operators reach this control plane, for links in alerts; default http://<listen>"
        ),
    )
    # /metrics without authentication (Prometheus scrapers usually carry no token).
    metrics_public: bool = Field(
        default=True,
        description=(
            "serve /metrics without authentication (Prometheus scrapers usually carry no token)"
        ),
    )
    # Signed checkpoints of the audit trail's head (docs/security.md, "Audit checkpoints"):
    # appended to this file (default <data dir>/audit-checkpoints.jsonl) every interval
    # seconds while the trail grows (0: none), and POSTed to these webhooks.
    audit_checkpoint_file: Path | None = Field(
        default=None,
        description=(
            "signed checkpoints of the audit trail's head are appended here; default <data "
            "dir>/audit-checkpoints.jsonl"
        ),
    )
    audit_checkpoint_interval: float = Field(
        default=300.0,
        ge=0,
        description="seconds between two audit checkpoints while the trail grows (0: none)",
    )
    audit_checkpoint_webhooks: list[str] = Field(
        default_factory=list, description="URLs each audit checkpoint is POSTed to"
    )
    # Variables of the control plane's environment that catalog and seed-003 scripts inherit,
    # beyond PATH, HOME, LANG, LC_*, TZ… (names, or prefixes ending in '*'; never OPSPLANE_*):
    # docs/security.md, "What commands inherit".
    env_passthrough: list[str] = Field(
        default_factory=list,
        description=(
            "variables of the control plane's environment that scripts inherit (names, or "
            "prefixes ending in '*'; never OPSPLANE_*)"
        ),
    )
    # Anonymous seed clients (docs/security.md, "Anonymous seed clients (compat_anonymous)"):
    # off by default. Calls without any credential to the routes of these seed APIs run as
    # the named principal, with this role and these groups, when they come from one of these
    # source networks; every such call is audited under that name, marked anonymous.
    compat_anonymous: list[Literal["seed000", "seed003", "seed004"]] = Field(
        default_factory=list,
        description=(
            "seed APIs (seed000, seed003, seed004) whose routes serve calls without a credential "
            "as compat_anonymous_principal (docs/security.md)"
        ),
    )
    compat_anonymous_principal: str = Field(
        default="seed-client", description="the name anonymous seed calls run and are audited as"
    )
    compat_anonymous_role: Literal["viewer", "operator", "admin"] = Field(
        default="operator",
        description="the role of compat_anonymous_principal: viewer, operator or admin",
    )
    # An operator runs only on hosts of these groups: by default the control plane's own host
    # (group control-plane), where seed 003 and seed 004 scripts run.
    compat_anonymous_groups: list[str] = Field(
        default_factory=lambda: ["control-plane"],
        description="the host groups compat_anonymous_principal may run on (as an operator)",
    )
    compat_anonymous_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1"],
        description="source networks anonymous seed calls are accepted from",
    )

    @field_validator("listen", "grpc_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        split_host_port(value)
        return value

    @field_validator("redact_patterns")
    @classmethod
    def _compilable(cls, value: list[str]) -> list[str]:
        try:
            Redactor(value)
        except InvalidInput as e:
            raise ValueError(str(e)) from e
        return value

    @field_validator("env_passthrough")
    @classmethod
    def _passthrough(cls, value: list[str]) -> list[str]:
        try:
            return list(check_passthrough(value))
        except InvalidInput as e:
            raise ValueError(str(e)) from e

    @field_validator("alert_webhooks", "audit_checkpoint_webhooks")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"a webhook must be an http:// or https:// URL: {url!r}")
        return value

    @field_validator("compat_anonymous")
    @classmethod
    def _unique_seeds(cls, value: list[str]) -> list[str]:
        return sorted(set(value))

    @field_validator("compat_anonymous_principal")
    @classmethod
    def _principal_name(cls, value: str) -> str:
        if not value or len(value) > 255 or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(
                "compat_anonymous_principal must be a name of 1 to 255 characters without "
                f"spaces, got {value!r}"
            )
        return value

    @field_validator("compat_anonymous_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as e:
                raise ValueError(f"compat_anonymous_networks: {e}") from e
        return value

    @model_validator(mode="after")
    def _anonymous_groups(self) -> Settings:
        groups = [g.strip() for g in self.compat_anonymous_groups]
        if "" in groups:
            raise ValueError("compat_anonymous_groups: group names must not be blank")
        if self.compat_anonymous and self.compat_anonymous_role == "operator" and not groups:
            raise ValueError(
                "compat_anonymous_groups must name at least one group for an operator principal"
            )
        return self

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'opsplane.db'}"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def effective_upload_roots(self) -> list[Path]:
        """Directories whose files upload tasks may send; the data directory's uploads/ only,
        unless configured, so that an upload can never read the control plane's secrets."""
        return self.upload_roots or [self.data_dir / "uploads"]

    @property
    def secret_key_path(self) -> Path:
        """The key that encrypts secret task parameters at rest (security/secrets.py)."""
        return self.data_dir / "keys" / "secrets.key"

    @property
    def effective_audit_checkpoint_file(self) -> Path:
        """Where signed checkpoints of the audit head go (security/checkpoints.py)."""
        return self.audit_checkpoint_file or self.data_dir / "audit-checkpoints.jsonl"

    @property
    def signing_key_path(self) -> Path:
        """The control plane's Ed25519 key that signs commands (DESIGN §3.3)."""
        return self.data_dir / "keys" / "control-plane.key"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _config_file_from(init_settings(), env_settings())
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def _config_file_from(*layers: dict[str, Any]) -> Path | None:
    for layer in layers:
        value = layer.get("config_file")
        if value:
            path = Path(value)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            return path
    return None


def load_settings(**overrides: Any) -> Settings:
    """Settings from flags (``overrides``; None means "not given"), env, the YAML file, defaults."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValueError as e:
        raise ConfigError(str(e)) from e

"""The composition root: builds the engine, its links and the services, and the FastAPI app
over them. The lifespan starts and stops the engine and its links.

It lives outside ``opsplane.api`` because it is the one place that knows every layer: it wires
the security service into the engine (engine/ports.py) and maps the store's "database
unavailable" errors to 503, so that no route needs to import ``opsplane.store``
(tests/unit/test_import_layers.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from opsplane.agentdeploy.service import AgentDeployer
from opsplane.api.deps import require_principal
from opsplane.api.errors import install_error_handlers
from opsplane.api.middleware import AuthenticateFirst
from opsplane.api.routers import (
    agents,
    audit,
    auth,
    compat_catalog,
    compat_remoterun,
    compat_ssh,
    fleet,
    health,
    hosts,
    metrics,
    runs,
    schedules,
    tasks,
    templates,
    tokens,
    users,
)
from opsplane.api.web import mount_web
from opsplane.catalog import CatalogService, default_registry, load_catalog
from opsplane.config import Settings
from opsplane.domain.clock import utcnow
from opsplane.domain.errors import ConfigError
from opsplane.domain.records import TaskRecord
from opsplane.domain.redaction import Redactor
from opsplane.domain.roles import Principal
from opsplane.engine.alerts import AlertSender
from opsplane.engine.core import Engine
from opsplane.engine.metrics import EngineMetrics
from opsplane.engine.ports import InstanceRouter
from opsplane.engine.schedules import AuditLaunch
from opsplane.remoterun import RemoteRunService
from opsplane.security.agents import AgentRegistry
from opsplane.security.anonymous import AnonymousAccess
from opsplane.security.audit import targets_summary
from opsplane.security.checkpoints import CheckpointWriter
from opsplane.security.secrets import SecretBox
from opsplane.security.service import Caller, SecurityService
from opsplane.security.signing import load_or_create_private_key
from opsplane.security.tls import amqp_ssl_context, resolve_grpc_server_files
from opsplane.store.database import POOL_TIMEOUT, is_unavailable
from opsplane.transport.base import SSH_LINK, Link
from opsplane.transport.grpc.server import GrpcLink
from opsplane.transport.local import LocalLink

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    # The configured certificate, else the one `opsplane keys init` generated (docs/tls.md).
    grpc_tls = resolve_grpc_server_files(
        settings.grpc_tls_cert, settings.grpc_tls_key, settings.data_dir
    )
    key, created = load_or_create_private_key(settings.signing_key_path)
    if created:
        log.info("created the command signing key %s", settings.signing_key_path)
    grpc_link = GrpcLink(
        settings.grpc_listen,
        heartbeat_interval=settings.heartbeat_interval,
        offline_after_missed=settings.offline_after_missed,
        metrics_interval=settings.metrics_interval,
        allow_insecure=settings.grpc_allow_insecure,
        tls_cert=grpc_tls[0] if grpc_tls else None,
        tls_key=grpc_tls[1] if grpc_tls else None,
        tls_client_ca=settings.grpc_tls_client_ca,
        signing_key=key,
        max_handshakes=settings.grpc_max_handshakes,
        retry_after_ms=settings.grpc_retry_after_ms,
        pending_streams=settings.grpc_pending_streams,
    )
    # The local host runs catalog scripts and the in-process catalog handlers (seed 004).
    local = LocalLink(
        settings.local_host,
        handlers=default_registry.link_handlers(),
        env_passthrough=settings.env_passthrough,
    )
    links: list[Link] = [grpc_link, local]
    try:
        from opsplane.transport.ssh import HostKeyPolicy, SshExecutor, SshLink
        from opsplane.transport.ssh.link import worker_start_window
    except ImportError:
        log.info("SSH link unavailable (pip install 'opsplane[ssh]')")
    else:
        policy = HostKeyPolicy(settings.ssh_known_hosts, settings.ssh_trust_on_first_use)
        executor = SshExecutor(policy, max_parallel=settings.ssh_max_parallel)
        work_queue = None
        if settings.ssh_workers:
            if not settings.amqp_url:
                raise ConfigError("ssh_workers needs amqp_url: the workers report over RabbitMQ")
            from opsplane.transport.ssh.worker import WorkQueue

            work_queue = WorkQueue(settings.amqp_url, settings.amqp_queue_type)
        links.append(
            SshLink(
                executor,
                work_queue=work_queue,
                worker_start_within=worker_start_window(settings.start_timeout),
            )
        )
    if settings.amqp_url:
        from opsplane.transport.amqp.link import AmqpLink

        links.append(
            AmqpLink(
                settings.amqp_url,
                signing_key=key,
                heartbeat_interval=settings.heartbeat_interval,
                offline_after_missed=settings.offline_after_missed,
                queue_type=settings.amqp_queue_type,
                ssl_context=amqp_ssl_context(
                    settings.amqp_url,
                    settings.amqp_tls_ca,
                    settings.amqp_tls_cert,
                    settings.amqp_tls_key,
                ),
            )
        )
    return make_engine(settings, links, router=instance_router(settings))


def instance_router(settings: Settings) -> InstanceRouter | None:
    """How this instance reaches the others on its database: through ``amqp_url``, if set
    (docs/instances.md)."""
    if not settings.amqp_url:
        return None
    from opsplane.transport.amqp.instances import InstanceRouter as AmqpInstanceRouter

    return AmqpInstanceRouter(
        settings.amqp_url,
        ssl_context=amqp_ssl_context(
            settings.amqp_url, settings.amqp_tls_ca, settings.amqp_tls_cert, settings.amqp_tls_key
        ),
    )


def make_engine(
    settings: Settings,
    links: list[Link],
    db: AsyncEngine | None = None,
    *,
    router: InstanceRouter | None = None,
) -> Engine:
    """The engine over ``links``, its agent keys and secret parameters wired to the security
    side (the engine knows them only as engine/ports.py's protocols)."""
    return Engine(
        settings,
        links,
        db,
        router=router,
        agents=lambda sessions, write: AgentRegistry(
            sessions,
            write,
            require_enrollment=settings.require_enrollment,
            reserved_names=(settings.local_host,),
        ),
        secrets=SecretBox(settings.secret_key_path),
    )


def _security_of(engine: Engine) -> tuple[AgentRegistry, SecretBox]:
    """The registry and the secret box ``make_engine`` gave ``engine``: the routes that enroll
    agents and seal secrets use them directly."""
    agents, secrets = engine.agents, engine.secrets
    if not isinstance(agents, AgentRegistry) or not isinstance(secrets, SecretBox):
        raise ConfigError("the engine was not built by opsplane.app_factory.make_engine")
    return agents, secrets


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    # Loaded before anything starts: a bad catalog raises CatalogError (a ConfigError) naming
    # the entry and the reason, and the server refuses to start.
    catalog = load_catalog(settings.catalog, settings.catalog_collect_dir, default_registry)
    the_engine = engine or build_engine(settings)
    catalog_service = CatalogService(
        the_engine,
        catalog,
        logs_dir=settings.catalog_logs_dir or settings.logs_dir,
        retention=settings.catalog_session_retention,
    )
    # A registry per app, never the process-global one: two apps never share counters.
    engine_metrics = EngineMetrics(the_engine, CollectorRegistry())
    alerts = AlertSender(
        the_engine.sessions,
        settings.alert_webhooks,
        fmt=settings.alert_format,
        base_url=settings.public_url
        or f"{'https' if settings.tls_cert else 'http'}://{settings.listen}",
        attempts=settings.alert_attempts,
        backoff=settings.alert_backoff,
        on_result=engine_metrics.alert_result,
        # With amqp_url, every instance hears every task's end, and one delivers (the others
        # keep a window for a takeover: docs/instances.md). Without it, each instance hears
        # its own only, and alerts for them.
        holds=(lambda: the_engine.duties.holds("alerts"))
        if the_engine.router is not None
        else (lambda: True),
        takeover_window=2 * settings.instance_lease_ttl,
    )
    the_engine.loops.add(alerts.loop)
    remoterun = RemoteRunService(the_engine, settings.script_dirs)
    the_engine.templates.use_scripts(remoterun.template_script, settings.local_host)
    security = SecurityService(
        the_engine.sessions,
        the_engine.write,
        data_dir=settings.data_dir,
        bootstrap_token=settings.bootstrap_admin_token,
        session_lifetime=settings.session_lifetime,
    )
    # Scheduled launches are audited in the transaction that creates their task.
    the_engine.schedules.audit_launch = _audit_launch(security)

    # Signed checkpoints of the audit head, outside the database (docs/security.md).
    checkpoints = CheckpointWriter(
        security.audit_head,
        load_or_create_private_key(settings.signing_key_path)[0],
        settings.effective_audit_checkpoint_file,
        interval=settings.audit_checkpoint_interval,
        webhooks=settings.audit_checkpoint_webhooks,
        clock=utcnow,
    )
    engine_metrics.watch_logins(security.login_throttle)
    anonymous = _anonymous_access(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await the_engine.start()
        try:
            if anonymous is not None:
                for line in anonymous.warnings():
                    log.warning("%s", line)
            # Users and tokens need the migrated database; no request is served before this.
            await security.bootstrap()
            await checkpoints.start()
            await alerts.start()
            the_engine.hub.add_listener(alerts.observe, cluster=True)
            await catalog_service.start()
            try:
                yield
            finally:
                await catalog_service.stop()
        finally:
            the_engine.hub.remove_listener(alerts.observe)
            await alerts.stop()
            await checkpoints.stop()
            await the_engine.stop()

    app = FastAPI(
        title="opsplane",
        version="0.1.0",
        description="Remote-execution control plane",
        lifespan=lifespan,
        # A longer body is a 413 as the route reads it (docs/operations.md, "Request limits").
        max_body_size=settings.max_request_bytes,
    )
    app.state.engine = the_engine
    app.state.agents, app.state.secrets = _security_of(the_engine)
    # opsplane agents deploy|upgrade: over the SSH link, when there is one.
    app.state.deployer = AgentDeployer(
        the_engine.hosts,
        app.state.agents,
        the_engine.links.get(SSH_LINK),
        settings.data_dir / "agent-bundles",
        write=the_engine.write,
        instance=the_engine.instance,
        install=settings.agent_deploy_install,
        index_url=settings.agent_deploy_index_url or "",
    )
    app.state.catalog_service = catalog_service
    app.state.metrics = engine_metrics
    app.state.alerts = alerts
    app.state.remoterun = remoterun
    app.state.security = security
    app.state.audit_checkpoints = checkpoints
    app.state.redactor = Redactor(settings.redact_patterns)
    app.state.compat_anonymous = anonymous
    install_error_handlers(app)
    app.add_middleware(AuthenticateFirst)
    install_database_error_handler(app)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(users.router)
    app.include_router(tokens.router)
    app.include_router(agents.router)
    app.include_router(audit.router)
    app.include_router(tasks.router)
    app.include_router(templates.router)
    app.include_router(schedules.router)
    app.include_router(hosts.router)
    app.include_router(fleet.router)
    # Seed 004's routes live at the root (/list, /sync/…, /async/…): before the web mount.
    app.include_router(compat_catalog.router)
    app.include_router(compat_ssh.router)
    # Seed 003's /tasks routes, also at the root.
    app.include_router(compat_remoterun.router)
    app.include_router(runs.router)
    # Scrapers usually carry no token: /metrics is public unless metrics_public is false.
    metrics_auth = [] if settings.metrics_public else [Depends(require_principal)]
    app.include_router(metrics.router, dependencies=metrics_auth)
    # Seed 004's short URL POST /{cluster-type}/{name}: after every other route, so that it
    # never answers in place of one (compat_catalog.short_router).
    app.include_router(compat_catalog.short_router)
    mount_web(app)
    return app


# No route has this path: a request for it is matched against every route, and answered 404.
WARM_UP_PATH = "/-/opsplane/warm-up"


async def warm_up(app: FastAPI) -> None:
    """Has ``app`` answer one request in-process before the first real one. FastAPI builds the
    routes of an included router (their dependencies and validators) when a request is first
    matched against them: some 0.1 s on the event loop for all of them, several times that on a
    loaded machine, taken from whichever request comes first, and from /healthz and the agents'
    streams with it (docs/reliability.md, scenario 8). A request that matches no route is
    matched against every one, and does nothing else."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://opsplane") as client:
        await client.get(WARM_UP_PATH)


def _anonymous_access(settings: Settings) -> AnonymousAccess | None:
    """``compat_anonymous`` as api.deps applies it; None while it is off (the default)."""
    if not settings.compat_anonymous:
        return None
    return AnonymousAccess.build(
        settings.compat_anonymous,
        name=settings.compat_anonymous_principal,
        role=settings.compat_anonymous_role,
        groups=settings.compat_anonymous_groups,
        networks=settings.compat_anonymous_networks,
    )


# While the database is unreachable, clients are told when to try again.
_RETRY_AFTER = {"Retry-After": "5"}


def install_database_error_handler(app: FastAPI) -> None:
    """The database unreachable (refused, lost, pool exhausted) → 503 with a clear message,
    never a 500 with a stack trace; any other database error stays a 500 (a bug)."""

    async def _database_error(request: Request, exc: Exception) -> JSONResponse:
        if not is_unavailable(exc):
            raise exc
        if isinstance(exc, sa_exc.TimeoutError):
            why = f"no database connection free within {POOL_TIMEOUT:.0f} s"
        else:
            # The driver's own words, first line only: never the SQL or its parameters.
            orig = getattr(exc, "orig", None) or exc
            why = (str(orig).splitlines() or [type(orig).__name__])[0][:200]
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, why)
        message = f"database unavailable: {why}"
        if getattr(request.state, "envelope_errors", False):
            body = {"code": 1, "data": "", "msg": message}
            return JSONResponse(body, status_code=503, headers=_RETRY_AFTER)
        return JSONResponse({"detail": message}, status_code=503, headers=_RETRY_AFTER)

    for kind in (sa_exc.DBAPIError, sa_exc.TimeoutError, sa_exc.DisconnectionError):
        app.add_exception_handler(kind, _database_error)


def _audit_launch(security: SecurityService) -> AuditLaunch:
    """The schedules' audit port over the security side's trail."""

    async def audit(
        session: AsyncSession,
        principal: Principal,
        action: str,
        task: TaskRecord,
        hosts: list[str],
        detail: dict[str, Any],
    ) -> None:
        entry = Caller(principal).entry(
            action, target=task.id, targets=targets_summary(task.targets, hosts), detail=detail
        )
        await security.audit_within(session, entry)

    return audit

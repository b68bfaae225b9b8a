"""Seed 004's catalog: legacy scripts declared in YAML and in-process Python handlers, each
exposed as a sync and an async route, run as ordinary script tasks on the control plane's host.

Wiring (``app_factory.py``): ``load_catalog(path, collect_dir, default_registry)`` at start (a bad
catalog raises ``CatalogError``), ``LocalLink(host, handlers=default_registry.link_handlers())``,
``CatalogService(engine, catalog, logs_dir=..., retention=...)`` started and stopped by the
lifespan, and ``api.routers.compat_catalog.router``.
"""

from __future__ import annotations

from opsplane.catalog.handlers import HandlerRegistry, default_registry, internal_task
from opsplane.catalog.registry import (
    Catalog,
    CatalogEntry,
    CatalogError,
    ExternalEntry,
    InternalEntry,
    kebab_case,
    load_catalog,
)
from opsplane.catalog.service import CatalogService, SessionView, SyncResult

__all__ = [
    "Catalog",
    "CatalogEntry",
    "CatalogError",
    "CatalogService",
    "ExternalEntry",
    "HandlerRegistry",
    "InternalEntry",
    "SessionView",
    "SyncResult",
    "default_registry",
    "internal_task",
    "kebab_case",
    "load_catalog",
]

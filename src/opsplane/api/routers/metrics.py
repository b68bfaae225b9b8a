"""``GET /metrics``: Prometheus text format, from the app's own registry (engine/metrics.py).

Public unless ``metrics_public`` is false: the app factory then puts the route behind the one
authentication dependency like every other route.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opsplane.engine.metrics import EngineMetrics

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Counters, histograms and fleet gauges of this control plane instance."""
    engine_metrics: EngineMetrics = request.app.state.metrics
    await engine_metrics.refresh()
    return Response(generate_latest(engine_metrics.registry), media_type=CONTENT_TYPE_LATEST)

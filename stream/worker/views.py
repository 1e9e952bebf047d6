"""The worker's web views, served by Faust's web server: /metrics (Prometheus), /healthz,
/readyz (503 until started and while rebalancing) and /config (the resolved settings,
password redacted)."""

from __future__ import annotations

from typing import Any

from clickvec.stream.worker.config import StreamConfig
from clickvec.stream.worker.metrics import Metrics
from clickvec.stream.worker.pipeline import Pipeline


class Views:
    """Registers the views on `app`; `ready` is set once the worker has started."""

    def __init__(self, app: Any, cfg: StreamConfig, bundle: Any, metrics: Metrics, pipeline: Pipeline) -> None:
        self.ready = False

        @app.page("/metrics")
        async def metrics_view(view: Any, request: Any) -> Any:
            return view.bytes(metrics.render(), content_type="text/plain; version=0.0.4")

        @app.page("/healthz")
        async def health(view: Any, request: Any) -> Any:
            return view.json({"status": "ok", "batches": pipeline.batches})

        @app.page("/readyz")
        async def ready(view: Any, request: Any) -> Any:
            ok = self.ready and not app.rebalancing
            try:
                parts = sorted(tp.partition for tp in app.consumer.assignment() if tp.topic == cfg.in_topic)
            except Exception:  # consumer not started yet
                parts = []
            return view.json({"ready": ok, "model_id": bundle.model_id, "partitions": parts},
                             status=200 if ok else 503)

        @app.page("/config")
        async def config_view(view: Any, request: Any) -> Any:
            return view.json(cfg.redacted())

"""What ``run --metrics-port`` answers: ``/metrics`` (Prometheus) and ``/healthz``
(the event loop ticks, the broker answers, the worker runs)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import ConfigError, redact
from .http_endpoint import MetricsEndpoint

if TYPE_CHECKING:
    from ..app import App
    from ..worker import Worker

log = logging.getLogger("aioworkers")


def serve(
    host: str, port: int, health: Health, *, timeout: float = 5.0, max_connections: int = 64
) -> MetricsEndpoint:
    """Serve ``/metrics`` and ``/healthz``; see `MetricsEndpoint` for ``timeout`` (per
    connection) and ``max_connections``."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    def respond(path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        if path == "/healthz":
            ok, doc = health.check()
            return 200 if ok else 503, "application/json", orjson.dumps(doc)
        return 404, "text/plain", b"not found: try /metrics or /healthz\n"

    try:
        server = MetricsEndpoint(
            host, port, respond, timeout=timeout, max_connections=max_connections
        )
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port} on {host}: {exc.strerror or exc}") from None
    server.start()
    log.info("serving /metrics and /healthz on http://%s:%d", host, server.server_port)
    return server


class Health:
    """Liveness: the event loop ticked lately, and the broker answered lately."""

    def __init__(self, *, tick: float = 1.0, stall: float = 10.0, broker_every: float = 5.0):
        self.tick = tick
        self.stall = stall
        self.broker_every = broker_every
        self.beat_at = 0.0
        self.broker_ok_at = 0.0
        self.broker_error = "not checked yet"
        self.state = "IDLE"

    async def run(self, app: App, worker: Worker) -> None:
        next_check = 0.0
        while True:
            now = time.monotonic()
            self.beat_at = now
            self.state = worker.state
            if now >= next_check:
                next_check = now + self.broker_every
                try:
                    async with asyncio.timeout(self.broker_every):
                        await app.broker.depth(worker.queues[0])
                except Exception as exc:
                    self.broker_error = redact(f"{type(exc).__name__}: {exc}")
                else:
                    self.broker_ok_at = time.monotonic()
                    self.broker_error = ""
            await asyncio.sleep(self.tick)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, details)``; called from the endpoint's thread."""
        now = time.monotonic()
        loop_lag = now - self.beat_at if self.beat_at else None
        loop_ok = loop_lag is not None and loop_lag < self.stall
        broker_ok = bool(self.broker_ok_at) and now - self.broker_ok_at < 3 * self.broker_every
        worker_ok = self.state in ("RUNNING", "QUIET")
        doc = {
            "status": "ok" if loop_ok and broker_ok and worker_ok else "unhealthy",
            "worker": self.state,
            "loop": "responsive" if loop_ok else "stalled",
            "loop_seconds_since_tick": None if loop_lag is None else round(loop_lag, 3),
            "broker": "connected" if broker_ok else "unreachable",
        }
        if not broker_ok and self.broker_error:
            doc["broker_error"] = self.broker_error
        return doc["status"] == "ok", doc

"""The running exporter: upstream client, worker and HTTP endpoints wired together.

``serve`` runs one until a signal; ``demo`` runs one next to a simulator and a Prometheus.
"""

from __future__ import annotations

import logging
import signal
import threading
from http.server import ThreadingHTTPServer
from types import FrameType

from exporter import upstream, web
from exporter.config import Config
from exporter.publish import Publisher, SelfMetrics
from exporter.worker import Worker

log = logging.getLogger(__name__)


class Service:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.publisher = Publisher(cfg.evaluation.staleness_bound)
        self.metrics = SelfMetrics(self.publisher)
        self.client = upstream.PrometheusClient(
            cfg.upstream, on_request=self.metrics.observe_request
        )
        self.worker = Worker(cfg, self.client, self.publisher, self.metrics)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Listen first (so a busy port fails fast), then start cycling."""
        host, port = self.cfg.web.host_port
        self._server = web.serve(web.App(self.publisher, self.metrics), host, port)
        self.worker.start()
        log.info(
            "serving %s; upstream %s every %gs, window %gs",
            self.metrics_url, self.cfg.upstream.url, self.cfg.evaluation.interval,
            self.cfg.evaluation.window,
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def metrics_url(self) -> str:
        host, port = self.address
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{port}/metrics"

    def stop(self) -> bool:
        """Stop; False when a cycle was still running (see :meth:`Worker.stop`)."""
        idle = self.worker.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.client.close()
        return idle


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

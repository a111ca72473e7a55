"""The HTTP endpoints: /metrics, /healthz, /readyz and a landing page.

Handlers only read the current snapshot; they never wait for a cycle.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from exporter import __version__
from exporter.publish import CONTENT_TYPE, Publisher, SelfMetrics

log = logging.getLogger(__name__)

_LANDING = """<html><head><title>triton-mig-exporter</title></head><body>
<h1>triton-mig-exporter {version}</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot;
<a href="/readyz">/readyz</a></p></body></html>
"""


class App:
    def __init__(self, publisher: Publisher, metrics: SelfMetrics) -> None:
        self.publisher = publisher
        self.metrics = metrics

    def metrics_body(self, gzipped: bool) -> bytes:
        # Self-metrics first (small, rendered per scrape), then the cycle's pre-rendered bytes.
        return self.metrics.body(gzipped) + self.publisher.derived_body(gzipped)

    def ready(self) -> bool:
        publisher = self.publisher
        return publisher.ready(publisher.snapshot, publisher.clock())


def _handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"triton-mig-exporter/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                body = app.metrics_body(gzipped)
                self._send(200, body, CONTENT_TYPE, "gzip" if gzipped else None)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                if app.ready():
                    self._send(200, b"ready\n", "text/plain")
                else:
                    self._send(503, b"not ready: no good cycle within the staleness bound\n",
                               "text/plain")
            elif path == "/":
                self._send(200, _LANDING.format(version=__version__).encode(), "text/html")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str,
                  encoding: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def serve(app: App, host: str, port: int) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the caller shuts the returned server down."""
    server = ThreadingHTTPServer((host, port), _handler(app))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server

"""A threaded HTTP reverse proxy on 127.0.0.1 that adds a fixed delay to every request.

It stands for a remote upstream (Mimir behind a load balancer, another region): every request
waits ``delay`` seconds, then is forwarded to the upstream over a kept-alive connection and the
answer relayed unchanged (Content-Encoding included). Keep-alive towards the client too, so a
client with a connection pool pays the delay, not a new TCP handshake, per request.

Run as a script it prints ``proxy: http://127.0.0.1:PORT`` and serves until its stdin closes (so
it never outlives the benchmark that started it) or it gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import urlsplit

#: Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "proxy-connection",
})


def make_handler(upstream: str, delay: float) -> type[BaseHTTPRequestHandler]:
    parts = urlsplit(upstream)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    prefix = parts.path.rstrip("/")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY: headers and body go out as separate writes; with Nagle's algorithm the
        # body would wait for the client's delayed ACK (about 40 ms) on every answer.
        disable_nagle_algorithm = True
        _conn: http.client.HTTPConnection | None = None

        def log_message(self, format: str, *args: object) -> None:
            """Quiet."""

        def do_GET(self) -> None:
            self._forward()

        def do_POST(self) -> None:
            self._forward()

        def _upstream(self) -> http.client.HTTPConnection:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(host, port, timeout=300)
            return self._conn

        def _exchange(self, body: bytes | None,
                      headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
            for attempt in (1, 2):
                conn = self._upstream()
                try:
                    conn.request(self.command, prefix + self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    return response, response.read()
                except (http.client.HTTPException, OSError):
                    # The upstream closed an idle kept-alive connection: reconnect once.
                    conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            time.sleep(delay)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Host"] = f"{host}:{port}"
            try:
                response, data = self._exchange(body, headers)
            except (http.client.HTTPException, OSError) as error:
                message = f"proxy: upstream failed: {error}\n".encode()
                self.send_response(502)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(message)))
                self.end_headers()
                self.wfile.write(message)
                return
            try:
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client left (a benchmark interrupted)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                if self._conn is not None:
                    self._conn.close()

    return Handler


def serve(upstream: str, delay: float, port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(upstream, delay))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="proxy", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds added per request")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = serve(args.upstream, args.delay, args.port)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
    print(f"proxy: http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

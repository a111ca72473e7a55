"""The HTTP endpoints: /metrics, /healthz, /readyz and a landing page.

Handlers only read the current snapshot; they never wait for a cycle.

Optionally (an exporter-toolkit web configuration file, ``--web.config.file``, or ``web:`` in
the configuration) the endpoints are served over TLS, client certificates can be required, and
/metrics and the landing page sit behind HTTP basic auth. /healthz and /readyz stay open: they
tell nothing but "up" and "ready", and kubelet probes carry no credentials. Passwords are stored
as bcrypt hashes, as exporter-toolkit stores them (:func:`bcrypt_hash`), and no other format:
with two, unknown user names took as long as one of them and could be told apart from the
other. A verified (user, password) is remembered (as an HMAC under a per-process key, never the
password) so a scraper pays the hash once, not on every scrape.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import selectors
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol, cast

import bcrypt

from exporter import __version__
from exporter.snapshot import CONTENT_TYPE

log = logging.getLogger(__name__)

#: Seconds a client gets for the TLS handshake, and for each read or write after it.
HANDSHAKE_TIMEOUT = 10.0
IO_TIMEOUT = 30.0
#: Seconds a connection may stay silent before its request starts; then it is closed. Until its
#: first byte it waits without a thread.
IDLE_TIMEOUT = 5.0
#: Seconds a request's line and headers get from its first byte (a client trickling them, a
#: "slowloris", frees its thread then).
REQUEST_TIMEOUT = 10.0
#: Threads answering requests, at most; requests beyond wait for one (50 scrapers at once
#: fit, as the load benchmark runs them).
MAX_THREADS = 64
#: Connections held while they wait for their first byte, at most; beyond, the one waiting
#: longest is closed.
MAX_WAITING = 512
#: The cost :func:`bcrypt_hash` uses: Python bcrypt's default, as exporter-toolkit's docs make
#: their hashes with it (2^12 rounds, about a quarter of a second).
DEFAULT_COST = 12
#: bcrypt reads this many bytes of a password; a longer one is refused, never cut.
BCRYPT_MAX_BYTES = 72
_REALM = 'Basic realm="triton-mig-exporter", charset="UTF-8"'
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})

#: A bcrypt hash, as exporter-toolkit takes them: ``$2y$`` (htpasswd -B), ``$2b$`` (Python's
#: bcrypt, ``triton-mig-exporter hash-password``) or ``$2a$``; the cost (4 to 31), then 22
#: characters of salt and 31 of checksum.
BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")

_LANDING = """<html><head><title>triton-mig-exporter</title></head><body>
<h1>triton-mig-exporter {version}</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot;
<a href="/readyz">/readyz</a></p></body></html>
"""


# --- passwords ----------------------------------------------------------------------------------


def bcrypt_hash(password: str, cost: int = DEFAULT_COST) -> str:
    """A ``$2b$<cost>$...`` bcrypt hash for ``basic_auth_users``: what exporter-toolkit takes.

    ValueError for a password over 72 bytes (bcrypt would read only its start).
    """
    raw = password.encode("utf-8")
    if len(raw) > BCRYPT_MAX_BYTES:
        raise ValueError(f"bcrypt takes passwords of at most {BCRYPT_MAX_BYTES} bytes")
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=cost)).decode("ascii")


def bcrypt_cost(hashed: str) -> int:
    """The cost of a bcrypt hash (ValueError for anything else)."""
    match = BCRYPT_HASH.match(hashed)
    if match is None:
        raise ValueError("not a bcrypt ($2y$, $2b$, $2a$) password hash")
    return int(match.group(1))


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches ``hashed``, a bcrypt hash (False for anything else)."""
    if not BCRYPT_HASH.match(hashed):
        return False
    raw = password.encode("utf-8")
    # Python's bcrypt refuses a longer password; Go's used to read its first 72 bytes. A
    # password of 73 bytes and more never matches.
    return len(raw) <= BCRYPT_MAX_BYTES and bcrypt.checkpw(raw, hashed.encode("ascii"))


class BasicAuth:
    """Checks ``Authorization: Basic`` headers against ``users`` (user name -> bcrypt hash;
    ValueError for anything else)."""

    CACHE_SIZE = 256

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)
        costs = [bcrypt_cost(hashed) for hashed in self._users.values()]
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()
        # Unknown users are checked against this, as costly as the costliest user's hash, so
        # an unknown name never answers faster than a known one.
        self._dummy = bcrypt_hash(secrets.token_hex(8), max(costs, default=DEFAULT_COST))

    def __call__(self, header: str | None) -> bool:
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(":")
        if not sep:
            return False
        key = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
        hashed = self._users.get(user)
        ok = verify_password(password, hashed if hashed is not None else self._dummy)
        if ok and hashed is not None:
            with self._lock:
                self._verified[key] = None
                while len(self._verified) > self.CACHE_SIZE:
                    self._verified.popitem(last=False)
            return True
        return False


# --- TLS ----------------------------------------------------------------------------------------


class TLSFiles:
    """A server TLS context from a certificate and key (and the CA client certificates are
    verified against, when ``verify`` asks for them), reloaded when any of the files changes
    (cert-manager and friends rotate them in place); a failed reload keeps the last context."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        client_ca: Path | None = None,
        verify: ssl.VerifyMode = ssl.CERT_NONE,
        versions: tuple[ssl.TLSVersion, ssl.TLSVersion] = (
            ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.MAXIMUM_SUPPORTED),
    ) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.verify, self.versions = verify, versions
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._context = self._load()  # OSError / ssl.SSLError at start-up, not per connection

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in (self.cert, self.key, self.client_ca):
            if path is None:
                continue
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version, context.maximum_version = self.versions
        context.load_cert_chain(str(self.cert), str(self.key), password=lambda: b"")
        if self.client_ca is not None:
            context.load_verify_locations(cafile=str(self.client_ca))
        context.verify_mode = self.verify
        return context

    def context(self) -> ssl.SSLContext:
        stamp = self._stat()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._context = self._load()
                    log.info("reloaded the TLS certificate %s", self.cert)
                except (OSError, ssl.SSLError) as error:
                    log.warning("keeping the previous TLS certificate: %s", error)
            return self._context


# --- HTTP ---------------------------------------------------------------------------------------

_QVALUE = re.compile(r"^(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)$")


def accepts_gzip(header: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header asks for gzip (RFC 9110, section 12.5.3): gzip (or
    x-gzip) named with a weight above 0, or, when it is not named, ``*`` with one. A weight that
    is not a qvalue makes its coding unacceptable."""
    named: float | None = None
    anything: float | None = None
    for part in (header or "").split(","):
        coding, *params = (piece.strip() for piece in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                value = value.strip()
                weight = float(value) if _QVALUE.match(value) else 0.0
        coding = coding.lower()
        if coding in ("gzip", "x-gzip"):
            named = weight if named is None else max(named, weight)
        elif coding == "*":
            anything = weight
    if named is not None:
        return named > 0
    return anything is not None and anything > 0



class Source(Protocol):
    """What the endpoints read: the /metrics body in parts, and readiness."""

    def metrics_parts(self, gzipped: bool) -> list[bytes]:
        """The body's pieces, in order (gzip: each a complete gzip member; members
        concatenate into one valid stream, RFC 1952 section 2.2)."""
        ...

    def ready(self) -> bool: ...

    def alive(self) -> bool:
        """Whether the process behind the figures still runs them (for /healthz)."""
        ...


class App:
    """The endpoints over a :class:`Source`.

    ``write_parts``: write /metrics piece by piece instead of joining the pieces first. A
    process that runs no cycles (the scrape process) saves the copy, a joined 10 MB at 100k
    series per scrape in flight; in a process that runs cycles each write waits for the
    interpreter lock again, and a scrape's p99 tripled.
    """

    def __init__(self, source: Source, auth: BasicAuth | None = None,
                 write_parts: bool = False) -> None:
        self.source = source
        self.auth = auth
        self.write_parts = write_parts

    def metrics_body(self, gzipped: bool) -> bytes:
        return b"".join(self.source.metrics_parts(gzipped))

    def ready(self) -> bool:
        return self.source.ready()

    def allowed(self, path: str, authorization: str | None) -> bool:
        return self.auth is None or path in _OPEN_PATHS or self.auth(authorization)


class _RequestReader(io.RawIOBase):
    """A connection's reads. While :attr:`deadline` is set (the request line and headers, from
    the moment the first byte could be read), a read gets only the time left until it, so
    trickling them holds a thread no longer."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            # Past it, only what has arrived already is read: a request that waited for a
            # thread is still answered, a client trickling its headers is not waited for.
            left = self.deadline - time.monotonic()
            self._sock.settimeout(min(max(left, 0.0), IO_TIMEOUT))
            try:
                return self._sock.recv_into(buffer)
            except BlockingIOError:
                raise TimeoutError("the request line and headers took too long") from None
        return self._sock.recv_into(buffer)


def _handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"triton-mig-exporter/{__version__}"
        timeout = IO_TIMEOUT  # a client that stalls mid-request frees its thread
        _reader: _RequestReader
        _head = False

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the socket's own file, replaced by one with a deadline
            self._reader = _RequestReader(self.connection)
            began: float = cast("Server", self.server).began.at
            self._reader.deadline = began + REQUEST_TIMEOUT
            self.rfile = io.BufferedReader(self._reader)

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # the line and the headers are in
            self._reader.deadline = None
            self.connection.settimeout(IO_TIMEOUT)
            return parsed

        def do_HEAD(self) -> None:
            self._head = True
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if not app.allowed(path, self.headers.get("Authorization")):
                self._send(401, b"unauthorized\n", "text/plain",
                           extra={"WWW-Authenticate": _REALM})
            elif path == "/metrics":
                gzipped = accepts_gzip(self.headers.get("Accept-Encoding"))
                parts = app.source.metrics_parts(gzipped)
                body = parts if app.write_parts or self._head else [b"".join(parts)]
                self._send(200, body, CONTENT_TYPE, "gzip" if gzipped else None)
            elif path == "/healthz":
                if app.source.alive():
                    self._send(200, b"ok\n", "text/plain")
                else:
                    self._send(503, b"unhealthy: the cycling process has gone silent\n",
                               "text/plain")
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

        def _send(self, status: int, body: bytes | list[bytes], content_type: str,
                  encoding: str | None = None, extra: Mapping[str, str] | None = None) -> None:
            parts = [body] if isinstance(body, bytes) else body
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(sum(map(len, parts))))
            self.end_headers()
            if not self._head:
                for part in parts:
                    self.wfile.write(part)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


class _Pool:
    """At most ``limit`` daemon threads running ``run`` on the items submitted, started as they
    are needed and ended after a minute without work. Daemon threads, as socketserver's: a
    client that stalls mid-answer never holds the process open."""

    IDLE_EXIT = 60.0

    def __init__(self, limit: int, run: Callable[[Any], None]) -> None:
        self.limit = limit
        self._run = run
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._threads = 0
        self._idle = 0

    def submit(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._idle:
                self._wake.notify()
            elif self._threads < self.limit:
                self._threads += 1
                threading.Thread(target=self._work, name="http", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._items:
                    self._idle += 1
                    woken = self._wake.wait(self.IDLE_EXIT)
                    self._idle -= 1
                    if not woken and not self._items:
                        self._threads -= 1
                        return
                item = self._items.popleft()
            self._run(item)


class _Waiting:
    """Accepted connections waiting for their first byte, in one thread: each is handed to
    ``ready`` once it can be read (the request has begun, or the client hung up), and closed
    with ``drop`` once it has waited :data:`IDLE_TIMEOUT`, or when more than
    :data:`MAX_WAITING` wait (the longest waiting first)."""

    def __init__(self, ready: Callable[[Any, Any], None], drop: Callable[[Any], None]) -> None:
        self._ready, self._drop = ready, drop
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        for end in (self._wake_read, self._wake_write):
            end.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._new: deque[tuple[Any, Any]] = deque()
        #: connection -> (client address, when it is closed), longest waiting first.
        self._held: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="http-waiting", daemon=True)
        self._thread.start()

    def add(self, connection: Any, address: Any) -> None:
        """From the accepting thread."""
        self._new.append((connection, address))
        with contextlib.suppress(OSError):  # full: a wake-up is already pending
            self._wake_write.send(b"\0")

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        self._thread.join(5)

    def _loop(self) -> None:
        try:
            while not self._closed:
                self._take_new()
                now = time.monotonic()
                while self._held:
                    oldest = next(iter(self._held))
                    if self._held[oldest][1] > now:
                        break
                    self._let_go(oldest, ready=False)
                timeout = (next(iter(self._held.values()))[1] - now) if self._held else None
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            while self._wake_read.recv(4096):
                                pass
                    elif key.fileobj in self._held:
                        self._let_go(key.fileobj, ready=True)
        finally:
            for connection in list(self._held):
                self._let_go(connection, ready=False)
            self._selector.close()
            self._wake_read.close()
            self._wake_write.close()

    def _take_new(self) -> None:
        while self._new:
            connection, address = self._new.popleft()
            try:
                self._selector.register(connection, selectors.EVENT_READ, address)
            except (OSError, ValueError):  # closed already
                self._drop(connection)
                continue
            self._held[connection] = (address, time.monotonic() + IDLE_TIMEOUT)
            while len(self._held) > MAX_WAITING:
                self._let_go(next(iter(self._held)), ready=False)

    def _let_go(self, connection: Any, ready: bool) -> None:
        address, _ = self._held.pop(connection)
        with contextlib.suppress(OSError, ValueError, KeyError):
            self._selector.unregister(connection)
        if ready:
            self._ready(connection, address)
        else:
            self._drop(connection)


class Server(HTTPServer):
    """An HTTP server whose connections wait for their first byte without a thread
    (:class:`_Waiting`) and are then answered by at most :data:`MAX_THREADS` threads
    (:class:`_Pool`)."""

    #: The listen backlog. socketserver's default of 5 drops the connections of a burst of
    #: scrapers beyond it, and their clients wait out SYN retransmits (1 s, 3 s, 7 s, ...).
    request_queue_size = socket.SOMAXCONN
    tls: TLSFiles | None = None

    def start_workers(self) -> None:
        #: Per answering thread: when its connection's first byte could be read (``at``).
        self.began = threading.local()
        self._pool = _Pool(MAX_THREADS, self._answer)
        self._waiting = _Waiting(
            lambda c, a: self._pool.submit((c, a, time.monotonic())), self.shutdown_request)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._waiting.add(request, client_address)

    def _answer(self, item: tuple[Any, Any, float]) -> None:
        request, client_address, self.began.at = item
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        self._waiting.close()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the TLS handshake (so a client that never finishes
        one holds up nobody else), then the request."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            connection = self.tls.context().wrap_socket(request, server_side=True)
        except OSError as error:  # ssl.SSLError included: plain HTTP, a bad client certificate
            log.debug("TLS handshake with %s failed: %s", client_address[0], error)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            self.shutdown_request(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A scraper hanging up mid-answer is routine: one debug line, not a traceback on stderr.
        error = sys.exc_info()[1]
        log.debug("connection from %s ended: %s: %s", client_address[0],
                  type(error).__name__, error)


class Server6(Server):
    address_family = socket.AF_INET6


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` as the HTTP server would open it (OSError when the
    port is taken), to be served here or by another process it is handed to."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(Server.request_queue_size)
    except OSError:
        sock.close()
        raise
    return sock


def serve_socket(app: App, sock: socket.socket, *, tls: TLSFiles | None = None
                 ) -> Server:
    """Serve ``app`` on a listening socket in a daemon thread; the caller shuts the returned
    server down (which closes the socket)."""
    server_class = Server6 if sock.family == socket.AF_INET6 else Server
    server = server_class(sock.getsockname()[:2], _handler(app), bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()
    server.tls = tls
    server.start_workers()
    thread = threading.Thread(target=server.serve_forever, name="http-accept", daemon=True)
    thread.start()
    return server


def serve(app: App, host: str, port: int, *, tls: TLSFiles | None = None) -> Server:
    """Start serving on ``host:port`` in a daemon thread (OSError when the port is taken)."""
    return serve_socket(app, listen(host, port), tls=tls)

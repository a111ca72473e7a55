"""The scrape process: /metrics answered by a process that runs no cycles.

A cycle's CPU work (decoding answers, deriving, rendering) holds the interpreter lock in turns
of a millisecond or two, and a scrape served by the same process waits behind those turns at
every step it takes: at 100k series its 99th percentile was 15 to 19 ms. Served from a process
of its own, a scrape waits for nothing but the CPU (3 to 6 ms).

``serve`` opens the listening socket itself (so a busy port fails before anything starts) and
starts ``python -m exporter.scrape_process FD`` on it. It writes the child, on the child's
standard input:

* once, the :class:`Settings` (one JSON message), and a first update, which the child holds
  before it answers a scrape;
* after each cycle and every :data:`REFRESH` seconds, an update: the self-metrics the cycle
  updates, as exposition bytes, and, when there is a new one, the snapshot of rendered
  families (:func:`encode_update`).

With ``web.scrape_process: auto`` (the default) ``serve`` answers scrapes itself until a cycle
publishes more than :data:`exporter.service.AUTO_SERIES` series, then starts the child on the
socket it listens on, its latest snapshot as the first update, and stops accepting.

The child serves them with the same handlers as one process would (:mod:`exporter.web`) and
renders the gauges that depend on the time of the scrape itself (upstream_up, series per
family). It exits when its standard input closes: the parent stopped, or died. The parent
exits with an error when the child dies. This module imports neither pandas nor the
configuration's libraries: the child holds about 26 MiB (11 of them pages it shares with the
parent) plus the figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from exporter import web
from exporter.snapshot import (
    RenderedFamily,
    Snapshot,
    SnapshotHolder,
    StateCollector,
    exposition_parts,
)

log = logging.getLogger(__name__)

#: Seconds between updates when no cycle ends: the self-metrics a scheduler event changes
#: (cycles_missed) or a long cycle's requests reach scrapes within this.
REFRESH = 1.0
#: Seconds without an update after which the child's /healthz answers 503: the parent sends one
#: every :data:`REFRESH` seconds even while a cycle runs, so silence this long means it is stuck
#: (stopped, or its relay thread gone), and liveness probes should restart the exporter.
SILENCE_LIMIT = 30.0
#: Seconds the child gets to start serving, and to exit once its input is closed.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
_LENGTH = struct.Struct(">I")


class ScrapeProcessError(RuntimeError):
    """The scrape process did not start, or exited while serve ran."""


@dataclass(frozen=True)
class TLSSettings:
    cert: str
    key: str
    client_ca: str | None
    verify: int
    min_version: int
    max_version: int

    def files(self) -> web.TLSFiles:
        return web.TLSFiles(
            Path(self.cert), Path(self.key),
            client_ca=None if self.client_ca is None else Path(self.client_ca),
            verify=ssl.VerifyMode(self.verify),
            versions=(ssl.TLSVersion(self.min_version), ssl.TLSVersion(self.max_version)))

    @classmethod
    def of(cls, files: web.TLSFiles) -> TLSSettings:
        return cls(str(files.cert), str(files.key),
                   None if files.client_ca is None else str(files.client_ca),
                   int(files.verify), int(files.versions[0]), int(files.versions[1]))


@dataclass(frozen=True)
class Settings:
    """What the child needs to know before it serves. Sent on its input, not its command
    line, because it holds password hashes."""

    staleness: float
    #: Every derived family's name, in the catalog's order (for the series-per-family gauge).
    families: tuple[str, ...]
    log_level: int = logging.INFO
    tls: TLSSettings | None = None
    users: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return _frame(json.dumps(asdict(self)).encode())

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> Settings:
        tls = data.get("tls")
        return cls(float(data["staleness"]), tuple(data["families"]), int(data["log_level"]),
                   None if tls is None else TLSSettings(**tls), dict(data["users"]))


# --- the messages -------------------------------------------------------------------------------


def _frame(header: bytes) -> bytes:
    return _LENGTH.pack(len(header)) + header


def encode_update(snapshot: Snapshot | None, counters: bytes) -> list[bytes]:
    """One update as the pieces to write in order: a length-prefixed JSON header, then the
    blobs it gives the lengths of (the counters; each family's plain and gzip bytes)."""
    head: dict[str, Any] = {"counters": len(counters)}
    blobs = [counters]
    if snapshot is not None:
        head["snapshot"] = {
            "cycle_at": snapshot.cycle_at, "cycle_good": snapshot.cycle_good,
            "good_at": snapshot.good_at, "evaluated_at": snapshot.evaluated_at,
            "families": [[f.name, f.series, f.computed_at, len(f.body), len(f.body_gzip)]
                         for f in snapshot.families.values()],
        }
        for family in snapshot.families.values():
            blobs += [family.body, family.body_gzip]
    return [_frame(json.dumps(head).encode()), *blobs]


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream (also in the middle of a message: the
    writer is gone)."""
    data = stream.read(size)  # a buffered read loops over short reads, without the lock
    return data if len(data) == size else None


def read_header(stream: IO[bytes]) -> dict[str, Any] | None:
    """The next message's JSON header, or None at the end of the stream."""
    length = _read_exactly(stream, _LENGTH.size)
    if length is None:
        return None
    header = _read_exactly(stream, _LENGTH.unpack(length)[0])
    return None if header is None else dict(json.loads(header))


def read_update(stream: IO[bytes]) -> tuple[Snapshot | None, bytes] | None:
    """The next update (see :func:`encode_update`), or None at the end of the stream."""
    head = read_header(stream)
    if head is None:
        return None
    counters = _read_exactly(stream, int(head["counters"]))
    if counters is None:
        return None
    shot = head.get("snapshot")
    if shot is None:
        return None, counters
    families: dict[str, RenderedFamily] = {}
    for name, series, computed_at, plain_size, gzip_size in shot["families"]:
        body = _read_exactly(stream, plain_size)
        body_gzip = _read_exactly(stream, gzip_size)
        if body is None or body_gzip is None:
            return None
        families[name] = RenderedFamily(name, body, body_gzip, series, computed_at)
    snapshot = Snapshot(MappingProxyType(families), shot["cycle_at"], shot["cycle_good"],
                        shot["good_at"], shot["evaluated_at"])
    return snapshot, counters


# --- the child ----------------------------------------------------------------------------------


class Mirror:
    """The child's copy of the parent's snapshot and self-metrics: a :class:`web.Source`."""

    def __init__(self, staleness: float, families: Sequence[str],
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.holder = SnapshotHolder(staleness, clock)
        self.counters = b""
        self.state = StateCollector(self.holder, families)
        self.monotonic = monotonic
        self.received_at = monotonic()

    def receive(self, snapshot: Snapshot | None, counters: bytes) -> None:
        self.received_at = self.monotonic()
        self.counters = counters
        if snapshot is not None:
            self.holder.snapshot = snapshot

    def metrics_parts(self, gzipped: bool) -> list[bytes]:
        return exposition_parts(self.holder, self.counters, self.state, gzipped)

    def ready(self) -> bool:
        return self.holder.ready_now()

    def alive(self) -> bool:
        return self.monotonic() - self.received_at <= SILENCE_LIMIT


def child_main(argv: Sequence[str]) -> int:
    """``python -m exporter.scrape_process FD``: serve the listening socket FD until standard
    input ends."""
    # The child lives as long as its parent: Ctrl-C (the whole process group gets it) and a
    # SIGTERM sent to every process of the group (systemd does) stop the parent, which closes
    # the child's input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    head = read_header(stdin)
    first = None if head is None else read_update(stdin)
    if head is None or first is None:
        return 1
    settings = Settings.decode(head)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    mirror = Mirror(settings.staleness, settings.families)
    mirror.receive(*first)  # before the first scrape: a hand-over serves no empty answer
    try:
        tls = None if settings.tls is None else settings.tls.files()
    except (OSError, ssl.SSLError) as error:
        print(f"error: cannot load the TLS certificate: {error}", file=sys.stderr)
        return 1
    auth = web.BasicAuth(settings.users) if settings.users else None
    server = web.serve_socket(web.App(mirror, auth, write_parts=True), sock, tls=tls)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        while (update := read_update(stdin)) is not None:
            mirror.receive(*update)
    finally:
        server.shutdown()
        server.server_close()
    return 0


# --- the parent ---------------------------------------------------------------------------------


class ScrapeProcess:
    """The parent's handle on the child: start it on a listening socket, send it updates,
    stop it. Updates are sent from one thread at a time."""

    def __init__(self, sock: socket.socket, settings: Settings,
                 first: tuple[Snapshot | None, bytes] = (None, b"")) -> None:
        """Start the child on ``sock`` and wait until it serves (ScrapeProcessError if it does
        not); ``first``: the update it holds before it answers its first scrape."""
        self._lock = threading.Lock()
        fd = sock.fileno()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.scrape_process", str(fd)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._input: IO[bytes] = self.proc.stdin
        try:
            self._input.write(settings.encode())
            for piece in encode_update(*first):
                self._input.write(piece)
            self._input.flush()
            self._wait_ready(self.proc.stdout)
        except (OSError, ScrapeProcessError):
            self.stop()
            raise ScrapeProcessError(
                f"the scrape process did not start (exit code {self.proc.returncode})"
            ) from None

    def _wait_ready(self, stdout: IO[bytes]) -> None:
        ready, _, _ = select.select([stdout], [], [], START_TIMEOUT)
        if not ready or stdout.readline() != b"ready\n":
            raise ScrapeProcessError("not ready")
        stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        """None while the child runs."""
        return self.proc.poll()

    def send(self, snapshot: Snapshot | None, counters: bytes) -> None:
        """Send one update (OSError, BrokenPipeError included, once the child is gone)."""
        with self._lock:
            for piece in encode_update(snapshot, counters):
                self._input.write(piece)
            self._input.flush()

    def stop(self) -> int:
        """Close the child's input, so it exits; kill it if it has not within
        :data:`STOP_TIMEOUT`. Its exit code."""
        # OSError: the child was gone with data unread.
        with self._lock, contextlib.suppress(OSError):
            self._input.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()  # already, unless it never said it was ready
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))


"""The running exporter: upstream client, worker and HTTP endpoints wired together.

``serve`` runs one until a signal; ``demo`` runs one next to a simulator and a Prometheus.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

from exporter import catalog, upstream, web
from exporter.config import TLS_VERSIONS, Config, ConfigError
from exporter.publish import InProcess, Publisher, SelfMetrics
from exporter.scrape_process import (
    REFRESH,
    ScrapeProcess,
    ScrapeProcessError,
    Settings,
    TLSSettings,
)
from exporter.snapshot import Snapshot
from exporter.worker import Worker

log = logging.getLogger(__name__)


#: Libraries whose routine lines repeat, every cycle, what the worker says once per change:
#: the scheduler logs each run (and each skipped tick, which cycles_missed counts), urllib3 each
#: retry (the cycle's failure line names the cause). Below --log.level debug they only speak up
#: at this level.
QUIET_LOGGERS = {"apscheduler": logging.ERROR, "urllib3": logging.ERROR}


#: The interpreter's switch interval in serve (Python's default is 5 ms). While a cycle keeps
#: threads busy under the interpreter lock, a thread serving a scrape waits about this long
#: each time it wants the lock back (after each socket call, its start): ten times or more per
#: scrape. At 5 ms a scrape during a cycle took 50 to 70 ms at the 99th percentile, at 0.5 ms
#: 15 to 20 ms; a shorter interval bought nothing more.
SWITCH_INTERVAL = 0.0005
#: Automatic full collections of the garbage collector run at most once per this many
#: collections of its middle generation (Python's default: 10), instead of several times a
#: cycle; the worker runs one after each cycle.
FULL_COLLECTION_EVERY = 1000


def tune_interpreter() -> None:
    """Interpreter settings for serve: a scrape during a cycle waits for the interpreter lock
    in short turns, not behind long holds.

    A full garbage collection traverses every object alive, under the interpreter lock: with a
    cycle's decoded answers alive, 30 to 90 ms each and about six per cycle at 100k series. The
    objects alive at start-up (the imported modules') are frozen out of them, and the
    automatic ones are all but switched off: the worker collects once after each cycle, when
    little but the frozen objects is alive (about a millisecond).
    """
    sys.setswitchinterval(SWITCH_INTERVAL)
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def quiet_libraries() -> None:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)


#: With ``web.scrape_process: auto``: the scrape process takes over once a cycle publishes more
#: than this many series. Below it, scrapes served by the cycling process take a few
#: milliseconds (fleet L, 1,744 series: p99 under 5 ms) and the second process would cost about
#: 25 MiB; at 104k series they took 15 to 20 ms at the 99th percentile, 4 to 6 from the scrape
#: process.
AUTO_SERIES = 10_000


class Service:
    def __init__(self, cfg: Config, *, scrape_process_above: float = AUTO_SERIES) -> None:
        """``scrape_process_above``: with ``web.scrape_process: auto``, the published series
        beyond which the scrape process takes over."""
        quiet_libraries()
        self.cfg = cfg
        self.scrape_process_above = scrape_process_above
        self.publisher = Publisher(cfg.evaluation.staleness_bound)
        self.metrics = SelfMetrics(self.publisher)
        # Decoding answers, deriving and rendering take turns on one lock: one thread of the
        # cycle at a time competes for the interpreter (with the threads serving scrapes, when
        # this process serves them). Kept with the scrape process too: answers decoded at once
        # only take turns on the interpreter lock anyway, and are held at once. At 104k series
        # without it, cycles took 2.1 s instead of 1.4 to 1.5 and peak RSS was 360 MiB, not 300.
        self._cpu = threading.Lock()
        #: Set at the end of each cycle: the relay sends the scrape process the new snapshot.
        self._cycle_done = threading.Event()
        self.client, self.worker, self.tls, self._users = self._build(cfg)
        self._server: web.Server | None = None
        self._app: web.App | None = None
        #: The listening socket, kept to start a scrape process on (at hand-over, or again at
        #: a reload); the server thread serves a copy of it.
        self._listener: socket.socket | None = None
        self.scrapes: ScrapeProcess | None = None
        self._relay: threading.Thread | None = None
        self._stopping = threading.Event()
        #: Set when serving cannot go on (the scrape process died); :attr:`failure` says why.
        self.failed = threading.Event()
        self.failure = ""
        self._address: tuple[str, int] | None = None

    def _build(self, cfg: Config) -> tuple[upstream.PrometheusClient, Worker,
                                            web.TLSFiles | None, dict[str, str]]:
        """What follows from ``cfg``: the client, the worker, the TLS files and the users
        (ConfigError, having started nothing, when the TLS files do not load)."""
        served = cfg.web.served()
        tls = served.tls_server_config
        files: web.TLSFiles | None = None
        if tls is not None and tls.cert_file is not None and tls.key_file is not None:
            try:
                files = web.TLSFiles(
                    tls.cert_file, tls.key_file, client_ca=tls.client_ca_file,
                    verify=tls.verify_mode,
                    versions=(TLS_VERSIONS[tls.min_version], TLS_VERSIONS[tls.max_version]))
            except (OSError, ssl.SSLError) as error:
                raise ConfigError(
                    f"{tls.cert_file}: cannot load the TLS certificate: {error}") from None
        client = upstream.PrometheusClient(
            cfg.upstream, on_request=self.metrics.observe_request, cpu=self._cpu
        )
        worker = Worker(cfg, client, self.publisher, self.metrics, cpu=self._cpu,
                        on_cycle_end=self._cycle_done.set)
        return client, worker, files, dict(served.basic_auth_users)

    def start(self) -> None:
        """Listen first (so a busy port fails fast: OSError), then start the scrape process
        (:class:`ScrapeProcessError` if it does not) or the server thread, then cycling."""
        host, port = self.cfg.web.host_port
        sock = self._listener = web.listen(host, port)
        self._address = (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
        mode = self.cfg.web.scrape_process
        if mode is True:
            self.scrapes = ScrapeProcess(sock, self._settings())
        else:
            # Built only where it checks passwords: it hashes a dummy one (a bcrypt round).
            auth = web.BasicAuth(self._users) if self._users else None
            self._app = web.App(InProcess(self.publisher, self.metrics), auth)
            self._server = web.serve_socket(self._app, sock.dup(), tls=self.tls)
        if mode is not False:
            self._relay = threading.Thread(target=self._relay_updates, name="relay",
                                           daemon=True)
            self._relay.start()
        self.worker.start()
        if self._users and self.tls is None:
            log.warning("basic auth without TLS: passwords are sent in clear text")
        log.info(
            "serving %s; upstream %s every %gs, window %gs",
            self.metrics_url, self.client.url, self.cfg.evaluation.interval,
            self.cfg.evaluation.window,
        )

    def _settings(self) -> Settings:
        return Settings(
            staleness=self.cfg.evaluation.staleness_bound,
            families=tuple(series.name for series in catalog.SERIES),
            log_level=logging.getLogger().getEffectiveLevel(),
            tls=None if self.tls is None else TLSSettings.of(self.tls),
            users=self._users,
        )

    def _relay_updates(self) -> None:
        """Send the scrape process each cycle's snapshot (and the self-metrics at least every
        :data:`REFRESH` seconds) until stopped or it is gone; in auto mode, first wait for a
        cycle that calls for it (:meth:`_hand_over`)."""
        sent: Snapshot | None = None
        while not self._stopping.is_set():
            if self.scrapes is None:
                sent = self._hand_over()
            scrapes = self.scrapes
            if scrapes is not None:
                snapshot = self.publisher.snapshot
                try:
                    scrapes.send(None if snapshot is sent else snapshot,
                                 self.metrics.counters_body())
                except OSError:
                    if self._stopping.is_set():
                        return
                    if scrapes is not self.scrapes:  # replaced by a reload meanwhile
                        continue
                    code = scrapes.exit_code()
                    self.failure = f"the scrape process exited (code {code}): /metrics is down"
                    self.failed.set()
                    return
                sent = snapshot
            self._cycle_done.wait(REFRESH)
            self._cycle_done.clear()

    def _hand_over(self) -> Snapshot | None:
        """Auto mode: once the latest cycle published more than :attr:`scrape_process_above`
        series, start the scrape process on the listening socket with that snapshot, then stop
        accepting here (connections accepted meanwhile are still answered). The snapshot it
        was given, or None while this process keeps the scrapes."""
        snapshot = self.publisher.snapshot
        series = snapshot.series
        server = self._server
        if series <= self.scrape_process_above or server is None or self._listener is None:
            return None
        try:
            self.scrapes = ScrapeProcess(self._listener, self._settings(),
                                         (snapshot, self.metrics.counters_body()))
        except ScrapeProcessError as error:
            log.error("%s; this process keeps answering scrapes", error)
            self.scrape_process_above = math.inf  # once is enough
            return None
        server.shutdown()
        server.server_close()  # its copy of the socket; the child holds its own
        self._server = None
        self._app = None
        log.info("a cycle published %d series (more than %g): scrapes are answered by the "
                 "scrape process (pid %d) from now on", series, self.scrape_process_above,
                 self.scrapes.pid)
        return snapshot

    @property
    def address(self) -> tuple[str, int]:
        assert self._address is not None, "not started"
        return self._address

    @property
    def metrics_url(self) -> str:
        host, port = self.address
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        if ":" in shown:
            shown = f"[{shown}]"
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{shown}:{port}/metrics"

    def stop(self) -> bool:
        """Stop; False when a cycle was still running (see :meth:`Worker.stop`)."""
        idle = self.worker.stop()
        self._stopping.set()
        self._cycle_done.set()
        if self._relay is not None:
            self._relay.join()
            self._relay = None
        if self.scrapes is not None:
            self.scrapes.stop()
            self.scrapes = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.client.close()
        return idle

    def reload(self, cfg: Config) -> list[str]:
        """Run from now on with ``cfg``: another upstream, evaluation, selectors, TLS files or
        users take effect (a new client and worker; the scrape process, if any, restarted on
        the same socket), while the published figures and the self-metrics carry on. The
        listen address and the scrape process mode cannot change while serving: the keys
        that would change them are returned (and not applied). ConfigError, with nothing
        changed, when the TLS files do not load."""
        lasting = [f"web.{key}" for key in ("listen_address", "scrape_process")
                   if getattr(cfg.web, key) != getattr(self.cfg.web, key)]
        client, worker, tls, users = self._build(cfg)
        staleness = cfg.evaluation.staleness_bound
        cfg = cfg.model_copy(update={"web": cfg.web.model_copy(update={
            "listen_address": self.cfg.web.listen_address,
            "scrape_process": self.cfg.web.scrape_process})})
        old_scrapes = self.scrapes
        if old_scrapes is not None and self._listener is not None:
            # Its TLS files, users and staleness bound are settings it reads at start: a new
            # one on the same socket, then the old one goes (ScrapeProcessError: nothing
            # changed).
            settings = replace(self._settings(), staleness=staleness,
                               tls=None if tls is None else TLSSettings.of(tls), users=users)
            try:
                self.scrapes = ScrapeProcess(self._listener, settings, (
                    self.publisher.snapshot, self.metrics.counters_body()))
            except ScrapeProcessError:
                client.close()
                raise
            old_scrapes.stop()
        old_client, old_worker = self.client, self.worker
        if old_worker.stop(grace=0):
            old_client.close()
        else:
            # A cycle in progress finishes (and publishes) on its own; its client is closed
            # once it has.
            bound = self.cfg.upstream.worst_case_seconds + 5

            def close_after() -> None:
                old_worker.stop(grace=bound)
                old_client.close()

            threading.Thread(target=close_after, name="reload", daemon=True).start()
        self.cfg = cfg
        self.client, self.worker, self.tls, self._users = client, worker, tls, users
        self.publisher.staleness = staleness
        if self._server is not None and self._app is not None:
            self._app.auth = web.BasicAuth(users) if users else None
            self._server.tls = tls
        worker.start()
        return lasting


def catch_hangups() -> threading.Event:
    """From now on SIGHUP sets the returned event instead of ending the process (its default);
    :func:`wait_for_signal` acts on it."""
    hangup = threading.Event()
    signal.signal(signal.SIGHUP, lambda signum, frame: hangup.set())
    return hangup


def wait_for_signal(failed: threading.Event | None = None,
                    on_hangup: Callable[[], None] | None = None,
                    hangup: threading.Event | None = None) -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C), or until ``failed`` is set. With ``on_hangup``,
    call it (in this thread) after each SIGHUP; ``hangup``: the event of
    :func:`catch_hangups`, when SIGHUP was caught before (a SIGHUP during start-up then
    counts)."""
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signals = [signal.SIGTERM, signal.SIGINT]
    previous = {s: signal.signal(s, _stop) for s in signals}
    if on_hangup is not None:
        hangup = hangup or threading.Event()
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda s, f: hangup.set())
    try:
        while not stop.wait(0.5):
            if failed is not None and failed.is_set():
                return
            if on_hangup is not None and hangup is not None and hangup.is_set():
                hangup.clear()
                on_hangup()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

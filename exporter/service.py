"""The running exporter: upstream client, worker and HTTP endpoints wired together.

``serve`` runs one until a signal; ``demo`` runs one next to a simulator and a Prometheus.
"""

from __future__ import annotations

import gc
import logging
import signal
import ssl
import sys
import threading
from http.server import ThreadingHTTPServer
from types import FrameType

from exporter import upstream, web
from exporter.config import TLS_VERSIONS, Config, ConfigError
from exporter.publish import Publisher, SelfMetrics
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


class Service:
    def __init__(self, cfg: Config) -> None:
        quiet_libraries()
        self.cfg = cfg
        self.publisher = Publisher(cfg.evaluation.staleness_bound)
        self.metrics = SelfMetrics(self.publisher)
        # Decoding answers, deriving and rendering take turns on one lock: one thread of the
        # cycle at a time competes for the interpreter with the threads serving scrapes.
        cpu = threading.Lock()
        self.client = upstream.PrometheusClient(
            cfg.upstream, on_request=self.metrics.observe_request, cpu=cpu
        )
        self.worker = Worker(cfg, self.client, self.publisher, self.metrics, cpu=cpu)
        served = cfg.web.served()
        tls = served.tls_server_config
        self.tls: web.TLSFiles | None = None
        if tls is not None and tls.cert_file is not None and tls.key_file is not None:
            try:
                self.tls = web.TLSFiles(
                    tls.cert_file, tls.key_file, client_ca=tls.client_ca_file,
                    verify=tls.verify_mode,
                    versions=(TLS_VERSIONS[tls.min_version], TLS_VERSIONS[tls.max_version]))
            except (OSError, ssl.SSLError) as error:
                raise ConfigError(
                    f"{tls.cert_file}: cannot load the TLS certificate: {error}") from None
        users = served.basic_auth_users
        self.auth = web.BasicAuth(users) if users else None
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Listen first (so a busy port fails fast), then start cycling."""
        host, port = self.cfg.web.host_port
        app = web.App(self.publisher, self.metrics, self.auth)
        self._server = web.serve(app, host, port, tls=self.tls)
        self.worker.start()
        if self.auth is not None and self.tls is None:
            log.warning("basic auth without TLS: passwords are sent in clear text")
        log.info(
            "serving %s; upstream %s every %gs, window %gs",
            self.metrics_url, self.client.url, self.cfg.evaluation.interval,
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
        if ":" in shown:
            shown = f"[{shown}]"
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{shown}:{port}/metrics"

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

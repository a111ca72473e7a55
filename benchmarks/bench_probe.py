"""The exporter under measurement, in its own process (so its peak RSS is its own).

Run as a script, it wires the exporter as ``exporter.service.Service`` does (PrometheusClient with
``on_request``, Worker, Publisher, SelfMetrics, ``exporter.web.serve`` on 127.0.0.1:0, in one
process as ``web.scrape_process: false`` serves: the scrapes here run between cycles) with the
worker's clock pinned to the benchmark's instant, then answers one JSON line per command read on
stdin:

* ``cycle``: one ``Worker.run_cycle`` with its timings (see :func:`_cycle`);
* ``scrapes``: the server-side time of each ``metrics_parts`` call (the body's pieces: the
  self-metrics rendered, the families' bytes picked) since the last ``scrapes``;
* ``rss``: peak and current resident set size, of this process and of the scrape process
  when serve would run one (see ``Exporter.feed``);
* ``quit`` (or end of stdin): stop.

Timing hooks are wrappers installed at run time around ``exporter.worker.query_base``,
``exporter.derive.derive_all``, ``Publisher.publish`` and ``InProcess.metrics_parts``, and a
response hook on the client's session; the exporter's code is not changed.

:class:`Probe` is the parent's handle on that process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _status_kb(field: str, pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(scrape_pid: int | None = None) -> dict[str, float]:
    """Peak and current resident set size, MiB; of the scrape process too when given
    (``scrape_vmhwm_mb``, ``scrape_vmrss_mb``).

    ``vmhwm_mb`` (VmHWM) is the one reported: on Linux ``ru_maxrss`` of a process started with
    fork + exec also counts the parent's resident set at the fork (the pre-exec copy), so with
    a large parent it reports the parent's size.
    """
    scrape = {} if scrape_pid is None else {
        "scrape_vmhwm_mb": _status_kb("VmHWM", scrape_pid) / 1024.0,
        "scrape_vmrss_mb": _status_kb("VmRSS", scrape_pid) / 1024.0,
    }
    return {
        **scrape,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "vmhwm_mb": _status_kb("VmHWM") / 1024.0,
        "vmrss_mb": _status_kb("VmRSS") / 1024.0,
        # pandas imports pyarrow whenever it is installed (about 40 MiB resident).
        "pyarrow": sys.modules.get("pyarrow") is not None,
    }


class _Timer:
    """Accumulates the wall time of every call of the functions it wraps, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``: wall time with at least one request in flight."""
    total = 0.0
    current: tuple[float, float] | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        total += current[1] - current[0]
    return total


TIMER = _Timer()
_HOOKED: list[bool] = []


class Exporter:
    """The exporter's parts wired as ``Service`` wires them, with timing hooks installed."""

    def __init__(self, upstream: str, at: float, window: str, interval: str,
                 concurrency: int | None = None) -> None:
        # Imported here: the parent imports this module for Probe without needing them.
        import requests

        from exporter import config, derive, web, worker
        from exporter.publish import InProcess, Publisher, SelfMetrics
        from exporter.upstream import PrometheusClient

        timer = TIMER
        self.timer = timer
        if not _HOOKED:
            # The worker looks both up as module attributes at call time.
            worker.query_base = timer.wrap("query_base", worker.query_base)
            derive.derive_all = timer.wrap("derive_all", derive.derive_all)
            _HOOKED.append(True)

        class TimedPublisher(Publisher):
            def publish(self, *args: Any, **kwargs: Any) -> Any:
                return timer.wrap("publish", super().publish)(*args, **kwargs)

        self.body_times: list[float] = []
        body_times = self.body_times

        class TimedSource(InProcess):
            def metrics_parts(self, gzipped: bool) -> list[bytes]:
                started = time.perf_counter()
                parts = super().metrics_parts(gzipped)
                body_times.append(time.perf_counter() - started)
                return parts

        upstream_cfg: dict[str, Any] = {"url": upstream, "timeout": "120s"}
        if concurrency is not None:
            upstream_cfg["concurrency"] = concurrency
        self.cfg = config.from_mapping({
            "upstream": upstream_cfg,
            "evaluation": {"interval": interval, "window": window, "staleness": "24h"},
            "web": {"listen_address": "127.0.0.1:0"},
        }, "benchmark", environ={})
        self.publisher = TimedPublisher(self.cfg.evaluation.staleness_bound)
        self.metrics = SelfMetrics(self.publisher)
        #: (outcome, start, end) of each API call as ``on_request`` reports it: send to parsed
        #: frame (HTTP, body read, JSON decode, parse_vector).
        self.requests_seen: list[tuple[str, float, float]] = []

        def on_request(outcome: str, seconds: float) -> None:
            self.metrics.observe_request(outcome, seconds)
            end = time.perf_counter()
            self.requests_seen.append((outcome, end - seconds, end))

        self.client = PrometheusClient(self.cfg.upstream, on_request=on_request)
        #: (start, end) of each HTTP exchange: request sent to response headers received
        #: (requests' ``elapsed``; Prometheus evaluates and encodes before sending headers).
        self.http: list[tuple[float, float]] = []

        def on_response(response: requests.Response, *args: Any, **kwargs: Any) -> None:
            end = time.perf_counter()
            self.http.append((end - response.elapsed.total_seconds(), end))

        self.client.session.hooks["response"].append(on_response)
        self.worker = worker.Worker(self.cfg, self.client, self.publisher, self.metrics,
                                    clock=lambda: at)
        self.app = web.App(TimedSource(self.publisher, self.metrics))
        self.derive_error = derive.DeriveError
        #: Base queries in flight at once (upstream.concurrency; 1 before that setting existed).
        self.concurrency = int(getattr(self.cfg.upstream, "concurrency", 1))
        self.server: Any = None
        self.scrapes: Any = None

    def serve(self) -> int:
        """Serve the timed /metrics here (see :meth:`feed` for the scrape process)."""
        from exporter import web

        self.server = web.serve(self.app, "127.0.0.1", 0)
        return int(self.server.server_address[1])

    def feed(self) -> None:
        """After a cycle, what serve's relay does with its default ``web.scrape_process:
        auto``, for the scrape process's memory: start it (on a port of its own) once a cycle
        published more than ``service.AUTO_SERIES`` series, and send it each snapshot."""
        from exporter import catalog, web
        from exporter.scrape_process import ScrapeProcess, Settings
        from exporter.service import AUTO_SERIES

        snapshot, counters = self.publisher.snapshot, self.metrics.counters_body()
        if self.scrapes is not None:
            self.scrapes.send(snapshot, counters)
        elif snapshot.series > AUTO_SERIES:
            with web.listen("127.0.0.1", 0) as sock:
                self.scrapes = ScrapeProcess(sock, Settings(
                    self.cfg.evaluation.staleness_bound,
                    tuple(series.name for series in catalog.SERIES)), (snapshot, counters))

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.scrapes is not None:
            self.scrapes.stop()
            self.scrapes = None
        self.client.close()


def serve_probe(upstream: str, prom: str, at: float, window: str, interval: str,
                concurrency: int | None) -> int:
    import requests
    from bench_fleet import query_stats

    exporter = Exporter(upstream, at, window, interval, concurrency)
    timer, publisher = exporter.timer, exporter.publisher
    requests_seen, http, body_times = exporter.requests_seen, exporter.http, exporter.body_times
    port = exporter.serve()
    stats_session = requests.Session()

    def cycle() -> dict[str, Any]:
        requests_seen.clear()
        http.clear()
        timer.take()
        before = query_stats(prom, stats_session)
        started = time.perf_counter()
        report = exporter.worker.run_cycle()
        wall = time.perf_counter() - started
        exporter.feed()  # after the timing: serve's relay sends it from another thread
        delta = query_stats(prom, stats_session) - before
        parts = timer.take()
        snapshot = publisher.snapshot
        return {
            "wall": wall,
            "query_base": parts.get("query_base", 0.0),
            "derive": parts.get("derive_all", 0.0),
            "publish": parts.get("publish", 0.0),
            "concurrency": exporter.concurrency,
            "requests": len(requests_seen),
            "request_seconds": sum(end - start for _, start, end in requests_seen),
            "request_busy": busy([(start, end) for _, start, end in requests_seen]),
            "outcomes": sorted({o for o, _, _ in requests_seen}),
            "http_responses": len(http),
            "http_seconds": sum(end - start for start, end in http),
            "http_busy": busy(http),
            "prom_requests": delta.requests,
            "prom_seconds": delta.seconds,
            "outcome": report.outcome,
            "evaluated_at": report.evaluated_at,
            "families": len(snapshot.families),
            "series": snapshot.series,
            "family_errors": sorted(
                n for n, r in report.derived.items() if isinstance(r, exporter.derive_error)),
        }

    def reply(payload: Mapping[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "port": port, "pid": os.getpid(), **rss()})
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "cycle":
                reply(cycle())
            elif command == "scrapes":
                reply({"seconds": body_times[:]})
                body_times.clear()
            elif command == "rss":
                reply(rss(exporter.scrapes and exporter.scrapes.pid))
            elif command == "quit":
                break
            else:
                reply({"error": f"unknown command {command!r}"})
    finally:
        exporter.close()
    return 0


class Probe:
    """The parent's side: start the probe process, send commands, always stop it."""

    def __init__(self, upstream: str, prom: str, at: float, window: str, interval: str,
                 concurrency: int | None = None, no_pyarrow: bool = False) -> None:
        command = [sys.executable, str(HERE / "bench_probe.py"), "--upstream", upstream,
                   "--prom", prom, "--at", repr(at), "--window", window, "--interval", interval]
        if concurrency is not None:
            command += ["--concurrency", str(concurrency)]
        if no_pyarrow:
            command.append("--no-pyarrow")
        # Own session: a Ctrl-C in the terminal reaches the parent, whose finally stops us.
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True, cwd=HERE.parent)
        try:
            self.hello = self._read()
            self.port = int(self.hello["port"])
        except BaseException:  # Ctrl-C while starting included: never leave it running
            self.close()
            raise

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=10)
            raise RuntimeError(f"benchmark probe exited with code {code}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the exporter under measurement")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--prom", required=True, help="Prometheus itself, for its counters")
    parser.add_argument("--at", type=float, required=True)
    parser.add_argument("--window", default="2m")
    parser.add_argument("--interval", default="30s")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="upstream.concurrency (default: the exporter's default)")
    parser.add_argument("--no-pyarrow", action="store_true",
                        help="make pyarrow unimportable, as in the Docker image (no extras)")
    args = parser.parse_args(argv)
    if args.no_pyarrow:
        # Before anything imports pandas, which imports pyarrow whenever it can.
        sys.modules["pyarrow"] = None  # type: ignore[assignment]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    return serve_probe(args.upstream, args.prom, args.at, args.window, args.interval,
                       args.concurrency)


if __name__ == "__main__":
    sys.exit(main())

"""Load on /metrics: concurrent scrapers against ~100k derived series while cycles run.

A fake upstream in this process answers the exporter's base queries with a synthetic fleet big
enough for about 100k derived series (by default 500 Triton servers x 60 of 1000 (model,
version) pairs, 500 MIG slices). ``python -m exporter serve`` runs against it in a subprocess
(cycles every ``--interval``), and ``--scrapers`` clients (threads spread over ``--procs``
processes, so the clients' GIL is not what is measured) fetch /metrics back to back for
``--seconds``, with ``Accept-Encoding: gzip`` as Prometheus sends it (``--no-gzip``: plain).
Then, against the same exporter and still while cycles run, one scraper (in one process) does
the same for ``--one-scraper-seconds`` with gzip, and as long again without (0 skips both).
Last, one scraper (in one process, gzip) sends a request every ``--fixed-interval`` for
``--fixed-seconds`` whatever the latency (0 skips it), as Prometheus scrapes: its scrapes land
in cycles in proportion to the time cycles run, where a back-to-back scraper makes many
between cycles and few during one. Which of them overlapped a cycle is told from the cycle
figures in each answer's self-metrics (each cycle's end and duration).

Printed: scrapes, errors (anything but a 200 with a complete body; must be 0), latency p50 /
p99 / max, body size, and the exporter's CPU (its process CPU time over the wall time of the
run, in cores), cycles run and their mean duration, its RSS at the end and its peak RSS (VmHWM:
the most it held at any moment of the run); for each one-scraper run its scrapes, errors,
latencies and body size; for the fixed-interval one also the share of its scrapes that
overlapped a cycle, their latencies and those of the rest, and the cycles' mean duration.
Not a timed test: a measurement.
The same figures are written as JSON to ``--json`` (default ``benchmarks/results/load.json``;
the schema is :func:`as_json`), from which docs/benchmarks.md is rendered.

    .venv/bin/python benchmarks/load.py [--scrapers 50] [--seconds 30] [--interval 10s]
        [--one-scraper-seconds 20] [--fixed-interval 0.25s] [--fixed-seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import bench_report
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalog, config
from exporter.catalog import Selectors
from exporter.config import parse_duration

PREFIX = "triton_mig_exporter_"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "load.json"
TRITON_FACTOR = {"count": 1.0, "success": 0.5, "failure": 0.01, "exec": 0.25, "cache_hits": 0.05,
                 "pending": 0.1}
TRITON_FACTOR |= {f"{p}_us": 1000.0 * (i + 1) for i, p in enumerate(catalog.PHASES)}
DCGM_FACTOR = {"tensor": 1.0, "dram": 0.5, "gr_engine": 0.8, "tensor_max": 1.0}


def fleet_bodies(pods: int, pairs: int, per_pod: int, slices: int) -> dict[str, bytes]:
    """The JSON answer of every base query for the synthetic fleet."""
    cells = [(f"triton-{p:04d}", f"model-{(p * 7 + i) % pairs // 2:04d}", str(1 + (p * 7 + i) % 2))
             for p in range(pods) for i in range(per_pod)]
    bodies = {}
    for name, factor in TRITON_FACTOR.items():
        result = [{"metric": {"model": m, "version": v, "pod": pod,
                              "prometheus_replica": "prom-0"},
                   "value": [0, repr((1 + n % 97) * factor)]}
                  for n, (pod, m, v) in enumerate(cells)]
        bodies[name] = json.dumps({"status": "success",
                                   "data": {"resultType": "vector", "result": result}}).encode()
    for name, factor in DCGM_FACTOR.items():
        result = [{"metric": {"instance": f"10.0.{s // 7 // 250}.{s // 7 % 250}:9400",
                              "device": "nvidia0", "GPU_I_ID": str(s % 7 + 1),
                              "GPU_I_PROFILE": "1g.10gb", "exported_pod": f"triton-{s % pods:04d}",
                              "prometheus_replica": "prom-0"},
                   "value": [0, repr((s % 100) / 100 * factor)]}
                  for s in range(slices)]
        bodies[name] = json.dumps({"status": "success",
                                   "data": {"resultType": "vector", "result": result}}).encode()
    return bodies


def start_upstream(bodies: dict[str, bytes]) -> ThreadingHTTPServer:
    sel = Selectors.from_config(config.load(None, environ={}))
    by_query = {q.promql(sel): bodies[q.name] for q in catalog.BASE_QUERIES}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            query = parse_qs(self.rfile.read(length).decode()).get("query", [""])[0]
            body = by_query.get(query)
            status = 200 if body is not None else 400
            body = body or b'{"status":"error","errorType":"bad_data","error":"unknown"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def exporter_pids(pid: int) -> list[int]:
    """serve's process and its children (the scrape process, unless web.scrape_process is
    false)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def cpu_seconds(pid: int) -> float:
    """CPU time of serve's process and its children."""
    total = 0.0
    for one in exporter_pids(pid):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) summed over serve's process and its children (the sum of the
    peaks bounds the peak of the sum), and ``VmRSS_<n>`` / ``VmHWM_<n>`` of each (0: serve's
    own)."""
    out: dict[str, float] = {"VmRSS": 0.0, "VmHWM": 0.0}
    for n, one in enumerate(exporter_pids(pid)):
        status = Path(f"/proc/{one}/status").read_text()
        for key, kib in re.findall(r"^(VmRSS|VmHWM):\s+(\d+)", status, re.M):
            out[key] += int(kib) / 1024
            out[f"{key}_{n}"] = int(kib) / 1024
    return out


def self_metrics(host: str, port: int) -> dict[str, float]:
    return parse_self_metrics(fetch(host, port, {}).decode())


def parse_self_metrics(text: str) -> dict[str, float]:
    """The exporter's own samples in an exposition: ``name,label=value,...`` -> value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(PREFIX):
                key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()))
                out[key] = sample.value
    return out


def fetch(host: str, port: int, headers: Mapping[str, str]) -> bytes:
    """One GET /metrics: its body; RuntimeError unless a 200 with the whole body."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers=dict(headers))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    expected = int(response.getheader("Content-Length") or -1)
    if response.status != 200 or len(body) != expected:
        raise RuntimeError(f"HTTP {response.status}, {len(body)} of {expected} bytes")
    return body


def attempt(host: str, port: int, headers: Mapping[str, str], errors: list[str],
            lock: threading.Lock) -> tuple[bytes, float] | None:
    """One :func:`fetch` and its latency in seconds; None on an error (noted in ``errors``)."""
    started = time.perf_counter()
    try:
        body = fetch(host, port, headers)
    except Exception as error:
        with lock:
            errors.append(f"{type(error).__name__}: {error}")
        return None
    return body, time.perf_counter() - started


def scrape_worker(host: str, port: int, threads: int, seconds: float,
                  gzip: bool) -> tuple[list[float], int, list[str], int]:
    """``threads`` scrapers, back to back for ``seconds``: latencies, errors, sizes."""
    latencies: list[float] = []
    errors: list[str] = []
    sizes: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    headers = {"Accept-Encoding": "gzip"} if gzip else {}

    def loop() -> None:
        while time.monotonic() < deadline:
            got = attempt(host, port, headers, errors, lock)
            if got is not None:
                with lock:
                    latencies.append(got[1])
                    sizes.append(len(got[0]))

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies, len(errors), errors[:5], int(statistics.median(sizes)) if sizes else 0


@dataclass(frozen=True)
class Timed:
    """One scrape of the fixed-interval scraper: when (wall clock, as the exporter's own
    timestamps), how long, and the cycle figures its self-metrics block showed."""

    start: float
    end: float
    latency: float
    size: int
    seen: dict[str, float]


def self_block(body: bytes) -> dict[str, float]:
    """The self-metrics of a gzip /metrics body: its first gzip member (the exporter writes
    the self-metrics first, each derived family as a member of its own)."""
    return parse_self_metrics(zlib.decompressobj(31).decompress(body).decode())


def fixed_worker(host: str, port: int, interval: float,
                 seconds: float) -> tuple[list[Timed], int, list[str]]:
    """One scraper sending a gzip request every ``interval`` for ``seconds``, whatever the
    latency (a late answer does not delay the next request): the scrapes and errors."""
    timed: list[Timed] = []
    errors: list[str] = []
    lock = threading.Lock()
    headers = {"Accept-Encoding": "gzip"}

    def one() -> None:
        start = time.time()
        got = attempt(host, port, headers, errors, lock)
        if got is not None:
            body, latency = got
            scrape = Timed(start, start + latency, latency, len(body), self_block(body))
            with lock:
                timed.append(scrape)

    threads = []
    first = time.monotonic()
    for tick in range(max(1, round(seconds / interval))):
        time.sleep(max(0.0, first + tick * interval - time.monotonic()))
        thread = threading.Thread(target=one)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    return timed, len(errors), errors[:5]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def latency_figures(lat: list[float]) -> dict[str, Any]:
    """``scrapes``, ``p50_ms``, ``p99_ms`` and ``max_ms`` of these latencies (0 for none)."""
    return {
        "scrapes": len(lat),
        "p50_ms": ms(statistics.median(lat)) if lat else 0.0,
        "p99_ms": ms(percentile(lat, 0.99)) if lat else 0.0,
        "max_ms": ms(max(lat)) if lat else 0.0,
    }


@dataclass(frozen=True)
class Scraping:
    """What the scrapers of one run saw: every latency, the errors, the median body."""

    latencies: list[float]
    errors: int
    samples: list[str]  # the first few error messages of each process
    body_bytes: int
    wall: float  # seconds, measured

    def figures(self) -> dict[str, Any]:
        """Scrapes, errors, latencies (ms) and body size: the JSON keys of every run."""
        figures = latency_figures(self.latencies)
        return {"scrapes": figures.pop("scrapes"), "errors": self.errors, **figures,
                "body_bytes": self.body_bytes}

    def report(self, gzip: bool) -> None:
        lat = self.latencies
        print(f"scrapes: {len(lat)} ({len(lat) / self.wall:.1f}/s), errors: {self.errors}")
        if lat:
            print(f"latency: p50 {statistics.median(lat) * 1000:.0f} ms, p99 "
                  f"{percentile(lat, 0.99) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms; "
                  f"body {self.body_bytes / 1e6:.2f} MB ({'gzip' if gzip else 'plain'})")
        for sample in self.samples:
            print(f"  error: {sample}")


def scrape(host: str, port: int, scrapers: int, procs: int, seconds: float,
           gzip: bool) -> Scraping:
    """``scrapers`` threads over ``procs`` client processes, back to back for ``seconds``."""
    procs = max(1, min(procs, scrapers))
    shares = [scrapers // procs + (i < scrapers % procs) for i in range(procs)]
    started = time.monotonic()
    with ProcessPoolExecutor(procs) as pool:
        results = list(pool.map(scrape_worker, [host] * procs, [port] * procs, shares,
                                [seconds] * procs, [gzip] * procs))
    return Scraping(latencies=[x for r in results for x in r[0]],
                    errors=sum(r[1] for r in results),
                    samples=[e for r in results for e in r[2]],
                    body_bytes=max(r[3] for r in results),
                    wall=time.monotonic() - started)


def cycles_between(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """Cycles run between two reads of the self-metrics, and their mean duration."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    cycles = delta(PREFIX + "cycle_duration_seconds_count")
    return cycles, delta(PREFIX + "cycle_duration_seconds_sum") / cycles if cycles else 0.0


def one_scraper(host: str, port: int, seconds: float) -> dict[str, dict[str, Any]]:
    """One scraper for ``seconds`` with gzip (as Prometheus scrapes), then one without."""
    out = {}
    for gzip in (True, False):
        print(f"one scraper for {seconds:g} s, {'gzip' if gzip else 'plain'}", flush=True)
        before = self_metrics(host, port)
        run = scrape(host, port, 1, 1, seconds, gzip)
        cycles, _ = cycles_between(before, self_metrics(host, port))
        run.report(gzip)
        out["gzip" if gzip else "plain"] = {"seconds": round(run.wall, 2), **run.figures(),
                                             "cycles": int(cycles)}
    return out


COUNT = PREFIX + "cycle_duration_seconds_count"
SUM = PREFIX + "cycle_duration_seconds_sum"
FINISHED = PREFIX + "last_success_timestamp_seconds"


def cycle_spans(seen: list[dict[str, float]]) -> list[tuple[float, float]]:
    """The (start, end) wall-clock times of every cycle seen whole in these reads of the
    self-metrics: a good cycle whose count was read along with the one before it. It ended
    when it published (``last_success_timestamp_seconds``) and lasted the difference of the
    duration sums."""
    by_count = {int(m[COUNT]): m for m in seen if COUNT in m}
    spans = []
    for count, after in sorted(by_count.items()):
        before = by_count.get(count - 1)
        if before is None or after.get(FINISHED) == before.get(FINISHED):
            continue  # not seen whole, or a failed cycle (no success time published)
        end = after.get(FINISHED, 0.0)
        spans.append((end - (after[SUM] - before[SUM]), end))
    return spans


def fixed_interval(host: str, port: int, interval: float,
                   seconds: float) -> dict[str, Any]:
    """One scraper (one process, gzip) every ``interval`` for ``seconds``, as Prometheus
    scrapes: its figures, and which scrapes overlapped a cycle."""
    print(f"one scraper every {interval:g} s for {seconds:g} s, gzip", flush=True)
    before = self_metrics(host, port)
    started = time.monotonic()
    with ProcessPoolExecutor(1) as pool:
        timed, errors, samples = pool.submit(fixed_worker, host, port, interval,
                                             seconds).result()
    wall = time.monotonic() - started
    seen = [before, *(t.seen for t in timed), self_metrics(host, port)]
    # A cycle still running after the last scrape is seen whole once it has published.
    longest = max((end - start for start, end in cycle_spans(seen)), default=3.0)
    deadline = time.monotonic() + 1.5 * longest
    while seen[-1].get(COUNT) == seen[-2].get(COUNT) and time.monotonic() < deadline:
        time.sleep(0.1)
        seen.append(self_metrics(host, port))
    spans = cycle_spans(seen)
    during: list[float] = []
    between: list[float] = []
    for t in timed:
        overlaps = any(t.start < end and t.end > start for start, end in spans)
        (during if overlaps else between).append(t.latency)
    cycles, cycle_mean = cycles_between(before, seen[-1])
    run = Scraping(latencies=[t.latency for t in timed], errors=errors, samples=samples,
                   body_bytes=int(statistics.median(t.size for t in timed)) if timed else 0,
                   wall=wall)
    run.report(True)
    share = len(during) / len(timed) if timed else 0.0
    figures = {"during_cycles": latency_figures(during),
               "between_cycles": latency_figures(between)}
    for name, part in figures.items():
        print(f"  {name.replace('_', ' ')}: {part['scrapes']} scrapes, p50 {part['p50_ms']} ms, "
              f"p99 {part['p99_ms']} ms, max {part['max_ms']} ms")
    print(f"  {share:.0%} of the scrapes overlapped a cycle; {cycles:.0f} cycles ran, mean "
          f"{cycle_mean:.2f} s")
    return {"interval_s": interval, "seconds": round(wall, 2), **run.figures(),
            "cycles": int(cycles), "cycle_mean_s": round(cycle_mean, 3),
            "overlap_share": round(share, 3), **figures}


def machine() -> dict[str, Any]:
    cpu = bench_report.cpu_model()
    return {
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
    }


def command_line(argv: list[str]) -> str:
    """The command that reproduces this run, with the interpreter relative to the repository."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = Path(sys.executable).absolute().relative_to(ROOT)
    return shlex.join([str(python), "benchmarks/load.py", *argv])


def as_json(args: argparse.Namespace, *, series: float, main: Scraping, cpu: float,
            cycles: float, cycle_mean: float, rss_mib: float, peak_rss_mib: float,
            peak_rss_by_process: list[float],
            one: dict[str, dict[str, Any]] | None, fixed: dict[str, Any] | None,
            command: str) -> dict[str, Any]:
    """The run as JSON: exactly these keys (docs/benchmarks.md is rendered from them).

    ``one_scraper`` is ``{"gzip": {...}, "plain": {...}}``, each with ``seconds``, the keys of
    :meth:`Scraping.figures` and ``cycles``; null when ``--one-scraper-seconds`` is 0.
    ``fixed_interval`` (see :func:`fixed_interval`) has ``interval_s``, ``seconds``, the keys
    of :meth:`Scraping.figures`, ``cycles``, ``cycle_mean_s``, ``overlap_share`` (of the
    scrapes, those that overlapped a cycle), and ``during_cycles`` and ``between_cycles``
    (each the keys of :func:`latency_figures`); null when ``--fixed-seconds`` is 0."""
    return {
        "machine": machine(),
        "scrapers": args.scrapers,
        "seconds": round(main.wall, 2),  # measured, so scrapes / seconds is the rate
        "interval": args.interval,
        "series": int(series),
        **main.figures(),
        "gzip": bool(args.gzip),
        "cpu_cores": round(cpu / main.wall, 3) if main.wall else 0.0,
        "cycles": int(cycles),
        "cycle_mean_s": round(cycle_mean, 3),
        "rss_mib": round(rss_mib, 1),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "scrape_process": bool(args.scrape_process),
        # Peak RSS of serve's own process, and of its scrape process (null without one).
        "peak_rss_mib_main": round(peak_rss_by_process[0], 1),
        "peak_rss_mib_scrape": (round(peak_rss_by_process[1], 1)
                                if len(peak_rss_by_process) > 1 else None),
        "one_scraper": one,
        "fixed_interval": fixed,
        "command": command,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--procs", type=int, default=5, help="client processes (scrapers split)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", default="10s", help="the exporter's evaluation interval")
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=1000, help="(model, version) pairs")
    parser.add_argument("--per-pod", type=int, default=60, help="pairs each pod serves")
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--no-gzip", dest="gzip", action="store_false")
    parser.add_argument("--one-scraper-seconds", type=float, default=20.0,
                        help="then one scraper this long with gzip and as long without "
                        "(0: skip; default %(default)s)")
    parser.add_argument("--fixed-interval", type=parse_duration, default="0.25s",
                        help="then one scraper sending a gzip request this often, whatever the "
                        "latency, as Prometheus does (default %(default)s)")
    parser.add_argument("--fixed-seconds", type=float, default=30.0,
                        help="for this long (0: skip; default %(default)s)")
    parser.add_argument("--single-process", dest="scrape_process", action="store_false",
                        help="run serve with web.scrape_process: false (scrapes answered by "
                        "the process that runs the cycles)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="write the results here as JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    args.command = command_line(argv)

    print(f"building the fleet: {args.pods} pods x {args.per_pod} of {args.pairs} pairs, "
          f"{args.slices} slices", flush=True)
    upstream = start_upstream(fleet_bodies(args.pods, args.pairs, args.per_pod, args.slices))
    with tempfile.TemporaryDirectory(prefix="triton-mig-load-") as tmp:
        cfg = Path(tmp) / "exporter.yaml"
        cfg.write_text(yaml.safe_dump({
            "upstream": {"url": f"http://127.0.0.1:{upstream.server_address[1]}",
                         "timeout": "60s"},
            "evaluation": {"interval": args.interval},
            "web": {"listen_address": "127.0.0.1:0", "scrape_process": args.scrape_process},
        }))
        proc = subprocess.Popen([sys.executable, "-m", "exporter", "serve", "--config.file",
                                 str(cfg)], stderr=subprocess.PIPE, text=True)
        try:
            return run(args, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            upstream.shutdown()
            upstream.server_close()


def run(args: argparse.Namespace, proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    line = ""
    while " serving http" not in line:
        line = proc.stderr.readline()
        if not line:
            print("serve did not start", file=sys.stderr)
            return 1
    threading.Thread(target=lambda: [None for _ in proc.stderr or ()], daemon=True).start()
    found = re.search(r"serving http://([^:]+):(\d+)/metrics", line)
    assert found, line
    host, port = found.group(1), int(found.group(2))
    deadline = time.monotonic() + 300
    while True:
        metrics = self_metrics(host, port)
        series = sum(v for k, v in metrics.items() if k.startswith(PREFIX + "series,"))
        if metrics.get(PREFIX + "upstream_up") == 1 and series:
            break
        if time.monotonic() > deadline:
            print("no good cycle within 300 s", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"exporter ready: {series:.0f} derived series; {args.scrapers} scrapers for "
          f"{args.seconds:g} s, cycles every {args.interval}", flush=True)

    before, cpu_before = metrics, cpu_seconds(proc.pid)
    main = scrape(host, port, args.scrapers, args.procs, args.seconds, args.gzip)
    cpu = cpu_seconds(proc.pid) - cpu_before
    after = self_metrics(host, port)
    cycles, cycle_mean = cycles_between(before, after)
    outcomes = [k.split("=")[1] for k in after
                if "cycles_total," in k and after[k] != before.get(k, 0.0)]
    main.report(args.gzip)
    print(f"exporter CPU: {cpu:.1f} s over {main.wall:.1f} s = {cpu / main.wall:.2f} cores; "
          f"{cycles:.0f} cycles ran, mean {cycle_mean:.2f} s; cycle outcomes {outcomes}")
    one = one_scraper(host, port, args.one_scraper_seconds) if args.one_scraper_seconds else None
    fixed = (fixed_interval(host, port, args.fixed_interval, args.fixed_seconds)
             if args.fixed_seconds else None)
    memory = memory_mib(proc.pid)
    print(f"exporter RSS {memory['VmRSS']:.0f} MiB (peak {memory['VmHWM']:.0f} MiB; of which "
          f"serve's own process {memory['VmHWM_0']:.0f} MiB)")
    document = as_json(args, series=series, main=main, cpu=cpu, cycles=cycles,
                       cycle_mean=cycle_mean, rss_mib=memory["VmRSS"],
                       peak_rss_mib=memory["VmHWM"],
                       peak_rss_by_process=[memory[k] for k in sorted(memory)
                                            if k.startswith("VmHWM_")],
                       one=one, fixed=fixed,
                       command=args.command)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"results written to {args.json}")
    runs = [*(one or {}).values(), *([fixed] if fixed else [])]
    errors = main.errors + sum(r["errors"] for r in runs)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

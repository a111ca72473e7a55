"""Benchmark the exporter's cycle and /metrics against a real, backfilled Prometheus.

For each fleet size: write ~40 min of simulated history (15 s step), backfill it with promtool
into a fresh TSDB, start Prometheus on it, then measure, at one pinned evaluation instant,

* the exporter (in a subprocess: ``Worker.run_cycle``, ``exporter.web.serve``): upstream queries
  per cycle, their time, the cycle's time and what it spends besides waiting, /metrics scrape
  times and body sizes, peak RSS;
* the seed notebook's query pattern (one query per model/version and per slice) against the same
  Prometheus at the same instant, interleaved with the exporter's cycles;

once directly and once behind a local proxy adding 50 ms per request. Medians of ``--repeat``
repetitions; ratios within the run. Every process and temporary folder it creates is removed on
exit, Ctrl-C included.

    .venv/bin/python benchmarks/run.py [--sizes S,M,L] [--repeat 5] [--quick]
        [--json benchmarks/results/latest.json] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import importlib.metadata
import io
import json
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from types import FrameType
from typing import Any

import bench_doc
import bench_notebook
import bench_report
import requests
from bench_fleet import SIZES, Size, pinned_instant, prometheus_on, query_stats, write_history
from bench_probe import Exporter, Probe

from exporter.config import parse_duration
from exporter.lab import promserver

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: benchmarks/load.py's results, shown in the Markdown when the file exists.
LOAD_JSON = HERE / "results" / "load.json"


class ProxyProcess:
    """benchmarks/bench_proxy.py in its own process (its threads never share our GIL)."""

    def __init__(self, upstream: str, delay: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "bench_proxy.py"), "--upstream", upstream,
             "--delay", repr(delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().strip()
            if not line.startswith("proxy: "):
                raise RuntimeError(f"proxy did not start: {line!r}")
        except BaseException:  # Ctrl-C while starting included: never leave it running
            self.stop()
            raise
        self.url = line.removeprefix("proxy: ")

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def scrape(url: str, n: int) -> dict[str, Any]:
    """``n`` plain scrapes then ``n`` gzip scrapes, timed by the client (request to last byte)."""
    session = requests.Session()
    plain: list[float] = []
    gz: list[float] = []
    plain_bytes = gzip_bytes = lines = 0
    try:
        for _ in range(n):
            started = time.perf_counter()
            answer = session.get(url, headers={"Accept-Encoding": "identity"}, timeout=60)
            body = answer.content
            plain.append(time.perf_counter() - started)
            answer.raise_for_status()
            plain_bytes = len(body)
            lines = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        for _ in range(n):
            started = time.perf_counter()
            answer = session.get(url, headers={"Accept-Encoding": "gzip"}, timeout=60,
                                 stream=True)
            raw = answer.raw.read(decode_content=False)
            gz.append(time.perf_counter() - started)
            answer.raise_for_status()
            if answer.headers.get("Content-Encoding") != "gzip":
                raise RuntimeError("/metrics did not answer gzip when asked")
            gzip_bytes = len(raw)
    finally:
        session.close()
    return {"plain": plain, "gzip": gz, "plain_bytes": plain_bytes, "gzip_bytes": gzip_bytes,
            "lines": lines}


def measure_mode(upstream: str, prom_url: str, at: float, args: argparse.Namespace, log: Any,
                 *, concurrency: int | None = None, full: bool = True) -> dict[str, Any]:
    """The exporter's cycles interleaved with the notebook's runs, then scrapes and RSS.

    ``full=False``: the exporter's cycles only (no notebook, no scrapes).
    """
    session = requests.Session()
    runs: list[dict[str, Any]] = []
    scrapes: dict[str, Any] | None = None
    try:
        with Probe(upstream, prom_url, at, args.window, args.interval, concurrency,
                   args.no_pyarrow) as probe:
            start_rss = probe.hello
            cold = probe.ask("cycle")
            if full:
                bench_notebook.run(session, upstream, at, args.window)  # warm-up, not counted
            cycles: list[dict[str, Any]] = []
            for _ in range(args.repeat):
                cycles.append(probe.ask("cycle"))
                if full:
                    before = query_stats(prom_url)
                    run = bench_notebook.run(session, upstream, at, args.window)
                    delta = query_stats(prom_url) - before
                    runs.append({**vars(run), "prom_requests": delta.requests,
                                 "prom_seconds": delta.seconds})
                log(".")
            if full:
                probe.ask("scrapes")  # forget anything before the timed scrapes
                scrapes = scrape(probe.metrics_url, args.scrapes)
                server = probe.ask("scrapes")["seconds"]
                scrapes["server_plain"] = server[: args.scrapes]
                scrapes["server_gzip"] = server[args.scrapes:]
            memory = probe.ask("rss")
    finally:
        session.close()
    for cycle in [cold, *cycles]:
        if cycle["outcome"] != "success" or cycle["family_errors"]:
            raise RuntimeError(f"exporter cycle not clean: {cycle['outcome']}, "
                               f"families not computed: {cycle['family_errors']}")
    raw = {"cold_cycle": cold, "cycles": cycles, "notebook": runs, "scrape": scrapes,
           "rss": {**memory, "start_mb": start_rss["vmhwm_mb"]}}
    return {"summary": bench_report.summarise_mode(raw), "raw": raw}


def _short(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    path = filename
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})"


class _InlineExecutor:
    """Stands in for ThreadPoolExecutor while profiling: cProfile sees only the thread it runs
    in, so the base queries (and the parsing of their answers) run inline, one at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Any, *iterables: Any) -> Any:
        return list(map(fn, *iterables))

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future


def profile_cycles(upstream: str, at: float, args: argparse.Namespace,
                   n: int = 3, top: int = 10) -> dict[str, Any]:
    """cProfile over ``n`` warm cycles in this process, base queries inline; the top entries
    by cumulative and self time (per cycle), the benchmark's own timing wrappers left out."""
    from exporter import worker

    exporter = Exporter(upstream, at, args.window, args.interval)
    patched = hasattr(worker, "ThreadPoolExecutor")
    original = getattr(worker, "ThreadPoolExecutor", None)
    try:
        if patched:
            worker.ThreadPoolExecutor = _InlineExecutor  # type: ignore[attr-defined,misc]
        exporter.worker.run_cycle()  # warm-up
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for _ in range(n):
            exporter.worker.run_cycle()
        profiler.disable()
        wall = (time.perf_counter() - started) / n
    finally:
        if patched:
            worker.ThreadPoolExecutor = original  # type: ignore[attr-defined]
        exporter.close()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    entries = [
        {"function": _short(func), "ncalls": nc // n, "tottime": tt / n, "cumtime": ct / n}
        for func, (_cc, nc, tt, ct, _callers) in stats.stats.items()  # type: ignore[attr-defined]
        if not func[0].startswith(str(HERE))
    ]
    by_cum = sorted(entries, key=lambda e: e["cumtime"], reverse=True)
    by_self = sorted(entries, key=lambda e: e["tottime"], reverse=True)
    return {"cycles": n, "inline_queries": patched, "cycle_s_under_profile": wall,
            "cumulative": by_cum[:top], "self": by_self[:top]}


def bench_size(size: Size, binaries: promserver.PrometheusBinaries, args: argparse.Namespace,
               log: Any) -> dict[str, Any]:
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"triton-mig-bench-{size.name}-"))
    prom: promserver.PrometheusServer | None = None
    proxy: ProxyProcess | None = None
    interval = parse_duration(args.interval)
    try:
        at = pinned_instant(time.time(), interval)
        log(f"{size.name}: {size.describe()}: writing {size.history_minutes:g} min of history")
        history, data = write_history(size, binaries, workdir, at)
        log(f" ({history.samples_written:,} samples, {history.write_seconds:.1f} s; promtool "
            f"{history.backfill_seconds:.1f} s)")
        started = time.monotonic()
        prom = prometheus_on(binaries, data)
        prom.start(timeout=120)  # assigned first: a Ctrl-C while it starts still stops it
        prometheus_start = time.monotonic() - started
        proxy = ProxyProcess(prom.url, args.delay)
        modes: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        plan: list[tuple[str, str, int | None, bool]] = [
            ("direct", prom.url, args.concurrency, True),
            ("proxy", proxy.url, args.concurrency, True),
        ]
        if args.sequential:
            plan.append(("proxy_seq", proxy.url, 1, False))
        for mode, upstream, concurrency, full in plan:
            log(f"; {mode} ")
            measured = measure_mode(upstream, prom.url, at, args, log,
                                    concurrency=concurrency, full=full)
            modes[mode] = measured["summary"]
            raw[mode] = measured["raw"]
        profile = None
        if args.profile_size == size.name:
            log("; profiling")
            profile = profile_cycles(prom.url, at, args)
        log("\n")
    finally:
        if proxy is not None:
            proxy.stop()
        if prom is not None:
            prom.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "size": size.name,
        "at": at,
        "fleet": {
            "describe": size.describe(),
            "servers": size.servers, "models": size.models, "slices": size.slices,
            "hosts": size.hosts, "gpus_per_host": size.gpus_per_host,
            "models_per_server": size.models_per_server, "epoch_seconds": size.epoch_seconds,
            "seed": size.seed, "families": size.families,
            "history_minutes": size.history_minutes, "samples": history.samples_stored,
            "openmetrics_bytes": history.openmetrics_bytes, "write_s": history.write_seconds,
            "backfill_s": history.backfill_seconds, "prometheus_start_s": prometheus_start,
        },
        "modes": modes,
        "seconds": time.monotonic() - began,
    }
    if profile is not None:
        result["profile"] = profile
    if args.raw:
        result["raw"] = raw
    return result


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies over all cores, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def background_load(seconds: float = 2.0) -> float:
    """Share of the machine's CPU busy while this benchmark does nothing: other work that will
    compete with the measurement (0..1; NaN where /proc/stat is missing)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(seconds)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan")


def machine_facts(binaries: promserver.PrometheusBinaries, args: argparse.Namespace) -> dict[str,
                                                                                             Any]:
    cpu = bench_report.cpu_model()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    version = importlib.metadata.version
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pandas": version("pandas"),
        "numpy": version("numpy"),
        "requests": version("requests"),
        "prometheus_client": version("prometheus-client"),
        "prometheus": binaries.version,
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "repeat": args.repeat,
        "scrapes": args.scrapes,
        "window": args.window,
        "interval": args.interval,
        "delay_ms": 1000 * args.delay,
        "concurrency": args.concurrency,
        "exporter_pyarrow": not args.no_pyarrow,
        "sizes": args.sizes,
        "loadavg_start": os.getloadavg()[0],
        "background_cpu": background_load(),
    }


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (non-default options only)."""
    parts = [".venv/bin/python benchmarks/run.py"]
    if args.quick:
        parts.append("--quick")
    else:
        parts += [f"--sizes {','.join(args.sizes)}", f"--repeat {args.repeat}"]
    defaults = {"scrapes": 200, "delay": 0.05, "window": "2m", "interval": "30s",
                "concurrency": None}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            parts.append(f"--{name} {value}")
    if not args.sequential:
        parts.append("--no-sequential")
    if args.no_pyarrow:
        parts.append("--no-pyarrow")
    if args.json:
        parts.append(f"--json {args.json}")
    if args.markdown:
        parts.append(f"--markdown {args.markdown}")
    parts += [f"--with-json {p}" for p in args.with_json]
    if args.with_load != LOAD_JSON:
        parts.append(f"--with-load {args.with_load}")
    return " ".join(parts)


def render_text(facts: dict[str, Any], results: list[dict[str, Any]]) -> str:
    out = ["", *bench_report.facts_lines(facts), ""]
    out.append(bench_report.text_table(bench_report.MAIN_HEADER,
                                       bench_report.main_rows(results)))
    out += ["", "Where the cycle goes (medians, seconds):"]
    out.append(bench_report.text_table(bench_report.BREAKDOWN_HEADER,
                                       bench_report.breakdown_rows(results)))
    out += ["", "Fleets:"]
    out.append(bench_report.text_table(bench_report.FLEET_HEADER,
                                       bench_report.fleet_rows(results)))
    out += ["", "Derive step against the series it derives (direct):"]
    out.append(bench_report.text_table(bench_report.DERIVE_HEADER,
                                       bench_report.derive_rows(results)))
    for result in results:
        profile = result.get("profile")
        if profile:
            out += ["", f"cProfile at {result['size']}, per cycle "
                    f"({profile['cycle_s_under_profile']:.3f} s under the profiler), "
                    "top by cumulative time:"]
            out += [f"  {e['cumtime']:8.4f}  {e['tottime']:8.4f}  {e['ncalls']:>7}  "
                    f"{e['function']}" for e in profile["cumulative"]]
            out += ["  top by self time:"]
            out += [f"  {e['tottime']:8.4f}  {e['cumtime']:8.4f}  {e['ncalls']:>7}  "
                    f"{e['function']}" for e in profile["self"]]
    out += ["", *bench_report.reading(results), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="S,M,L",
                        help=f"comma-separated, of {','.join(SIZES)} (default S,M,L)")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (medians; >= 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: S only, repeat 2")
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes per format")
    parser.add_argument("--delay", type=float, default=0.05, help="proxy delay, seconds")
    parser.add_argument("--window", default="2m", help="rate window (exporter and notebook)")
    parser.add_argument("--interval", default="30s", help="exporter cycle interval")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="the exporter's upstream.concurrency (default: its own default)")
    parser.add_argument("--no-sequential", dest="sequential", action="store_false",
                        help="skip the extra proxy run at upstream.concurrency 1")
    parser.add_argument("--no-pyarrow", action="store_true",
                        help="run the exporter with pyarrow unimportable, as the Docker image "
                        "(no extras) runs it; by default it imports what the venv has")
    parser.add_argument("--profile-size", default=None,
                        help="size to cProfile the cycle at (default: the largest run; "
                        "'none' to skip)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write docs/benchmarks.md-style Markdown here")
    parser.add_argument("--raw", action="store_true",
                        help="keep every repetition's raw figures in the JSON")
    parser.add_argument("--with-json", type=Path, action="append", default=[], metavar="PATH",
                        help="also show the results of an earlier run (e.g. XL) in the Markdown, "
                        "when the file exists (repeatable)")
    parser.add_argument("--with-load", type=Path, default=LOAD_JSON, metavar="PATH",
                        help="also show benchmarks/load.py's results in the Markdown, when the "
                        "file exists (default benchmarks/results/load.json)")
    parser.add_argument("--render", type=Path, default=None, metavar="PATH",
                        help="measure nothing: render --markdown from this results file")
    args = parser.parse_args(argv)
    if args.render is not None:
        if args.markdown is None:
            parser.error("--render needs --markdown")
        payload = json.loads(args.render.read_text())
        write_markdown(args.markdown, payload, args.with_json, args.with_load)
        return 0
    if args.quick:
        args.sizes, args.repeat = "S", 2
    args.sizes = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes or args.repeat < 1 or args.scrapes < 1:
        parser.error(f"bad --sizes/--repeat/--scrapes (unknown sizes: {unknown})")
    if args.profile_size is None:
        args.profile_size = args.sizes[-1]
    args.profile_size = args.profile_size.upper()

    # SIGTERM behaves like Ctrl-C: the finally blocks stop every process we started.
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def log(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    began = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        cache = None if os.environ.get(promserver.CACHE_ENV) else ROOT / ".cache"
        binaries = promserver.find_prometheus(cache)
        facts = machine_facts(binaries, args)
        if facts["background_cpu"] > 0.15:
            log(f"warning: {100 * facts['background_cpu']:.0f}% of the machine's CPU is busy "
                "with other work; the figures will be slower and noisier than on an idle "
                "machine\n")
        for name in args.sizes:
            results.append(bench_size(SIZES[name], binaries, args, log))
    except KeyboardInterrupt:
        log("\ninterrupted: every process and temporary folder was cleaned up\n")
        return 130
    facts["total_seconds"] = time.monotonic() - began
    facts["loadavg_end"] = os.getloadavg()[0]
    print(render_text(facts, results))
    payload = {"command": command_line(args), "facts": facts, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        log(f"wrote {args.json}\n")
    if args.markdown:
        write_markdown(args.markdown, payload, args.with_json, args.with_load)
        log(f"wrote {args.markdown}\n")
    return 0


def write_markdown(path: Path, payload: dict[str, Any], extra: list[Path],
                   load: Path | None = None) -> None:
    extras = [json.loads(p.read_text()) for p in extra if p.exists()]
    load_results = json.loads(load.read_text()) if load is not None and load.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bench_doc.render(payload, extras, load_results))


if __name__ == "__main__":
    sys.exit(main())

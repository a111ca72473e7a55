"""Benchmark the historical report over a long range of a real, backfilled Prometheus.

One fleet size (default L: 40 servers x 50 models x 100 slices) gets ``--hours`` of simulated
history at a 60 s scrape interval, written in segments with ``Fleet.write_openmetrics`` (only
the families the queries read) and backfilled with promtool into one TSDB, each segment while
the next one is written. A Prometheus on 127.0.0.1 serves it. Then, in one run:

* our report over the whole range, in a child process (its own peak RSS), once per variant:
  ``before`` (one query at a time, every base query at full grain), ``narrow`` (one at a time,
  the narrowed queries, deduplicated by the upstream), ``fast`` (one at a time, the narrowed
  queries with their fast forms first) and ``after`` (the exporter's default
  ``upstream.concurrency``, as ``fast``). Per variant: wall time (fetch + derive + table +
  statistics, and the files separately), peak RSS, queries, bytes received, and Prometheus's
  own time for them (``prometheus_http_request_duration_seconds`` of ``/api/v1/query_range``,
  read from its /metrics before and after);
* the seed notebook's pattern (``benchmarks/bench_notebook.py``'s queries as range queries per
  chunk: its 20 base queries, then 2 per model version and 2 per slice, one at a time, each
  answer JSON-decoded only) over 1 h, then 4x longer ranges while a pass stays under
  ``--notebook-budget`` seconds and the range fits the history;
* a per-query profile (``stats=all``): every form of each of the report's base queries and
  every query of the notebook's pattern over the whole range, one at a time;

and prints the comparison per hour of range. Every process and temporary folder it starts is
removed when it ends, on Ctrl-C and SIGTERM too.

    .venv/bin/python benchmarks/report_range.py [--hours 24] [--size L]
        [--json benchmarks/results/report.json] [--markdown docs/report-benchmark.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import bench_notebook
import bench_report
import requests
from bench_fleet import SIZES, Size, UsedFamiliesFleet, prometheus_on

from exporter.config import format_duration, parse_duration
from exporter.lab import promserver

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Target figures of the report issue.
TARGET_UPSTREAM_RATIO = 1.2
TARGET_RSS_MB = 1024.0
TARGET_SPEEDUP = 5.0
#: (name, concurrency (None: the exporter's default), narrow, fast, upstream.compression (None:
#: the default, auto: plain answers from this loopback Prometheus))
VARIANTS: tuple[tuple[str, int | None, bool, bool, str | None], ...] = (
    ("before", 1, False, False, "gzip"),
    ("narrow", 1, True, False, None),
    ("fast", 1, True, True, None),
    ("after", None, True, True, None),
    ("gzip", None, True, True, "gzip"),
)
#: The variant sending `after`'s queries one at a time: the upstream's own time for them.
ALONE = "fast"


def log(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


# --- history --------------------------------------------------------------------------------------


class Backfills:
    """promtool runs, one per segment file, each in the background while the next is written."""

    def __init__(self, binaries: promserver.PrometheusBinaries, data: Path) -> None:
        self.binaries = binaries
        self.data = data
        self.proc: subprocess.Popen[str] | None = None
        self.file: Path | None = None
        self.expected = 0
        self.stored = 0
        self.waited = 0.0

    def start(self, file: Path, expected: int) -> None:
        self.finish()
        self.data.mkdir(parents=True, exist_ok=True)
        command = [str(self.binaries.promtool), "tsdb", "create-blocks-from", "openmetrics",
                   str(file), str(self.data)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.file, self.expected = file, expected

    def finish(self) -> None:
        if self.proc is None:
            return
        began = time.monotonic()
        out, _ = self.proc.communicate()
        self.waited += time.monotonic() - began
        code, self.proc = self.proc.returncode, None
        if code != 0:
            raise RuntimeError(f"promtool failed ({code}): {out.strip()[-2000:]}")
        stored = promserver.parse_backfill_samples(out)
        if stored != self.expected:
            raise RuntimeError(f"promtool stored {stored} of {self.expected} samples")
        self.stored += stored
        if self.file is not None:
            self.file.unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def write_history(size: Size, binaries: promserver.PrometheusBinaries, workdir: Path,
                  start: float, end: float, scrape: float, segment: float) -> dict[str, Any]:
    """``size``'s history on [start, end] every ``scrape`` seconds, into ``workdir/tsdb``."""
    fleet = UsedFamiliesFleet(size.spec(start - size.epoch_seconds))
    backfills = Backfills(binaries, workdir / "tsdb")
    written = om_bytes = 0
    write_s = 0.0
    began = time.monotonic()
    try:
        at, n = start, 0
        while at <= end:
            last = min(at + segment - scrape, end)
            file = workdir / f"segment-{n}.om"
            t0 = time.monotonic()
            count = fleet.write_openmetrics(file, at, last, scrape)
            write_s += time.monotonic() - t0
            written += count
            om_bytes += file.stat().st_size
            backfills.start(file, count)
            log(".")
            at, n = last + scrape, n + 1
        backfills.finish()
    finally:
        backfills.kill()
    return {"samples": written, "openmetrics_bytes": om_bytes, "segments": n,
            "write_s": write_s, "backfill_wait_s": backfills.waited,
            "total_s": time.monotonic() - began}


# --- Prometheus's own accounting ------------------------------------------------------------------

_RANGE_HANDLER = 'handler="/api/v1/query_range"'
_INNER_EVAL = 'slice="inner_eval"'
_VALUE = re.compile(r"\s(\S+)$")


def upstream_stats(prom_url: str) -> dict[str, float]:
    """Requests and summed handling seconds of /api/v1/query_range, and the engine's summed
    evaluation seconds (all queries), from Prometheus's own /metrics (not counted there)."""
    text = requests.get(f"{prom_url}/metrics", timeout=30).text
    out = {"requests": 0.0, "seconds": 0.0, "eval_seconds": 0.0}
    for line in text.splitlines():
        match = _VALUE.search(line)
        if match is None:
            continue
        if _RANGE_HANDLER in line:
            if line.startswith("prometheus_http_requests_total{"):
                out["requests"] += float(match.group(1))
            elif line.startswith("prometheus_http_request_duration_seconds_sum{"):
                out["seconds"] += float(match.group(1))
        elif line.startswith("prometheus_engine_query_duration_seconds_sum{") and (
                _INNER_EVAL in line):
            out["eval_seconds"] += float(match.group(1))
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


# --- our report, in a child process ---------------------------------------------------------------


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return math.nan


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one report as ``triton-mig-exporter report`` does; what it cost, as a dict."""
    import requests as http

    from exporter import config, report
    from exporter.upstream import PrometheusClient

    upstream: dict[str, Any] = {"url": spec["url"], "timeout": "600s", "retries": 0}
    if spec["concurrency"] is not None:
        upstream["concurrency"] = spec["concurrency"]
    if spec.get("compression") is not None:
        upstream["compression"] = spec["compression"]
    cfg = config.from_mapping({
        "upstream": upstream,
        "evaluation": {"window": spec["window"], "scrape_interval": spec["scrape"]},
    }, environ={})
    calls: list[float] = []
    decoded = [0]

    def count(response: http.Response, *args: Any, **kwargs: Any) -> http.Response:
        # The answer's JSON bytes as read (after gzip, which Prometheus applies on the wire).
        iterate = response.iter_content

        def counted(*a: Any, **k: Any) -> Any:
            for chunk in iterate(*a, **k):
                decoded[0] += len(chunk)
                yield chunk

        response.iter_content = counted  # type: ignore[method-assign]
        return response

    started = time.perf_counter()
    with PrometheusClient(cfg.upstream, on_request=lambda outcome, s: calls.append(s)) as client:
        client.session.hooks["response"].append(count)
        made = report.generate(client, cfg, spec["start"], spec["end"], spec["step"],
                               spec["chunk"], retries=0, upstream=client.url,
                               narrow=spec["narrow"], fast=spec["fast"])
        fetched = time.perf_counter() - started
        files_started = time.perf_counter()
        files = report.write_report(made, Path(spec["out"]))
        files_s = time.perf_counter() - files_started
    return {
        "wall_s": fetched, "files_s": files_s, "total_s": fetched + files_s,
        "queries": made.summary["report"]["queries"],
        "concurrency": made.summary["report"]["concurrency"],
        "chunks": made.summary["report"]["chunks"],
        "client_request_sum_s": sum(calls), "json_bytes": decoded[0],
        "rss_peak_mb": _vmhwm_mb(), "rows": len(made.table), "columns": made.table.shape[1],
        "files": files, "warnings": made.summary["warnings"],
        "steps_with_triton_data": made.summary["statistics"]["steps_with_triton_data"],
    }


class Child:
    """This script with ``--child``: one report, its figures on the last line of stdout."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            cwd=ROOT,
        )

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"report child failed ({self.proc.returncode}):\n{err[-3000:]}")
        figures: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return figures

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the slower middle one of an even count)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return ordered[len(ordered) // 2]


def measure_report(prom_url: str, spec: dict[str, Any], live: list[Child]) -> dict[str, Any]:
    before = upstream_stats(prom_url)
    run = Child(spec)
    live.append(run)
    try:
        figures = run.result()
    finally:
        run.kill()
        live.remove(run)
    figures["upstream"] = delta(upstream_stats(prom_url), before)
    return figures


# --- the notebook's pattern -----------------------------------------------------------------------


def notebook_range(url: str, start: float, end: float, step: float, chunk: float,
                   window: str, plain: bool = False) -> dict[str, Any]:
    """The seed's ``get_all_queries``: every query over every (start, end) tuple, one at a time,
    GET /api/v1/query_range as prometheus-api-client sends it (gzip-compressed answers, as
    requests asks; ``plain``: uncompressed, like for like with the report on one host);
    answers only JSON-decoded."""
    session = requests.Session()
    if plain:
        session.headers["Accept-Encoding"] = "identity"
    tuples: list[tuple[float, float]] = []
    at = start
    while at <= end:
        tuples.append((at, min(at + chunk, end)))
        at = tuples[-1][1] + step  # no repeated boundary (the seed's tuples repeated it)
    queries = 0
    received = 0

    def ask(promql: str) -> list[dict[str, Any]]:
        nonlocal queries, received
        out: list[dict[str, Any]] = []
        for st, et in tuples:
            answer = session.get(f"{url}/api/v1/query_range", timeout=600, params={
                "query": promql, "start": f"{st:.3f}", "end": f"{et:.3f}", "step": f"{step:g}"})
            received += len(answer.content)
            body = answer.json()
            queries += 1
            if body.get("status") != "success":
                raise RuntimeError(f"notebook query failed: {body.get('error')}")
            out += body["data"]["result"]
        return out

    began = time.perf_counter()
    try:
        pairs: set[tuple[str, str]] | None = None
        slices: set[tuple[str, str, str]] | None = None
        for promql in bench_notebook.base_queries(window).values():
            labels = [item["metric"] for item in ask(promql)]
            if pairs is None and labels and all("model" in m and "version" in m for m in labels):
                pairs = {(m["model"], m["version"]) for m in labels}
            if slices is None and labels and all("GPU_I_ID" in m for m in labels):
                slices = {(m["device"], m["GPU_I_ID"], m["instance"]) for m in labels}
        pair_list, slice_list = sorted(pairs or ()), sorted(slices or ())
        for promql in bench_notebook.model_queries(pair_list, window).values():
            ask(promql)
        for promql in bench_notebook.slice_queries(slice_list, window).values():
            ask(promql)
    finally:
        session.close()
    return {"wall_s": time.perf_counter() - began, "queries": queries, "json_bytes": received,
            "pairs": len(pair_list), "slices": len(slice_list), "chunks": len(tuples)}


def measure_notebook(prom_url: str, start: float, end: float, step: float, chunk: float,
                     window: str, budget: float) -> list[dict[str, Any]]:
    """1 h, then 4x longer (at most the whole range) while a pass takes under ``budget`` s."""
    passes: list[dict[str, Any]] = []
    whole = (end - start) / 3600.0
    hours = min(1.0, whole)
    while True:
        first = end - hours * 3600.0
        log(f" {hours:g}h")
        before = upstream_stats(prom_url)
        try:
            figures = notebook_range(prom_url, first, end, step, chunk, window)
        except (requests.RequestException, RuntimeError) as error:
            passes.append({"hours": hours, "failed": str(error)[:500]})
            break
        figures["upstream"] = delta(upstream_stats(prom_url), before)
        figures["hours"] = hours
        passes.append(figures)
        if figures["wall_s"] > budget or hours >= whole:
            break
        hours = min(hours * 4, whole)
    return passes


# --- per query: what the upstream evaluates -------------------------------------------------------

_FAMILY = re.compile(r"\b(nv_[a-z_]+|DCGM_[A-Z_]+)\b")


def stats_range(session: requests.Session, url: str, promql: str, start: float, end: float,
                step: float) -> tuple[dict[str, float], list[dict[str, str]]]:
    """One range query with ``stats=all``: the engine's evaluation seconds, the samples it
    loaded, the answer's JSON bytes and series, the request's seconds; and the series' labels."""
    began = time.perf_counter()
    answer = session.get(f"{url}/api/v1/query_range", timeout=600, params={
        "query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}",
        "stats": "all"})
    body = answer.json()
    seconds = time.perf_counter() - began
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {body.get('error')}: {promql}")
    stats = body["data"]["stats"]
    result = body["data"]["result"]
    return {"queries": 1, "seconds": seconds, "eval_s": stats["timings"]["evalTotalTime"],
            "samples": stats["samples"]["totalQueryableSamples"],
            "bytes": len(answer.content), "series": len(result)}, [r["metric"] for r in result]


def _add(into: dict[str, float], figures: dict[str, float]) -> None:
    for key, value in figures.items():
        into[key] = into.get(key, 0) + value


def profile(url: str, start: float, end: float, step: float, chunk: float,
            window: str) -> dict[str, Any]:
    """Each form of each of the report's base queries, and each query of the notebook's
    pattern, over the whole range with ``stats=all``, one at a time: where the upstream's time
    goes. Nothing else runs meanwhile."""
    from exporter import config, report
    from exporter.catalog import BASE_QUERIES, Selectors

    cfg = config.from_mapping({"evaluation": {"window": window}}, environ={})
    sel = Selectors.from_config(cfg)
    forms = {"catalog": report.report_queries(sel, narrow=False),
             "deduplicated": {name: promql for name, promql in report.report_queries(sel).items()
                              if name in report.NARROW},
             "fast": report.fast_queries(sel)}
    spans = report.chunks(start, end, step, chunk)
    session = requests.Session()
    ours: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for query in BASE_QUERIES:
            for form, promqls in forms.items():
                if query.name not in promqls:
                    continue
                figures: dict[str, float] = {}
                for first, last in spans:
                    _add(figures, stats_range(session, url, promqls[query.name], first, last,
                                              step)[0])
                ours.setdefault(query.name, {})[form] = figures
        # The notebook's pattern as notebook_range sends it (its tuples, its queries).
        tuples: list[tuple[float, float]] = []
        at = start
        while at <= end:
            tuples.append((at, min(at + chunk, end)))
            at = tuples[-1][1] + step
        theirs: dict[str, dict[str, Any]] = {}
        seen: dict[str, list[dict[str, str]]] = {}

        def ask(group: str, promql: str) -> None:
            entry = theirs.setdefault(group, {"families": sorted(set(_FAMILY.findall(promql)))})
            for first, last in tuples:
                figures, labels = stats_range(session, url, promql, first, last, step)
                _add(entry, figures)
                seen.setdefault(group, []).extend(labels)

        for name, promql in bench_notebook.base_queries(window).items():
            ask(name, promql)
        pairs = sorted({(m["model"], m["version"]) for m in seen.get("inf_rate", [])
                        if "model" in m and "version" in m})
        slices = sorted({(m["device"], m["GPU_I_ID"], m["instance"])
                         for m in seen.get("gpu_tensor_util", []) if "GPU_I_ID" in m})
        for name, promql in bench_notebook.model_queries(pairs, window).items():
            ask(f"{name.split('_', 2)[0]}_{name.split('_', 2)[1]}_<model>", promql)
        for name, promql in bench_notebook.slice_queries(slices, window).items():
            ask(f"{name.rsplit('_', 1)[0]}_<slice>", promql)
    finally:
        session.close()
    families = {q.name: q.metric for q in BASE_QUERIES}
    return {"report": ours, "notebook": theirs, "families": families,
            "pairs": len(pairs), "slices": len(slices)}


# --- facts, summary, rendering --------------------------------------------------------------------


def machine_facts(binaries: promserver.PrometheusBinaries) -> dict[str, Any]:
    from run import background_load

    cpu = bench_report.cpu_model()
    return {
        "cores": os.cpu_count(), "cpu": cpu,
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(), "prometheus": binaries.version,
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg()[0], "background_cpu": background_load(),
    }


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per-hour figures, ratios and the targets, all from this one run."""
    hours = result["range_hours"]
    reports = result["reports"]
    after = reports["after"]
    notebook = [p for p in result["notebook"] if "failed" not in p]
    longest = notebook[-1] if notebook else None
    out: dict[str, Any] = {
        "per_hour_s": {name: r["wall_s"] / hours for name, r in reports.items()},
        # Prometheus's time for a variant's queries when sent one at a time: under concurrency
        # each request also waits for the CPU the others use, and their sum grows with it.
        "upstream_ratio": {
            name: r["wall_s"] / reports[ALONE if name == "after" else name]["upstream"]["seconds"]
            for name, r in reports.items() if name != "gzip"  # no gzip variant one at a time
        },
        "rss_peak_mb": {name: r["rss_peak_mb"] for name, r in reports.items()},
        "before_over_after": reports["before"]["wall_s"] / after["wall_s"],
        "bytes_before_over_after": reports["before"]["json_bytes"] / after["json_bytes"],
    }
    if longest is not None:
        out["notebook_hours"] = longest["hours"]
        out["notebook_per_hour_s"] = longest["wall_s"] / longest["hours"]
        out["speedup_per_hour"] = out["notebook_per_hour_s"] / out["per_hour_s"]["after"]
        if "gzip" in reports:
            # Both with gzip-compressed answers, as across a network.
            out["speedup_per_hour_gzip"] = out["notebook_per_hour_s"] / out["per_hour_s"]["gzip"]
    if result.get("notebook_plain"):
        plain = result["notebook_plain"]
        out["notebook_plain_per_hour_s"] = plain["wall_s"] / plain["hours"]
        # Both with plain answers: what uncompressed transfer alone does for either.
        out["speedup_per_hour_plain"] = (out["notebook_plain_per_hour_s"]
                                         / out["per_hour_s"]["after"])
    out["targets"] = {
        "upstream_ratio": {"target": TARGET_UPSTREAM_RATIO,
                           "value": out["upstream_ratio"].get("after", math.nan)},
        "rss_peak_mb": {"target": TARGET_RSS_MB, "value": after["rss_peak_mb"]},
        "speedup_per_hour": {"target": TARGET_SPEEDUP,
                             "value": out.get("speedup_per_hour", math.nan)},
    }
    targets = out["targets"]
    targets["upstream_ratio"]["met"] = targets["upstream_ratio"]["value"] <= TARGET_UPSTREAM_RATIO
    targets["rss_peak_mb"]["met"] = targets["rss_peak_mb"]["value"] < TARGET_RSS_MB
    targets["speedup_per_hour"]["met"] = targets["speedup_per_hour"]["value"] >= TARGET_SPEEDUP
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows]
    return [line, rule, *body]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def render(payload: dict[str, Any]) -> list[str]:
    """The tables, as Markdown (also readable as text)."""
    facts, result, summary = payload["facts"], payload["result"], payload["summary"]
    history = result["history"]
    hours = result["range_hours"]
    out = [
        f"Machine: {facts['cores']} cores ({facts['cpu']}), {facts['memory_gib']:.0f} GiB, "
        f"Python {facts['python']}, Prometheus {facts['prometheus']}; started "
        f"{facts['started']}, load average {facts['loadavg_start']:.2f}, "
        f"{100 * facts['background_cpu']:.0f}% of the CPU busy with other work at the start.",
        "",
        f"Fleet {result['size']}: {result['fleet']}. History: {result['history_hours']:g} h at "
        f"{result['scrape']} scrapes, only the families the queries read: "
        f"{history['samples']:,} samples, {_mb(history['openmetrics_bytes'])} MB of "
        f"OpenMetrics in {history['segments']} segments; written in {history['write_s']:.0f} s, "
        f"backfilled alongside (waited {history['backfill_wait_s']:.0f} s more), "
        f"{history['total_s']:.0f} s in all. Report: {hours:.4g} h = {result['steps']:,} steps of "
        f"{result['step']}, W = {result['window']}, chunks of {result['chunk']}.",
        "",
    ]
    rows = []
    for name, r in result["reports"].items():
        up = r["upstream"]
        rows.append([
            name, str(r["concurrency"]), str(r["queries"]), f"{r['wall_s']:.1f}",
            " / ".join(f"{w:.1f}" for w in result["walls"][name]), f"{r['files_s']:.1f}",
            f"{up['seconds']:.1f}", f"{up['eval_seconds']:.1f}",
            f"{summary['upstream_ratio'][name]:.2f}" if name in summary["upstream_ratio"]
            else "-", f"{r['client_request_sum_s']:.1f}",
            _mb(r["json_bytes"]), f"{r['rss_peak_mb']:.0f}", f"{r['wall_s'] / hours:.2f}",
        ])
    out += table(["report", "concurrency", "queries", "wall s", "all runs", "files s",
                  "upstream s", "of which eval s", "wall / upstream alone",
                  "client request s (sum)", "JSON MB", "peak RSS MiB", "s per hour"], rows)
    out += ["", "The seed notebook's pattern (one query per model version and per slice, "
            "each over every chunk, one at a time):", ""]
    rows = []
    for p in result["notebook"]:
        if "failed" in p:
            rows.append([f"{p['hours']:.4g}", "failed", p["failed"][:60], "", "", "", "", ""])
            continue
        runs = (" / ".join(f"{w:.1f}" for w in result["notebook_walls"])
                if p["hours"] == summary.get("notebook_hours") else "")
        rows.append([f"{p['hours']:.4g}", str(p["queries"]), f"{p['wall_s']:.1f}", runs,
                     f"{p['upstream']['seconds']:.1f}", _mb(p["json_bytes"]),
                     f"{p['pairs']} / {p['slices']}", f"{p['wall_s'] / p['hours']:.2f}"])
    if result.get("notebook_plain"):
        p = result["notebook_plain"]
        rows.append([f"{p['hours']:.4g} plain", str(p["queries"]), f"{p['wall_s']:.1f}",
                     " / ".join(f"{w:.1f}" for w in result["notebook_plain_walls"]),
                     f"{p['upstream']['seconds']:.1f}", _mb(p["json_bytes"]),
                     f"{p['pairs']} / {p['slices']}", f"{p['wall_s'] / p['hours']:.2f}"])
    out += table(["range h", "queries", "wall s", "all runs", "upstream s", "JSON MB",
                  "model versions / slices", "s per hour"], rows)
    targets = summary["targets"]

    def verdict(key: str, fmt: str, unit: str = "") -> str:
        t = targets[key]
        return f"{format(t['value'], fmt)}{unit} ({'met' if t['met'] else 'NOT met'})"

    out += [
        "",
        "Targets, `after` (this run's ratios):",
        "",
        f"- wall time / the upstream's own time for the queries issued (the same queries, "
        f"sent one at a time: `{ALONE}`'s upstream s): {verdict('upstream_ratio', '.2f')}; "
        f"target <= {TARGET_UPSTREAM_RATIO}",
        f"- peak RSS: {verdict('rss_peak_mb', '.0f', ' MiB')}; target < {TARGET_RSS_MB:.0f} MiB",
        f"- per hour of range, the notebook's pattern ({summary.get('notebook_hours', 0):.4g} h, "
        f"its longest pass) / ours: {verdict('speedup_per_hour', '.1f', 'x')}; target >= "
        f"{TARGET_SPEEDUP:g}x",
        *([f"- the same, both with plain answers (the notebook's longest pass uncompressed): "
           f"{summary['speedup_per_hour_plain']:.1f}x"] if "speedup_per_hour_plain" in summary
          else []),
        *([f"- the same, both with gzip-compressed answers (`gzip`, as across a network): "
           f"{summary['speedup_per_hour_gzip']:.1f}x"] if "speedup_per_hour_gzip" in summary
          else []),
        f"- before / after (same run): {summary['before_over_after']:.2f}x the wall time, "
        f"{summary['bytes_before_over_after']:.2f}x the JSON bytes",
    ]
    return out


#: The report's base queries for figures the notebook's pattern lacks.
NOTEBOOK_LACKS = {"failure": "failures", "exec": "batch size",
                  "gr_engine": "graphics-engine activity", "tensor_max": "idle slices"}
#: Forms of a base query, in the order the report prefers them.
_FORMS = ("fast", "deduplicated", "catalog")


def sent_form(forms: dict[str, Any]) -> str:
    """The form ``fast``/``after`` send first for a base query."""
    return next(form for form in _FORMS if form in forms)


def bounds(result: dict[str, Any]) -> list[str]:
    """The "What bounds it" section: the per-query profile as tables and its totals."""
    prof = result.get("profile")
    if not prof:
        return ["(no per-query profile in this run)"]
    ours, theirs = prof["report"], prof["notebook"]

    def cell(figures: dict[str, float] | None) -> str:
        if figures is None:
            return ""
        return f"{figures['eval_s']:.2f} / {_mb(figures['bytes'])}"

    rows = []
    sent: dict[str, float] = {}
    for name, forms in ours.items():
        form = sent_form(forms)
        _add(sent, forms[form])
        rows.append([f"`{name}`", f"`{prof['families'][name]}`",
                     *(cell(forms.get(f)) for f in ("catalog", "deduplicated", "fast")),
                     form, f"{forms[form]['samples'] / 1e6:.1f}",
                     str(int(forms[form]["series"] / forms[form]["queries"]))])
    catalog_total: dict[str, float] = {}
    for forms in ours.values():
        _add(catalog_total, forms["catalog"])
    rows.append(["all 14", "", cell(catalog_total), "", "", "as sent: " + cell(sent),
                 f"{sent['samples'] / 1e6:.1f}", ""])
    out = [
        f"Each base query over the whole range ({result['range_hours']:.4g} h, chunks of "
        f"{result['chunk']}), one at a time with `stats=all`: the engine's evaluation seconds "
        "(`evalTotalTime`) / the answer's JSON MB, per form: `catalog` (per model, version, pod "
        "and replica), `deduplicated` (`sum by (model, version) (max by (model, version, pod) "
        "(catalog))`), `fast` (`sum by (model, version, <replica labels>) (rate(...))`, exact "
        "when the answer holds one replica label set). `samples M`: samples the engine loaded "
        "(`totalQueryableSamples`) for the form sent; `series`: per query of that form.",
        "",
        *table(["base query", "family", "catalog eval s / MB", "deduplicated", "fast",
                "sent", "samples M", "series"], rows),
        "",
        "The notebook's pattern over the same range, each query over its tuples (`<model>`: "
        f"one query per model version, {prof['pairs']}; `<slice>`: one per slice, "
        f"{prof['slices']}):",
        "",
    ]
    rows = []
    nb_total: dict[str, float] = {}
    reads: dict[str, int] = {}
    for group, entry in sorted(theirs.items(), key=lambda item: -item[1]["eval_s"]):
        figures = {k: v for k, v in entry.items() if k != "families"}
        _add(nb_total, figures)
        for family in entry["families"]:
            reads[family] = reads.get(family, 0) + int(entry["queries"])
        rows.append([f"`{group}`", str(int(entry["queries"])),
                     ", ".join(f"`{f}`" for f in entry["families"]),
                     f"{entry['eval_s']:.2f}", f"{entry['samples'] / 1e6:.1f}",
                     _mb(entry["bytes"])])
    rows.append(["all", str(int(nb_total["queries"])), "", f"{nb_total['eval_s']:.2f}",
                 f"{nb_total['samples'] / 1e6:.1f}", _mb(nb_total["bytes"])])
    out += table(["query", "queries", "families read", "eval s", "samples M", "JSON MB"], rows)
    like: dict[str, float] = {}
    extra: dict[str, float] = {}
    for name, forms in ours.items():
        _add(extra if name in NOTEBOOK_LACKS else like, forms[sent_form(forms)])
    dedup_saved = sum(forms["deduplicated"]["eval_s"] - forms["fast"]["eval_s"]
                      for forms in ours.values() if "fast" in forms and "deduplicated" in forms)
    out += [
        "",
        f"- Evaluation, all queries one at a time: the report's 14 as sent "
        f"{sent['eval_s']:.2f} s ({sent['samples'] / 1e6:.0f} M samples, "
        f"{_mb(sent['bytes'])} MB of JSON), at full grain {catalog_total['eval_s']:.2f} s; the "
        f"notebook's {int(nb_total['queries'])} queries {nb_total['eval_s']:.2f} s "
        f"({nb_total['samples'] / 1e6:.0f} M samples, {_mb(nb_total['bytes'])} MB), "
        f"{nb_total['eval_s'] / sent['eval_s']:.1f}x ours.",
        "- Like for like: the notebook's pattern sends, per family it reads, "
        + ", ".join(f"`{f}` {n}" for f, n in sorted(reads.items(), key=lambda x: -x[1]))
        + " queries over the range (some for one model version or one slice) for a fleet "
        "rate, requests, five latencies and servers active, per model version a rate and "
        "servers active, per pod and per (model, version, pod) rates and latencies, and per "
        f"slice tensor and DRAM activity for the "
        f"{prof['slices']} slices its DCGM filter matches. The report reads each of those "
        f"families once ({len(ours) - len(NOTEBOOK_LACKS)} queries): {like['eval_s']:.2f} s of "
        f"evaluation ({nb_total['eval_s'] / like['eval_s']:.1f}x less than the notebook) for "
        "those figures deduplicated, per model version and per slice; its other "
        f"{len(NOTEBOOK_LACKS)} queries ("
        + ", ".join(f"`{n}`: {what}" for n, what in NOTEBOOK_LACKS.items())
        + f", figures the notebook lacks) cost {extra['eval_s']:.2f} s more.",
        f"- Grouping, not reading, dominates: a Triton family's samples cost the same in every "
        f"form, but each grouping per (model, version, pod) is rebuilt at every step. The fast "
        f"forms save {dedup_saved:.2f} s of evaluation over the deduplicating ones here; what "
        f"is left is `success` (per pod: servers active need it), `failure` (four times the "
        f"series: one per reason) and the rate itself, which every form computes over each "
        f"sample W / scrape interval times (W = {result['window']}).",
    ]
    return out


def write_markdown(path: Path, payload: dict[str, Any]) -> None:
    lines = [
        "# Report benchmark",
        "",
        "What `triton-mig-exporter report` costs over a long range of a real Prometheus, against "
        "the seed notebook's query pattern on the same Prometheus in the same run. Regenerate "
        "with:",
        "",
        "```sh",
        payload["command"],
        "```",
        "",
        "(`benchmarks/report_range.py --help` for the options; everything runs on 127.0.0.1 and "
        "is removed afterwards.) The five report runs: `before` sends one query at a time and "
        "asks every base query at full grain (per model, version and pod) for gzip-compressed "
        "answers, as the report did "
        "before (but it already sends the next chunk's queries while a chunk is derived); "
        "`narrow` also one at "
        "a time, with the queries the table reads only per model version asked for at that "
        "grain, deduplicated by the upstream; `fast` also one at a time, those and `count` "
        "first asked summed per model version and replica label set (asked again "
        "deduplicated only when an answer holds several replica label sets); `after` is what "
        "the command does: as `fast`, `upstream.concurrency` of them in flight; `gzip` as "
        "`after` with `upstream.compression: gzip` (what a remote upstream gets; the others "
        "use the default, `auto`, which asks this loopback Prometheus for plain answers). "
        "The notebook's pattern asks for gzip as requests does; its longest pass is also run "
        "with plain answers (`plain`), like for like. `upstream s` "
        "is Prometheus's own summed handling time of a run's range queries "
        "(`prometheus_http_request_duration_seconds`, "
        "`of which eval s`: `prometheus_engine_query_duration_seconds{slice=\"inner_eval\"}`); "
        "under concurrency each request also waits for the CPU the others use, so "
        "`wall / upstream alone` divides by the time of the same queries sent one at a time "
        f"(`{ALONE}`'s for `after`). Wall time counts fetching, deriving, the table and the "
        "statistics, `files s` the parquet, CSV, summaries and plots after it. Peak RSS is the "
        "report process's VmHWM. Each figure is the median of `--repeat` runs (`all runs`), "
        "interleaved with the notebook's longest pass.",
        "",
        "## Latest run",
        "",
        *render(payload),
        "",
        "## What bounds it",
        "",
        *bounds(payload["result"]),
        "",
        "## Reading it",
        "",
        *payload.get("reading", []),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_wrap(lines)))


def reading(payload: dict[str, Any]) -> list[str]:
    """What the figures mean, with the extrapolations, from this run's numbers."""
    result, summary = payload["result"], payload["summary"]
    history = result["history"]
    per_hour_history = history["total_s"] / result["history_hours"]
    after = result["reports"]["after"]
    week = 168.0
    lines = [
        f"- History cost here: {per_hour_history:.1f} s and "
        f"{history['openmetrics_bytes'] / result['history_hours'] / 1e6:.0f} MB of OpenMetrics "
        f"per hour of {result['size']} history, so 7 days would take about "
        f"{per_hour_history * week / 60:.0f} min and "
        f"{history['openmetrics_bytes'] / result['history_hours'] * week / 1e9:.1f} GB written "
        f"in segments"
        + (f"; the run uses {result['history_hours']:g} h to stay within a few minutes."
           if result["history_hours"] < week else "."),
        f"- Our report's cost is per chunk (queries, answers, derivation; each chunk is pivoted "
        f"into its rows as it arrives): at {summary['per_hour_s']['after']:.2f} s per hour of "
        f"range, 7 days would take about {summary['per_hour_s']['after'] * week / 60:.1f} min "
        f"({math.ceil(week * 3600 / parse_duration(result['chunk'])) * 14} queries). Its "
        f"memory is that of two chunks in flight plus the table's floats (steps x columns x 8 "
        f"bytes: {8 * result['steps'] * after['columns'] / 1e6:.0f} MB here, about "
        f"{8 * week * 3600 / parse_duration(result['step']) * after['columns'] / 1e6:.0f} MB "
        f"for 7 days); "
        f"peak RSS {after['rss_peak_mb']:.0f} MiB for {result['steps']:,} steps.",
    ]
    reports = result["reports"]
    notebook = [p for p in result["notebook"] if "failed" not in p]
    if notebook:
        last = notebook[-1]
        own = reports[ALONE]["upstream"]["seconds"] / hours_of(result)
        theirs = last["upstream"]["seconds"] / last["hours"]
        lines.append(
            f"- Where the time goes: Prometheus's own time for our queries, sent one at a time, "
            f"is {own:.2f} s per hour of range (with the deduplicating forms, `narrow`: "
            f"{reports['narrow']['upstream']['seconds'] / hours_of(result):.2f} s; at full "
            f"grain, `before`: {reports['before']['upstream']['seconds'] / hours_of(result):.2f}"
            f" s); for the notebook's pattern {theirs:.2f} s ({theirs / own:.1f}x). On this "
            f"machine Prometheus and the report share "
            f"{payload['facts']['cores']} cores, so sending queries concurrently cannot make "
            f"Prometheus's work finish sooner than those cores allow; against an upstream "
            f"with cores of its own (Mimir, Thanos, a Prometheus on another host) the "
            f"{reports['after']['concurrency']} concurrent queries overlap for real. Narrowing "
            f"and the fast forms cut the JSON the upstream encodes and the report decodes "
            f"{summary['bytes_before_over_after']:.1f}x; what remains is mostly `success`, "
            f"which the table needs per server.")
    if "speedup_per_hour" in summary:
        lines.append(
            f"- The notebook's pattern costs {summary['notebook_per_hour_s']:.2f} s per hour of "
            f"range over {summary['notebook_hours']:.4g} h (its query count is per chunk: 20 + 2 "
            f"per model version + 2 per slice), {summary['speedup_per_hour']:.1f}x ours per "
            f"hour. Its answers are only JSON-decoded here (no DataFrames, no joins), so the "
            f"real notebook is slower still.")
    return lines


def hours_of(result: dict[str, Any]) -> float:
    hours: float = result["range_hours"]
    return hours


def _wrap(lines: list[str], width: int = 100) -> list[str]:
    """Prose wrapped at ``width`` (tables, code and headings as they are)."""
    out: list[str] = []
    fence = False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        if fence or line.startswith(("|", "#", "```")) or len(line) <= width:
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                             break_on_hyphens=False)
    return out


def command_line(args: argparse.Namespace) -> str:
    parts = [".venv/bin/python benchmarks/report_range.py"]
    defaults = {"size": "L", "hours": 24.0, "scrape": "60s", "step": "60s", "window": "4m",
                "chunk": "6h", "segment": "6h", "notebook_budget": 240.0, "repeat": 3}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            parts.append(f"--{name.replace('_', '-')} {value}")
    if args.json:
        parts.append(f"--json {args.json}")
    if args.markdown:
        parts.append(f"--markdown {args.markdown}")
    return " ".join(parts)


# --- main -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path, live: list[Child],
        started: Callable[[promserver.PrometheusServer], None]) -> dict[str, Any]:
    cache = None if os.environ.get(promserver.CACHE_ENV) else ROOT / ".cache"
    binaries = promserver.find_prometheus(cache)
    facts = machine_facts(binaries)
    if facts["background_cpu"] > 0.15:
        log(f"warning: {100 * facts['background_cpu']:.0f}% of the CPU is busy with other "
            "work; the figures will be slower and noisier than on an idle machine\n")
    size = SIZES[args.size]
    scrape, step = parse_duration(args.scrape), parse_duration(args.step)
    chunk, segment = parse_duration(args.chunk), parse_duration(args.segment)
    window = parse_duration(args.window)
    end = math.floor(time.time() / 3600.0) * 3600.0 - 3600.0
    start = end - args.hours * 3600.0
    log(f"{size.name}: {size.describe()}: writing {args.hours:g} h of history at {args.scrape} ")
    history = write_history(size, binaries, workdir, start, end, scrape, segment)
    log(f" {history['samples']:,} samples in {history['total_s']:.0f} s\n")
    # Only 2 h blocks, as promtool wrote them: no compaction competes with the measurement.
    prom = prometheus_on(binaries, workdir / "tsdb")
    prom.extra_args = ("--storage.tsdb.max-block-duration=2h",)
    started(prom)
    prom.start(timeout=300)
    # The report's first window starts at the history's first sample.
    first = math.ceil((start + window) / step) * step
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in VARIANTS}
    notebook: list[dict[str, Any]] = []
    longest: list[dict[str, Any]] = []
    plain: list[dict[str, Any]] = []
    # Repetitions interleave the variants and the notebook, so all see the same machine.
    for repetition in range(args.repeat):
        for name, concurrency, narrow, fast, compression in VARIANTS:
            log(f"[{repetition + 1}/{args.repeat}] report {name} ...")
            spec = {"url": prom.url, "start": first, "end": end, "step": step, "chunk": chunk,
                    "window": args.window, "scrape": args.scrape, "concurrency": concurrency,
                    "narrow": narrow, "fast": fast, "compression": compression,
                    "out": str(workdir / f"out-{name}")}
            runs[name].append(measure_report(prom.url, spec, live))
            log(f" {runs[name][-1]['wall_s']:.1f} s\n")
        log(f"[{repetition + 1}/{args.repeat}] notebook pattern:")
        if repetition == 0:
            notebook = measure_notebook(prom.url, first, end, step, chunk, args.window,
                                        args.notebook_budget)
            longest.append(next(p for p in reversed(notebook) if "failed" not in p))
        else:
            hours = longest[0]["hours"]
            log(f" {hours:g}h")
            before = upstream_stats(prom.url)
            again = notebook_range(prom.url, end - hours * 3600.0, end, step, chunk,
                                   args.window)
            longest.append({**again, "upstream": delta(upstream_stats(prom.url), before),
                            "hours": hours})
        hours = longest[0]["hours"]
        log(f" {hours:g}h plain")
        before = upstream_stats(prom.url)
        again = notebook_range(prom.url, end - hours * 3600.0, end, step, chunk, args.window,
                               plain=True)
        plain.append({**again, "upstream": delta(upstream_stats(prom.url), before),
                      "hours": hours})
        log("\n")
    log("per-query profile ...")
    began = time.monotonic()
    profiled = profile(prom.url, first, end, step, chunk, args.window)
    log(f" {time.monotonic() - began:.0f} s\n")
    reports = {name: median_run(done) for name, done in runs.items()}
    notebook[notebook.index(longest[0])] = median_run(longest)
    hours = (end - first) / 3600.0
    result = {
        "size": size.name, "fleet": size.describe(), "history_hours": args.hours,
        "scrape": args.scrape, "step": args.step, "window": format_duration(window),
        "chunk": args.chunk, "range_hours": hours, "steps": int((end - first) / step) + 1,
        "history": history, "reports": reports, "notebook": notebook,
        "repeat": args.repeat,
        "walls": {name: [r["wall_s"] for r in done] for name, done in runs.items()},
        "notebook_walls": [p["wall_s"] for p in longest],
        "notebook_plain": median_run(plain),
        "notebook_plain_walls": [p["wall_s"] for p in plain],
        "profile": profiled,
    }
    facts["loadavg_end"] = os.getloadavg()[0]
    return {"facts": facts, "result": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="L", choices=sorted(SIZES), help="fleet (default L)")
    parser.add_argument("--hours", type=float, default=24.0,
                        help="history to backfill, hours (default 24; 168 = 7 days)")
    parser.add_argument("--scrape", default="60s", help="scrape interval of the history")
    parser.add_argument("--step", default="60s", help="report step")
    parser.add_argument("--window", default="4m", help="evaluation.window W (>= 4 scrapes)")
    parser.add_argument("--chunk", default="6h", help="report --chunk, and the notebook's tuples")
    parser.add_argument("--segment", default="6h", help="history written per OpenMetrics file")
    parser.add_argument("--notebook-budget", type=float, default=240.0,
                        help="stop lengthening the notebook's range after a pass this long (s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repetitions (each variant and the notebook's longest pass; the "
                        "median run is shown)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown here")
    parser.add_argument("--render", type=Path, default=None, metavar="PATH",
                        help="measure nothing: print (and with --markdown write) the results "
                        "of this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.render is not None:
        payload = json.loads(args.render.read_text())
        payload["summary"] = summarise(payload["result"])
        payload["reading"] = reading(payload)
        print("\n".join(["", *render(payload), "", *bounds(payload["result"]), "",
                         *payload["reading"], ""]))
        if args.markdown:
            write_markdown(args.markdown, payload)
        return 0

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="triton-mig-report-bench-"))
    live: list[Child] = []
    servers: list[promserver.PrometheusServer] = []
    try:
        payload = run(args, workdir, live, servers.append)
    except KeyboardInterrupt:
        log("\ninterrupted: stopping every process it started, removing its temporary folder\n")
        return 130
    finally:
        for process in list(live):
            process.kill()
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    payload["command"] = command_line(args)
    payload["summary"] = summarise(payload["result"])
    payload["reading"] = reading(payload)
    print("\n".join(["", *render(payload), "", *bounds(payload["result"]), "",
                     *payload["reading"], ""]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        log(f"wrote {args.json}\n")
    if args.markdown:
        write_markdown(args.markdown, payload)
        log(f"wrote {args.markdown}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

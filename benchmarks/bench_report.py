"""Summaries (medians within one run) and their rendering: console table, Markdown, JSON."""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from exporter.config import parse_duration


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, for the machine facts printed with every run."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def median(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.median(data) if data else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): p99 of 200 scrapes is the 198th fastest."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summarise_cycles(cycles: Sequence[Mapping[str, Any]],
                     cold: Mapping[str, Any]) -> dict[str, Any]:
    """Medians over the exporter's timed cycles."""
    return {
        "concurrency": cycles[-1]["concurrency"],
        "queries": median(c["requests"] for c in cycles),
        "prom_queries": median(c["prom_requests"] for c in cycles),
        # Wall time with at least one HTTP request in flight (send -> response headers).
        "upstream_s": median(c["http_busy"] for c in cycles),
        # Sums over requests (they overlap when upstream.concurrency > 1).
        "upstream_sum_s": median(c["http_seconds"] for c in cycles),
        "upstream_server_s": median(c["prom_seconds"] for c in cycles),
        "request_sum_s": median(c["request_seconds"] for c in cycles),
        "parse_sum_s": median(c["request_seconds"] - c["http_seconds"] for c in cycles),
        "cycle_s": median(c["wall"] for c in cycles),
        "cycle_min_s": min(c["wall"] for c in cycles),
        "cycle_max_s": max(c["wall"] for c in cycles),
        "overhead_s": median(c["wall"] - c["http_busy"] for c in cycles),
        "overhead_share": median((c["wall"] - c["http_busy"]) / c["wall"] for c in cycles),
        "query_phase_s": median(c["query_base"] for c in cycles),
        "derive_s": median(c["derive"] for c in cycles),
        # Derivation time per 1000 series it derived (the published series of the cycle).
        "derive_ms_per_1k_series": median(
            1e6 * c["derive"] / c["series"] if c["series"] else math.nan for c in cycles),
        "publish_s": median(c["publish"] for c in cycles),
        "other_s": median(c["wall"] - c["query_base"] - c["derive"] - c["publish"]
                          for c in cycles),
        "cold_cycle_s": cold["wall"],
        "series": cycles[-1]["series"],
        "families": cycles[-1]["families"],
        "outcomes": sorted({c["outcome"] for c in cycles}),
        "family_errors": sorted({e for c in cycles for e in c["family_errors"]}),
        "counts_consistent": all(
            c["requests"] == c["prom_requests"] == c["http_responses"] for c in cycles),
    }


def summarise_notebook(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "queries": median(r["queries"] for r in runs),
        "prom_queries": median(r["prom_requests"] for r in runs),
        "wall_s": median(r["wall"] for r in runs),
        "upstream_s": median(r["http_seconds"] for r in runs),
        "upstream_server_s": median(r["prom_seconds"] for r in runs),
        "pairs": runs[-1]["pairs"],
        "slices": runs[-1]["slices"],
        "empty_answers": runs[-1]["empty"],
        "counts_consistent": all(r["queries"] == r["prom_requests"] for r in runs),
    }


def summarise_scrapes(scrape: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "n": len(scrape["plain"]),
        "plain_p50_ms": 1000 * percentile(scrape["plain"], 50),
        "plain_p99_ms": 1000 * percentile(scrape["plain"], 99),
        "gzip_p50_ms": 1000 * percentile(scrape["gzip"], 50),
        "gzip_p99_ms": 1000 * percentile(scrape["gzip"], 99),
        "server_plain_p50_ms": 1000 * percentile(scrape["server_plain"], 50),
        "server_plain_p99_ms": 1000 * percentile(scrape["server_plain"], 99),
        "server_gzip_p50_ms": 1000 * percentile(scrape["server_gzip"], 50),
        "server_gzip_p99_ms": 1000 * percentile(scrape["server_gzip"], 99),
        "plain_bytes": scrape["plain_bytes"],
        "gzip_bytes": scrape["gzip_bytes"],
        "lines": scrape["lines"],
    }


def summarise_mode(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Medians over the repetitions of one mode (direct, behind the proxy, ...)."""
    out: dict[str, Any] = {"ours": summarise_cycles(raw["cycles"], raw["cold_cycle"]),
                           "rss": raw["rss"]}
    if raw.get("notebook"):
        nb = summarise_notebook(raw["notebook"])
        out["notebook"] = nb
        ours = out["ours"]
        out["ratio"] = {
            "queries": nb["queries"] / ours["queries"] if ours["queries"] else math.nan,
            "wall": nb["wall_s"] / ours["cycle_s"] if ours["cycle_s"] else math.nan,
        }
    if raw.get("scrape"):
        out["scrape"] = summarise_scrapes(raw["scrape"])
    return out


# --- rendering ---------------------------------------------------------------------------------


def _f(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _kb(n: float) -> str:
    return f"{n / 1024:.1f}"


def _ms(value: float) -> str:
    return _f(value, 2)


MODES = (("direct", "direct"), ("proxy", "+50 ms proxy"),
         ("proxy_seq", "+50 ms proxy, concurrency 1"))

MAIN_HEADER = (
    "size", "upstream", "queries/cycle (ours; Prom Δ)", "upstream s: waiting (Σ requests)",
    "cycle s", "overhead s (share)", "/metrics p50 / p99 ms", "body KiB plain / gzip",
    "peak RSS MiB (+ scrape process)", "notebook queries", "notebook s",
    "notebook/ours queries", "notebook/ours time",
)


def _mode_rows(results: Sequence[Mapping[str, Any]],
               need: str | None = None) -> Iterable[tuple[str, str, Mapping[str, Any]]]:
    for result in results:
        for mode, label in MODES:
            s = result["modes"].get(mode)
            if s is None or (need is not None and need not in s):
                continue
            yield result["size"], label, s


def main_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for size, label, s in _mode_rows(results, need="notebook"):
        ours, nb, sc = s["ours"], s["notebook"], s["scrape"]
        flag = "" if ours["counts_consistent"] and nb["counts_consistent"] else " (!)"
        rows.append([
            size,
            label,
            f"{ours['queries']:.0f}; {ours['prom_queries']:.0f}{flag}",
            f"{_f(ours['upstream_s'])} ({_f(ours['upstream_sum_s'])})",
            _f(ours["cycle_s"]),
            f"{_f(ours['overhead_s'])} ({100 * ours['overhead_share']:.0f}%)",
            f"{_ms(sc['plain_p50_ms'])} / {_ms(sc['plain_p99_ms'])}",
            f"{_kb(sc['plain_bytes'])} / {_kb(sc['gzip_bytes'])}",
            peak_rss(s["rss"]),
            f"{nb['queries']:.0f}",
            _f(nb["wall_s"]),
            f"{s['ratio']['queries']:.1f}x",
            f"{s['ratio']['wall']:.1f}x",
        ])
    return rows


def peak_rss(rss: Mapping[str, Any]) -> str:
    """Peak RSS: with a scrape process (serve starts one above ``service.AUTO_SERIES``
    series), the two processes summed, then each (the cycling one and the scrape process);
    else the one process's."""
    main, scrape = rss["vmhwm_mb"], rss.get("scrape_vmhwm_mb")
    if scrape is None:
        return f"{main:.0f}"
    return f"{main + scrape:.0f} ({main:.0f} + {scrape:.0f})"


BREAKDOWN_HEADER = (
    "size", "upstream", "concurrency", "cycle s (min-max)", "cold cycle s", "query phase s",
    "of which waiting s", "Σ Prom server s", "Σ HTTP s", "Σ decode+parse s", "derive s",
    "derive ms / 1k series", "publish s", "series published", "gzip scrape p50 / p99 ms",
    "body build p50 / p99 ms (plain; gzip)", "RSS after start MiB",
)


def breakdown_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for size, label, s in _mode_rows(results):
        ours = s["ours"]
        sc = s.get("scrape")
        scrape_cells = ["-", "-"]
        if sc is not None:
            scrape_cells = [
                f"{_ms(sc['gzip_p50_ms'])} / {_ms(sc['gzip_p99_ms'])}",
                f"{_ms(sc['server_plain_p50_ms'])} / {_ms(sc['server_plain_p99_ms'])}; "
                f"{_ms(sc['server_gzip_p50_ms'])} / {_ms(sc['server_gzip_p99_ms'])}",
            ]
        rows.append([
            size,
            label,
            f"{ours['concurrency']}",
            f"{_f(ours['cycle_s'])} ({_f(ours['cycle_min_s'])}-{_f(ours['cycle_max_s'])})",
            _f(ours["cold_cycle_s"]),
            _f(ours["query_phase_s"]),
            _f(ours["upstream_s"]),
            _f(ours["upstream_server_s"]),
            _f(ours["upstream_sum_s"]),
            _f(ours["parse_sum_s"]),
            _f(ours["derive_s"]),
            _f(derive_per_1k(ours), 2),
            _f(ours["publish_s"]),
            f"{ours['series']}",
            *scrape_cells,
            f"{s['rss']['start_mb']:.0f}",
        ])
    return rows


def derive_per_1k(ours: Mapping[str, Any]) -> float:
    """Derivation ms per 1000 derived series (computed from the medians for older results)."""
    value = ours.get("derive_ms_per_1k_series")
    if value is None:
        value = 1e6 * ours["derive_s"] / ours["series"] if ours.get("series") else math.nan
    return float(value)


DERIVE_HEADER = ("size", "series derived", "derive s", "derive ms per 1k series")


def derive_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The derive step against the number of series it derives, one row per size (direct)."""
    rows = []
    for result in sorted(results, key=lambda r: r["modes"]["direct"]["ours"]["series"]
                         if "direct" in r["modes"] else 0):
        ours = result["modes"].get("direct", {}).get("ours")
        if ours is None:
            continue
        rows.append([result["size"], f"{ours['series']:,}", _f(ours["derive_s"]),
                     _f(derive_per_1k(ours), 2)])
    return rows


LOAD_HEADER = (
    "scrapers", "seconds", "cycle interval", "series", "scrapes", "scrapes/s", "errors",
    "p50 / p99 / max ms", "body KiB", "gzip", "exporter CPU cores", "cycles",
    "cycle mean s", "RSS at end MiB", "peak RSS MiB",
)


#: What a figure reads as when the file has no such key.
NA = "n/a"
#: What a figure that older load.py runs did not record reads as.
NOT_MEASURED = "not measured"


def _na(load: Mapping[str, Any], key: str, form: str = "{}", missing: str = NA) -> str:
    value = load.get(key)
    return missing if value is None else form.format(value)


def _number(run: Mapping[str, Any], key: str) -> float | None:
    value = run.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _rate(run: Mapping[str, Any]) -> str:
    scrapes, seconds = _number(run, "scrapes"), _number(run, "seconds")
    return NA if scrapes is None or not seconds else f"{scrapes / seconds:.0f}"


def _latencies(run: Mapping[str, Any]) -> str:
    return " / ".join(_na(run, key, "{:.1f}") for key in ("p50_ms", "p99_ms", "max_ms"))


def _body(run: Mapping[str, Any]) -> str:
    body = _number(run, "body_bytes")
    return NA if body is None else _kb(body)


def load_rows(load: Mapping[str, Any]) -> list[list[str]]:
    """The one row of benchmarks/load.py's results (any key may be missing: n/a)."""
    gzip = load.get("gzip")
    return [[
        _na(load, "scrapers"), _na(load, "seconds", "{:g}"), _na(load, "interval"),
        _na(load, "series", "{:,}"), _na(load, "scrapes", "{:,}"), _rate(load),
        _na(load, "errors"), _latencies(load), _body(load),
        "n/a" if gzip is None else ("yes" if gzip else "no"),
        _na(load, "cpu_cores", "{:.2f}"), _na(load, "cycles"),
        _na(load, "cycle_mean_s", "{:.3f}"), _na(load, "rss_mib", "{:.0f}"),
        _na(load, "peak_rss_mib", "{:.0f}", NOT_MEASURED),
    ]]


ONE_SCRAPER_HEADER = (
    "scraper", "seconds", "cycles meanwhile", "scrapes", "scrapes/s", "errors",
    "p50 / p99 / max ms", "body KiB",
)
#: The performance issue's target for /metrics: this p99 at this many derived series.
TARGET_P99_MS = 10.0
TARGET_SERIES = 100_000


def one_scraper_runs(load: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """load.py's one-scraper runs by encoding (``gzip``, ``plain``); empty before it had them."""
    one = load.get("one_scraper")
    if not isinstance(one, Mapping):
        return {}
    return {name: run for name, run in one.items() if isinstance(run, Mapping)}


def one_scraper_rows(load: Mapping[str, Any]) -> list[list[str]]:
    """A row per one-scraper run (any key may be missing: n/a)."""
    return [[name, _na(run, "seconds", "{:g}"), _na(run, "cycles"), _na(run, "scrapes", "{:,}"),
             _rate(run), _na(run, "errors"), _latencies(run), _body(run)]
            for name, run in one_scraper_runs(load).items()]


FIXED_HEADER = (
    "every", "seconds", "cycles meanwhile", "cycle mean s", "scrapes", "errors",
    "p50 / p99 / max ms", "overlapping a cycle", "during cycles p50 / p99 / max ms",
    "between cycles p50 / p99 / max ms", "body KiB",
)


def fixed_interval_run(load: Mapping[str, Any]) -> Mapping[str, Any]:
    """load.py's fixed-interval run; empty before it had one (or with it skipped)."""
    fixed = load.get("fixed_interval")
    return fixed if isinstance(fixed, Mapping) else {}


def fixed_interval_rows(load: Mapping[str, Any]) -> list[list[str]]:
    """The fixed-interval run's row, or none (any key may be missing: n/a)."""
    run = fixed_interval_run(load)
    if not run:
        return []
    share = _number(run, "overlap_share")
    parts = [run.get(key) for key in ("during_cycles", "between_cycles")]
    return [[_na(run, "interval_s", "{:g} s"), _na(run, "seconds", "{:g}"), _na(run, "cycles"),
             _na(run, "cycle_mean_s", "{:.3f}"), _na(run, "scrapes", "{:,}"),
             _na(run, "errors"), _latencies(run), NA if share is None else f"{share:.0%}",
             *(_latencies(part) if isinstance(part, Mapping) else NA for part in parts),
             _body(run)]]


def _verdict(run: Mapping[str, Any], series: float | None) -> str | None:
    """The run's p99 against the target (None when the run has no p99)."""
    p99 = _number(run, "p99_ms")
    if p99 is None:
        return None
    verdict = "meets the target" if p99 <= TARGET_P99_MS else "does not meet the target"
    if series is None or series < TARGET_SERIES:
        verdict += f" (at fewer series than the target's {TARGET_SERIES:,})"
    if run.get("errors"):
        verdict += f", with {run['errors']} errors"
    return f"p99 {p99:.1f} ms, which {verdict}"


def load_reading(load: Mapping[str, Any]) -> list[str]:
    """The target against the one-scraper runs, and what bounds the plain one."""
    runs = one_scraper_runs(load)
    gz, plain = runs.get("gzip", {}), runs.get("plain", {})
    fixed = fixed_interval_run(load)
    series = _number(load, "series")
    at = NA if series is None else f"{series:,.0f}"
    lines = []
    lead = (f"Target (the performance issue): `/metrics` p99 at most {TARGET_P99_MS:g} ms with "
            f"{TARGET_SERIES // 1000}k derived series. ")
    fixed_verdict = _verdict(fixed, series)
    if fixed_verdict is not None:
        share = _number(fixed, "overlap_share")
        overlap = "" if share is None else f"; {share:.0%} of its scrapes overlapped a cycle"
        lines.append(f"{lead}One scraper at a fixed interval "
                     f"({_na(fixed, 'interval_s', '{:g}')} s), as Prometheus scrapes, with gzip, "
                     f"at {at} series: {fixed_verdict}{overlap}.")
        lead = ""
    verdict = _verdict(gz, series)
    if verdict is None:
        lines.append(f"{lead}One scraper with gzip: {NOT_MEASURED} in this run.")
    else:
        lines.append(f"{lead}One scraper with gzip, back to back, at {at} series: {verdict}.")
        lines += _cycle_share(load, gz)
    plain_body, gz_body = _number(plain, "body_bytes"), _number(gz, "body_bytes")
    p50 = _number(plain, "p50_ms")
    if plain_body is None or p50 is None:
        lines.append(f"Plain (no gzip), one scraper: {NOT_MEASURED} in this run.")
    else:
        ratio = f", {plain_body / gz_body:.0f}x the gzip body" if gz_body else ""
        lines.append(
            f"Plain (no gzip), one scraper: each body is {plain_body / 1e6:.1f} MB{ratio}, "
            f"p50 / p99 {p50:.1f} / {_na(plain, 'p99_ms', '{:.1f}')} ms. The body is rendered "
            "once per cycle, so what bounds a plain scrape is its size carried through "
            "Python's HTTP stack at both ends (the exporter's `http.server` writing it, the "
            f"client's `http.client` reading it): {plain_body / 1e6 / (p50 / 1000):.0f} MB/s "
            "at p50. Prometheus asks for gzip.")
    main, scrape = _number(load, "peak_rss_mib_main"), _number(load, "peak_rss_mib_scrape")
    if main is not None and scrape is not None:
        lines.append(f"serve answered the scrapes from its scrape process: peak RSS {main:.0f} "
                     f"MiB in the process that runs the cycles, {scrape:.0f} MiB in the scrape "
                     f"process (the table's peak is the two summed).")
    elif load.get("scrape_process") is False:
        lines.append("serve ran in one process (`--single-process`, `web.scrape_process: "
                     "false`): the cycles and the scrapes shared its interpreter lock.")
    p99_all = _number(load, "p99_ms")
    if p99_all is not None:
        lines.append(f"The {_na(load, 'scrapers')} scrapers of the first table fetch back to "
                     f"back ({_rate(load)} scrapes/s, where Prometheus sends one per scrape "
                     f"interval): a stress test of the HTTP path, not the target's case; "
                     f"their p99 is {p99_all:.1f} ms.")
    return lines


def _cycle_share(load: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """How much of the time cycles ran: what a back-to-back scraper's p99 underweights."""
    cycle, interval = _number(load, "cycle_mean_s"), load.get("interval")
    with contextlib.suppress(ValueError):
        every = parse_duration(interval)
        if cycle and every:
            return [f"That p99 counts scrapes: back to back, one scraper makes many between "
                    f"cycles and few while a cycle holds the interpreter, where the slow ones "
                    f"are (max {_na(run, 'max_ms', '{:.1f}')} ms). Scraping at a fixed "
                    f"interval, as Prometheus does, a scrape overlaps a cycle about as often "
                    f"as cycles run: {cycle:.1f} s every {interval} here, "
                    f"{min(1.0, cycle / every):.0%} of the time."]
    return []


def load_machine(load: Mapping[str, Any]) -> str:
    machine = load.get("machine")
    if not isinstance(machine, Mapping) or not machine:
        return "n/a"
    return ", ".join(f"{key} {value}" for key, value in machine.items())


FLEET_HEADER = (
    "size", "fleet", "pairs (model, version) active", "Triton slices", "history",
    "samples backfilled", "write s", "promtool s", "Prometheus start s", "size total s",
)


def fleet_rows(results: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for result in results:
        fleet = result["fleet"]
        nb = result["modes"]["direct"]["notebook"]
        rows.append([
            result["size"],
            fleet["describe"],
            f"{nb['pairs']}",
            f"{nb['slices']}",
            f"{fleet['history_minutes']:g} min ({fleet['families']} families)",
            f"{fleet['samples']:,}",
            _f(fleet["write_s"], 1),
            _f(fleet["backfill_s"], 1),
            _f(fleet["prometheus_start_s"], 1),
            _f(result["seconds"], 0),
        ])
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def facts_lines(facts: Mapping[str, Any]) -> list[str]:
    lines = [
        f"- machine: {facts['cores']} cores ({facts['cpu']}), {facts['memory_gib']:.0f} GiB RAM, "
        f"Linux {facts['kernel']}",
        f"- Python {facts['python']}, pandas {facts['pandas']}, numpy {facts['numpy']}, "
        f"requests {facts['requests']}, prometheus-client {facts['prometheus_client']}",
        f"- Prometheus {facts['prometheus']} (promtool backfill, TSDB on local disk)",
        f"- run: {facts['started']} UTC, {facts['repeat']} repetitions per figure (medians), "
        f"{facts['scrapes']} scrapes per format, window {facts['window']}, "
        f"proxy delay {facts['delay_ms']:g} ms, total {facts['total_seconds']:.0f} s",
    ]
    if "exporter_pyarrow" in facts:
        lines.append(
            "- exporter process: " + ("pyarrow importable (the venv has it; pandas then "
                                      "imports it)" if facts["exporter_pyarrow"] else
                                      "pyarrow not importable, as in the Docker image")
        )
    if "background_cpu" in facts:
        lines.append(
            f"- other work on the machine: {100 * facts['background_cpu']:.0f}% of its CPU busy "
            f"in a 2 s sample before the run; 1-minute load average "
            f"{facts['loadavg_start']:.2f} at the start, {facts.get('loadavg_end', math.nan):.2f} "
            "at the end (the benchmark's own processes included)"
        )
    return lines


def reading(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Sentences computed from the figures: what bounds the cycle at each size."""
    out = []
    for result in results:
        modes = result["modes"]
        d = modes.get("direct")
        if d is None:
            continue
        o = d["ours"]
        wait = o["upstream_s"]
        parts = {
            "waiting for Prometheus": wait,
            "parsing answers outside that wait": max(0.0, o["query_phase_s"] - wait),
            "derivation (derive_all)": o["derive_s"],
            "rendering (publish)": o["publish_s"],
        }
        top = max(parts, key=lambda k: parts[k])
        text = (
            f"**{result['size']}**, direct: cycle {_f(o['cycle_s'])} s = "
            + ", ".join(f"{k} {100 * v / o['cycle_s']:.0f}%" for k, v in parts.items())
            + f"; the largest part is {top}."
        )
        p = modes.get("proxy")
        if p is not None:
            po = p["ours"]
            text += (
                f" Behind the 50 ms proxy the cycle takes {_f(po['cycle_s'])} s with "
                f"{po['concurrency']} queries in flight"
            )
            q = modes.get("proxy_seq")
            if q is not None:
                text += f" ({_f(q['ours']['cycle_s'])} s one at a time)"
            if "notebook" in p:
                text += (
                    f"; the notebook's pattern takes {_f(p['notebook']['wall_s'])} s "
                    f"({p['ratio']['wall']:.1f}x ours, {p['notebook']['queries']:.0f} "
                    "sequential queries)"
                )
            text += "."
        out.append(text)
    return out

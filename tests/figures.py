"""Contract figures keyed alike from the exporter's exposition and from Prometheus's answers,
so the rules tests compare one with the other."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter import rules
from exporter.config import Config
from exporter.lab import promserver

#: series name -> label set -> value
Figures = dict[str, dict[tuple[tuple[str, str], ...], float]]


def series_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    # Prometheus drops empty labels; the exposition may print them as "".
    return tuple(sorted((k, v) for k, v in labels.items() if v and k != "__name__"))


def exporter_figures(config_file: Path, at: float) -> Figures:
    """What ``once --at`` prints for the instant, keyed by series and label set."""
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "once", "--config.file", str(config_file),
         "--at", f"{at:.3f}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out: Figures = {}
    for family in text_string_to_metric_families(done.stdout):
        for sample in family.samples:
            out.setdefault(sample.name, {})[series_key(sample.labels)] = sample.value
    return out


def keyed(samples: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]],
          names: frozenset[str] | set[str]) -> Figures:
    """The series ``names`` of parsed samples (label tuples as the parser gives them), keyed as
    :func:`prometheus_figures` keys Prometheus's answers."""
    return {name: {series_key(dict(labels)): v for labels, v in rows.items()}
            for name, rows in samples.items() if name in names}


def prometheus_figures(prom: promserver.PrometheusServer, inlined: Mapping[str, str],
                       at: float) -> Figures:
    """Each rule's value at ``at``: its inlined expression (rules.inline_recording_rules),
    instant-queried."""
    out: Figures = {}
    for name, expr in inlined.items():
        for row in prom.query(expr, at):
            key = series_key(row["metric"])
            assert key not in out.get(name, {}), (name, key)
            out.setdefault(name, {})[key] = float(row["value"][1])
    return out


def relative_difference(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


#: Time allowed between a scrape's end and its samples being readable by a rule, on a busy host.
STORE_MARGIN = 0.03


def recorded_figures(prom: promserver.PrometheusServer, at: float) -> Figures:
    """Every recorded sample stamped exactly ``at`` (the raw samples of a short range)."""
    out: Figures = {}
    for series in prom.query('{__name__=~".*:.*:.*"}[500ms]', at):
        for stamp, value in series["values"]:
            if round(float(stamp) * 1000) == round(at * 1000):
                out.setdefault(series["metric"]["__name__"], {})[series_key(series["metric"])] = (
                    float(value))
    return out


def rule_groups(prom: promserver.PrometheusServer) -> list[dict[str, Any]]:
    answer = requests.get(f"{prom.url}/api/v1/rules", timeout=5).json()
    groups: list[dict[str, Any]] = answer["data"]["groups"]
    return groups


def _seconds(rfc3339: str) -> float:
    from datetime import datetime

    head, _, frac = rfc3339.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def choose_rule_phase(prom: promserver.PrometheusServer, base: dict[str, Any], cfg: Config,
                       folder: Path) -> Path:
    """Load the rules from a file whose group evaluates away from every scrape.

    A group's evaluation phase is a hash of its name and file; a scrape's, a hash of its target.
    A rule evaluated at T while a scrape stamped just before T is still in flight misses that
    sample, which a later query at T sees (seen: a raw rate 1e-4 off). Each rule file path gives
    a new phase: take one where no scrape is stamped within (longest scrape + STORE_MARGIN)
    before the group's instant. :func:`in_flight` checks each instant compared again.
    """
    durations = [float(r["value"][1])
                 for r in prom.query("max_over_time(scrape_duration_seconds[10s])")]
    stamps = [float(r["value"][1]) for r in prom.query("timestamp(up)")]
    unsafe = max(durations, default=0.01) + STORE_MARGIN
    for attempt in range(30):
        paths = rules.write(cfg, folder / f"attempt-{attempt}")
        recording = str(paths[0])
        prom.config = {**base, "rule_files": [str(p) for p in paths]}
        prom.reload()

        def evaluated(path: str = recording) -> float | None:
            for group in rule_groups(prom):
                if group["file"] == path and not group["lastEvaluation"].startswith("0001"):
                    return _seconds(group["lastEvaluation"])
            return None

        started = promserver.wait_for(evaluated, 10, 0.05, what="the rule group to evaluate")
        # lastEvaluation is the wall time the evaluation began: its instant, or up to ~10 ms
        # after it. Unsafe: a scrape stamped up to `unsafe` before any instant in that range.
        if all((started - s) % 1.0 > unsafe + 0.01 for s in stamps):
            return Path(recording)
    pytest.fail("no rule-file name gave an evaluation phase clear of the scrapes")


def in_flight(prom: promserver.PrometheusServer, at: float) -> list[str]:
    """Targets whose last scrape stamped at or before ``at`` may not have been stored yet when
    the rules evaluated at ``at``: stamped less than its own duration + STORE_MARGIN before."""
    late = []
    for series in prom.query("scrape_duration_seconds[3s]", at):
        stamp, duration = (float(v) for v in series["values"][-1])
        if at - stamp <= duration + STORE_MARGIN:
            target = series["metric"].get("pod", series["metric"].get("instance"))
            late.append(f"{target}: {at - stamp:.3f} s after a {duration:.3f} s scrape")
    return late

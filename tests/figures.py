"""Contract figures keyed alike from the exporter's exposition and from Prometheus's answers,
so the rules tests compare one with the other."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from exporter import promserver

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

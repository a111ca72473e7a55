"""Contract figures keyed alike from the exporter's exposition and from Prometheus's answers,
so the rules tests compare one with the other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

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

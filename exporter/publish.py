"""Publishing: derived tables become an immutable snapshot, rendered once per cycle.

A scrape never waits for a cycle and never sees half of one: the worker builds a new
:class:`Snapshot` and swaps it in with one assignment; readers take a reference and work from
it. The exposition bytes (plain and gzip) of each family are rendered when the snapshot is built,
so serving ``/metrics`` costs a concatenation, whatever the number of scrapes.

The derived families are written straight from the table columns in the text format
prometheus-client writes (label names sorted, values escaped and floats formatted as it does;
``tests/test_publish.py`` compares the bytes), not through its metric objects: at 60k series
those cost several times the formatting and would be kept alive with every snapshot. Only the
bytes are kept; :class:`SnapshotCollector` parses them back when a registry asks.

A family whose computation failed this cycle keeps its last good rendering until that is older
than the staleness bound; then it is withdrawn, as every family is when the upstream is gone.
"""

from __future__ import annotations

import gzip
import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from types import MappingProxyType

import numpy as np
import pandas as pd
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter import __version__, catalog
from exporter.derive import VALUE, DeriveError
from exporter.snapshot import (
    CONTENT_TYPE,
    PREFIX,
    RenderedFamily,
    Snapshot,
    SnapshotHolder,
    StateCollector,
    exposition_parts,
)
from exporter.upstream import OUTCOMES, SLICE

# The *_created series double the self-metrics for no use to a dashboard or alert.
disable_created_metrics()  # type: ignore[no-untyped-call]

__all__ = [
    "CONTENT_TYPE", "PREFIX", "InProcess", "Publisher", "RenderedFamily", "SelfMetrics",
    "Snapshot", "SnapshotCollector", "exposition", "render_family",
]


def escape_label_value(value: str) -> str:
    """A label value as prometheus-client writes it: backslash, newline, double quote escaped."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def escape_help(text: str) -> str:
    """HELP text as prometheus-client writes it: backslash and newline escaped."""
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_values(values: np.ndarray) -> list[str]:
    """``floatToGoString`` of every value. ``repr`` is the same string below 1e6 in magnitude;
    only the rest (Go's exponent form, +-Inf, NaN) goes through prometheus-client's function."""
    floats = values.tolist()
    texts: list[str] = []
    for part in range(0, len(floats), SLICE):  # map in one go holds the interpreter lock
        texts += map(repr, floats[part : part + SLICE])
    for i in np.flatnonzero(~(np.abs(values) < 1e6)).tolist():  # NaN compares False: included
        texts[i] = floatToGoString(floats[i])  # type: ignore[no-untyped-call]
    return texts


def _label_pairs(name: str, column: pd.Series) -> list[str]:
    """``name="value"`` for each row (the value as ``astype(str)`` gives it), each distinct
    value escaped once."""
    values = column.tolist()
    distinct = set(values)
    if not all(type(value) is str for value in distinct):
        values = column.astype(str).tolist()
        distinct = set(values)
    pairs = {value: f'{name}="{escape_label_value(value)}"' for value in distinct}
    return [pairs[value] for value in values]


def exposition(series: catalog.Series, labels: tuple[str, ...], table: pd.DataFrame) -> bytes:
    """One derived family in the text format, byte for byte what prometheus-client's
    ``generate_latest`` writes for a ``GaugeMetricFamily`` of the same rows.

    Metric and label names are valid legacy names (the catalog's and the configuration's
    checked ones), which prometheus-client writes unescaped.
    """
    name = series.name
    head = (f"# HELP {name} {escape_help(f'{series.help} Unit: {series.unit}.')}\n"
            f"# TYPE {name} gauge\n")
    values = format_values(table[VALUE].to_numpy(dtype=np.float64))
    # prometheus-client writes the labels of a sample sorted by name.
    columns = [_label_pairs(label, table[label]) for label in sorted(set(labels))]
    if columns:
        rows = map(",".join, zip(*columns, strict=True))
        lines = [f"{name}{{{row}}} {value}\n" for row, value in zip(rows, values, strict=True)]
    else:
        lines = [f"{name} {value}\n" for value in values]
    return (head + "".join(lines)).encode("utf-8")


def render_family(
    series: catalog.Series, labels: tuple[str, ...], table: pd.DataFrame, now: float
) -> RenderedFamily:
    body = exposition(series, labels, table)
    # Separate gzip members concatenate into one valid gzip stream (RFC 1952 section 2.2).
    return RenderedFamily(series.name, body, gzip.compress(body, 6, mtime=0), len(table), now)


class Publisher(SnapshotHolder):
    """Holds the current snapshot; the worker publishes, scrapes read."""

    def publish(
        self,
        derived: Mapping[str, pd.DataFrame | DeriveError],
        labels: Mapping[str, tuple[str, ...]],
        evaluated_at: float,
        good: bool,
        rendered: Mapping[str, RenderedFamily] | None = None,
    ) -> Snapshot:
        """Swap in the snapshot of this cycle's ``derived`` tables.

        ``rendered``: families already rendered from those same tables (with their labels), as
        the worker renders them while the cycle's other queries are in flight; only their
        time is set here.
        """
        now = self.clock()
        previous = self.snapshot
        ahead = rendered or {}
        families: dict[str, RenderedFamily] = {}
        for series in catalog.SERIES:
            result = derived.get(series.name)
            if isinstance(result, pd.DataFrame):
                done = ahead.get(series.name)
                families[series.name] = (
                    replace(done, computed_at=now) if done is not None
                    else render_family(series, labels[series.name], result, now)
                )
            elif series.name in previous.families:
                families[series.name] = previous.families[series.name]
        snapshot = Snapshot(
            families=MappingProxyType(families),
            cycle_at=now,
            cycle_good=good,
            good_at=now if good else previous.good_at,
            evaluated_at=evaluated_at if good else previous.evaluated_at,
        )
        self.snapshot = snapshot  # the one assignment readers observe
        return snapshot


class SnapshotCollector(Collector):
    """A prometheus-client collector over the publisher's current snapshot (no I/O).

    The snapshot keeps bytes only; the metric objects are parsed back from them per collect.
    """

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        publisher = self._publisher
        for family in publisher.fresh(publisher.snapshot, publisher.clock()):
            yield from text_string_to_metric_families(family.body.decode("utf-8"))


class SelfMetrics:
    """The exporter's own instrumentation, all present from start-up."""

    def __init__(self, publisher: Publisher) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.build_info = Gauge(
            PREFIX + "build_info",
            "Build information; always 1.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.cycle_duration = Histogram(
            PREFIX + "cycle_duration_seconds",
            "Wall time of one cycle: upstream queries, derivation and rendering.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.cycles = Counter(
            PREFIX + "cycles", "Cycles run, by outcome.", ["outcome"], registry=r
        )
        self.cycles_missed = Counter(
            PREFIX + "cycles_missed",
            "Scheduled cycles skipped because the previous one was still running or late.",
            registry=r,
        )
        self.upstream_requests = Counter(
            PREFIX + "upstream_requests",
            "Upstream HTTP API requests, by outcome (ok or the error reason).",
            ["outcome"],
            registry=r,
        )
        self.upstream_request_duration = Histogram(
            PREFIX + "upstream_request_duration_seconds",
            "Upstream HTTP API request time, retries included.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.upstream_warnings = Counter(
            PREFIX + "upstream_warnings",
            "Warnings the upstream returned with query results.",
            registry=r,
        )
        self.family_errors = Counter(
            PREFIX + "family_errors",
            "Derived families that could not be computed in a cycle, by family.",
            ["family"],
            registry=r,
        )
        self.nonfinite = Counter(
            PREFIX + "nonfinite_dropped",
            "Derived figures dropped because they were not finite (a sum past the float range "
            "from upstream values near it), by family.",
            ["family"],
            registry=r,
        )
        for outcome in ("success", "partial", "failure"):
            self.cycles.labels(outcome)
        for outcome in OUTCOMES:
            self.upstream_requests.labels(outcome)
        for series in catalog.SERIES:
            self.family_errors.labels(series.name)
            self.nonfinite.labels(series.name)
        #: The gauges read off the snapshot, rendered per scrape by whoever serves it.
        self.state = StateCollector(publisher, [series.name for series in catalog.SERIES])

    def observe_request(self, outcome: str, seconds: float) -> None:
        self.upstream_requests.labels(outcome).inc()
        self.upstream_request_duration.observe(seconds)

    def counters_body(self) -> bytes:
        """The instrumentation the cycle updates (all but the snapshot's gauges)."""
        return generate_latest(self.registry)



class InProcess:
    """/metrics served by the exporter's own process: self-metrics rendered per scrape, then
    the fresh families. (``serve`` uses :mod:`exporter.scrape_process` unless told not to.)"""

    def __init__(self, publisher: Publisher, metrics: SelfMetrics) -> None:
        self.publisher = publisher
        self.metrics = metrics

    def metrics_parts(self, gzipped: bool) -> list[bytes]:
        metrics = self.metrics
        return exposition_parts(self.publisher, metrics.counters_body(), metrics.state, gzipped)

    def ready(self) -> bool:
        return self.publisher.ready_now()

    def alive(self) -> bool:
        return True  # this process answers: it runs

"""What a scrape reads: the latest snapshot of rendered families, and how fresh it is.

This module holds no pandas and no configuration, so the scrape process (see
:mod:`exporter.scrape_process`) imports it without the weight of the cycle's libraries. The
snapshot is built in :mod:`exporter.publish`; here it is only held and judged.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

PREFIX = "triton_mig_exporter_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class RenderedFamily:
    """One derived family, built and rendered in the cycle that computed it."""

    name: str
    body: bytes
    body_gzip: bytes
    series: int
    computed_at: float


@dataclass(frozen=True)
class Snapshot:
    """Everything a scrape needs, never mutated after construction."""

    families: Mapping[str, RenderedFamily] = field(
        default_factory=lambda: MappingProxyType({})
    )
    #: Wall-clock time the latest cycle finished, good or not.
    cycle_at: float | None = None
    #: Whether every base query of the latest cycle answered.
    cycle_good: bool = False
    #: Wall-clock time of the latest good cycle and the evaluation instant it used.
    good_at: float | None = None
    evaluated_at: float | None = None

    @property
    def series(self) -> int:
        """Series in all its families."""
        return sum(family.series for family in self.families.values())


class SnapshotHolder:
    """Holds the current snapshot (swapped whole, with one assignment readers observe) and
    judges it against the staleness bound at the time of asking."""

    def __init__(self, staleness: float, clock: Callable[[], float] = time.time) -> None:
        self.staleness = staleness
        self.clock = clock
        self.snapshot = Snapshot()

    def fresh(self, snapshot: Snapshot, now: float) -> list[RenderedFamily]:
        return [
            family
            for family in snapshot.families.values()
            if now - family.computed_at <= self.staleness
        ]

    def upstream_up(self, snapshot: Snapshot, now: float) -> bool:
        return (
            snapshot.cycle_good
            and snapshot.cycle_at is not None
            and now - snapshot.cycle_at <= self.staleness
        )

    def ready(self, snapshot: Snapshot, now: float) -> bool:
        return snapshot.good_at is not None and now - snapshot.good_at <= self.staleness

    def ready_now(self) -> bool:
        """:meth:`ready` for the current snapshot at the current time (/readyz)."""
        return self.ready(self.snapshot, self.clock())

    def derived_parts(self, gzipped: bool = False) -> list[bytes]:
        """The fresh families' bytes, in order; a response writes them one after another."""
        families = self.fresh(self.snapshot, self.clock())
        return [f.body_gzip if gzipped else f.body for f in families]

    def derived_body(self, gzipped: bool = False) -> bytes:
        return b"".join(self.derived_parts(gzipped))


class StateCollector(Collector):
    """Self-metrics read off the snapshot at scrape time: they change with the clock (a cycle
    too long ago makes upstream_up 0), so they are rendered by whoever serves the scrape."""

    def __init__(self, holder: SnapshotHolder, families: Sequence[str]) -> None:
        self._holder = holder
        self._families = tuple(families)

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        holder = self._holder
        yield from self.families_at(holder.snapshot, holder.clock())

    def families_at(self, snapshot: Snapshot, now: float) -> Iterator[Metric]:
        """The gauges of ``snapshot`` judged at ``now``."""
        holder = self._holder
        yield GaugeMetricFamily(
            PREFIX + "upstream_up",
            "1 when the latest cycle got an answer to every upstream query and is not stale.",
            value=1.0 if holder.upstream_up(snapshot, now) else 0.0,
        )
        yield GaugeMetricFamily(
            PREFIX + "last_success_timestamp_seconds",
            "Unix time the latest good cycle finished (0 before the first).",
            value=snapshot.good_at or 0.0,
        )
        yield GaugeMetricFamily(
            PREFIX + "last_evaluation_timestamp_seconds",
            "The evaluation instant (now - eval_delay, aligned) of the latest good cycle.",
            value=snapshot.evaluated_at or 0.0,
        )
        fresh = {family.name: family.series for family in holder.fresh(snapshot, now)}
        published = GaugeMetricFamily(
            PREFIX + "series",
            "Series published per derived family (0 when withdrawn).",
            labels=["family"],
        )
        for name in self._families:
            published.add_metric([name], float(fresh.get(name, 0)))
        yield published


class _Fixed(Collector):
    """Metrics already collected, for one rendering."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def exposition_parts(holder: SnapshotHolder, counters: bytes, state: StateCollector,
                     gzipped: bool) -> list[bytes]:
    """/metrics in pieces, as either process serves it: the self-metrics (``counters``, the
    instrumentation the cycle updates, then the ``state`` gauges) and the fresh families, all
    of one snapshot at one instant, so an answer never mixes two cycles. Gzip: each piece a
    complete member; members concatenate into one valid stream."""
    snapshot, now = holder.snapshot, holder.clock()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(state.families_at(snapshot, now)))
    own = counters + generate_latest(registry)
    families = holder.fresh(snapshot, now)
    return [gzip.compress(own, 6, mtime=0) if gzipped else own,
            *(f.body_gzip if gzipped else f.body for f in families)]

"""publish + worker: snapshots, staleness, self-metrics, one cycle against a fake upstream."""

from __future__ import annotations

import gzip
import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from exporter import catalog, config, publish, upstream
from exporter.catalog import Selectors
from exporter.publish import InProcess, Publisher, SelfMetrics, SnapshotCollector
from exporter.upstream import Hint, QueryResult, UpstreamError
from exporter.web import App
from exporter.worker import Worker, evaluation_time

CFG = config.load(None, environ={})
SEL = Selectors.from_config(CFG)
TRITON = pd.DataFrame(
    [("a", "1", "p1", "r0", 2.0), ("b", "1", "p2", "r0", 1.0)],
    columns=["model", "version", "pod", "prometheus_replica", "value"])
SLICES = pd.DataFrame(
    [("h1:9400", "nvidia0", "1", "3g.40gb", "p1", "r0", 0.5)],
    columns=["instance", "device", "GPU_I_ID", "GPU_I_PROFILE", "exported_pod",
             "prometheus_replica", "value"])


class FakeUpstream:
    """A Querier answering each base query with a fixed frame, or failing on request."""

    def __init__(self, sel: Selectors = SEL) -> None:
        self.frames = {q.promql(sel): (TRITON if q.source is catalog.Source.TRITON else SLICES)
                       for q in catalog.BASE_QUERIES}
        self.failing: set[str] = set()
        self.calls: list[tuple[str, float]] = []

    def instant(self, query: str, at: float) -> QueryResult:
        self.calls.append((query, at))
        if "*" in self.failing or any(name in query for name in self.failing):
            # As the client says it: a refused connection carries what to check.
            raise UpstreamError("connection", "connection refused", query=query,
                                hint=Hint("cannot reach upstream", "upstream.url"))
        return QueryResult(self.frames[query], ())


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(now: float = 1_000_000.0) -> tuple[Worker, FakeUpstream, Publisher, SelfMetrics, Clock]:
    clock = Clock(now)
    publisher = Publisher(CFG.evaluation.staleness_bound, clock)
    metrics = SelfMetrics(publisher)
    upstream = FakeUpstream()
    return Worker(CFG, upstream, publisher, metrics, clock), upstream, publisher, metrics, clock


def parse(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_evaluation_time_is_delayed_and_aligned() -> None:
    assert evaluation_time(1000.0, 0, 30) == 990.0
    assert evaluation_time(1000.0, 60, 30) == 930.0
    assert evaluation_time(990.0, 0, 30) == 990.0


def test_one_cycle_queries_a_fixed_set_at_one_instant_and_publishes_every_family() -> None:
    worker, upstream, publisher, metrics, clock = make()
    report = worker.run_cycle()
    assert len(upstream.calls) == len(catalog.BASE_QUERIES)
    assert {at for _, at in upstream.calls} == {evaluation_time(clock.now, 0, 30)}
    assert report.good
    body = App(InProcess(publisher, metrics)).metrics_body(gzipped=False)
    samples = parse(body)
    for series in catalog.SERIES:
        assert series.name in samples or series.name.replace(":", "_") in str(samples.keys()) \
            or series.name in body.decode(), series.name
    assert samples[":nv_inference_count:rate"][()] == 3.0
    assert samples["model_version:nv_inference_count:rate"][(("model", "a"), ("version", "1"))] \
        == 2.0
    assert samples["triton_mig_exporter_upstream_up"][()] == 1.0
    assert samples["triton_mig_exporter_cycles_total"][(("outcome", "success"),)] == 1.0


def test_gzip_body_is_the_same_exposition() -> None:
    worker, _, publisher, metrics, _ = make()
    worker.run_cycle()
    app = App(InProcess(publisher, metrics))
    plain = app.metrics_body(gzipped=False)
    assert gzip.decompress(app.metrics_body(gzipped=True)) == plain


def test_snapshot_collector_yields_what_is_served() -> None:
    worker, _, publisher, _, _ = make()
    worker.run_cycle()
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(publisher))
    assert generate_latest(registry) == publisher.derived_body()


def test_self_metrics_exist_before_the_first_cycle() -> None:
    _, _, publisher, metrics, _ = make()
    samples = parse(App(InProcess(publisher, metrics)).metrics_body(gzipped=False))
    assert samples["triton_mig_exporter_upstream_up"][()] == 0.0
    assert samples["triton_mig_exporter_cycles_missed_total"][()] == 0.0
    assert samples["triton_mig_exporter_upstream_requests_total"][(("outcome", "timeout"),)] == 0
    errors = samples["triton_mig_exporter_family_errors_total"]
    assert len(errors) == len(catalog.SERIES)
    assert ":nv_inference_count:rate" not in samples
    assert not App(InProcess(publisher, metrics)).ready()


def test_failed_upstream_keeps_figures_until_stale_then_withdraws_them() -> None:
    worker, upstream, publisher, metrics, clock = make()
    app = App(InProcess(publisher, metrics))
    worker.run_cycle()
    upstream.failing = {"*"}
    clock.now += 30
    worker.run_cycle()
    samples = parse(app.metrics_body(gzipped=False))
    assert samples["triton_mig_exporter_upstream_up"][()] == 0.0
    assert samples[":nv_inference_count:rate"][()] == 3.0  # within the staleness bound
    assert app.ready()
    clock.now += 61  # 91 s after the last good cycle: past 3 x 30 s
    worker.run_cycle()
    samples = parse(app.metrics_body(gzipped=False))
    assert ":nv_inference_count:rate" not in samples
    assert samples["triton_mig_exporter_series"][(("family", ":nv_inference_count:rate"),)] == 0
    assert not app.ready()
    assert samples["triton_mig_exporter_cycles_total"][(("outcome", "failure"),)] == 2.0
    upstream.failing = set()
    clock.now += 30
    worker.run_cycle()
    samples = parse(app.metrics_body(gzipped=False))
    assert samples[":nv_inference_count:rate"][()] == 3.0
    assert samples["triton_mig_exporter_upstream_up"][()] == 1.0


def test_one_failing_query_fails_only_its_families() -> None:
    worker, upstream, publisher, metrics, _ = make()
    upstream.failing = {"DCGM_FI_PROF_DRAM_ACTIVE"}
    report = worker.run_cycle()
    assert report.outcome == "partial"
    samples = parse(App(InProcess(publisher, metrics)).metrics_body(gzipped=False))
    assert "gpu_instance:dcgm_dram_active:avg" not in samples
    assert ":dcgm_tensor_active:sum" in samples
    errors = samples["triton_mig_exporter_family_errors_total"]
    assert errors[(("family", "gpu_instance:dcgm_dram_active:avg"),)] == 1.0
    assert errors[(("family", ":dcgm_tensor_active:sum"),)] == 0.0


def test_vanished_series_vanish_in_the_next_cycle() -> None:
    worker, upstream, publisher, metrics, _ = make()
    worker.run_cycle()
    only_a = TRITON[TRITON["model"] == "a"]
    for q in catalog.BASE_QUERIES:
        if q.source is catalog.Source.TRITON:
            upstream.frames[q.promql(SEL)] = only_a
    worker.run_cycle()
    body = App(InProcess(publisher, metrics)).metrics_body(gzipped=False).decode()
    assert 'model="a"' in body and 'model="b"' not in body


@pytest.mark.parametrize("value", ['quo"te', "back\\slash", "new\nline", "ünïcødé"])
def test_label_values_are_escaped_in_the_exposition(value: str) -> None:
    worker, upstream, publisher, metrics, _ = make()
    frame = TRITON.assign(model=[value, "b"])
    for q in catalog.BASE_QUERIES:
        if q.source is catalog.Source.TRITON:
            upstream.frames[q.promql(SEL)] = frame
    worker.run_cycle()
    samples = parse(App(InProcess(publisher, metrics)).metrics_body(gzipped=False))
    assert samples["model_version:nv_inference_count:rate"][
        (("model", value), ("version", "1"))] == 2.0


def test_an_unreachable_upstream_is_asked_once_per_cycle_not_once_per_query() -> None:
    worker, upstream, _, _, _ = make()
    upstream.failing = {"*"}
    report = worker.run_cycle()
    assert 1 <= len(upstream.calls) <= CFG.upstream.concurrency
    assert len(report.query_errors) == len(catalog.BASE_QUERIES)
    assert report.outcome == "failure"


class SlowUpstream(FakeUpstream):
    """Answers after a delay and records how many queries were in flight at once."""

    def __init__(self, delay: float, sel: Selectors) -> None:
        super().__init__(sel)
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()

    def instant(self, query: str, at: float) -> QueryResult:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            return super().instant(query, at)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_scheduled_cycles_never_overlap_and_late_ticks_are_counted_as_missed() -> None:
    cfg = config.from_mapping({"evaluation": {"interval": "200ms", "window": "1s"},
                               "upstream": {"concurrency": 1}}, environ={})
    publisher = Publisher(cfg.evaluation.staleness_bound)
    metrics = SelfMetrics(publisher)
    # 14 queries of 50 ms: a cycle takes ~0.7 s, three and a half intervals.
    upstream = SlowUpstream(0.05, Selectors.from_config(cfg))
    worker = Worker(cfg, upstream, publisher, metrics)
    worker.start()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and metrics.cycles.labels("success")._value.get() < 2:
            time.sleep(0.05)
    finally:
        worker.stop()
    assert metrics.cycles.labels("success")._value.get() >= 2
    assert upstream.most_in_flight == 1
    assert metrics.cycles_missed._value.get() >= 1


def test_queries_of_a_cycle_run_concurrently_up_to_the_bound() -> None:
    cfg = config.from_mapping({"upstream": {"concurrency": 4}}, environ={})
    publisher = Publisher(cfg.evaluation.staleness_bound)
    upstream = SlowUpstream(0.1, Selectors.from_config(cfg))
    worker = Worker(cfg, upstream, publisher, SelfMetrics(publisher))
    report = worker.run_cycle()
    assert report.good and len(report.frames) == len(catalog.BASE_QUERIES)
    # 14 queries of 0.1 s: 4 in flight at once, never more (the cycle's time is a benchmark's).
    assert upstream.most_in_flight == 4


# --- the exposition written from the columns, against prometheus-client's ---------------------

AWKWARD = ['quo"te', "back\\slash", "new\nline", "ünïcødé 🚀", "", "ends with \\", '\\"',
           "\\n (not a newline)", "tab\tand\rcarriage", "a,b=c{d}"]
#: Integers, zeros, tiny and huge floats, and the 1e6 boundary where Go switches to exponents.
VALUES = [0.0, -0.0, 1.0, 3.0, -7.0, 0.1, 1 / 3, 5e-324, 2.2e-308, 1e-7, 123456.789,
          999999.9999999999, 1e6, 1234567.0, 1.5e16, 1e22, 12345678901234567890.0,
          1.7976931348623157e308, -1e6, -2.5e20]


def reference(series: catalog.Series, labels: tuple[str, ...], table: pd.DataFrame) -> bytes:
    """What prometheus-client's own objects and generate_latest make of the same rows."""
    family = GaugeMetricFamily(series.name, f"{series.help} Unit: {series.unit}.", labels=labels)
    columns = [table[label].astype(str).tolist() for label in labels]
    for i, value in enumerate(table["value"].astype(float).tolist()):
        family.add_metric([column[i] for column in columns], value)

    class One:
        def collect(self) -> list[Metric]:
            return [family]

    return generate_latest(One())


def awkward_series(help_text: str = "Help with \\ a backslash,\na newline and \"quotes\".") \
        -> catalog.Series:
    return catalog.Series("model_version:awkward:ratio", help_text, "ratio",
                          catalog.Level.MODEL_VERSION, "vector(1)", ("count",))


@pytest.mark.parametrize("labels", [(), ("model",), ("version", "model", "pod"),
                                    ("instance", "device", "GPU_I_ID", "GPU_I_PROFILE", "pod")])
def test_exposition_is_byte_for_byte_what_prometheus_client_writes(
        labels: tuple[str, ...]) -> None:
    rows = max(len(AWKWARD), len(VALUES))
    table = pd.DataFrame({
        **{label: [AWKWARD[(i + k) % len(AWKWARD)] for i in range(rows)]
           for k, label in enumerate(labels)},
        "value": [VALUES[i % len(VALUES)] for i in range(rows)],
    })
    if not labels:
        table = table.iloc[:1]
    series = awkward_series()
    body = publish.exposition(series, labels, table)
    assert body == reference(series, labels, table)
    assert b"\\\\ a backslash,\\na newline" in body  # the HELP text was escaped, not dropped


def test_exposition_of_integer_values_and_of_no_rows_matches_prometheus_client() -> None:
    series = awkward_series("Plain help.")
    ints = pd.DataFrame({"model": ["a", "b", "c"], "value": [0, 7, 10**7]})
    assert ints["value"].dtype.kind == "i"
    assert publish.exposition(series, ("model",), ints) == reference(series, ("model",), ints)
    none = pd.DataFrame({"model": pd.Series([], dtype=object), "value": pd.Series([], dtype=float)})
    assert publish.exposition(series, ("model",), none) == reference(series, ("model",), none)
    # Label columns that do not hold strings are written as astype(str) gives them.
    numbers = pd.DataFrame({"model": pd.Series([1, 2.5, "x"], dtype=object),
                            "version": [3, 4, 5], "value": [1.0, 2.0, 3.0]})
    assert publish.exposition(series, ("model", "version"), numbers) == reference(
        series, ("model", "version"), numbers)


def test_values_are_formatted_as_float_to_go_string() -> None:
    values = np.array([*VALUES, math.inf, -math.inf, math.nan, 2.5e6, 1e15, 1e16])
    expected = [floatToGoString(v) for v in values.tolist()]  # type: ignore[no-untyped-call]
    assert publish.format_values(values) == expected
    # Formatted a slice at a time: the same strings, in order, across slices.
    count = 2 * upstream.SLICE + 5
    many = np.resize(values, count) + np.arange(count) / 8
    expected = [floatToGoString(v) for v in many.tolist()]  # type: ignore[no-untyped-call]
    assert publish.format_values(many) == expected


def test_snapshot_keeps_bytes_only_and_the_collector_parses_them_back() -> None:
    worker, upstream, publisher, _, _ = make()
    frame = TRITON.assign(model=['quo"te\\', "b"])
    for q in catalog.BASE_QUERIES:
        if q.source is catalog.Source.TRITON:
            upstream.frames[q.promql(SEL)] = frame
    worker.run_cycle()
    family = publisher.snapshot.families["model_version:nv_inference_count:rate"]
    assert not hasattr(family, "metric")
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(publisher))
    assert generate_latest(registry) == publisher.derived_body()
    assert registry.get_sample_value(
        "model_version:nv_inference_count:rate", {"model": 'quo"te\\', "version": "1"}) == 2.0


def test_families_rendered_during_the_cycle_are_published_with_the_cycle_time() -> None:
    publisher = Publisher(CFG.evaluation.staleness_bound, Clock(500.0))
    series = catalog.SERIES[0]
    table = pd.DataFrame({label: ["x"] for label in series.labels(SEL)} | {"value": [1.0]})
    ahead = publish.RenderedFamily(series.name, b"ahead\n", gzip.compress(b"ahead\n"), 1, 0.0)
    labels = {s.name: s.labels(SEL) for s in catalog.SERIES}
    other = catalog.SERIES[1]
    snapshot = publisher.publish({series.name: table, other.name: table.head(0)}, labels, 1.0,
                                 True, rendered={series.name: ahead})
    assert snapshot.families[series.name].body == b"ahead\n"  # not rendered again
    assert snapshot.families[series.name].computed_at == 500.0
    assert snapshot.families[other.name] == publish.render_family(
        other, labels[other.name], table.head(0), 500.0)

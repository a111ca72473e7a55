"""The historical report: time parsing, chunking, the wide table, the statistics, the files, the
command, and (integration) a backfilled Prometheus against the simulator's ground truth.

Each of the seed notebook's mistakes has a test named ``test_notebook_*`` that fails on the
notebook's behaviour.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests

from exporter import catalog, config, report, worker
from exporter.catalog import BASE_QUERIES, PHASES, Selectors
from exporter.config import Config
from exporter.lab import promserver, simulate
from exporter.report import (
    FLEET_COLUMNS,
    MAX_POINTS,
    MODEL_COLUMNS,
    SLICE_COLUMNS,
    SLICE_IDLE,
    ReportFetchError,
    TimeError,
    chunks,
    generate,
    parse_time,
    step_grid,
    summary_statistics,
    wide_table,
    write_report,
)
from exporter.upstream import PrometheusClient, QueryResult, UpstreamError, parse_matrix

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "report"
#: 2023-03-30T22:00:00Z, i.e. the notebook's "2023-03-30 at 16:00:00 MDT".
T0 = 1680213600.0
NOW = 1700000000.0

Sample = tuple[dict[str, str], float]


def make_config(**evaluation: Any) -> Config:
    return config.from_mapping({"evaluation": {"window": "60s", **evaluation}}, environ={})


# --- a fake upstream that evaluates range queries like Prometheus -------------------------------


class FakePrometheus:
    """Answers the catalog's base queries (and nothing else) over [start, end] every step,
    both ends included, from ``data(base query name, t) -> [(labels, value)]``."""

    def __init__(
        self,
        cfg: Config,
        data: Callable[[str, float], list[Sample]],
        fail: Callable[[int, str, float], UpstreamError | None] | None = None,
    ) -> None:
        sel = Selectors.from_config(cfg)
        self.names = {q.promql(sel): q.name for q in BASE_QUERIES}
        #: The report's narrowed forms: answered per (model, version), as PromQL would.
        self.narrowed = {promql: name for name, promql in report.report_queries(sel).items()
                         if name in report.NARROW}
        #: The fast forms: summed per (model, version) and replica label set, no pod between.
        self.fast = {promql: name for name, promql in report.fast_queries(sel).items()}
        self.replicas = sel.replicas
        self.data = data
        self.fail = fail
        self.calls: list[tuple[str, float, float, float]] = []
        #: The form of each call: fast, narrowed or catalog.
        self.forms: list[str] = []

    def samples(self, name: str, t: float, narrowed: bool, fast: bool = False) -> list[Sample]:
        rows = self.data(name, t)
        if fast:
            # sum by (model, version, replicas): every series, those without a model too.
            keep = ("model", "version", *self.replicas)
            summed: dict[tuple[tuple[str, str], ...], float] = {}
            for labels, value in rows:
                key = tuple((k, labels[k]) for k in keep if labels.get(k, ""))
                summed[key] = summed.get(key, 0.0) + value
            return [(dict(key), value) for key, value in summed.items()]
        if not narrowed:
            return rows
        # max by (model, version, pod) over the replicas, then sum by (model, version).
        highest: dict[tuple[str, str, str], float] = {}
        for labels, value in rows:
            key = (labels.get("model", ""), labels.get("version", ""), labels.get("pod", ""))
            highest[key] = max(highest.get(key, -math.inf), value)
        sums: dict[tuple[str, str], float] = {}
        for (model, version, _), value in highest.items():
            sums[(model, version)] = sums.get((model, version), 0.0) + value
        return [({"model": m, "version": v}, value) for (m, v), value in sums.items()]

    def range(self, query: str, start: float, end: float, step: float) -> QueryResult:
        narrowed, fast = query in self.narrowed, query in self.fast
        # A KeyError here: the report sent a query that is not in the catalog.
        name = (self.fast[query] if fast else self.narrowed[query] if narrowed
                else self.names[query])
        self.calls.append((name, start, end, step))
        self.forms.append("fast" if fast else "narrowed" if narrowed else "catalog")
        if self.fail is not None:
            error = self.fail(len(self.calls), name, start)
            if error is not None:
                raise error
        series: dict[tuple[tuple[str, str], ...], list[list[Any]]] = {}
        start_ms, step_ms = round(start * 1000), round(step * 1000)
        for k in range(round((end - start) / step) + 1):
            t = (start_ms + k * step_ms) / 1000
            for labels, value in self.samples(name, t, narrowed, fast):
                key = tuple(sorted(labels.items()))
                series.setdefault(key, []).append([t, repr(float(value))])
        payload = {"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": dict(key), "values": values} for key, values in series.items()]}}
        return parse_matrix(payload, query)


#: inferences/s per (model, version, pod); successes are half, executions a quarter.
TRITON = {("a", "1", "p1"): 10.0, ("a", "1", "p2"): 20.0, ("b", "1", "p2"): 5.0}
#: microseconds per successful request, per phase.
PHASE_US = {"request": 1000.0, "queue": 400.0, "compute_input": 100.0, "compute_infer": 300.0,
            "compute_output": 50.0}
S1 = ("10.0.0.4:9400", "nvidia0", "1", "3g.40gb", "p1")
S2 = ("10.0.0.4:9400", "nvidia0", "2", "1g.10gb", "p2")
SLICES = {
    S1: {"tensor": 0.3, "dram": 0.2, "gr_engine": 0.5, "tensor_max": 0.35},
    S2: {"tensor": 0.005, "dram": 0.1, "gr_engine": 0.2, "tensor_max": 0.008},
}
SID1, SID2 = "10.0.0.4:9400/nvidia0/1/3g.40gb", "10.0.0.4:9400/nvidia0/2/1g.10gb"


def fleet_data(
    replicas: tuple[str, ...] = ("prometheus-k8s-0",),
    triton: dict[tuple[str, str, str], float] | None = None,
    present: Callable[[tuple[str, str, str], float], bool] = lambda key, t: True,
    dcgm: bool = True,
) -> Callable[[str, float], list[Sample]]:
    triton = TRITON if triton is None else triton

    def data(name: str, t: float) -> list[Sample]:
        out: list[Sample] = []
        for replica in replicas:
            for (model, version, pod), rate in triton.items():
                if not present((model, version, pod), t):
                    continue
                labels = {"model": model, "version": version, "pod": pod,
                          "prometheus_replica": replica}
                success = rate / 2
                values = {"count": rate, "success": success, "failure": 0.0, "exec": rate / 4,
                          **{f"{p}_us": success * us for p, us in PHASE_US.items()}}
                if name in values:
                    out.append((labels, values[name]))
            if dcgm:
                for (instance, device, gi, profile, pod), gauges in SLICES.items():
                    if name in gauges:
                        out.append(({"instance": instance, "device": device, "GPU_I_ID": gi,
                                     "GPU_I_PROFILE": profile, "exported_pod": pod,
                                     "prometheus_replica": replica}, gauges[name]))
        return out

    return data


def no_sleep(seconds: float) -> None:
    pass


def run(fake: FakePrometheus, cfg: Config, start: float, end: float, step: float = 60.0,
        chunk: float = 900.0, **kw: Any) -> report.Report:
    return generate(fake, cfg, start, end, step, chunk, sleep=no_sleep, **kw)


# --- time parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "2023-03-30 at 16:00:00 MDT",  # the notebook's form
    "2023-03-30  at  16:00:00  MDT",
    "30 March 2023 at 4pm MDT",
    "March 30, 2023 at 15:00 MST",  # MST is UTC-7 whatever the season
    "2023-03-30 at 3:00pm PDT",
    "2023-03-30 at 22:00:00 UTC",
    "2023-03-30T22:00:00Z",
    "2023-03-30T22:00:00z",
    "2023-03-30T16:00:00-06:00",
    "2023-03-30 22:00:00+00:00",
    "1680213600",
    " 1680213600.0 ",
])
def test_parse_time_absolute_forms(text: str) -> None:
    assert parse_time(text, NOW) == T0


def test_parse_time_notebook_form_does_not_depend_on_the_machine_zone() -> None:
    saved = os.environ.get("TZ")
    try:
        for zone in ("UTC", "Asia/Tokyo", "America/Denver"):
            os.environ["TZ"] = zone
            time.tzset()
            assert parse_time("2023-03-30 at 16:00:00 MDT", NOW) == T0
            with pytest.raises(TimeError, match="no time zone"):
                parse_time("2023-03-30 at 16:00:00", NOW)
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.parametrize(("text", "expected"), [
    ("now", NOW),
    ("NOW", NOW),
    ("now-7d", NOW - 7 * 86400),
    ("now - 1h30m", NOW - 5400),
    ("now+15m", NOW + 900),
    ("1680213600.25", T0 + 0.25),
])
def test_parse_time_relative_and_fractional(text: str, expected: float) -> None:
    assert parse_time(text, NOW) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("text", "message"), [
    ("2023-03-30 at 16:00:00", "no time zone"),  # the notebook read this in the local zone
    ("2023-03-30T16:00:00", "no time zone"),
    ("yesterday", "no time zone"),
    ("now-7x", "relative time"),
    ("now*2", "relative time"),
    ("nan", "finite"),
    ("", "empty"),
    ("2023-03-30 at 16:00:00 America/Nowhere", "cannot read"),
    ("not a date at all", "cannot read"),
])
def test_parse_time_refuses_what_it_cannot_read_exactly(text: str, message: str) -> None:
    with pytest.raises(TimeError, match=message):
        parse_time(text, NOW)


def test_format_time_is_rfc3339_utc() -> None:
    assert report.format_time(T0) == "2023-03-30T22:00:00Z"
    assert report.format_time(T0 + 0.5) == "2023-03-30T22:00:00.500Z"


# --- chunking -------------------------------------------------------------------------------------


def points(span: tuple[float, float], step: float) -> list[float]:
    """The instants Prometheus evaluates a range query at: both ends included."""
    start, end = span
    n = round((end - start) / step)
    return [round(start * 1000 + k * step * 1000) / 1000 for k in range(n + 1)]


@pytest.mark.parametrize(("start", "end", "step", "chunk"), [
    (T0, T0 + 3600, 60, 900),
    (T0 + 7, T0 + 3599, 60, 900),
    (T0, T0 + 86400, 15, 6 * 3600),
    (T0, T0 + 30 * 86400, 15, 365 * 86400),  # capped by 11,000 points, not by chunk
    (T0, T0 + 600, 60, 30),  # chunk shorter than a step: one point per chunk
    (T0, T0 + 10, 0.25, 1),
    (T0, T0, 60, 900),
])
def test_chunks_cover_every_step_once(start: float, end: float, step: float,
                                      chunk: float) -> None:
    spans = chunks(start, end, step, chunk)
    covered = [t for span in spans for t in points(span, step)]
    grid = step_grid(start, end, step)
    assert covered == list(grid)
    assert len(set(covered)) == len(covered)
    for first, last in spans:
        assert last - first <= max(chunk, 0) + 1e-9
        assert len(points((first, last), step)) <= MAX_POINTS
        assert (last - first) / step <= MAX_POINTS  # Prometheus's own check
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert first == pytest.approx(last + step)


def test_chunks_are_aligned_to_the_step() -> None:
    assert list(step_grid(100.5, 400, 60)) == [120, 180, 240, 300, 360]
    assert chunks(100.5, 400, 60, 3600) == [(120.0, 360.0)]
    assert chunks(120, 360, 60, 120) == [(120.0, 240.0), (300.0, 360.0)]
    # The same step lands on the same instant whatever the start typed.
    assert chunks(T0 + 1, T0 + 300, 60, 3600)[0][0] == T0 + 60
    assert all(t % 60 == 0 for span in chunks(T0 + 13, T0 + 7200, 60, 1000) for t in span)


def test_chunks_edge_cases() -> None:
    assert chunks(61, 119, 60, 3600) == []
    assert len(step_grid(61, 119, 60)) == 0
    with pytest.raises(ValueError, match="before start"):
        chunks(10, 5, 1, 10)
    with pytest.raises(ValueError, match="step"):
        chunks(0, 10, 0, 10)
    with pytest.raises(ValueError, match="chunk"):
        chunks(0, 10, 1, 0)
    with pytest.raises(ValueError, match="finite"):
        chunks(0, math.inf, 1, 10)


def test_notebook_consecutive_tuples_duplicate_boundaries_ours_do_not() -> None:
    stamps: list[float] = []
    for start, end in [(T0, T0 + 900), (T0 + 900, T0 + 1800)]:  # the notebook's advice
        stamps += points((start, end), 60)
    assert len(stamps) != len(set(stamps))  # the old way: the boundary twice
    ours = [t for span in chunks(T0, T0 + 1800, 60, 900) for t in points(span, 60)]
    assert len(ours) == len(set(ours)) == 31


# --- the wide table from hand-built derived tables ----------------------------------------------


def frame(rows: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    columns = ["timestamp", *labels, "value"]
    return pd.DataFrame(rows, columns=columns)


def test_notebook_wide_table_two_versions_of_one_model_and_absent_is_nan() -> None:
    steps = [T0, T0 + 60, T0 + 120]
    mv = ["model", "version"]
    derived = {
        "model_version:nv_inference_count:rate": frame([
            {"timestamp": T0, "model": "pn_demo", "version": "1", "value": 3.0},
            {"timestamp": T0 + 60, "model": "pn_demo", "version": "1", "value": 4.0},
            {"timestamp": T0 + 60, "model": "pn_demo", "version": "2", "value": 0.0},
        ], mv),
        "model_version:triton_servers_active:count": frame([
            {"timestamp": T0, "model": "pn_demo", "version": "1", "value": 1.0},
            {"timestamp": T0 + 60, "model": "pn_demo", "version": "1", "value": 2.0},
            {"timestamp": T0 + 60, "model": "pn_demo", "version": "2", "value": 0.0},
        ], mv),
        ":nv_inference_count:rate": frame([
            {"timestamp": T0, "value": 3.0}, {"timestamp": T0 + 60, "value": 4.0}], []),
    }
    table = wide_table(derived, steps)
    assert len(table) == 3 and table.index.is_unique
    assert list(table["timestamp"]) == steps
    assert str(table.index.tz) == "UTC" and table.index.name == "time"
    # Two versions: two sets of columns, no "columns overlap".
    assert table["rate_pn_demo/1"].tolist()[:2] == [3.0, 4.0]
    assert np.isnan(table["rate_pn_demo/2"].iloc[0])  # absent, not 0
    assert table["rate_pn_demo/2"].iloc[1] == 0.0  # present and idle: a real 0
    assert table["num_instances_pn_demo/2"].iloc[1] == 0.0
    # Every model has every per-model column, NaN where its series never was.
    for column in MODEL_COLUMNS:
        assert f"{column.name}_pn_demo/2" in table.columns
    assert table["batch_size_pn_demo/1"].isna().all()
    # A step without any data is a row of NaN, not a missing row.
    assert table.drop(columns="timestamp").iloc[2].isna().all()
    assert np.isnan(table["summed_rate"].iloc[2])
    assert table["summed_rate"].tolist()[:2] == [3.0, 4.0]
    # Fleet columns of series that are missing altogether are NaN, never 0.
    assert table["summed_dram"].isna().all() and table["idle_slices"].isna().all()
    assert [c.name for c in FLEET_COLUMNS] == list(table.columns[: len(FLEET_COLUMNS)])


def test_wide_table_slices_and_their_columns() -> None:
    labels = ["instance", "device", "GPU_I_ID", "GPU_I_PROFILE", "pod"]
    rows = [
        {"timestamp": T0, "instance": "h:9400", "device": "nvidia0", "GPU_I_ID": "10",
         "GPU_I_PROFILE": "1g.10gb", "pod": "p2", "value": 0.5},
        {"timestamp": T0, "instance": "h:9400", "device": "nvidia0", "GPU_I_ID": "9",
         "GPU_I_PROFILE": "1g.10gb", "pod": "p1", "value": 0.25},
        # The workload pod changed inside the window: two rows, the slice's column keeps one.
        {"timestamp": T0 + 60, "instance": "h:9400", "device": "nvidia0", "GPU_I_ID": "9",
         "GPU_I_PROFILE": "1g.10gb", "pod": "p1", "value": 0.25},
        {"timestamp": T0 + 60, "instance": "h:9400", "device": "nvidia0", "GPU_I_ID": "9",
         "GPU_I_PROFILE": "1g.10gb", "pod": "p3", "value": 0.75},
    ]
    derived = {"gpu_instance:dcgm_tensor_active:avg": frame(rows, labels)}
    table = wide_table(derived, [T0, T0 + 60])
    # GPU_I_ID 9 sorts before 10.
    assert report.slice_ids(table) == ["h:9400/nvidia0/9/1g.10gb", "h:9400/nvidia0/10/1g.10gb"]
    assert table["tensor_h:9400/nvidia0/9/1g.10gb"].tolist() == [0.25, 0.75]
    assert table["tensor_h:9400/nvidia0/10/1g.10gb"].iloc[0] == 0.5
    assert np.isnan(table["tensor_h:9400/nvidia0/10/1g.10gb"].iloc[1])
    for column in SLICE_COLUMNS:
        assert f"{column.name}_h:9400/nvidia0/9/1g.10gb" in table.columns
    assert report.slice_pods(derived) == {"h:9400/nvidia0/10/1g.10gb": ["p2"],
                                          "h:9400/nvidia0/9/1g.10gb": ["p1", "p3"]}


def test_notebook_overlapping_chunks_are_refused_not_multiplied() -> None:
    """The notebook concatenated chunks that shared a boundary step and left-joined them: rows
    multiplied. A repeated step in a derived table is an error here, never extra rows."""
    rows = [{"timestamp": T0, "value": 1.0}, {"timestamp": T0 + 60, "value": 2.0},
            {"timestamp": T0 + 60, "value": 2.0}, {"timestamp": T0 + 120, "value": 3.0}]
    with pytest.raises(ValueError, match="repeated"):
        wide_table({":nv_inference_count:rate": frame(rows, [])}, [T0, T0 + 60, T0 + 120])
    with pytest.raises(ValueError, match="repeat"):
        wide_table({}, [T0, T0])


def test_wide_table_of_nothing_still_has_every_step() -> None:
    table = wide_table({}, step_grid(T0, T0 + 600, 60))
    assert len(table) == 11
    assert table.drop(columns="timestamp").isna().all().all()
    assert report.model_ids(table) == [] and report.slice_ids(table) == []


# --- the pipeline against the fake upstream -------------------------------------------------------


def test_pipeline_figures_rows_and_queries() -> None:
    cfg = make_config()
    fake = FakePrometheus(cfg, fleet_data())
    result = run(fake, cfg, T0, T0 + 3600, chunk=900)
    table = result.table
    assert len(table) == 61 and table.index.is_unique
    assert list(table["timestamp"]) == list(step_grid(T0, T0 + 3600, 60))
    # The queries: the catalog's fixed base queries per chunk, not one per model or slice.
    spans = chunks(T0, T0 + 3600, 60, 900)
    assert len(spans) == 4
    assert len(fake.calls) == len(spans) * len(BASE_QUERIES)
    assert {(start, end) for _, start, end, _ in fake.calls} == set(spans)
    assert all(step == 60 for *_, step in fake.calls)
    row = table.iloc[10]
    expected = {
        "rate": 35.0, "rate_raw": 35.0, "drift": 1.0, "summed_rate": 35.0, "requests": 17.5,
        "failures": 0.0, "num_instances": 2.0, "summed_instances": 3.0, "concurrency": 1.5,
        **{f"{phase}_seconds": PHASE_US[phase] / 1e6 for phase in PHASES},
        "summed_tensor": 0.305, "summed_dram": 0.3, "gpu_equivalents": 0.3 * 3 / 7 + 0.005 / 7,
        "idle_slices": 1.0, "rate_a/1": 30.0, "rate_b/1": 5.0, "requests_a/1": 15.0,
        "num_instances_a/1": 2.0, "num_instances_b/1": 1.0, "batch_size_a/1": 4.0,
        "request_seconds_b/1": 0.001, f"tensor_{SID1}": 0.3, f"dram_{SID1}": 0.2,
        f"gr_engine_{SID1}": 0.5, f"idle_{SID1}": 0.0, f"idle_{SID2}": 1.0,
    }
    for column, value in expected.items():
        assert row[column] == pytest.approx(value, rel=1e-12), column
    assert np.isnan(row["cache_hit_ratio_a/1"])  # no cache series: absent, not 0
    stats = result.summary["statistics"]
    assert stats["concurrency"]["mean"] == pytest.approx(1.5)
    assert stats["models"]["a/1"]["share_of_inferences"] == pytest.approx(30 / 35)
    assert stats["slices"][SID2]["idle_share"] == 1.0
    assert result.summary["slice_pods"] == {SID1: ["p1"], SID2: ["p2"]}
    assert not result.summary["warnings"] and result.summary["message"] is None


def test_notebook_delta_on_counters_is_gone_and_latency_is_exact() -> None:
    """The notebook used delta() on counters and divided by (1 + 1e6 * delta(success)): a bias
    of +1 request, no reset handling, and 0.81x the true request time on a real Prometheus.
    Ours: rate() of the counters, and seconds per request = us / requests / 1e6 exactly."""
    sel = Selectors.from_config(make_config())
    # Every Triton counter; the one Triton gauge (queue depth) is averaged over the window.
    triton = [q.promql(sel) for q in BASE_QUERIES if q.source is catalog.Source.TRITON
              and q.metric != "nv_inference_pending_request_count"]
    assert len(triton) == 10
    assert all("rate(" in q and "delta(" not in q for q in triton)
    # A quiet model: 1 request of 0.5 s in the window (rate 1/60 per s over W = 60 s).
    cfg = make_config()
    rate = 1 / 60

    def data(name: str, t: float) -> list[Sample]:
        labels = {"model": "q", "version": "1", "pod": "p1"}
        values = {"count": rate, "success": rate, "exec": rate, "request_us": rate * 500_000}
        return [(labels, values[name])] if name in values else []

    table = run(FakePrometheus(cfg, data), cfg, T0, T0 + 120).table
    assert table["request_seconds_q/1"].tolist() == pytest.approx([0.5] * 3, rel=1e-12)
    assert table["request_seconds"].tolist() == pytest.approx([0.5] * 3, rel=1e-12)
    notebook = 500_000 / (1 + 1e6 * 1)  # what its formula gives for the same window
    assert notebook != pytest.approx(0.5, rel=1e-9)


def test_notebook_summed_dram_sums_the_slices_not_the_models() -> None:
    cfg = make_config()
    table = run(FakePrometheus(cfg, fleet_data()), cfg, T0, T0 + 300).table
    dram = table[[f"dram_{SID1}", f"dram_{SID2}"]].sum(axis=1)
    assert table["summed_dram"].tolist() == pytest.approx(dram.tolist())
    tensor = table[[f"tensor_{SID1}", f"tensor_{SID2}"]].sum(axis=1)
    assert table["summed_tensor"].tolist() == pytest.approx(tensor.tolist())
    # The notebook's summed_gpu_dram_util was the sum of the model rate columns.
    assert table["summed_dram"].iloc[0] != pytest.approx(table["summed_rate"].iloc[0])
    idle = table[[f"idle_{SID1}", f"idle_{SID2}"]].sum(axis=1)
    assert table["idle_slices"].tolist() == idle.tolist()


def test_notebook_ha_replicas_do_not_double_and_drift_shows_them() -> None:
    """Two HA replicas stored: the notebook's rates doubled and its summed/net check still said
    1. Ours: rates are deduplicated, the check still says 1, and drift says 0.5."""
    cfg = make_config()
    one = run(FakePrometheus(cfg, fleet_data()), cfg, T0, T0 + 600).table
    two_result = run(FakePrometheus(cfg, fleet_data(
        replicas=("prometheus-k8s-0", "prometheus-k8s-1"))), cfg, T0, T0 + 600)
    two = two_result.table
    for column in ("rate", "requests", "rate_a/1", "num_instances", "concurrency",
                   "summed_tensor", f"tensor_{SID1}", "request_seconds"):
        assert two[column].tolist() == pytest.approx(one[column].tolist()), column
    assert two["rate_raw"].tolist() == pytest.approx((2 * one["rate"]).tolist())
    assert two["drift"].tolist() == pytest.approx([0.5] * len(two))
    stats = two_result.summary["statistics"]
    assert stats["rate_consistency"]["mean"] == pytest.approx(1.0)
    assert stats["drift"]["mean"] == pytest.approx(0.5)
    assert stats["drift"]["steps_off"] == len(two)


def test_notebook_model_seen_in_part_of_the_range() -> None:
    """A model only active in some chunks: the notebook dropped or mis-broadcast it; ours has
    its columns throughout, NaN where it had no series."""
    cfg = make_config()
    later = fleet_data(present=lambda key, t: key[0] != "b" or t >= T0 + 1200)
    table = run(FakePrometheus(cfg, later), cfg, T0, T0 + 1800, chunk=600).table
    before = table["timestamp"] < T0 + 1200
    assert table.loc[before, "rate_b/1"].isna().all()
    assert (table.loc[~before, "rate_b/1"] == 5.0).all()
    assert table.loc[before, "summed_instances"].eq(2).all()


def test_notebook_empty_window_is_an_empty_report(tmp_path: Path) -> None:
    """The notebook raised KeyError: 'timestamp' on a window without data."""
    cfg = make_config()
    result = run(FakePrometheus(cfg, lambda name, t: []), cfg, T0, T0 + 600)
    assert result.empty
    assert len(result.table) == 11
    assert result.table.drop(columns="timestamp").isna().all().all()
    assert "no Triton or DCGM data" in (result.summary["message"] or "")
    files = write_report(result, tmp_path / "out")
    assert files == ["report.parquet", "report.csv", "summary.json", "summary.md"]
    back = pd.read_parquet(tmp_path / "out" / "report.parquet")
    assert len(back) == 11
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["statistics"]["concurrency"] == {
        "steps": 0, "mean": None, "max": None, "min": None, "std": None}


def test_partial_sources_are_warned() -> None:
    cfg = make_config()
    result = run(FakePrometheus(cfg, fleet_data(dcgm=False)), cfg, T0, T0 + 120)
    assert not result.empty
    assert any("no DCGM series" in w for w in result.summary["warnings"])


def test_step_longer_than_the_window_warns() -> None:
    cfg = make_config(window="2m")
    result = run(FakePrometheus(cfg, fleet_data()), cfg, T0, T0 + 1800, step=300)
    assert any("longer than the window" in w for w in result.summary["warnings"])
    assert report.window_warning(120, 120) is None
    assert report.window_warning(121, 120) is not None


# --- retries and failures -------------------------------------------------------------------------


def test_a_failed_query_is_retried_with_backoff() -> None:
    cfg = make_config()
    waits: list[float] = []
    failures = iter([True, True, False])

    def fail(call: int, name: str, start: float) -> UpstreamError | None:
        if start == T0 + 960 and name == "success" and next(failures, False):
            return UpstreamError("http_5xx", "HTTP 503: overloaded", query=name)
        return None

    fake = FakePrometheus(cfg, fleet_data(), fail)
    result = generate(fake, cfg, T0, T0 + 1800, 60, 900, retries=2, backoff=0.5,
                      sleep=waits.append, concurrency=1)
    assert waits == [0.5, 1.0]
    assert result.summary["report"]["retries"] == 2
    assert len(result.table) == 31 and result.table["rate"].notna().sum() == 31


def test_a_chunk_that_keeps_failing_is_named() -> None:
    cfg = make_config()
    waits: list[float] = []

    def fail(call: int, name: str, start: float) -> UpstreamError | None:
        if start >= T0 + 960:
            return UpstreamError("connection", "cannot connect", query=name)
        return None

    fake = FakePrometheus(cfg, fleet_data(), fail)
    with pytest.raises(ReportFetchError) as caught:
        generate(fake, cfg, T0, T0 + 2700, 60, 900, retries=2, backoff=0.1, sleep=waits.append,
                 concurrency=1)
    message = str(caught.value)
    assert "chunk 2/3 (2023-03-30T22:16:00Z .. 2023-03-30T22:31:00Z)" in message
    assert "after 3 attempts" in message and f"base query {BASE_QUERIES[0].name}" in message
    assert caught.value.chunk == 2 and waits == [0.1, 0.2]


def test_a_refused_query_is_not_retried() -> None:
    cfg = make_config()
    waits: list[float] = []
    fake = FakePrometheus(cfg, fleet_data(), lambda call, name, start: UpstreamError(
        "too_large", "answer exceeds max_response_bytes", query=name))
    with pytest.raises(ReportFetchError, match=r"after 1 attempt: .*shorter --chunk"):
        generate(fake, cfg, T0, T0 + 600, 60, 900, retries=3, sleep=waits.append, concurrency=1)
    assert waits == []


# --- concurrency and the narrowed queries -------------------------------------------------------


class GatedPrometheus(FakePrometheus):
    """Holds its first ``parties`` queries at a barrier: they all must be in flight at once."""

    def __init__(self, cfg: Config, parties: int) -> None:
        super().__init__(cfg, fleet_data())
        self.barrier = threading.Barrier(parties)
        self.lock = threading.Lock()
        self.started = self.in_flight = self.peak = 0

    def range(self, query: str, start: float, end: float, step: float) -> QueryResult:
        with self.lock:
            self.started += 1
            first = self.started <= self.barrier.parties
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if first:  # a report sending one query at a time breaks the barrier here
                self.barrier.wait(timeout=20)
            return super().range(query, start, end, step)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_queries_run_concurrently_within_the_bound_and_give_the_same_report() -> None:
    cfg = make_config()
    gated = GatedPrometheus(cfg, parties=3)
    concurrent = run(gated, cfg, T0, T0 + 3600, concurrency=3)
    assert gated.peak == 3  # three at once (the barrier), never more than the bound
    sequential = FakePrometheus(cfg, fleet_data())
    alone = run(sequential, cfg, T0, T0 + 3600, concurrency=1)
    pd.testing.assert_frame_equal(concurrent.table, alone.table)
    assert sorted(gated.calls) == sorted(sequential.calls)  # the same queries, each once
    assert concurrent.summary["report"]["concurrency"] == 3
    assert concurrent.summary["report"]["queries"] == len(sequential.calls)


def test_a_failure_under_concurrency_stops_sending_and_names_the_query() -> None:
    cfg = make_config()

    def fail(call: int, name: str, start: float) -> UpstreamError | None:
        if start >= T0 + 960 and name == "exec":
            return UpstreamError("http_4xx", "HTTP 400: bad query", query=name)
        return None

    fake = FakePrometheus(cfg, fleet_data(), fail)
    with pytest.raises(ReportFetchError) as caught:
        run(fake, cfg, T0, T0 + 3600, concurrency=4)
    assert caught.value.chunk == 2 and caught.value.query == "exec"
    # Chunks 1 and 2 were sent (the second while the first was derived), chunk 3 at most in
    # part and chunk 4 never: what was not yet sent when exec failed stays unsent.
    spans = chunks(T0, T0 + 3600, 60, 900)
    sent = {start for _, start, _, _ in fake.calls}
    assert {spans[0][0], spans[1][0]} <= sent and spans[3][0] not in sent
    assert len(fake.calls) < 3 * len(BASE_QUERIES)


def test_table_built_per_chunk_equals_the_table_of_the_whole_range() -> None:
    """generate pivots each chunk as it arrives (memory of a chunk, not of the range); the
    concatenation must be the table wide_table builds from every derived row at once, also
    for a model seen in the first chunks only."""
    cfg = make_config()
    data = fleet_data(present=lambda key, t: key[0] != "b" or t < T0 + 1200)
    made = run(FakePrometheus(cfg, data), cfg, T0, T0 + 3600, concurrency=2)
    sel = Selectors.from_config(cfg)
    spans = chunks(T0, T0 + 3600, 60, 900)
    held = report.collect(FakePrometheus(cfg, data), sel, spans, 60, keep=report.TABLE_SERIES)
    whole = wide_table(held.derived, step_grid(T0, T0 + 3600, 60))
    pd.testing.assert_frame_equal(made.table, whole)
    assert made.table["rate_b/1"].notna().sum() == 20  # 22:00 .. 22:19
    assert made.summary["slice_pods"] == report.slice_pods(held.derived)
    with pytest.raises(ValueError, match="overlap"):
        report.concat_tables([whole, whole])


def test_narrowed_queries_deduplicate_per_pod_then_sum_per_model_version() -> None:
    """The narrowed form keeps the catalog query (per model, version, pod and replica) inside:
    replicas are deduplicated per pod, as derive does, before the pods are summed. A form that
    summed per replica first would double nothing here but differ as soon as replicas hold
    different pods (a replica that missed a scrape)."""
    sel = Selectors.from_config(make_config())
    queries = report.report_queries(sel)
    full = report.report_queries(sel, narrow=False)
    assert list(queries) == [q.name for q in BASE_QUERIES]
    for query in BASE_QUERIES:
        assert full[query.name] == query.promql(sel)
        if query.name in report.NARROW:
            kept = "".join(f", {label}" for label in query.extra)  # a failure's reason
            assert queries[query.name] == (
                f"sum by (model, version{kept}) (max by (model, version, pod, instance{kept}) "
                f"({query.promql(sel)}))")
        else:
            assert queries[query.name] == query.promql(sel)
    assert {"count", "success"}.isdisjoint(report.NARROW)
    # Replica r1 lost p2's series: per pod the highest replica, whatever each replica holds.
    cfg = make_config()
    partial = {("a", "1", "p1"): 10.0, ("a", "1", "p2"): 20.0}

    def data(name: str, t: float) -> list[Sample]:
        full_replica = fleet_data(("r0",), partial)(name, t)
        missing_p2 = fleet_data(("r1",), {("a", "1", "p1"): 10.0})(name, t)
        return full_replica + missing_p2

    fake = FakePrometheus(cfg, data)
    narrowed = run(fake, cfg, T0, T0 + 600, concurrency=1)
    whole = run(FakePrometheus(cfg, data), cfg, T0, T0 + 600, concurrency=1, narrow=False)
    pd.testing.assert_frame_equal(narrowed.table, whole.table)
    assert narrowed.table["failures_a/1"].iloc[-1] == 0.0
    assert narrowed.table["batch_size_a/1"].iloc[-1] == pytest.approx(4.0)
    # Two replica label sets in every fast answer: each was asked again (not cache_hits nor
    # pending: no series, and an empty answer is exact).
    asked = [name for name, *_ in fake.calls]
    again = {name for name in report.FAST if asked.count(name) == 2}
    assert again == report.FAST - {"cache_hits", "pending"}
    assert narrowed.summary["report"]["queries"] == len(BASE_QUERIES) + len(again)


def test_fast_queries_sum_per_model_version_and_replica_and_are_exact_with_one_replica() -> None:
    """The fast form skips the per-pod grouping; with one replica label set it gives the
    figures of the deduplicating forms (count's raw rate included) and nothing is asked twice."""
    cfg = make_config()
    sel = Selectors.from_config(cfg)
    fast = report.fast_queries(sel)
    assert set(fast) == report.FAST == report.NARROW | {"count"}
    for query in BASE_QUERIES:
        if query.name in fast:
            kept = "".join(f", {label}" for label in query.extra)
            assert fast[query.name] == (
                f"sum by (model, version, prometheus_replica{kept}) ({query.function}("
                f"{query.metric}{{{sel.triton}}}[{sel.window}]))")
    # A series without a model label counts in the raw rate only, as in the catalog.
    unlabelled = ({"pod": "p9", "prometheus_replica": "prometheus-k8s-0"}, 7.0)

    def data(name: str, t: float) -> list[Sample]:
        return fleet_data()(name, t) + ([unlabelled] if name == "count" else [])

    fake = FakePrometheus(cfg, data)
    quick = run(fake, cfg, T0, T0 + 1800, concurrency=2)
    slow = FakePrometheus(cfg, data)
    dedup = run(slow, cfg, T0, T0 + 1800, concurrency=2, fast=False)
    whole = run(FakePrometheus(cfg, data), cfg, T0, T0 + 1800, concurrency=2, narrow=False)
    pd.testing.assert_frame_equal(quick.table, whole.table)
    pd.testing.assert_frame_equal(dedup.table, whole.table)
    assert quick.table["rate_raw"].iloc[-1] == pytest.approx(42.0)
    assert quick.table["rate"].iloc[-1] == pytest.approx(35.0)
    spans = chunks(T0, T0 + 1800, 60, 900)
    assert sorted(fake.calls) == sorted(slow.calls)  # the same base queries, each once
    assert fake.forms.count("fast") == len(spans) * len(report.FAST)
    assert "fast" not in slow.forms
    assert slow.forms.count("narrowed") == len(spans) * len(report.NARROW)
    assert quick.summary["report"]["queries"] == len(spans) * len(BASE_QUERIES)


def test_one_replica_reads_a_missing_label_as_one_more_replica_label_set() -> None:
    frame = pd.DataFrame({"model": ["a", "a", "b"], "prometheus_replica": ["r0", "r0", "r0"],
                          "value": [1.0, 2.0, 3.0]})
    assert report.one_replica(frame, ["prometheus_replica"])
    assert report.one_replica(frame.iloc[:0], ["prometheus_replica"])
    assert report.one_replica(frame.drop(columns="prometheus_replica"), ["prometheus_replica"])
    assert report.one_replica(frame, [])
    lacking = frame.assign(prometheus_replica=["r0", "", "r0"])  # a series without the label
    assert not report.one_replica(lacking, ["prometheus_replica"])
    two = frame.assign(prometheus_replica=["r0", "r1", "r0"])
    assert not report.one_replica(two, ["prometheus_replica"])
    both = frame.assign(dc=["x", "y", "x"])
    assert not report.one_replica(both, ["prometheus_replica", "dc"])


# --- statistics on a hand-computed table ----------------------------------------------------------


def test_summary_statistics_hand_computed() -> None:
    index = pd.DatetimeIndex(pd.to_datetime([T0, T0 + 60, T0 + 120, T0 + 180], unit="s",
                                            utc=True), name="time")
    nan = math.nan
    table = pd.DataFrame({
        "timestamp": [T0, T0 + 60, T0 + 120, T0 + 180],
        "rate": [10.0, 20.0, 0.0, nan],
        "drift": [1.0, 0.5, nan, nan],
        "summed_rate": [10.0, 20.0, nan, nan],
        "requests": [2.0, 6.0, 0.0, nan],
        "num_instances": [2.0, 4.0, 0.0, nan],
        "summed_instances": [4.0, 6.0, 0.0, nan],
        "request_seconds": [0.1, 0.2, nan, nan],
        "rate_a/1": [4.0, 8.0, nan, nan],
        "requests_a/1": [2.0, 6.0, nan, nan],
        "num_instances_a/1": [1.0, 2.0, nan, nan],
        "request_seconds_a/1": [0.1, 0.2, nan, nan],
        "tensor_s": [0.2, 0.4, nan, 0.0],
        "dram_s": [0.1, 0.1, nan, 0.0],
        "gr_engine_s": [0.3, 0.5, nan, 0.0],
        "idle_s": [0.0, 0.0, nan, 1.0],
        "summed_tensor": [0.2, 0.4, nan, 0.0],
    }, index=index)
    stats = summary_statistics(table)
    # Concurrency over steps with active servers: [4/2, 6/4] (the 0-server step is left out).
    assert stats["concurrency"] == pytest.approx(
        {"steps": 2, "mean": 1.75, "max": 2.0, "min": 1.5, "std": 0.25})
    assert stats["rate_consistency"] == pytest.approx(
        {"steps": 2, "mean": 1.0, "max": 1.0, "min": 1.0, "std": 0.0})
    assert stats["drift"]["mean"] == pytest.approx(0.75)
    assert stats["drift"]["std"] == pytest.approx(0.25)
    assert stats["drift"]["steps_off"] == 1
    assert stats["steps"] == 4 and stats["steps_with_active_servers"] == 2
    assert stats["steps_with_triton_data"] == 3 and stats["steps_with_dcgm_data"] == 3
    # Request-weighted: (0.1 x 2 + 0.2 x 6) / 8, not the mean of the means (0.15).
    assert stats["mean_seconds"]["request"] == pytest.approx(0.175)
    assert stats["mean_seconds"]["queue"] is None
    model = stats["models"]["a/1"]
    assert model["mean_rate"] == pytest.approx(6.0)
    assert model["peak_rate"] == 8.0 and model["peak_time"] == "2023-03-30T22:01:00Z"
    assert model["mean_servers"] == pytest.approx(1.5) and model["max_servers"] == 2.0
    assert model["share_of_inferences"] == pytest.approx(12 / 30)
    assert model["mean_seconds"]["request"] == pytest.approx(0.175)
    assert model["steps_present"] == 2
    s = stats["slices"]["s"]
    assert s["mean_tensor"] == pytest.approx(0.2) and s["mean_dram"] == pytest.approx(0.2 / 3)
    assert s["mean_gr_engine"] == pytest.approx(0.8 / 3)
    assert s["idle_share"] == pytest.approx(1 / 3) and s["steps_present"] == 3
    text = report.summary_json({"statistics": stats, "x": math.nan})
    assert json.loads(text)["x"] is None and "NaN" not in text


def test_describe_ignores_non_finite_values() -> None:
    assert report.describe(np.array([1.0, math.nan, math.inf, 3.0])) == pytest.approx(
        {"steps": 2, "mean": 2.0, "max": 3.0, "min": 1.0, "std": 1.0})


# --- progress -------------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("stream", "quiet", "shown"), [
    (FakeTTY(), False, True), (FakeTTY(), True, False), (io.StringIO(), False, False)])
def test_progress_bar_only_on_a_tty_and_not_quiet(stream: io.StringIO, quiet: bool,
                                                  shown: bool) -> None:
    bar = report.progress_bar(6, quiet, stream)
    bar.update(3)
    bar.refresh()  # tqdm throttles redraws to one per 0.1 s
    bar.close()
    assert ("3/6" in stream.getvalue()) is shown


# --- writing --------------------------------------------------------------------------------------


def test_write_report_files_and_replacement(tmp_path: Path) -> None:
    cfg = make_config()
    result = run(FakePrometheus(cfg, fleet_data()), cfg, T0, T0 + 1200)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "slice_heatmap.png").write_text("stale")  # from an earlier report
    files = write_report(result, out)
    assert files[:4] == ["report.parquet", "report.csv", "summary.json", "summary.md"]
    assert set(files[4:]) == set(report.PLOTS)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "slice_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    back = pd.read_parquet(out / "report.parquet")
    pd.testing.assert_frame_equal(back, result.table, check_freq=False)
    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 21 and csv["time"].iloc[0] == "2023-03-30T22:00:00Z"
    assert list(csv.columns) == ["time", *result.table.columns]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files"] == files
    assert summary["statistics"]["models"].keys() == {"a/1", "b/1"}
    markdown = (out / "summary.md").read_text()
    assert "| concurrency (models per busy server) | 21 | 1.5 |" in markdown
    assert SID1 in markdown and "p1" in markdown


def test_write_report_failure_leaves_the_folder_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = make_config()
    result = run(FakePrometheus(cfg, fleet_data()), cfg, T0, T0 + 600)
    out = tmp_path / "out"
    write_report(result, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("exporter.report.build.write_plots", broken)
    with pytest.raises(report.ReportError, match="No space left"):
        write_report(result, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(report.ReportError):
        write_report(result, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- the command ----------------------------------------------------------------------------------


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def empty_upstream() -> Iterator[str]:
    """A 127.0.0.1 server answering every range query with Prometheus's recorded empty answer."""
    body = (FIXTURES / "empty_matrix.json").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_command_empty_window_exits_0_with_a_message(
    empty_upstream: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    code = report.main_from_args(parse_args(
        "--upstream", empty_upstream, "--start", "2023-03-30 at 16:00:00 MDT",
        "--end", "2023-03-30 at 17:00:00 MDT", "--out", str(out)))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no Triton or DCGM data between 2023-03-30T22:00:00Z and 2023-03-30T23:00:00Z" in (
        captured.err)
    assert len(pd.read_csv(out / "report.csv")) == 61
    assert "%|" not in captured.err  # no progress bar: stderr is not a TTY


def test_command_unreachable_upstream_names_the_chunk_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9', retries: 0, timeout: 2s}\n")
    out = tmp_path / "reports" / "week"
    code = report.main_from_args(parse_args(
        "--config.file", str(cfg), "--start", "1680213600", "--end", "1680220800",
        "--chunk", "1h", "--retries", "1", "--retry-backoff", "10ms", "--out", str(out),
        "--quiet"))
    err = capsys.readouterr().err
    assert code == report.EXIT_UPSTREAM
    assert "chunk 1/2 (2023-03-30T22:00:00Z .. 2023-03-30T23:00:00Z) failed after 2 attempts" in err
    assert "connection" in err and "nothing was written" in err
    assert not out.exists()
    assert not (tmp_path / "reports").exists() or not any((tmp_path / "reports").iterdir())


@pytest.mark.parametrize(("argv", "message"), [
    (["--start", "2023-03-30 at 16:00:00"], "no time zone"),
    (["--start", "now", "--end", "now-1h"], "before --start"),
    (["--start", "1680213661", "--end", "1680213719"], "no 60s step"),
])
def test_command_usage_errors_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code = report.main_from_args(parse_args(
        "--upstream", "http://127.0.0.1:9", "--out", str(tmp_path / "out"), *argv))
    assert code == report.EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_bad_config_and_bad_flags(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluation: {window: soon}\n")
    code = report.main_from_args(parse_args("--config.file", str(cfg), "--start", "now-1h"))
    assert code == report.EXIT_USAGE and "evaluation.window" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args("--start", "now-1h", "--step", "0s")
    with pytest.raises(SystemExit):
        parse_args("--end", "now")  # --start is required


def test_command_without_the_report_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from exporter.report import command

    real = command.importlib.util.find_spec
    monkeypatch.setattr(command.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert report.main_from_args(parse_args("--start", "now-1h")) == report.EXIT_UPSTREAM
    assert "pyarrow not installed" in capsys.readouterr().err

# --- the command: bad input, limits, the estimate, the output folder ------------------------------


class RecordingUpstream:
    """A 127.0.0.1 server answering every range query with an empty matrix, counting them;
    ``hold`` keeps each answer until it is set."""

    def __init__(self) -> None:
        body = (FIXTURES / "empty_matrix.json").read_bytes()
        self.requests = 0
        self.hold: threading.Event | None = None
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream.requests += 1
                if upstream.hold is not None:
                    upstream.hold.wait(30)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def recording() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    try:
        yield upstream
    finally:
        upstream.close()


#: Times no upstream holds, each with what the one line says.
BAD_TIMES = [
    (["--start", "1e18", "--end", "1e18"], "'1e18' is not an instant between 1970"),
    (["--start=-1e15"], "'-1e15' is not an instant between 1970"),
    (["--start", "-1"], "'-1' is not an instant between 1970"),
    (["--start", "1e400"], "is not a finite number"),
    (["--start", "now-1h", "--end", "253402300800"], "'253402300800' is not an instant"),
    (["--start", "now+10000000w"], "'now+10000000w' is not an instant between 1970"),
    (["--start", "now-3000000w"], "'now-3000000w' is not an instant between 1970"),
    (["--start", "9999-12-31T23:59:59+00:00", "--end", "9999-12-31T23:59:59-01:00"],
     "is not an instant between 1970"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_TIMES)
def test_command_times_outside_1970_to_9999_are_one_line(
    argv: list[str], message: str, recording: RecordingUpstream, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = report.main_from_args(parse_args(
        "--upstream", recording.url, "--out", str(tmp_path / "out"), *argv))
    err = capsys.readouterr().err
    assert code == report.EXIT_USAGE, err
    [line] = err.strip().splitlines()
    assert line.startswith("report: error: ") and message in line, line
    assert recording.requests == 0 and not (tmp_path / "out").exists()


#: Steps and chunks the millisecond grid cannot hold.
BAD_DURATIONS = [("--step", "0.4ms"), ("--step", "0ms"), ("--step", "1.5ms"),
                 ("--step", "99999999999w"), ("--chunk", "0.4ms"), ("--chunk", "99999999999w"),
                 ("--retry-backoff", "99999999999w")]


@pytest.mark.parametrize(("flag", "text"), BAD_DURATIONS)
def test_command_steps_the_grid_cannot_hold_are_usage_errors(
    flag: str, text: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args("--start", "now-1h", flag, text)
    assert exited.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_command_the_issues_inputs_end_in_one_line_not_a_traceback(tmp_path: Path) -> None:
    """As typed in the issue, each in its own process (started at once)."""
    runs = []
    for argv in (["--start", "1e18", "--end", "1e18"], ["--start=-1e15"],
                 ["--start", "now-1h", "--step", "0.4ms"]):
        runs.append(subprocess.Popen(
            [sys.executable, "-m", "exporter", "report", "--upstream", "http://127.0.0.1:9",
             "--out", str(tmp_path / "out"), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc in runs:
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 2, err
        # One line (after argparse's usage lines, for a bad flag).
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(("report: error: ", "triton-mig-exporter report: error: ")), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("start", "end", "step", "chunk"), [
    (T0, T0 + 7200, 60.0, 3600.0), (T0 + 1, T0 + 59, 60.0, 900.0), (T0, T0, 60.0, 60.0),
    (T0 + 0.5, T0 + 86400, 0.25, 3600.0), (T0, T0 + 86400 * 7, 60.0, 21600.0),
    (T0, T0 + 86400, 1.0, 86400.0), (T0 + 0.001, T0 + 0.009, 0.002, 0.002),
])
def test_extent_counts_what_the_grid_and_the_chunks_hold(
    start: float, end: float, step: float, chunk: float,
) -> None:
    assert report.extent(start, end, step, chunk) == (
        len(step_grid(start, end, step)), len(chunks(start, end, step, chunk)))


def test_command_refuses_a_range_over_the_limits_before_sending_a_query(
    recording: RecordingUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The issue's command: ten years at 1 s would be 315 million rows and 28,670 chunks of
    every base query."""
    code = report.main_from_args(parse_args(
        "--upstream", recording.url, "--start", "now-3650d", "--step", "1s",
        "--out", str(tmp_path / "out")))
    err = capsys.readouterr().err
    assert code == report.EXIT_USAGE
    [line] = err.strip().splitlines()
    assert re.fullmatch(
        r"report: error: the range would be 315,360,00[01] rows \(limit 100,000\) and "
        + f"{28_670 * len(BASE_QUERIES):,}"
        + r" queries \(limit 5,000\); narrow the range, raise --step or --chunk, or add --force "
        r"to run it anyway", line), line
    assert recording.requests == 0
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_command_force_runs_a_range_over_the_limits_and_shows_the_estimate_first(
    recording: RecordingUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from exporter.report import command

    monkeypatch.setattr(command, "MAX_ROWS", 100)
    argv = ["--upstream", recording.url, "--start", "2023-03-30T22:00:00Z",
            "--end", "2023-03-31T00:00:00Z", "--chunk", "1h", "--out", str(tmp_path / "out")]
    assert report.main_from_args(parse_args(*argv)) == report.EXIT_USAGE
    err = capsys.readouterr().err
    assert "the range would be 121 rows (limit 100)" in err and recording.requests == 0
    assert report.main_from_args(parse_args(*argv, "--force")) == 0
    err = capsys.readouterr().err
    estimate = ("report: 2023-03-30T22:00:00Z .. 2023-03-31T00:00:00Z every 60s: 121 rows, "
                f"2 chunks, at least {2 * len(BASE_QUERIES)} queries (over the limits: --force)")
    assert err.splitlines()[0] == estimate, err
    assert recording.requests >= 28
    assert len(pd.read_csv(tmp_path / "out" / "report.csv")) == 121


def test_command_shows_the_estimate_unless_quiet(
    recording: RecordingUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--upstream", recording.url, "--start", "2023-03-30T22:00:00Z",
            "--end", "2023-03-30T23:00:00Z", "--out", str(tmp_path / "out")]
    assert report.main_from_args(parse_args(*argv)) == 0
    assert capsys.readouterr().err.splitlines()[0] == (
        "report: 2023-03-30T22:00:00Z .. 2023-03-30T23:00:00Z every 60s: 61 rows, 1 chunk, "
        f"at least {len(BASE_QUERIES)} queries")
    assert report.main_from_args(parse_args(*argv, "--quiet")) == 0
    assert "every 60s" not in capsys.readouterr().err


def test_command_checks_the_output_folder_is_writable_before_querying(
    recording: RecordingUpstream, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file" / "out", Path("/proc/version/out"), Path("/proc/out")):
        code = report.main_from_args(parse_args(
            "--upstream", recording.url, "--start", "now-1h", "--out", str(out)))
        err = capsys.readouterr().err
        assert code == report.EXIT_USAGE, err
        [line] = err.strip().splitlines()
        assert line.startswith(f"report: error: cannot write the report next to {out}: "), line
    assert recording.requests == 0


def partial_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_command_stopped_by_a_signal_leaves_no_partial_folder(
    signum: int, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    recording.hold = threading.Event()
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "report", "--upstream", recording.url,
         "--start", "2023-03-30T22:00:00Z", "--end", "2023-03-30T23:00:00Z",
         "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        promserver.wait_for(lambda: recording.requests > 0, 60, what="the first query")
        assert partial_folders(tmp_path), "the output is prepared before querying"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err
    assert err.strip() == f"report: stopped by {signal.Signals(signum).name}; nothing was " \
        f"written to {out}"
    assert list(tmp_path.iterdir()) == []


def test_command_removes_the_partial_folder_a_killed_report_left(
    recording: RecordingUpstream, tmp_path: Path,
) -> None:
    recording.hold = threading.Event()
    out = tmp_path / "out"
    argv = ["--upstream", recording.url, "--start", "2023-03-30T22:00:00Z",
            "--end", "2023-03-30T23:00:00Z", "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "report", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        promserver.wait_for(lambda: recording.requests > 0, 60, what="the first query")
        proc.kill()  # SIGKILL: nothing of the process runs any more
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    [left] = partial_folders(tmp_path)
    assert left.startswith(f".out.{proc.pid}.")
    # Another report's folder, still running (this process), is left alone.
    mine = tmp_path / f".out.{os.getpid()}.x1y2z3.partial"
    mine.mkdir()
    recording.hold.set()
    recording.hold = None
    assert report.main_from_args(parse_args(*argv)) == 0
    assert partial_folders(tmp_path) == [mine.name]
    assert (out / "report.csv").exists()


def test_docs_describe_every_column() -> None:
    text = (ROOT / "docs" / "report.md").read_text(encoding="utf-8")
    for column in FLEET_COLUMNS:
        assert f"`{column.name}`" in text, column.name
    for column in (*MODEL_COLUMNS, *SLICE_COLUMNS):
        assert f"`{column.name}_" in text, column.name
    assert SLICE_IDLE in text


# --- integration: a backfilled Prometheus against the simulator's truth ---------------------------

WINDOW = 60.0
STEP = 60.0
EPOCH = 300.0
DUPLICATE = (T0 + 1200, T0 + 2400)  # the HA replica is stored from 22:20 to 22:40


@pytest.fixture(scope="module")
def backfilled(
    prometheus_binaries: promserver.PrometheusBinaries, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[simulate.Fleet, promserver.PrometheusServer, Path]]:
    """1 h of 4 servers x 3 models (4 model versions) at 15 s, a duplicated replica in the
    middle, backfilled with promtool into a fresh TSDB served by a real Prometheus."""
    root = tmp_path_factory.mktemp("report")
    faults = simulate.Faults()
    faults.set_switch("duplicate_replica", True, at=DUPLICATE[0])
    faults.set_switch("duplicate_replica", False, at=DUPLICATE[1])
    spec = simulate.FleetSpec(servers=4, models=3, hosts=2, gpus_per_host=1, seed=3,
                              epoch_seconds=EPOCH, start=T0)
    fleet = simulate.Fleet(spec, faults)
    history = root / "history.om"
    written = fleet.write_openmetrics(history, T0, T0 + 3600, 15)
    assert promserver.backfill(prometheus_binaries, history, root / "tsdb") == written
    server = promserver.PrometheusServer(
        prometheus_binaries, {"global": {"scrape_interval": "15s"}}, root / "tsdb")
    try:
        server.start()
        yield fleet, server, root
    finally:
        server.stop()


def config_file(root: Path, url: str, concurrency: int = 4) -> Path:
    path = root / "report.yaml"
    path.write_text(f"upstream: {{url: '{url}', retries: 0, timeout: 5s, "
                    f"concurrency: {concurrency}}}\n"
                    f"evaluation: {{window: {WINDOW:g}s, scrape_interval: 15s}}\n")
    return path


@pytest.fixture(scope="module")
def made(
    backfilled: tuple[simulate.Fleet, promserver.PrometheusServer, Path],
) -> tuple[simulate.Fleet, Path, pd.DataFrame]:
    fleet, server, root = backfilled
    out = root / "out"
    code = report.main_from_args(parse_args(
        "--upstream", server.url, "--config.file", str(config_file(root, server.url)),
        "--start", "2023-03-30 at 16:00:00 MDT", "--end", "2023-03-30 at 17:00:00 MDT",
        "--step", "60s", "--chunk", "15m", "--out", str(out), "--quiet"))
    assert code == 0
    return fleet, out, pd.read_parquet(out / "report.parquet")


def expected_row(fleet: simulate.Fleet, t: float, models: list[str],
                 slices: list[str]) -> dict[str, float]:
    """The simulator's truth for the window (t - W, t], in the report's columns."""
    truth = fleet.truth(t, WINDOW)

    def get(series: str, key: tuple[tuple[str, str], ...] = ()) -> float:
        return truth.get(series, {}).get(key, math.nan)

    row = {c.name: get(c.series) for c in FLEET_COLUMNS if c.series in catalog.SERIES_BY_NAME}
    for model in models:
        name, version = model.split("/")
        for c in MODEL_COLUMNS:
            row[f"{c.name}_{model}"] = get(c.series, (("model", name), ("version", version)))
    identity = {}
    for key in truth.get("gpu_instance:dcgm_tensor_active:avg", {}):
        labels = dict(key)
        identity["/".join(labels[n] for n in ("instance", "device", "GPU_I_ID",
                                              "GPU_I_PROFILE"))] = key
    for slice_id in slices:
        for c in SLICE_COLUMNS:
            if c.series in catalog.SERIES_BY_NAME:
                row[f"{c.name}_{slice_id}"] = get(c.series, identity.get(slice_id, ()))
    return row


@pytest.mark.integration
def test_backfilled_report_has_one_row_per_step(
    made: tuple[simulate.Fleet, Path, pd.DataFrame],
) -> None:
    _, out, table = made
    assert len(table) == 61 and table.index.is_unique
    assert list(table["timestamp"]) == [T0 + 60 * k for k in range(61)]
    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 61 and csv["time"].is_unique
    summary = json.loads((out / "summary.json").read_text())
    assert summary["report"]["chunks"] == 4  # 15 min of 60 s steps: 16 + 16 + 16 + 13 points
    # Chunks 2 and 3 hold the HA replica (22:20 .. 22:40): their fast answers show two replica
    # label sets, so each fast query of theirs is asked again, deduplicated.
    assert summary["report"]["queries"] == 4 * len(BASE_QUERIES) + 2 * len(report.FAST)
    assert report.model_ids(table) == ["particlenet_aa/1", "pn_demo/1", "pn_demo/2",
                                       "svj_tch_gnn/1"]
    assert len(report.slice_ids(table)) == 4
    # The first step's window holds one sample only: rates are absent there (NaN), gauges not.
    assert np.isnan(table["rate"].iloc[0]) and not np.isnan(table["summed_tensor"].iloc[0])


@pytest.mark.integration
def test_backfilled_report_equals_the_ground_truth(
    made: tuple[simulate.Fleet, Path, pd.DataFrame],
) -> None:
    """Every step whose window lies inside one simulator epoch, every column with a truth.

    Tolerance: backfilled samples sit exactly on the 15 s grid, the window's first and last
    samples are its edges, so rate() needs no extrapolation and equals (C(t) - C(t-W)) / W.
    The simulator prints counters with at most 6 decimals: each sample is off by up to 5e-7,
    so one series' rate by up to 1e-6 / 60 s, and a sum over n series by n times that (the
    fleet failure rate sums 4 pods x 4 reasons: 2.7e-7 /s). Gauges are printed exactly as the
    truth rounds them. Hence abs=1e-6 (a millionth of a request per second) and rel=1e-6 for
    float64 rounding; any real error (a missed sample, extrapolation, a doubled replica) is
    orders of magnitude larger.
    """
    fleet, _, table = made
    models, slices = report.model_ids(table), report.slice_ids(table)
    checked = 0
    for t in table["timestamp"]:
        if (t - T0) % EPOCH < WINDOW:  # the window spans an epoch change: no exact truth
            continue
        want = expected_row(fleet, t, models, slices)
        row = table.loc[table["timestamp"] == t].iloc[0]
        for column, value in want.items():
            if math.isnan(value):
                assert np.isnan(row[column]), (t, column, row[column])
            else:
                assert row[column] == pytest.approx(value, rel=1e-6, abs=1e-6), (t, column)
        idle = sum(row[f"idle_{s}"] for s in slices)
        assert idle == row["idle_slices"]
        checked += 1
    assert checked == 48


@pytest.mark.integration
def test_backfilled_drift_is_half_only_while_the_replica_is_stored(
    made: tuple[simulate.Fleet, Path, pd.DataFrame],
) -> None:
    """The replica's samples run from 22:20:00 to 22:39:45. A window (closed, 60 s) needs two
    of them for a rate: steps 22:21 .. 22:39 see both replicas. 22:40 still holds four replica
    samples that rate() extrapolates over the window (no staleness markers in a backfill), so
    it is left out; from 22:41 on the replica is gone."""
    _, out, table = made
    drift = table.set_index("timestamp")["drift"].dropna()
    for t, value in drift.items():
        if DUPLICATE[0] + 60 <= t <= DUPLICATE[1] - 60:
            assert value == pytest.approx(0.5, rel=1e-9), t
        elif t <= DUPLICATE[0] or t >= DUPLICATE[1] + 60:
            assert value == pytest.approx(1.0, rel=1e-9), t
    assert (drift < 0.99).sum() == 20  # 22:21 .. 22:40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["statistics"]["rate_consistency"]["mean"] == pytest.approx(1.0)
    assert summary["statistics"]["drift"]["min"] == pytest.approx(0.5)


@pytest.mark.integration
def test_backfilled_plots_are_real_images(
    made: tuple[simulate.Fleet, Path, pd.DataFrame],
) -> None:
    from matplotlib.image import imread

    _, out, _ = made
    for name in report.PLOTS:
        path = out / name
        assert path.stat().st_size > 10_000, name
        pixels = imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, name
        assert float(np.std(pixels[..., :3])) > 0.05, name  # not a blank canvas


class FailAfter:
    """A 127.0.0.1 proxy to Prometheus that answers 503 once ``limit`` queries went through."""

    def __init__(self, target: str, limit: int) -> None:
        self.seen = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen > limit:
                    status, payload = 503, b'{"status":"error","errorType":"unavailable",' \
                        b'"error":"proxy says no"}'
                else:
                    answer = requests.post(f"{target}{self.path}", data=body, timeout=10,
                                           headers={"Content-Type": self.headers[
                                               "Content-Type"]})
                    status, payload = answer.status_code, answer.content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FailAfter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.mark.integration
def test_backfilled_upstream_failing_mid_range_names_the_chunk_and_keeps_the_old_report(
    backfilled: tuple[simulate.Fleet, promserver.PrometheusServer, Path],
    made: tuple[simulate.Fleet, Path, pd.DataFrame],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, server, root = backfilled
    _, out, _ = made
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    # One query at a time: which request is the 18th is then fixed. Chunk 2 holds the HA
    # replica, so its fast count answer is asked again deduplicated (the 16th): the 18th is
    # failure's.
    with FailAfter(server.url, limit=len(BASE_QUERIES) + 3) as proxy:
        code = report.main_from_args(parse_args(
            "--config.file", str(config_file(root, proxy.url, concurrency=1)),
            "--start", "2023-03-30T22:00:00Z", "--end", "2023-03-30T23:00:00Z",
            "--chunk", "15m", "--retries", "2", "--retry-backoff", "10ms",
            "--out", str(out), "--quiet"))
    err = capsys.readouterr().err
    assert code == report.EXIT_UPSTREAM
    assert "chunk 2/4 (2023-03-30T22:16:00Z .. 2023-03-30T22:31:00Z) failed after 3 attempts" in (
        err)
    assert f"base query {BASE_QUERIES[2].name}" in err and "HTTP 503" in err
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]
    # And with Prometheus itself gone: the first chunk is named.
    server.stop()
    try:
        code = report.main_from_args(parse_args(
            "--config.file", str(config_file(root, server.url)), "--start", str(T0),
            "--end", str(T0 + 3600), "--chunk", "15m", "--retries", "0",
            "--out", str(root / "never"), "--quiet"))
        assert code == report.EXIT_UPSTREAM
        assert "chunk 1/4" in capsys.readouterr().err
        assert not (root / "never").exists()
    finally:
        server.start()


# --- integration: a history that changes mid-range (restart, new model, vanished slice) ----------

SCRAPE = 15.0
HALF = T0 + 1800  # the second segment starts here: another fleet layout
RESTART = T0 + 750  # a Triton server restarts (on a scrape instant, mid-epoch)


@pytest.fixture(scope="module")
def changing(
    prometheus_binaries: promserver.PrometheusBinaries, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[simulate.Fleet, simulate.Fleet, pd.DataFrame, str]]:
    """1 h in two segments backfilled into one TSDB. Before ``HALF``: 3 servers x 2 models on two
    hosts, the first server restarted at ``RESTART``. From ``HALF``: 2 of those servers on the
    first host only, serving a third model. So one model appears only in the second half, the
    second host's slices disappear, and every counter of the kept servers resets at ``HALF``."""
    root = tmp_path_factory.mktemp("changing")
    faults = simulate.Faults()
    first = simulate.Fleet(simulate.FleetSpec(
        servers=3, models=2, hosts=2, gpus_per_host=1, seed=7, churn=0.0, epoch_seconds=EPOCH,
        start=T0), faults)
    faults.restart(first.pods[0], at=RESTART)
    second = simulate.Fleet(simulate.FleetSpec(
        servers=2, models=3, hosts=1, gpus_per_host=1, seed=7, churn=0.0, epoch_seconds=EPOCH,
        start=HALF))
    for name, fleet, span in (("first", first, (T0, HALF - SCRAPE)),
                              ("second", second, (HALF, T0 + 3600))):
        history = root / f"{name}.om"
        written = fleet.write_openmetrics(history, span[0], span[1], SCRAPE)
        assert promserver.backfill(prometheus_binaries, history, root / "tsdb") == written
    server = promserver.PrometheusServer(
        prometheus_binaries, {"global": {"scrape_interval": "15s"}}, root / "tsdb")
    try:
        server.start()
        code = report.main_from_args(parse_args(
            "--config.file", str(config_file(root, server.url)), "--start", str(T0),
            "--end", str(T0 + 3600), "--step", "60s", "--chunk", "20m",
            "--out", str(root / "out"), "--quiet"))
        assert code == 0
        yield first, second, pd.read_parquet(root / "out" / "report.parquet"), server.url
    finally:
        server.stop()


def slice_id(sl: simulate.MigSlice) -> str:
    return f"{sl.instance}/nvidia{sl.gpu}/{sl.gi_id}/{sl.profile}"


def triton_slices(fleet: simulate.Fleet) -> set[str]:
    return {slice_id(sl) for sl in fleet.slices if sl.triton}


def served(fleet: simulate.Fleet, t: float) -> set[str]:
    return {f"{m}/{v}" for pod in fleet.pods for m, v in fleet.loaded_models(pod, t)}


def assert_row(row: pd.Series, want: dict[str, float], t: float) -> None:
    for column, value in want.items():
        if math.isnan(value):
            assert np.isnan(row[column]), (t, column, row[column])
        else:
            assert row[column] == pytest.approx(value, rel=1e-6, abs=1e-6), (t, column)


RATE_KINDS = ("rate", "requests", "failures")


@pytest.mark.integration
def test_backfilled_counter_reset_gives_no_negative_rate_and_the_true_figures(
    changing: tuple[simulate.Fleet, simulate.Fleet, pd.DataFrame, str],
) -> None:
    """A server restart inside the range. The notebook's delta() goes negative there (checked on
    the same Prometheus); our rate() never does. The one step whose window holds the restart
    misses only the gain between the last scrape before the restart and the restart (the
    counter is 0 at the restart): that pod's share of the step is (W - SCRAPE) / W of its true
    increase. Every other step of the first segment equals the simulator's truth exactly."""
    first, _, table, url = changing
    pod = first.pods[0]
    at = RESTART + 30  # the only step whose window (t - 60 s, t] holds the restart
    delta = requests.get(f"{url}/api/v1/query", timeout=10, params={
        "query": f'sum(delta(nv_inference_count{{pod="{pod}"}}[60s]))', "time": at}).json()
    assert float(delta["data"]["result"][0]["value"][1]) < 0  # the reset is in the data
    rate_columns = [c for c in table.columns
                    if c.split("_", 1)[0] in ("rate", "requests", "failures", "summed")
                    and c not in ("summed_instances", "summed_tensor", "summed_dram")]
    assert "rate" in rate_columns and "rate_pn_demo/1" in rate_columns
    assert (table[rate_columns].fillna(0.0) >= 0).all().all()

    models, slices = report.model_ids(table), report.slice_ids(table)
    truth = first.truth(at, WINDOW)
    missed = SCRAPE / WINDOW  # the last pre-restart scrape is SCRAPE before the restart
    want = expected_row(first, at, models, slices)
    lost: dict[str, float] = {}
    for kind, family in zip(RATE_KINDS, ("nv_inference_count", "nv_inference_request_success",
                                         "nv_inference_request_failure"), strict=True):
        for key, value in truth[f"model_version_pod:{family}:rate"].items():
            labels = dict(key)
            if labels["pod"] == pod:
                model = f"{labels['model']}/{labels['version']}"
                want[f"{kind}_{model}"] -= missed * value
                lost[kind] = lost.get(kind, 0.0) + missed * value
    assert lost["rate"] > 0
    for kind in RATE_KINDS:
        want[kind] -= lost[kind]
    want["rate_raw"] = want["rate"]
    want["summed_rate"] = want["rate"]
    # Ratios mix the restarted pod's partial increases with the others' whole ones: not checked.
    checked = {c: v for c, v in want.items()
               if c.split("_", 1)[0] in (*RATE_KINDS, "num", "summed", "concurrency", "drift",
                                         "tensor", "dram", "gr", "gpu", "idle")}
    row = table.loc[table["timestamp"] == at].iloc[0]
    assert_row(row, checked, at)
    # Every other step of the first segment (windows before the restart, or after it and so
    # holding post-restart samples only): the truth, exactly.
    segment = table.loc[(table["timestamp"] > T0) & (table["timestamp"] < HALF)]
    compared = 0
    for t in segment["timestamp"]:
        if (t - T0) % EPOCH < WINDOW or t == at:
            continue
        assert_row(segment.loc[segment["timestamp"] == t].iloc[0],
                   expected_row(first, t, models, slices), t)
        compared += 1
    assert compared == 23  # 22:01 .. 22:29, less 5 steps that straddle an epoch and 22:13


@pytest.mark.integration
def test_backfilled_model_of_the_second_half_is_absent_before_and_true_after(
    changing: tuple[simulate.Fleet, simulate.Fleet, pd.DataFrame, str],
) -> None:
    first, second, table, _ = changing
    new = served(second, HALF + 60) - served(first, T0 + 60)
    assert len(new) == 1  # the fixture's premise: one model version only in the second half
    model = new.pop()
    assert model in report.model_ids(table)
    steps = table["timestamp"]
    before, after = table[steps <= HALF], table[steps >= HALF + WINDOW]
    for c in MODEL_COLUMNS:
        assert before[f"{c.name}_{model}"].isna().all(), c.name
    # Present at every step once a window holds two of its samples (0 when idle, never NaN).
    assert after[f"rate_{model}"].notna().all() and (after[f"rate_{model}"] > 0).any()
    assert after[f"num_instances_{model}"].notna().all()
    # Exact figures in the second half, every column of every model (the new one included).
    models, slices = report.model_ids(table), report.slice_ids(table)
    compared = 0
    for t in after["timestamp"]:
        if (t - T0) % EPOCH < WINDOW:
            continue
        assert_row(after.loc[after["timestamp"] == t].iloc[0],
                   expected_row(second, t, models, slices), t)
        compared += 1
    assert compared == 24  # 30 steps from HALF + 60 s, less the 6 that straddle an epoch


@pytest.mark.integration
def test_backfilled_slice_that_disappears_keeps_its_history_and_is_absent_after(
    changing: tuple[simulate.Fleet, simulate.Fleet, pd.DataFrame, str],
) -> None:
    first, second, table, _ = changing
    gone = triton_slices(first) - triton_slices(second)
    assert gone and triton_slices(second) - triton_slices(first)  # premise: some go, one comes
    assert set(report.slice_ids(table)) == triton_slices(first) | triton_slices(second)
    steps = table["timestamp"]
    # The last sample of the first segment is at HALF - 15 s: windows from HALF + 60 s miss it.
    before, after = table[steps < HALF], table[steps >= HALF + WINDOW]
    for slice_ in gone:
        for c in SLICE_COLUMNS:
            assert before[f"{c.name}_{slice_}"].notna().all(), (c.name, slice_)
            assert after[f"{c.name}_{slice_}"].isna().all(), (c.name, slice_)
    # The fleet sums follow: in the second half they add up only the remaining slices.
    models, slices = report.model_ids(table), report.slice_ids(table)
    for t in (T0 + 600 + WINDOW * 2, HALF + 600 + WINDOW * 2):
        fleet = first if t < HALF else second
        want = expected_row(fleet, t, models, slices)
        row = table.loc[steps == t].iloc[0]
        assert_row(row, {k: v for k, v in want.items()
                         if k.split("_", 1)[0] in ("summed", "tensor", "dram", "gr", "idle",
                                                   "gpu")}, t)
        present = [s for s in slices if not np.isnan(row[f"tensor_{s}"])]
        assert sorted(present) == sorted(triton_slices(fleet))
    assert table["summed_tensor"].notna().all()


@pytest.mark.integration
def test_backfilled_report_equals_the_exporter_once_at_and_the_full_grain(
    backfilled: tuple[simulate.Fleet, promserver.PrometheusServer, Path],
    made: tuple[simulate.Fleet, Path, pd.DataFrame],
) -> None:
    """A report value at a step is what ``once --at`` that step prints (the exporter's instant
    queries, derived by the same code), also while the HA replica is stored (22:20 .. 22:40);
    and asking for the narrowed queries per model version changes no figure. rel=1e-9: the
    upstream adds the pods of a narrowed query in its own order."""
    _, server, root = backfilled
    _, _, table = made
    cfg = config.load(config_file(root, server.url))
    sel = Selectors.from_config(cfg)
    steps = [T0 + 60 * k for k in (2, 7, 21, 30, 39, 47, 60)]
    with PrometheusClient(cfg.upstream) as client:
        full = generate(client, cfg, T0, T0 + 3600, 60, 900, narrow=False, concurrency=1)
        checked = 0
        for t in steps:
            once = worker.compute(client, sel, t, 1)
            assert not once.query_errors
            row = table.loc[table["timestamp"] == t].iloc[0]
            for column in FLEET_COLUMNS[1:]:
                derived = once.derived.get(column.series)
                if not isinstance(derived, pd.DataFrame):
                    continue  # summed_rate: not a series
                want = derived["value"].iloc[0] if len(derived) else math.nan
                assert row[column.name] == pytest.approx(want, rel=1e-9, nan_ok=True), (
                    t, column.name)
                checked += 1
            for column in (*MODEL_COLUMNS, *SLICE_COLUMNS):
                derived = once.derived.get(column.series)
                if not isinstance(derived, pd.DataFrame):
                    continue  # the idle flag: report only
                labels = [c for c in derived.columns if c not in ("value", "pod")]
                for _, series in derived.iterrows():
                    entity = "/".join(str(series[label]) for label in labels)
                    assert row[f"{column.name}_{entity}"] == pytest.approx(
                        series["value"], rel=1e-9), (t, column.name, entity)
                    checked += 1
            # Nothing the exporter lacks: every present model column is one once printed.
            for model in report.model_ids(table):
                name, version = model.split("/")
                rates = once.derived["model_version:nv_inference_count:rate"]
                present = ((rates["model"] == name) & (rates["version"] == version)).any()
                assert present == (not np.isnan(row[f"num_instances_{model}"])), (t, model)
    assert checked > 100 * len(steps) // 2
    pd.testing.assert_frame_equal(table, full.table, rtol=1e-9)

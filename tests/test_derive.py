"""derive: hand-built base frames in, hand-computed tables out."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from exporter import catalog, config, derive
from exporter.catalog import Selectors

SEL = Selectors.from_config(config.load(None, environ={}))
TRITON_COLS = ["model", "version", "pod", "prometheus_replica", "value"]
SLICE_COLS = ["instance", "device", "GPU_I_ID", "GPU_I_PROFILE", "exported_pod",
              "prometheus_replica", "value"]


def triton(*rows: tuple[str, str, str, str, float]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=TRITON_COLS)


def slices(*rows: tuple[str, str, str, str, str, str, float]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=SLICE_COLS)


def as_dict(table: pd.DataFrame | derive.DeriveError) -> dict[tuple[str, ...], float]:
    assert isinstance(table, pd.DataFrame), table
    labels = [c for c in table.columns if c != "value"]
    return {tuple(row[labels]): float(row["value"]) for _, row in table.iterrows()}


def fleet(table: pd.DataFrame | derive.DeriveError) -> float | None:
    values = as_dict(table)
    assert set(values) <= {()}
    return values.get(())


def all_triton(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {q.name: frame for q in catalog.BASE_QUERIES if q.source is catalog.Source.TRITON}


# A fleet of two pods, two models; model b has two versions. Replica r1 duplicates r0 except
# where noted; one series carries no model label.
COUNT = triton(
    ("a", "1", "p1", "r0", 10.0),
    ("a", "1", "p1", "r1", 10.0),
    ("a", "1", "p2", "r0", 6.0),
    ("a", "1", "p2", "r1", 5.0),  # replicas disagree a little: the higher one is kept
    ("b", "1", "p1", "r0", 4.0),
    ("b", "2", "p2", "r0", 0.0),  # loaded, idle
    ("", "", "p1", "r0", 3.0),  # no model label: only the raw rate sees it
)


def test_rates_at_every_level_are_deduplicated_and_skip_unlabelled_series() -> None:
    out = derive.derive_all(all_triton(COUNT), SEL)
    assert as_dict(out["model_version_pod:nv_inference_count:rate"]) == {
        ("a", "1", "p1"): 10.0,
        ("a", "1", "p2"): 6.0,
        ("b", "1", "p1"): 4.0,
        ("b", "2", "p2"): 0.0,
    }
    assert as_dict(out["model_version:nv_inference_count:rate"]) == {
        ("a", "1"): 16.0, ("b", "1"): 4.0, ("b", "2"): 0.0,
    }
    assert as_dict(out["pod:nv_inference_count:rate"]) == {("p1",): 14.0, ("p2",): 6.0}
    assert fleet(out[":nv_inference_count:rate"]) == 20.0


def test_raw_rate_and_drift_see_duplicates_and_unlabelled_series() -> None:
    out = derive.derive_all(all_triton(COUNT), SEL)
    raw = 10 + 10 + 6 + 5 + 4 + 0 + 3
    assert fleet(out[":nv_inference_count:rate_raw"]) == raw
    assert fleet(out[":triton_inference_rate_drift:ratio"]) == pytest.approx(20 / raw)


def test_drift_is_one_on_a_clean_upstream_and_half_with_a_doubled_replica() -> None:
    clean = triton(("a", "1", "p1", "r0", 8.0), ("b", "1", "p2", "r0", 2.0))
    assert fleet(derive.derive_all(all_triton(clean), SEL)[
        ":triton_inference_rate_drift:ratio"]) == 1.0
    doubled = pd.concat([clean, clean.assign(prometheus_replica="r1")])
    out = derive.derive_all(all_triton(doubled), SEL)
    assert fleet(out[":triton_inference_rate_drift:ratio"]) == 0.5
    assert fleet(out[":nv_inference_count:rate"]) == 10.0


def test_concurrency_counts_active_servers_per_model() -> None:
    out = derive.derive_all(all_triton(COUNT), SEL)
    assert as_dict(out["model_version:triton_servers_active:count"]) == {
        ("a", "1"): 2.0, ("b", "1"): 1.0, ("b", "2"): 0.0,
    }
    assert as_dict(out["pod:triton_models_active:count"]) == {("p1",): 2.0, ("p2",): 1.0}
    assert fleet(out[":triton_servers_active:count"]) == 2.0
    assert fleet(out[":triton_model_servers_active:sum"]) == 3.0
    assert fleet(out[":triton_model_concurrency:ratio"]) == 1.5


def test_idle_fleet_has_zero_counts_and_no_ratios() -> None:
    idle = triton(("a", "1", "p1", "r0", 0.0), ("a", "1", "p2", "r0", 0.0))
    out = derive.derive_all(all_triton(idle), SEL)
    assert fleet(out[":triton_servers_active:count"]) == 0.0
    assert fleet(out[":triton_model_servers_active:sum"]) == 0.0
    # 0/0 is absent: not 0, not NaN.
    assert fleet(out[":triton_model_concurrency:ratio"]) is None
    assert as_dict(out["model_version:nv_inference_batch_size:mean"]) == {}
    assert as_dict(out["model_version:nv_inference_request_duration:mean_seconds"]) == {}
    assert fleet(out[":nv_inference_request_duration:mean_seconds"]) is None
    assert fleet(out[":triton_inference_rate_drift:ratio"]) is None
    assert fleet(out[":nv_inference_count:rate"]) == 0.0


def test_empty_upstream_gives_absent_fleet_figures() -> None:
    out = derive.derive_all(all_triton(triton()), SEL)
    for name in (":nv_inference_count:rate", ":triton_servers_active:count",
                 ":nv_inference_count:rate_raw", ":triton_model_concurrency:ratio"):
        assert fleet(out[name]) is None, name


def test_latency_batch_size_and_cache_ratio_per_model() -> None:
    success = triton(("a", "1", "p1", "r0", 4.0), ("a", "1", "p2", "r0", 6.0),
                     ("b", "1", "p1", "r0", 0.0))
    count = triton(("a", "1", "p1", "r0", 16.0), ("a", "1", "p2", "r0", 24.0),
                   ("b", "1", "p1", "r0", 0.0))
    execs = triton(("a", "1", "p1", "r0", 2.0), ("a", "1", "p2", "r0", 3.0),
                   ("b", "1", "p1", "r0", 0.0))
    # 2000 us per request on p1, 3000 us on p2: (4*2000 + 6*3000) / 10 = 2600 us.
    request_us = triton(("a", "1", "p1", "r0", 8000.0), ("a", "1", "p2", "r0", 18000.0),
                        ("b", "1", "p1", "r0", 0.0))
    hits = triton(("a", "1", "p1", "r0", 1.0), ("a", "1", "p2", "r0", 1.5))
    frames = all_triton(request_us)
    frames.update(success=success, count=count, exec=execs, cache_hits=hits)
    out = derive.derive_all(frames, SEL)
    assert as_dict(out["model_version:nv_inference_request_duration:mean_seconds"]) == {
        ("a", "1"): pytest.approx(0.0026),
    }
    assert fleet(out[":nv_inference_request_duration:mean_seconds"]) == pytest.approx(0.0026)
    assert as_dict(out["model_version:nv_inference_batch_size:mean"]) == {("a", "1"): 8.0}
    assert as_dict(out["model_version:nv_cache_hit:ratio"]) == {("a", "1"): 0.25}


def test_cache_ratio_absent_when_cache_series_do_not_exist() -> None:
    frames = all_triton(triton(("a", "1", "p1", "r0", 4.0)))
    frames["cache_hits"] = triton()
    out = derive.derive_all(frames, SEL)
    assert as_dict(out["model_version:nv_cache_hit:ratio"]) == {}


def test_non_finite_samples_are_dropped_not_published() -> None:
    frame = triton(("a", "1", "p1", "r0", math.nan), ("a", "1", "p2", "r0", math.inf),
                   ("b", "1", "p1", "r0", 2.0), ("c", "1", "p1", "r0", -math.inf))
    out = derive.derive_all(all_triton(frame), SEL)
    assert as_dict(out["model_version_pod:nv_inference_count:rate"]) == {("b", "1", "p1"): 2.0}
    assert fleet(out[":nv_inference_count:rate_raw"]) == 2.0
    for result in out.values():
        if isinstance(result, pd.DataFrame) and not result.empty:
            assert result["value"].map(math.isfinite).all()


def test_churn_a_model_gone_from_the_frame_is_gone_from_every_table() -> None:
    before = triton(("a", "1", "p1", "r0", 1.0), ("b", "1", "p1", "r0", 1.0))
    after = triton(("a", "1", "p1", "r0", 1.0))
    assert ("b", "1") in as_dict(derive.derive_all(all_triton(before), SEL)[
        "model_version:nv_inference_count:rate"])
    out = derive.derive_all(all_triton(after), SEL)
    for name, result in out.items():
        if isinstance(result, pd.DataFrame) and "model" in result.columns:
            assert "b" not in set(result["model"]), name


def test_custom_source_label_names_are_published_as_contract_names() -> None:
    cfg = config.from_mapping(
        {"triton": {"model_label": "model_name", "pod_label": "exported_pod"},
         "replica_labels": ["__replica__"]}, environ={})
    sel = Selectors.from_config(cfg)
    frame = pd.DataFrame(
        [("a", "1", "p1", "x", 2.0), ("a", "1", "p1", "y", 2.0)],
        columns=["model_name", "version", "exported_pod", "__replica__", "value"])
    out = derive.derive_all({q.name: frame for q in catalog.BASE_QUERIES}, sel)
    assert as_dict(out["model_version_pod:nv_inference_count:rate"]) == {("a", "1", "p1"): 2.0}


SLICES = slices(
    ("10.0.0.1:9400", "nvidia0", "1", "3g.40gb", "tr-1", "r0", 0.6),
    ("10.0.0.1:9400", "nvidia0", "1", "3g.40gb", "tr-1", "r1", 0.5),
    ("10.0.0.1:9400", "nvidia0", "9", "1g.10gb", "tr-2", "r0", 0.7),
    ("10.0.0.1:9400", "nvidia0", "10", "1g.10gb", "", "r0", 0.0),  # unattributed slice
    ("10.0.0.2:9400", "nvidia0", "1", "7g.79gb", "tr-3", "r0", 0.2),  # driver-reported name
    ("10.0.0.2:9400", "nvidia1", "", "", "tr-4", "r0", 0.5),  # a whole GPU
)


def test_slices_are_deduplicated_and_keep_their_pod() -> None:
    frames = {"tensor": SLICES, "dram": SLICES, "gr_engine": SLICES, "tensor_max": SLICES}
    out = derive.derive_all(frames, SEL)
    table = as_dict(out["gpu_instance:dcgm_tensor_active:avg"])
    assert table[("10.0.0.1:9400", "nvidia0", "1", "3g.40gb", "tr-1")] == 0.6
    assert table[("10.0.0.1:9400", "nvidia0", "10", "1g.10gb", "")] == 0.0
    assert len(table) == 5
    assert fleet(out[":dcgm_tensor_active:sum"]) == pytest.approx(0.6 + 0.7 + 0 + 0.2 + 0.5)
    assert fleet(out[":dcgm_dram_active:sum"]) == pytest.approx(2.0)


def test_gpu_equivalents_weigh_slices_by_their_share_of_the_gpu() -> None:
    out = derive.derive_all({"tensor": SLICES}, SEL)
    expected = 0.6 * 3 / 7 + 0.7 * 1 / 7 + 0.0 + 0.2 * 7 / 7 + 0.5 * 1
    assert fleet(out[":dcgm_tensor_active:gpu_equivalents"]) == pytest.approx(expected)


def test_idle_slices_counted_from_the_window_maximum() -> None:
    out = derive.derive_all({"tensor_max": SLICES}, SEL)
    assert fleet(out[":dcgm_mig_slices_idle:count"]) == 1.0
    none = derive.derive_all({"tensor_max": slices()}, SEL)
    assert fleet(none[":dcgm_mig_slices_idle:count"]) is None


def test_a_missing_base_query_fails_only_the_families_that_need_it() -> None:
    frames = all_triton(COUNT)
    del frames["exec"]
    out = derive.derive_all(frames, SEL)
    assert isinstance(out["model_version:nv_inference_batch_size:mean"], derive.DeriveError)
    assert isinstance(out["gpu_instance:dcgm_tensor_active:avg"], derive.DeriveError)
    assert fleet(out[":nv_inference_count:rate"]) == 20.0


def test_every_catalog_series_has_a_derivation_with_its_labels() -> None:
    assert set(derive.DERIVATIONS) == {s.name for s in catalog.SERIES}
    frames = {q.name: (SLICES if q.source is catalog.Source.DCGM else COUNT)
              for q in catalog.BASE_QUERIES}
    out = derive.derive_all(frames, SEL)
    for series in catalog.SERIES:
        table = out[series.name]
        assert isinstance(table, pd.DataFrame), (series.name, table)
        assert list(table.columns) == [*series.labels(SEL), "value"]


def test_range_frames_keyed_by_timestamp_give_each_instants_tables() -> None:
    """The report derives a whole range at once; each step must equal a live cycle's tables."""
    idle = triton(("a", "1", "p1", "r0", 0.0), ("b", "1", "p2", "r0", 0.0))
    steps = {100.0: COUNT, 160.0: idle, 220.0: triton()}
    ranged = {}
    for q in catalog.BASE_QUERIES:
        parts = [(SLICES if q.source is catalog.Source.DCGM else frame).assign(timestamp=ts)
                 for ts, frame in steps.items()]
        ranged[q.name] = pd.concat(parts, ignore_index=True)
    keyed = derive.derive_all(ranged, SEL, keys=("timestamp",))
    for ts, frame in steps.items():
        single = derive.derive_all(
            {q.name: (SLICES if q.source is catalog.Source.DCGM else frame)
             for q in catalog.BASE_QUERIES}, SEL)
        for name, table in single.items():
            assert isinstance(table, pd.DataFrame)
            whole = keyed[name]
            assert isinstance(whole, pd.DataFrame)
            assert list(whole.columns) == ["timestamp", *table.columns]
            at = as_dict(whole[whole["timestamp"] == ts].drop(columns="timestamp"))
            assert at == pytest.approx(as_dict(table), rel=1e-12), (name, ts)


# --- the numpy grouping against pandas' groupby and merge ------------------------------------


def random_triton(seed: int, rows: int = 400) -> pd.DataFrame:
    """Many label tuples repeated across timestamps and replicas, some missing keys, empty models
    and non-finite values."""
    rng = np.random.default_rng(seed)

    def pick(values: list[object]) -> list[object]:
        return [values[i] for i in rng.integers(0, len(values), rows)]

    values = rng.random(rows) * 10.0 ** rng.integers(-3, 7, rows)
    values[rng.random(rows) < 0.05] = math.nan
    values[rng.random(rows) < 0.03] = math.inf
    frame = pd.DataFrame({
        "timestamp": pick([100.0, 160.0, 220.0, math.nan]),
        "model": pick(["a", "b", "", "é", 'q"', "z", math.nan]),
        "version": pick(["1", "2", "10"]),
        "pod": pick([f"p{i}" for i in range(12)]),
        "prometheus_replica": pick(["r0", "r1"]),
        "value": values,
    })
    # An answer never repeats a label set (a PromQL vector cannot).
    return frame.drop_duplicates(subset=[c for c in frame.columns if c != "value"])


def pandas_dedup(frame: pd.DataFrame) -> pd.DataFrame:
    """The replica deduplication written with pandas: the reference for triton_series. Rows
    with the same labels are one series group of the base query (summed), then the highest
    replica is kept."""
    keep = np.isfinite(frame["value"]) & (frame["model"].astype(str) != "")
    series = ["timestamp", *derive.MVP, "prometheus_replica"]
    summed = frame[keep].groupby(series, sort=True)["value"].sum().reset_index()
    deduplicated: pd.DataFrame = (
        summed.groupby(["timestamp", *derive.MVP], sort=True)["value"].max().reset_index())
    return deduplicated


def assert_same(got: pd.DataFrame, want: pd.DataFrame, rel: float = 0.0) -> None:
    assert list(got.columns) == list(want.columns)
    for column in got.columns[:-1]:
        assert got[column].tolist() == want[column].tolist(), column  # same rows, same order
    assert got["value"].to_numpy() == pytest.approx(want["value"].to_numpy(), rel=rel, abs=0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("key_limit", [2**62, 7])  # 7: the combined key is renumbered often
def test_grouping_gives_what_pandas_groupby_gives(
        seed: int, key_limit: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(derive, "_KEY_LIMIT", key_limit)
    frame = random_triton(seed)
    keys = ["timestamp"]
    table = derive.triton_series(frame, SEL, keys)
    reference = pandas_dedup(frame)
    assert_same(table.frame([*keys, *derive.MVP]), reference, rel=1e-12)
    for by in (["timestamp", "model", "version"], ["timestamp", "pod"], ["timestamp"]):
        want = reference.groupby(by, sort=True)["value"].sum().reset_index()
        assert_same(derive.aggregate(table, by).frame(by), want, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ratio_joins_as_a_pandas_inner_merge(seed: int) -> None:
    by = ["timestamp", "model", "version"]
    num = pandas_dedup(random_triton(seed)).groupby(by, sort=True)["value"].sum().reset_index()
    den_frame = random_triton(seed + 100)
    den_frame.loc[den_frame.index[::4], "value"] = 0.0  # 0/0 and x/0: absent
    den = pandas_dedup(den_frame).groupby(by, sort=True)["value"].sum().reset_index()
    joined = num.merge(den[den["value"] > 0], on=by, suffixes=("_num", "_den"), how="inner")
    want = joined[by].assign(value=joined["value_num"] / joined["value_den"] / 1e6)
    got = derive.ratio(
        derive.aggregate(derive.triton_series(random_triton(seed), SEL, ["timestamp"]), by),
        derive.aggregate(derive.triton_series(den_frame, SEL, ["timestamp"]), by),
        by, 1e6,
    )
    assert len(want) > 10
    assert_same(got.frame(by), want.reset_index(drop=True), rel=1e-12)


# --- preparing inputs as answers arrive ----------------------------------------------------------

#: Every base query answered: Triton ones with COUNT (a different frame for success, so a
#: series reading the wrong one differs), DCGM ones with SLICES.
SUCCESS = triton(("a", "1", "p1", "r0", 5.0), ("b", "1", "p1", "r0", 0.0),
                 ("b", "2", "p2", "r0", 2.0))
FULL = {q.name: (SLICES if q.source is catalog.Source.DCGM
                 else SUCCESS if q.name == "success" else COUNT)
        for q in catalog.BASE_QUERIES}


def assert_same_tables(left: dict[str, pd.DataFrame | derive.DeriveError],
                right: dict[str, pd.DataFrame | derive.DeriveError]) -> None:
    assert list(left) == list(right)
    for name, table in left.items():
        other = right[name]
        if isinstance(table, pd.DataFrame):
            assert isinstance(other, pd.DataFrame), (name, other)
            pd.testing.assert_frame_equal(table, other, check_exact=True)
        else:
            assert table == other, name


def prepared_from(frames: dict[str, pd.DataFrame], plan: derive.Plan,
                  keys: tuple[str, ...] = ()) -> dict[derive.Need, derive.Table]:
    prepared: dict[derive.Need, derive.Table] = {}
    for name, frame in frames.items():
        prepared.update(derive.prepare(name, frame, SEL, plan.tables_of(name), keys))
    return prepared


def test_plan_names_the_base_queries_each_series_reads() -> None:
    plan = derive.plan(SEL)
    assert set(plan.needs) == {s.name for s in catalog.SERIES}
    assert plan.queries_of(":triton_inference_rate_drift:ratio") == {"count"}
    assert plan.queries_of("model_version:nv_cache_hit:ratio") == {"cache_hits", "success"}
    assert plan.queries_of(":dcgm_mig_slices_idle:count") == {"tensor_max"}
    assert ("raw", "count") in plan.tables_of("count")
    assert ("level:pod", "success") in plan.tables_of("success")
    for series in catalog.SERIES:
        needed = plan.queries_of(series.name)
        assert needed, series.name
        # Its queries alone are enough; without any one of them the series cannot be derived.
        enough = derive.derive_all({n: FULL[n] for n in needed}, SEL, only={series.name})
        assert isinstance(enough[series.name], pd.DataFrame), (series.name, enough)
        for name in needed:
            short = derive.derive_all({n: FULL[n] for n in needed - {name}}, SEL,
                                      only={series.name})
            assert isinstance(short[series.name], derive.DeriveError), (series.name, name)


def test_prepared_tables_stand_in_for_the_frames() -> None:
    plan = derive.plan(SEL)
    prepared = prepared_from(FULL, plan)
    assert {name for _, name in prepared} == set(FULL)
    expected = derive.derive_all(FULL, SEL)
    assert_same_tables(derive.derive_all(FULL, SEL, prepared=prepared), expected)
    # The plan covers every table read: no frame is needed once they are prepared.
    assert_same_tables(derive.derive_all({}, SEL, prepared=prepared), expected)


def test_prepared_range_tables_keep_their_keys() -> None:
    plan = derive.plan(SEL)
    ranged = {name: pd.concat([frame.assign(timestamp=ts) for ts in (100.0, 160.0)],
                              ignore_index=True) for name, frame in FULL.items()}
    keys = ("timestamp",)
    prepared = prepared_from(ranged, plan, keys)
    assert_same_tables(derive.derive_all({}, SEL, keys, prepared=prepared),
                derive.derive_all(ranged, SEL, keys))


def test_only_derives_the_named_series_in_catalog_order() -> None:
    names = [":dcgm_mig_slices_idle:count", ":nv_inference_count:rate"]
    out = derive.derive_all(FULL, SEL, only=names)
    assert list(out) == [n for n in derive.DERIVATIONS if n in names]


def test_a_table_that_cannot_be_prepared_is_left_to_derive_all_to_report() -> None:
    plan = derive.plan(SEL)
    broken = COUNT.assign(value=["x"] * len(COUNT))  # not a number: cannot be normalised
    assert derive.prepare("count", broken, SEL, plan.tables_of("count")) == {}
    frames = {**FULL, "count": broken}
    prepared = prepared_from({n: f for n, f in frames.items() if n != "count"}, plan)
    out = derive.derive_all(frames, SEL, prepared=prepared)
    assert_same_tables(out, derive.derive_all(frames, SEL))
    failed = out[":nv_inference_count:rate"]
    assert isinstance(failed, derive.DeriveError) and "ValueError" in failed.message


def test_figures_past_the_float_range_are_dropped_and_counted_never_published() -> None:
    """An upstream value of 1e308 on two servers sums to +Inf, and Inf - Inf is NaN: neither is
    published, each dropped figure is counted, and no RuntimeWarning escapes (warnings are
    errors in this suite)."""
    huge = pd.DataFrame(
        [("a", "1", "p1", "r0", 1e308), ("a", "1", "p2", "r0", 1e308), ("b", "1", "p1", "r0", 1.0)],
        columns=["model", "version", "pod", "prometheus_replica", "value"])
    frames = {q.name: (SLICES if q.source is catalog.Source.DCGM else huge)
              for q in catalog.BASE_QUERIES}
    dropped: dict[str, int] = {}
    out = derive.derive_all(frames, SEL, nonfinite=dropped)
    for name, table in out.items():
        assert isinstance(table, pd.DataFrame), name
        assert np.isfinite(table["value"]).all(), name
    assert dropped[":nv_inference_count:rate"] == 1
    assert dropped["model_version:nv_inference_count:rate"] == 1
    assert dropped["model_version:triton_requests_executed:rate"] == 1  # Inf - Inf
    assert out["model_version:nv_inference_count:rate"]["model"].tolist() == ["b"]
    assert "model_version_pod:nv_inference_count:rate" not in dropped  # 1e308 itself is finite

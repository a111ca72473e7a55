"""catalog: the contract's names and shapes; the README's table and query count match it."""

from __future__ import annotations

import re
from pathlib import Path

from exporter import catalog, config, docs
from exporter.catalog import Level, Selectors

ROOT = Path(__file__).resolve().parent.parent
SEL = Selectors.from_config(config.load(None, environ={}))
NAME = re.compile(r"^[a-z_]*:[a-zA-Z0-9_]+:[a-z_]+$")


def test_every_name_follows_level_metric_operation_and_is_unique() -> None:
    names = [s.name for s in catalog.SERIES]
    assert len(names) == len(set(names))
    for series in catalog.SERIES:
        assert NAME.match(series.name), series.name
        assert series.name.startswith(f"{series.level.value}:"), series.name
        assert series.help.endswith(".") and series.unit


def test_the_contract_families_of_the_design_are_all_there() -> None:
    names = {s.name for s in catalog.SERIES}
    for level in ("model_version_pod", "model_version", "pod", ""):
        for metric in ("nv_inference_count", "nv_inference_request_success",
                       "nv_inference_request_failure"):
            assert f"{level}:{metric}:rate" in names
    for phase in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
        assert f"model_version:nv_inference_{phase}_duration:mean_seconds" in names
        assert f":nv_inference_{phase}_duration:mean_seconds" in names
    assert {
        ":nv_inference_count:rate_raw", ":triton_inference_rate_drift:ratio",
        "model_version:nv_inference_batch_size:mean", "model_version:nv_cache_hit:ratio",
        "model_version:triton_servers_active:count", "pod:triton_models_active:count",
        ":triton_servers_active:count", ":triton_model_servers_active:sum",
        ":triton_model_concurrency:ratio", "gpu_instance:dcgm_tensor_active:avg",
        "gpu_instance:dcgm_dram_active:avg", "gpu_instance:dcgm_gr_engine_active:avg",
        ":dcgm_tensor_active:sum", ":dcgm_dram_active:sum",
        ":dcgm_tensor_active:gpu_equivalents", ":dcgm_mig_slices_idle:count",
    } <= names


def test_rule_expressions_read_only_series_defined_before_them() -> None:
    defined: set[str] = set()
    all_names = {s.name for s in catalog.SERIES}
    for series in catalog.SERIES:
        expr = series.expr(SEL)
        used = {n for n in re.findall(r"[a-z_]*:[a-zA-Z0-9_]+:[a-z_]+", expr) if n in all_names}
        assert used <= defined, (series.name, used - defined)
        defined.add(series.name)


def test_counters_are_read_only_through_rate() -> None:
    for query in catalog.BASE_QUERIES:
        if query.source is catalog.Source.TRITON:
            # The one Triton gauge, queue depth, is averaged; every counter goes through rate.
            gauge = query.metric == "nv_inference_pending_request_count"
            assert query.function == ("avg_over_time" if gauge else "rate"), query.name
            assert "delta(" not in query.promql(SEL)
    for series in catalog.SERIES:
        assert "delta(" not in series.expr(SEL) and "irate(" not in series.expr(SEL)


def test_base_queries_do_not_depend_on_the_fleet_and_are_fixed_in_number() -> None:
    assert len(catalog.BASE_QUERIES) == 15
    for query in catalog.BASE_QUERIES:
        text = query.promql(SEL)
        assert text.startswith(("sum by (", "max by (")), text
        assert "[120s]" in text


def test_levels_have_their_labels() -> None:
    for series in catalog.SERIES:
        labels = series.labels(SEL)
        if series.level is Level.GPU_INSTANCE:
            assert labels == ("instance", "device", "GPU_I_ID", "GPU_I_PROFILE", "pod")
        else:
            assert labels == catalog.LEVEL_LABELS[series.level]


def test_readme_contract_table_is_generated_from_the_catalog() -> None:
    readme = (ROOT / "README.md").read_text()
    assert docs.render_readme(readme, SEL) == readme, "README drifted: run `make docs`"
    assert f"**{len(catalog.BASE_QUERIES)} upstream queries**" in readme

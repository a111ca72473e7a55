"""dashboard: the committed JSON is what the catalog generates; every query names only catalog
series and self-metrics; layout, variables and ids are sound; every query parses in Prometheus."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter import catalog, config, dashboard, promserver
from exporter.publish import PREFIX, Publisher, SelfMetrics

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / dashboard.DEFAULT_OUTPUT


def default_dashboard() -> dict[str, Any]:
    return dashboard.render(config.load(ROOT / "config.yaml", environ={}))


def self_metric_names() -> set[str]:
    """Every sample name the exporter's own registry exposes (with _total, _bucket, ...)."""
    metrics = SelfMetrics(Publisher(90.0))
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


# --------------------------------------------------------------------------------------------
# Walking the JSON

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression (with Grafana variables) selects.

    Strings, label matchers, ranges, grouping clauses and variables are cut first; of the
    identifiers left, those followed by ``(`` are functions or aggregations, the rest are
    metric names unless they are keywords or parts of numbers (``1e6``)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.groups()
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and variable queries."""
    found = [node["expr"] for node in walk(board["panels"]) if "expr" in node]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        found.append(text)
        found.append(variable["definition"])
    return found


def used_names(board: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for text in queries(board):
        values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text)
        names |= metric_names(values.group(1) if values else text)
    return names


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


# --------------------------------------------------------------------------------------------
# The extractor itself


@pytest.mark.parametrize("expr, names", [
    (':nv_inference_count:rate / (:nv_inference_count:rate_raw > 0)',
     {":nv_inference_count:rate", ":nv_inference_count:rate_raw"}),
    ('histogram_quantile(0.9, sum by (le, instance) (rate(x_bucket[$__rate_interval])))',
     {"x_bucket"}),
    ('sum(model_version:a:rate{model=~"$model", pod=~"(a|b)"}) / 1e6 > bool 0.5',
     {"model_version:a:rate"}),
    ('time() - up offset 5m', {"up"}),
    ('sum by (family) (increase(fam_total[${__range}])) > 0 unless on(x) other',
     {"fam_total", "other"}),
])
def test_metric_names_finds_exactly_the_selected_series(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --------------------------------------------------------------------------------------------
# The committed file


def test_committed_dashboard_is_what_the_catalog_generates() -> None:
    expected = dashboard.dumps(default_dashboard())
    assert COMMITTED.read_text(encoding="utf-8") == expected, (
        f"{COMMITTED.relative_to(ROOT)} is out of date: regenerate it with "
        "`triton-mig-exporter dashboard --config.file config.yaml`"
    )


def test_rendering_is_stable() -> None:
    assert dashboard.dumps(default_dashboard()) == dashboard.dumps(default_dashboard())
    text = COMMITTED.read_text(encoding="utf-8")
    assert json.loads(text) == default_dashboard()
    assert text.endswith("}\n")


def test_every_query_names_only_catalog_series_or_self_metrics() -> None:
    board = default_dashboard()
    used = used_names(board)
    allowed = set(catalog.SERIES_BY_NAME) | self_metric_names()
    assert used - allowed == set()
    # Not vacuous: self-metrics are there too, each with the prefix.
    assert {n for n in used if n.startswith(PREFIX)} >= {
        PREFIX + "upstream_up", PREFIX + "cycle_duration_seconds_bucket",
        PREFIX + "family_errors_total", PREFIX + "series", PREFIX + "cycles_missed_total"}


def test_a_query_on_a_foreign_metric_would_be_caught() -> None:
    board = default_dashboard()
    board["panels"][1]["targets"][0]["expr"] = "sum(rate(nv_inference_count[5m]))"
    allowed = set(catalog.SERIES_BY_NAME) | self_metric_names()
    assert used_names(board) - allowed == {"nv_inference_count"}


def test_every_catalog_series_is_graphed() -> None:
    assert set(catalog.SERIES_BY_NAME) <= used_names(default_dashboard())
    titles = [p["title"] for p in default_dashboard()["panels"] if p["type"] == "row"]
    assert "Other catalog series" not in titles  # every series has a curated panel today


def test_rows_follow_the_issue() -> None:
    board = default_dashboard()
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Fleet overview", "Per model ($model)", "Per server ($pod)", "MIG slices",
                    "Exporter health"]
    sections: dict[str, list[str]] = {}
    current = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            sections[current] = []
        else:
            sections[current].extend(t["expr"] for t in panel.get("targets", []))

    def names(row: str) -> set[str]:
        return set().union(*(metric_names(e) for e in sections[row]))

    assert {":nv_inference_count:rate", ":nv_inference_request_success:rate",
            ":triton_servers_active:count", ":triton_model_concurrency:ratio",
            ":triton_inference_rate_drift:ratio"} <= names("Fleet overview")
    assert {"model_version:nv_inference_count:rate", "model_version:triton_servers_active:count",
            "model_version:nv_inference_batch_size:mean", "model_version:nv_cache_hit:ratio",
            "model_version:nv_inference_request_failure:rate",
            "model_version:nv_inference_queue_duration:mean_seconds"} <= names(
                "Per model ($model)")
    assert {"pod:triton_models_active:count", "pod:nv_inference_count:rate"} <= names(
        "Per server ($pod)")
    assert {"gpu_instance:dcgm_tensor_active:avg", "gpu_instance:dcgm_dram_active:avg",
            "gpu_instance:dcgm_gr_engine_active:avg", ":dcgm_tensor_active:gpu_equivalents",
            ":dcgm_mig_slices_idle:count"} <= names("MIG slices")
    assert {PREFIX + "upstream_up", PREFIX + "cycle_duration_seconds_bucket",
            PREFIX + "family_errors_total", PREFIX + "series",
            PREFIX + "cycles_missed_total"} <= names("Exporter health")


def test_drift_panels_show_the_tolerance_band() -> None:
    board = default_dashboard()
    drift = [p for p in all_panels(board)
             if any(":triton_inference_rate_drift:ratio" in t["expr"]
                    for t in p.get("targets", []))]
    assert len(drift) == 2
    for panel in drift:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps] == [None, 0.95, 1.05]
        assert [s["color"] for s in steps] == ["red", "green", "red"]
    graph = next(p for p in drift if p["type"] == "timeseries")
    assert graph["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line+area"


def test_latency_phases_are_stacked_under_the_whole_request() -> None:
    for panel in all_panels(default_dashboard()):
        if not panel["title"].startswith("Latency phases"):
            continue
        assert panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
        exprs = [t["expr"] for t in panel["targets"]]
        assert len(exprs) == len(catalog.PHASES)
        assert "request_duration" in exprs[-1]
        total = panel["fieldConfig"]["overrides"][0]
        assert total["matcher"]["options"] == panel["targets"][-1]["refId"]


# --------------------------------------------------------------------------------------------
# Grafana structure


def test_schema_uid_and_ids() -> None:
    board = default_dashboard()
    assert board["schemaVersion"] == dashboard.SCHEMA_VERSION == 39
    assert board["uid"] == "triton-mig-exporter" and board["id"] is None
    ids = [p["id"] for p in all_panels(board)]
    assert ids == list(range(1, len(ids) + 1))


def test_template_variables() -> None:
    variables = {v["name"]: v for v in default_dashboard()["templating"]["list"]}
    assert list(variables) == ["datasource", "model", "pod"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "pod"):
        variable = variables[name]
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
        assert variable["definition"].endswith(f", {name})")


def test_every_panel_queries_the_selected_datasource() -> None:
    for panel in all_panels(default_dashboard()):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_panels_fit_the_grid_and_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in default_dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells


def test_model_and_pod_panels_use_their_variables() -> None:
    for panel in all_panels(default_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in metric_names(expr):
                if name in catalog.SERIES_BY_NAME:
                    labels = catalog.SERIES_BY_NAME[name].labels(
                        catalog.Selectors.from_config(config.Config()))
                    if catalog.MODEL in labels:
                        assert "$model" in expr, panel["title"]
                    if catalog.POD in labels:
                        assert "$pod" in expr, panel["title"]


def test_slice_labels_and_idle_threshold_come_from_the_configuration() -> None:
    cfg = config.from_mapping({
        "dcgm": {"slice_labels": ["Hostname", "gpu", "GPU_I_ID", "GPU_I_PROFILE"],
                 "idle_threshold": 0.05},
        "evaluation": {"interval": "1m"},
    }, environ={})
    board = dashboard.render(cfg)
    text = dashboard.dumps(board)
    assert "{{Hostname}} {{gpu}} {{GPU_I_ID}} {{GPU_I_PROFILE}} {{pod}}" in text
    table = next(p for p in all_panels(board) if p["type"] == "table")
    order = table["transformations"][1]["options"]["indexByName"]
    assert list(order)[:5] == ["Hostname", "gpu", "GPU_I_ID", "GPU_I_PROFILE", "pod"]
    idle = next(p for p in all_panels(board) if p["title"] == "Idle MIG slices")
    assert "under 0.05" in idle["description"]
    assert board["refresh"] == "60s"


def test_a_new_catalog_series_gets_a_panel(monkeypatch: pytest.MonkeyPatch) -> None:
    new = dataclasses.replace(catalog.SERIES_BY_NAME["model_version:nv_cache_hit:ratio"],
                              name="model_version:nv_new_thing:ratio", help="A new figure.")
    monkeypatch.setattr(catalog, "SERIES", (*catalog.SERIES, new))
    monkeypatch.setattr(catalog, "SERIES_BY_NAME", {**catalog.SERIES_BY_NAME, new.name: new})
    board = dashboard.render(config.Config())
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows[-1] == "Other catalog series"
    last = board["panels"][-1]
    assert last["title"] == new.name and last["description"] == "A new figure."
    assert last["targets"][0]["expr"] == 'model_version:nv_new_thing:ratio{model=~"$model"}'


def test_a_catalog_unit_without_a_grafana_unit_fails_generation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(dashboard.UNITS, "GPUs")
    with pytest.raises(KeyError, match="GPUs"):
        dashboard.render(config.Config())


# --------------------------------------------------------------------------------------------
# The command


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dashboard.add_arguments(parser)
    return parser.parse_args(argv)


def test_command_writes_checks_and_prints(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "board.json"
    cfg_file = str(ROOT / "config.yaml")
    assert dashboard.main_from_args(parse("--config.file", cfg_file, "-o", str(out))) == 0
    assert out.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")
    assert dashboard.main_from_args(parse("--config.file", cfg_file, "-o", str(out),
                                          "--check")) == 0
    out.write_text("{}\n")
    assert dashboard.main_from_args(parse("--config.file", cfg_file, "-o", str(out),
                                          "--check")) == 1
    assert "out of date" in capsys.readouterr().err
    assert dashboard.main_from_args(parse("--config.file", cfg_file, "-o", "-")) == 0
    assert json.loads(capsys.readouterr().out)["uid"] == dashboard.UID
    written = dashboard.write(config.Config(), tmp_path / "w" / "d.json")
    assert json.loads(written.read_text())["uid"] == dashboard.UID


def test_command_with_a_bad_config_is_a_usage_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dcgm: {idle_threshold: 2}\n")
    assert dashboard.main_from_args(parse("--config.file", str(bad), "-o", "-")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "idle_threshold" in err


def test_default_output_is_the_committed_path() -> None:
    assert parse().output == str(dashboard.DEFAULT_OUTPUT)
    assert COMMITTED.is_file()


# --------------------------------------------------------------------------------------------
# Every query parses in a real Prometheus

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "30s",
                     "$model": ".*", "$pod": ".*"}


def substitute(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


@pytest.mark.integration
def test_every_panel_query_is_valid_promql(prometheus_binaries: promserver.PrometheusBinaries,
                                           tmp_path: Path) -> None:
    server = promserver.PrometheusServer(
        prometheus_binaries, {"global": {"scrape_interval": "15s"}}, tmp_path / "prom")
    exprs = [node["expr"] for node in walk(default_dashboard()["panels"]) if "expr" in node]
    assert len(exprs) > 40
    server.start()
    try:
        for expr in exprs:
            answer = requests.get(f"{server.url}/api/v1/query",
                                  params={"query": substitute(expr)}, timeout=5)
            body = answer.json()
            assert answer.status_code == 200 and body["status"] == "success", (expr, body)
    finally:
        server.stop()


def test_module_runs_on_its_own() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "exporter.dashboard", "--config.file", str(ROOT / "config.yaml"),
         "--output", str(COMMITTED), "--check"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr

"""dashboard: the committed JSON is what the catalog generates; every query names only catalog
series and self-metrics; layout, variables and ids are sound; every panel query returns data from
a simulated fleet, through the committed recording rules and through the exporter alike."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
import requests
import yaml

from exporter import catalog, config, dashboard
from exporter.lab import demo, promserver, simulate
from exporter.publish import PREFIX, Publisher, SelfMetrics

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / dashboard.DEFAULT_OUTPUT


def default_dashboard() -> dict[str, Any]:
    return dashboard.render(config.load(ROOT / "config.yaml", environ={}))


def self_metric_names() -> set[str]:
    """Every sample name the exporter's own registry exposes (with _total, _bucket, ...)."""
    metrics = SelfMetrics(Publisher(90.0))
    families = [*metrics.registry.collect(), *metrics.state.collect()]
    return {sample.name for family in families for sample in family.samples}


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
    assert list(variables) == ["datasource", "model", "pod", "host"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # The label each variable lists, and the series it lists it from.
    expected = {"model": ("model_version:nv_inference_count:rate", "model"),
                "pod": ("pod:nv_inference_count:rate", "pod"),
                "host": ("gpu_instance:dcgm_tensor_active:avg", "instance")}
    for name, (series, label) in expected.items():
        variable = variables[name]
        assert variable["type"] == "query" and variable["description"]
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
        assert variable["definition"] == variable["query"] == f"label_values({series}, {label})"
        assert label in catalog.SERIES_BY_NAME[series].labels(
            catalog.Selectors.from_config(config.Config()))
    # No Triton or fleet series has a host label: the variable says what it filters.
    assert "only the panels of those series" in variables["host"]["description"]


def test_host_is_the_node_label_of_the_slice_series() -> None:
    sel = catalog.Selectors.from_config(config.Config())
    assert dashboard.host_label(sel) == "instance"
    hostname = config.from_mapping(
        {"dcgm": {"slice_labels": ["gpu", "Hostname", "GPU_I_ID", "GPU_I_PROFILE"]}},
        environ={})
    assert dashboard.host_label(catalog.Selectors.from_config(hostname)) == "Hostname"
    board = dashboard.render(hostname)
    host = next(v for v in board["templating"]["list"] if v["name"] == "host")
    assert host["query"] == "label_values(gpu_instance:dcgm_tensor_active:avg, Hostname)"
    exprs = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    assert sum('Hostname=~"$host"' in e for e in exprs) == 4
    assert not any('instance=~"$host"' in e for e in exprs)


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


def test_model_pod_and_host_panels_use_their_variables() -> None:
    filtered = set()
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
                    if "instance" in labels:
                        assert 'instance=~"$host"' in expr, panel["title"]
                        filtered.add(panel["title"])
    assert filtered == {"Slice activity now", "Tensor activity per slice"}


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


def target_units(panel: dict[str, Any]) -> dict[str, str | None]:
    """The unit each target's values are shown in, by refId: a byFrameRefID override's, else
    the panel's default; in a table, the column the target's values become (``Value #A``,
    renamed by the organize transformation) through its byName override."""
    config_ = panel["fieldConfig"]

    def override_unit(matcher: str, options: str) -> str | None:
        for override in config_["overrides"]:
            if override["matcher"] == {"id": matcher, "options": options}:
                for prop in override["properties"]:
                    if prop["id"] == "unit":
                        return str(prop["value"])
        return None

    units: dict[str, str | None] = {}
    for target in panel["targets"]:
        ref = target["refId"]
        if panel["type"] == "table":
            renames: dict[str, str] = {}
            for step in panel.get("transformations", []):
                renames.update(step["options"].get("renameByName", {}))
            column = renames.get(f"Value #{ref}", f"Value #{ref}")
            units[ref] = override_unit("byName", column) or config_["defaults"].get("unit")
        else:
            units[ref] = override_unit("byFrameRefID", ref) or config_["defaults"].get("unit")
    return units


def panel_problems(panel: dict[str, Any]) -> list[str]:
    """What a data panel lacks: a unit for each target's values, a description, and in it the
    help text of every catalog series its queries select, shown in the catalog unit."""
    title = panel["title"]
    problems = []
    description = panel.get("description", "")
    if not description.strip():
        problems.append(f"{title}: no description")
    units = target_units(panel)
    for target in panel["targets"]:
        unit = units[target["refId"]]
        if not unit:
            problems.append(f"{title}: no unit for target {target['refId']}")
        for name in sorted(metric_names(target["expr"]) & set(catalog.SERIES_BY_NAME)):
            series = catalog.SERIES_BY_NAME[name]
            if series.help not in description:
                problems.append(f"{title}: the description lacks the help of {name}")
            if unit and unit != dashboard.UNITS[series.unit]:
                problems.append(f"{title}: {name} shown in {unit!r}, not in its catalog unit "
                                f"{series.unit!r}")
    return problems


@pytest.mark.parametrize("path", sorted((ROOT / "deploy" / "grafana").glob("*.json")),
                         ids=lambda p: p.name)
def test_every_panel_has_a_unit_and_the_help_of_its_catalog_series(path: Path) -> None:
    board = json.loads(path.read_text(encoding="utf-8"))
    panels = [p for p in all_panels(board) if p["type"] != "row"]
    assert panels
    assert [problem for panel in panels for problem in panel_problems(panel)] == []
    # Not vacuous: most panels are built from catalog series, and the table's units are its
    # columns'.
    catalog_panels = [p for p in panels if any(
        metric_names(t["expr"]) & set(catalog.SERIES_BY_NAME) for t in p["targets"])]
    assert len(catalog_panels) > len(panels) / 2
    (table,) = [p for p in panels if p["type"] == "table"]
    assert "unit" not in table["fieldConfig"]["defaults"]
    assert set(target_units(table).values()) == {"percentunit"}


def test_a_panel_without_its_unit_or_help_would_be_caught() -> None:
    panels = {p["title"]: p for p in all_panels(default_dashboard())}
    requests_ = panels["Requests"]
    assert panel_problems(requests_) == []
    requests_["description"] = requests_["description"].split(" Failed:")[0]
    del requests_["fieldConfig"]["defaults"]["unit"]
    assert panel_problems(requests_) == [
        *(f"Requests: no unit for target {ref}" for ref in "ABC"),
        "Requests: the description lacks the help of :nv_inference_request_failure:rate",
        "Requests: no unit for target D",
        "Requests: the description lacks the help of reason:nv_inference_request_failure:rate",
    ]
    table = panels["Slice activity now"]
    table["fieldConfig"]["overrides"][1]["properties"] = [
        p for p in table["fieldConfig"]["overrides"][1]["properties"] if p["id"] != "unit"]
    assert panel_problems(table) == ["Slice activity now: no unit for target B"]
    drift = panels["Rate drift"]
    drift["fieldConfig"]["defaults"]["unit"] = "none"
    drift["description"] = " "
    assert panel_problems(drift) == [
        "Rate drift: no description",
        "Rate drift: the description lacks the help of :triton_inference_rate_drift:ratio",
        "Rate drift: :triton_inference_rate_drift:ratio shown in 'none', not in its catalog "
        "unit 'ratio'",
    ]


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
# Every panel query returns data from a real fleet, on either source of the series
#
# The simulator, a Prometheus ("rules") that scrapes it, evaluates the committed rules/ files
# and scrapes the exporter's self-metrics (as the demo does), the exporter (`python -m exporter
# serve`) querying that Prometheus, and a second Prometheus ("exporter") configured like
# deploy/prometheus/prometheus.yml that scrapes everything the exporter serves. The dashboard
# promises to work on either source, so every panel query must return data from both.

SCRAPE = 1.0  # seconds: scrapes, rule evaluation and exporter cycles
STEP = 5.0  # the range-query step Grafana would use ($__interval)
#: Panels that have data only when something is wrong, and why; proven by the fault phase.
EMPTY_WHEN_HEALTHY = {
    "Family errors": "only a family that failed to compute in the interval has a sample (> 0); "
                     "a failing upstream query causes that, no simulator fault does",
}
DATA_TIMEOUT = 75.0
#: A base query the fault phase makes the upstream refuse.
FAILED_BASE_QUERY = "dram"


def grafana_variables(rng: str = "1m") -> dict[str, str]:
    """Grafana's interval variables for a data source whose scrape interval is SCRAPE."""
    rate_interval = max(STEP + SCRAPE, 4 * SCRAPE)  # Grafana's $__rate_interval
    return {"__rate_interval": f"{rate_interval:g}s", "__interval": f"{STEP:g}s",
            "__range": rng}


def substitute(expr: str, values: dict[str, str]) -> str:
    """``$name`` and ``${name}`` replaced by ``values[name]``; an unknown variable fails."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def test_substitute_replaces_every_variable_form() -> None:
    values = {"model": "a|b", "__rate_interval": "6s", "pod": ".*"}
    assert substitute('rate(x{model=~"$model", pod=~"${pod}"}[$__rate_interval])', values) == (
        'rate(x{model=~"a|b", pod=~".*"}[6s])')
    with pytest.raises(AssertionError, match="host"):
        substitute('x{instance=~"$host"}', values)


@dataclasses.dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str  # variables substituted


def panel_queries(board: dict[str, Any], variables: dict[str, list[str]],
                  rng: str = "1m") -> list[PanelQuery]:
    """Every target of every panel, variables substituted as Grafana would with All selected:
    ``allValue`` for multi-value variables, and each value in turn for a repeated panel."""
    all_values = {v["name"]: v.get("allValue", ".*") for v in board["templating"]["list"]
                  if v["type"] == "query"}
    out = []
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        repeat = panel.get("repeat")
        choices = [{}] if repeat is None else [{repeat: v} for v in variables.get(repeat, [])]
        for choice in choices:
            values = {**grafana_variables(rng), **all_values, **choice}
            title = substitute(panel["title"], values)
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", title
                out.append(PanelQuery(title, target["refId"], substitute(target["expr"], values)))
    return out


class FailingUpstream:
    """An HTTP proxy to a Prometheus that refuses the queries naming a metric when told to:
    the upstream fault that makes the exporter's families fail (no simulator fault reaches the
    exporter's queries, only the scrapes)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.refuse: str | None = None
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                refuse = proxy.refuse
                if refuse is not None and refuse in unquote_plus(
                        self.path + "&" + body.decode("utf-8", "replace")):
                    self._answer(422, b'{"status":"error","errorType":"execution",'
                                      b'"error":"refused by the test"}', "application/json")
                    return
                answer = requests.request(
                    self.command, proxy.target + self.path, data=body or None, timeout=30,
                    headers={k: v for k, v in self.headers.items()
                             if k.lower() in ("content-type", "accept")})
                self._answer(answer.status_code, answer.content,
                             answer.headers.get("Content-Type", "application/json"))

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclasses.dataclass
class LiveFleet:
    spec: simulate.FleetSpec
    sources: dict[str, promserver.PrometheusServer]
    upstream: FailingUpstream
    board: dict[str, Any]


def committed_rules(folder: Path) -> list[str]:
    """The committed rule files, each group evaluated every SCRAPE instead of 30s (names and
    expressions untouched) so the first figures come within seconds."""
    folder.mkdir(parents=True)
    paths = []
    for name in ("recording.rules.yaml", "alerts.rules.yaml"):
        doc = yaml.safe_load((ROOT / "rules" / name).read_text(encoding="utf-8"))
        for group in doc["groups"]:
            group["interval"] = f"{SCRAPE:g}s"
        (folder / name).write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        paths.append(str(folder / name))
    return paths


def exporter_prometheus_config(target: str, alerts: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml, pointed at ``target`` and scraping every SCRAPE."""
    doc = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    interval = f"{SCRAPE:g}s"
    doc["global"].update(scrape_interval=interval, evaluation_interval=interval)
    doc["rule_files"] = [alerts]
    (job,) = doc["scrape_configs"]
    job.update(scrape_interval=interval, scrape_timeout=interval,
               static_configs=[{"targets": [target]}])
    return doc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def live_fleet(prometheus_binaries: promserver.PrometheusBinaries,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    tmp = tmp_path_factory.mktemp("dashboard-live")
    # One long epoch: the loaded models and rates hold still while the test runs.
    spec = simulate.FleetSpec(servers=4, models=3, hosts=2, gpus_per_host=1, seed=7,
                              epoch_seconds=3600, churn=0.0, start=time.time() - 600)
    fleet = simulate.Fleet(spec, simulate.Faults())
    sim = simulate.serve(fleet, "127.0.0.1", 0)
    exporter_address = f"127.0.0.1:{promserver.free_port()}"
    rule_files = committed_rules(tmp / "rules")
    rules_prom = promserver.PrometheusServer(prometheus_binaries, {
        **fleet.prometheus_config(f"127.0.0.1:{sim.server_address[1]}", SCRAPE),
        "rule_files": rule_files,
    }, tmp / "prometheus-rules")
    rules_prom.config["scrape_configs"].append(
        demo.exporter_scrape_job(config.Config().rules.exporter_job, exporter_address))
    exporter_prom = promserver.PrometheusServer(
        prometheus_binaries, exporter_prometheus_config(exporter_address, rule_files[1]),
        tmp / "prometheus-exporter")
    upstream = FailingUpstream(rules_prom.url)
    exporter_config = tmp / "exporter.yaml"
    exporter_config.write_text(yaml.safe_dump({
        "upstream": {"url": upstream.url, "timeout": "10s"},
        "evaluation": {"interval": f"{SCRAPE:g}s", "scrape_interval": f"{SCRAPE:g}s"},
    }), encoding="utf-8")
    exporter_log = tmp / "exporter.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        # The upstream is up before the exporter's first cycle, so no family fails then.
        rules_prom.start()
        upstream.start()
        with exporter_log.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", "serve", "--config.file",
                 str(exporter_config), "--web.listen-address", exporter_address],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        exporter_prom.start()
        yield LiveFleet(spec, {"rules": rules_prom, "exporter": exporter_prom}, upstream,
                        default_dashboard())
    finally:
        if proc is not None:
            stop_process(proc)
        exporter_prom.stop()
        rules_prom.stop()
        upstream.stop()
        sim.shutdown()
        sim.server_close()


def variable_values(prom: promserver.PrometheusServer,
                    board: dict[str, Any]) -> dict[str, list[str]]:
    """What each query variable lists (``label_values(series, label)``), as Grafana asks."""
    out = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        series, label = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]).groups()
        answer = requests.get(f"{prom.url}/api/v1/label/{label}/values",
                              params={"match[]": series}, timeout=10).json()
        out[variable["name"]] = answer["data"]
    return out


def variable_counts(variables: dict[str, list[str]]) -> list[int]:
    return [len(variables.get(name, [])) for name in ("model", "pod", "host")]


def fleet_counts(spec: simulate.FleetSpec) -> list[int]:
    return [spec.models, spec.servers, spec.hosts]


def has_data(prom: promserver.PrometheusServer, expr: str) -> bool:
    """The instant query is valid PromQL and returns at least one finite sample."""
    answer = requests.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=10)
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (expr, body)
    return any(math.isfinite(float(item["value"][1])) for item in body["data"]["result"])


def wait_for_panels(live: LiveFleet, wanted: Callable[[PanelQuery], bool],
                    timeout: float) -> dict[str, list[PanelQuery]]:
    """Poll until every wanted panel query returns data from every source, or the deadline;
    returns, per source, the queries still without data."""
    deadline = time.monotonic() + timeout
    pending: dict[str, list[PanelQuery]] = {}
    for name, prom in live.sources.items():
        # Every model, pod and host: targets are scraped at spread offsets, so the first
        # recorded series can name some pods a scrape interval before the others.
        variables = promserver.wait_for(
            lambda prom=prom: (v := variable_values(prom, live.board))
            and variable_counts(v) == fleet_counts(live.spec) and v,
            timeout=max(deadline - time.monotonic(), 1), interval=0.5,
            what=f"every dashboard variable to list the whole fleet from the {name} source")
        pending[name] = [q for q in panel_queries(live.board, variables) if wanted(q)]
    while True:
        for name, prom in live.sources.items():
            pending[name] = [q for q in pending[name] if not has_data(prom, q.expr)]
        if not any(pending.values()) or time.monotonic() >= deadline:
            return pending
        time.sleep(0.5)


def describe(pending: dict[str, list[PanelQuery]]) -> str:
    return "; ".join(f"{source} source: " + ", ".join(
        f"{q.panel!r} {q.ref}: {q.expr}" for q in queries) for source, queries in pending.items()
        if queries)


@pytest.mark.integration
def test_every_panel_query_returns_data_from_rules_and_exporter(live_fleet: LiveFleet) -> None:
    board = live_fleet.board
    titles = {p["title"] for p in all_panels(board) if p["type"] != "row"}
    assert set(EMPTY_WHEN_HEALTHY) <= titles
    pending = wait_for_panels(live_fleet, lambda q: q.panel not in EMPTY_WHEN_HEALTHY,
                              DATA_TIMEOUT)
    assert not any(pending.values()), f"panel queries without data: {describe(pending)}"
    # Not vacuous: every panel but the allow-listed ones was asked, from both sources, and
    # the repeated panel once per model.
    variables = variable_values(live_fleet.sources["rules"], board)
    asked = {q.panel for q in panel_queries(board, variables)}
    assert asked == ({t for t in titles if "$" not in t}
                     | {f"Latency phases: {m}" for m in variables["model"]})
    assert variable_counts(variables) == fleet_counts(live_fleet.spec)
    # The allow-list is exactly the panels without data in a healthy fleet.
    for name, prom in live_fleet.sources.items():
        empty = {q.panel for q in panel_queries(board, variables) if not has_data(prom, q.expr)}
        assert empty == set(EMPTY_WHEN_HEALTHY), name


@pytest.mark.integration
def test_allow_listed_panels_have_data_when_the_upstream_fails(live_fleet: LiveFleet) -> None:
    # Let the healthy phase (or, alone, the stack) get its figures first.
    assert not any(wait_for_panels(live_fleet, lambda q: q.panel == "Series per family",
                                   DATA_TIMEOUT).values())
    live_fleet.upstream.refuse = catalog.BASE_BY_NAME[FAILED_BASE_QUERY].metric
    try:
        pending = wait_for_panels(live_fleet, lambda q: q.panel in EMPTY_WHEN_HEALTHY,
                                  DATA_TIMEOUT)
        assert not any(pending.values()), f"panel queries without data: {describe(pending)}"
        # The panel names the families that need the refused query, and only those.
        expected = {s.name for s in catalog.SERIES if FAILED_BASE_QUERY in s.inputs}
        assert expected
        (errors,) = [q for q in panel_queries(live_fleet.board, {})
                     if q.panel == "Family errors"]
        for prom in live_fleet.sources.values():
            families = {item["metric"]["family"] for item in prom.query(errors.expr)}
            assert families == expected
    finally:
        live_fleet.upstream.refuse = None


def test_module_runs_on_its_own() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter.dashboard", "--config.file", str(ROOT / "config.yaml"),
         "--output", str(COMMITTED), "--check"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr

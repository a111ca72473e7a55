"""The Grafana dashboard, generated from the catalog.

Panels query the published series by their catalog names (the exporter's and the recording
rules' alike, so the dashboard works on either source) and the exporter's own
``triton_mig_exporter_*`` self-metrics, nothing else. Titles are written here; descriptions and
units come from the catalog, and a catalog series no curated panel shows gets a panel of its own
in a last row, so the dashboard always covers the whole contract.

The output is stable: fixed panel ids in generation order, sorted keys, a fixed uid. The
committed ``deploy/grafana/triton-mig-exporter.json`` is :func:`render` of ``config.yaml``, and a
test regenerates it and fails on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter import catalog, config
from exporter.catalog import Level, Selectors
from exporter.config import Config, ConfigError, format_duration
from exporter.publish import PREFIX

__all__ = [
    "DEFAULT_OUTPUT",
    "DRIFT_TOLERANCE",
    "SCHEMA_VERSION",
    "UID",
    "add_arguments",
    "dumps",
    "host_label",
    "main",
    "main_from_args",
    "render",
    "write",
]

Json = dict[str, Any]

DEFAULT_OUTPUT = Path("deploy/grafana/triton-mig-exporter.json")
UID = "triton-mig-exporter"
TITLE = "Triton on MIG: fleet, models, servers and slices"
SCHEMA_VERSION = 39
#: The band around 1 inside which the inference-rate drift ratio counts as healthy.
#: TODO: read it from the configuration (the alert's tolerance) once it is there.
DRIFT_TOLERANCE = 0.05

DATASOURCE: Json = {"type": "prometheus", "uid": "${datasource}"}
MODEL_FILTER = 'model=~"$model"'
POD_FILTER = 'pod=~"$pod"'
#: Slice labels that name the GPU node, most specific first; none of them: the first slice label.
HOST_LABELS = ("Hostname", "hostname", "host", "node", "instance")
HOST_DESCRIPTION = (
    "GPU node, from the {label} label of the per-slice gpu_instance:* series (the node's "
    "dcgm-exporter). It filters only the panels of those series: no Triton series and no "
    "fleet-wide sum of the contract carries a host label."
)

#: Catalog units as Grafana units; a unit missing here fails generation.
UNITS: dict[str, str] = {
    "inferences/s": "suffix: inf/s",
    "requests/s": "reqps",
    "requests": "none",
    "inferences/execution": "none",
    "ratio": "percentunit",
    "seconds": "s",
    "servers": "none",
    "models": "none",
    "models/server": "none",
    "slices": "none",
    "GPUs": "none",
}

_GREEN = "green"
_RED = "red"
_REF_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _series(name: str) -> catalog.Series:
    try:
        return catalog.SERIES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"dashboard: {name} is not a catalog series") from None


def _unit(series: catalog.Series) -> str:
    try:
        return UNITS[series.unit]
    except KeyError:
        raise KeyError(
            f"dashboard: catalog unit {series.unit!r} of {series.name} has no Grafana unit"
        ) from None


def host_label(sel: Selectors) -> str:
    """The published slice label that names the GPU node: the ``$host`` variable's label."""
    for label in HOST_LABELS:
        if label in sel.slice_labels:
            return label
    return sel.slice_labels[0]


def _host_filter(sel: Selectors) -> str:
    return f'{host_label(sel)}=~"$host"'


def _selector(name: str, *matchers: str) -> str:
    return f"{name}{{{', '.join(matchers)}}}" if matchers else name


def _legend(labels: Iterable[str]) -> str:
    parts = []
    for label in labels:
        if label == catalog.VERSION:
            parts.append("v{{version}}")
        else:
            parts.append("{{" + label + "}}")
    return " ".join(parts)


def _thresholds(*steps: tuple[float | None, str]) -> Json:
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    #: An instant query in table format (tables); otherwise a range query.
    table: bool = False

    def target(self, ref: str) -> Json:
        target: Json = {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "refId": ref,
        }
        if self.table:
            target.update(format="table", instant=True, range=False)
        else:
            target.update(range=True)
        return target


@dataclass
class _Builder:
    """Lays panels out left to right, 24 columns wide, and numbers them in order."""

    sel: Selectors
    panels: list[Json] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    _next_id: int = 1
    _x: int = 0
    _y: int = 0
    _line_height: int = 0

    def _id(self) -> int:
        panel_id = self._next_id
        self._next_id += 1
        return panel_id

    def _newline(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
            "id": self._id(),
            "panels": [],
            "title": title,
            "type": "row",
        })
        self._y += 1

    def use(self, name: str) -> catalog.Series:
        series = _series(name)
        self.used.add(series.name)
        return series

    def add(self, panel: Json, width: int, height: int) -> Json:
        if self._x + width > 24:
            self._newline()
        panel.update(
            datasource=DATASOURCE,
            gridPos={"h": height, "w": width, "x": self._x, "y": self._y},
            id=self._id(),
        )
        self._x += width
        self._line_height = max(self._line_height, height)
        self.panels.append(panel)
        return panel


def _targets(queries: Sequence[Query]) -> list[Json]:
    return [query.target(_REF_IDS[i]) for i, query in enumerate(queries)]


def _timeseries(
    title: str,
    description: str,
    queries: Sequence[Query],
    unit: str,
    *,
    stack: bool = False,
    minimum: float | None = 0,
    maximum: float | None = None,
    thresholds: Json | None = None,
    threshold_style: str = "off",
    overrides: list[Json] | None = None,
    decimals: int | None = None,
) -> Json:
    defaults: Json = {
        "color": {"mode": "palette-classic"},
        "custom": {
            "axisPlacement": "auto",
            "drawStyle": "line",
            "fillOpacity": 60 if stack else 10,
            "gradientMode": "none",
            "lineWidth": 1,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"group": "A", "mode": "normal" if stack else "none"},
            "thresholdsStyle": {"mode": threshold_style},
        },
        "thresholds": thresholds or _thresholds((None, _GREEN)),
        "unit": unit,
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"calcs": [], "displayMode": "list", "placement": "bottom",
                       "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(queries),
        "title": title,
        "type": "timeseries",
    }


def _stat(
    title: str,
    description: str,
    query: Query,
    unit: str,
    *,
    thresholds: Json | None = None,
    mappings: list[Json] | None = None,
    decimals: int | None = None,
    color_mode: str = "value",
) -> Json:
    defaults: Json = {
        "color": {"mode": "thresholds"},
        "mappings": mappings or [],
        "thresholds": thresholds or _thresholds((None, _GREEN)),
        "unit": unit,
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": color_mode,
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        "targets": _targets([query]),
        "title": title,
        "type": "stat",
    }


def _override_right_axis(ref: str, unit: str) -> Json:
    return {
        "matcher": {"id": "byFrameRefID", "options": ref},
        "properties": [
            {"id": "custom.axisPlacement", "value": "right"},
            {"id": "unit", "value": unit},
        ],
    }


def _drift_thresholds() -> Json:
    low, high = 1 - DRIFT_TOLERANCE, 1 + DRIFT_TOLERANCE
    return _thresholds((None, _RED), (round(low, 6), _GREEN), (round(high, 6), _RED))


def _fleet(b: _Builder) -> None:
    b.row("Fleet overview")
    count = b.use(":nv_inference_count:rate")
    raw = b.use(":nv_inference_count:rate_raw")
    success = b.use(":nv_inference_request_success:rate")
    failure = b.use(":nv_inference_request_failure:rate")
    servers = b.use(":triton_servers_active:count")
    summed = b.use(":triton_model_servers_active:sum")
    concurrency = b.use(":triton_model_concurrency:ratio")
    drift = b.use(":triton_inference_rate_drift:ratio")
    band = f"{1 - DRIFT_TOLERANCE:g} to {1 + DRIFT_TOLERANCE:g}"

    for title, series, extra in (
        ("Inference rate", count, {}),
        ("Successful requests", success, {}),
        ("Failed requests", failure,
         {"thresholds": _thresholds((None, _GREEN), (1e-9, _RED))}),
        ("Servers active", servers, {"decimals": 0}),
        ("Models per busy server", concurrency, {"decimals": 2}),
    ):
        b.add(_stat(title, series.help, Query(series.name), _unit(series), **extra), 4, 4)
    b.add(_stat("Rate drift", f"{drift.help} Green inside the tolerance band {band}.",
                Query(drift.name), _unit(drift), thresholds=_drift_thresholds(),
                decimals=1, color_mode="background"), 4, 4)

    b.add(_timeseries(
        "Inference rate: deduplicated and raw",
        f"Deduplicated: {count.help} Raw: {raw.help}",
        [Query(count.name, "deduplicated"), Query(raw.name, "raw (no dedup, any model)")],
        _unit(count),
    ), 8, 8)
    b.add(_timeseries(
        "Rate drift and its tolerance band",
        f"{drift.help} The green band is the tolerance {band}; outside it for a while, with "
        "traffic, the inference rate mismatch alert fires.",
        [Query(drift.name, "drift")],
        _unit(drift), minimum=None, thresholds=_drift_thresholds(),
        threshold_style="line+area", decimals=1,
    ), 8, 8)
    b.add(_timeseries(
        "Servers active and model concurrency",
        f"Servers active: {servers.help} Summed per model: {summed.help} "
        f"Concurrency (right axis): {concurrency.help}",
        [Query(servers.name, "servers active"),
         Query(summed.name, "servers active, summed per model"),
         Query(concurrency.name, "models per busy server")],
        _unit(servers),
        overrides=[_override_right_axis("C", _unit(concurrency))],
    ), 8, 8)

    executed = b.use(":triton_requests_executed:rate")
    reasons = b.use("reason:nv_inference_request_failure:rate")
    b.add(_timeseries(
        "Requests",
        f"Successful: {success.help} Ran the model: {executed.help} Failed: {failure.help} "
        f"By reason: {reasons.help}",
        [Query(success.name, "successful"), Query(executed.name, "ran the model"),
         Query(failure.name, "failed"), Query(reasons.name, "failed: {{reason}}")],
        _unit(success),
    ), 12, 8)
    phases = [b.use(f":nv_inference_{phase}_duration:mean_seconds")
              for phase in catalog.PHASES if phase != "request"]
    total = b.use(":nv_inference_request_duration:mean_seconds")
    b.add(_timeseries(
        "Latency phases (fleet)",
        "Mean time per request in each phase, stacked, against the whole request (dashed). "
        "Compute phases are per request that ran the model: with the response cache on, the "
        f"stack can exceed the request mean. {_phase_helps(phases, total)}",
        [*(Query(s.name, _phase_legend(s.name)) for s in phases), Query(total.name, "request")],
        _unit(total), stack=True,
        overrides=[_override_total(_REF_IDS[len(phases)])],
    ), 12, 8)


def _phase_legend(name: str) -> str:
    return name.split(":")[1].removeprefix("nv_inference_").removesuffix("_duration")


def _phase_helps(phases: Sequence[catalog.Series], total: catalog.Series) -> str:
    """Each phase's catalog help under its name, then the whole request's."""
    return " ".join(f"{_phase_legend(s.name).replace('_', ' ').capitalize()}: {s.help}"
                    for s in (*phases, total))


def _override_total(ref: str) -> Json:
    """The whole-request line drawn over the stacked phases, not stacked itself."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref},
        "properties": [
            {"id": "custom.stacking", "value": {"group": "total", "mode": "none"}},
            {"id": "custom.fillOpacity", "value": 0},
            {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}},
            {"id": "color", "value": {"fixedColor": "text", "mode": "fixed"}},
        ],
    }


def _per_model(b: _Builder) -> None:
    b.row("Per model ($model)")
    legend = _legend(catalog.LEVEL_LABELS[Level.MODEL_VERSION])
    for title, name in (
        ("Inference rate by model", "model_version:nv_inference_count:rate"),
        ("Successful requests by model", "model_version:nv_inference_request_success:rate"),
        ("Servers active by model", "model_version:triton_servers_active:count"),
        ("Batch size by model", "model_version:nv_inference_batch_size:mean"),
        ("Response-cache hit ratio by model", "model_version:nv_cache_hit:ratio"),
        ("Failed requests by model", "model_version:nv_inference_request_failure:rate"),
        ("Queue depth by model", "model_version:nv_inference_pending_request_count:avg"),
        ("Requests that ran the model", "model_version:triton_requests_executed:rate"),
    ):
        series = b.use(name)
        b.add(_timeseries(title, series.help, [Query(_selector(name, MODEL_FILTER), legend)],
                          _unit(series)), 8, 8)
    reasons = b.use("model_version_reason:nv_inference_request_failure:rate")
    b.add(_timeseries(
        "Failed requests by model and reason", reasons.help,
        [Query(_selector(reasons.name, MODEL_FILTER),
               _legend(catalog.LEVEL_LABELS[Level.MODEL_VERSION_REASON]))],
        _unit(reasons)), 8, 8)
    phases = [b.use(f"model_version:nv_inference_{phase}_duration:mean_seconds")
              for phase in catalog.PHASES if phase != "request"]
    total = b.use("model_version:nv_inference_request_duration:mean_seconds")
    single = 'model="$model"'
    panel = _timeseries(
        "Latency phases: $model",
        "Mean time per request of the model in each phase, stacked, against the whole request "
        "(dashed); one panel per selected model. Compute phases are per request that ran the "
        "model: with the response cache on, the stack can exceed the request mean. With "
        "several versions of a "
        f"model live, the stack adds their figures: read it per version. "
        f"{_phase_helps(phases, total)}",
        [*(Query(_selector(s.name, single), f"{_phase_legend(s.name)} v{{{{version}}}}")
           for s in phases),
         Query(_selector(total.name, single), "request v{{version}}")],
        _unit(total), stack=True,
        overrides=[_override_total(_REF_IDS[len(phases)])],
    )
    panel.update(maxPerRow=3, repeat="model", repeatDirection="h")
    b.add(panel, 8, 8)


def _per_server(b: _Builder) -> None:
    b.row("Per server ($pod)")
    pod_legend = _legend(catalog.LEVEL_LABELS[Level.POD])
    models = b.use("pod:triton_models_active:count")
    count = b.use("pod:nv_inference_count:rate")
    success = b.use("pod:nv_inference_request_success:rate")
    failure = b.use("pod:nv_inference_request_failure:rate")
    pending = b.use("pod:nv_inference_pending_request_count:avg")
    fleet_pending = b.use(":nv_inference_pending_request_count:avg")
    b.add(_timeseries("Queue depth per server", f"{pending.help} Fleet: {fleet_pending.help}",
                      [Query(_selector(pending.name, POD_FILTER), pod_legend),
                       Query(fleet_pending.name, "fleet")],
                      _unit(pending)), 8, 8)
    b.add(_timeseries("Models active per server", models.help,
                      [Query(_selector(models.name, POD_FILTER), pod_legend)],
                      _unit(models)), 8, 8)
    b.add(_timeseries("Inference rate per server", count.help,
                      [Query(_selector(count.name, POD_FILTER), pod_legend)],
                      _unit(count)), 8, 8)
    b.add(_timeseries(
        "Requests per server", f"Successful: {success.help} Failed: {failure.help}",
        [Query(_selector(success.name, POD_FILTER), pod_legend + " ok"),
         Query(_selector(failure.name, POD_FILTER), pod_legend + " failed")],
        _unit(success)), 8, 8)

    full = _legend(catalog.LEVEL_LABELS[Level.MODEL_VERSION_POD])
    both = (MODEL_FILTER, POD_FILTER)
    count = b.use("model_version_pod:nv_inference_count:rate")
    success = b.use("model_version_pod:nv_inference_request_success:rate")
    failure = b.use("model_version_pod:nv_inference_request_failure:rate")
    pending = b.use("model_version_pod:nv_inference_pending_request_count:avg")
    b.add(_timeseries("Inference rate by server and model", count.help,
                      [Query(_selector(count.name, *both), full)], _unit(count)), 12, 8)
    b.add(_timeseries("Queue depth by server and model", pending.help,
                      [Query(_selector(pending.name, *both), full)], _unit(pending)), 12, 8)
    b.add(_timeseries(
        "Requests by server and model", f"Successful: {success.help} Failed: {failure.help}",
        [Query(_selector(success.name, *both), full + " ok"),
         Query(_selector(failure.name, *both), full + " failed")],
        _unit(success)), 12, 8)


def _mig(b: _Builder, cfg: Config) -> None:
    b.row("MIG slices")
    sel = b.sel
    slice_legend = _legend([*sel.slice_labels, catalog.POD])
    equivalents = b.use(":dcgm_tensor_active:gpu_equivalents")
    tensor_sum = b.use(":dcgm_tensor_active:sum")
    dram_sum = b.use(":dcgm_dram_active:sum")
    idle = b.use(":dcgm_mig_slices_idle:count")
    fleet_wide = " Fleet-wide: the series has no host label, so $host does not filter it."
    b.add(_timeseries("Tensor activity in GPU-equivalents", equivalents.help + fleet_wide,
                      [Query(equivalents.name, "GPU-equivalents busy")],
                      _unit(equivalents)), 8, 8)
    b.add(_timeseries("Activity summed over slices",
                      f"Tensor: {tensor_sum.help} DRAM: {dram_sum.help}{fleet_wide}",
                      [Query(tensor_sum.name, "tensor"), Query(dram_sum.name, "DRAM")],
                      _unit(tensor_sum)), 8, 8)
    b.add(_timeseries(
        "Idle MIG slices",
        f"{idle.help} Idle threshold: tensor activity under {cfg.dcgm.idle_threshold:g} "
        f"(dcgm.idle_threshold).{fleet_wide}",
        [Query(idle.name, "idle slices")], _unit(idle), decimals=0), 8, 8)

    activity = [b.use(f"gpu_instance:dcgm_{short}_active:avg")
                for short in ("tensor", "dram", "gr_engine")]
    columns = ("Tensor", "DRAM", "GR engine")
    b.add(_slice_table(activity, columns, sel), 12, 10)
    tensor = activity[0]
    b.add(_status_history(
        "Tensor activity per slice",
        f"{tensor.help} The workload pod is {catalog.POD}; $host filters by "
        f"{host_label(sel)}.",
        Query(_selector(tensor.name, _host_filter(sel), POD_FILTER), slice_legend)), 12, 10)


def _activity_thresholds() -> Json:
    return _thresholds((None, "blue"), (0.25, _GREEN), (0.6, "yellow"), (0.85, _RED))


def _slice_table(
    activity: Sequence[catalog.Series], columns: Sequence[str], sel: Selectors
) -> Json:
    rename = {f"Value #{_REF_IDS[i]}": title for i, title in enumerate(columns)}
    # The organize transformation orders fields by their names before renaming.
    order = {label: i for i, label in enumerate([*sel.slice_labels, catalog.POD, *rename])}
    hidden = {name: True for name in ("Time", "__name__", "endpoint", "job", "namespace",
                                      "service")}
    descriptions = " ".join(f"{title}: {s.help}" for title, s in zip(columns, activity,
                                                                     strict=True))
    return {
        "description": f"Latest activity of each MIG slice (0..1), of the hosts in $host "
        f"({host_label(sel)}). {descriptions}",
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {"align": "auto", "cellOptions": {"type": "auto"}},
                "thresholds": _thresholds((None, _GREEN)),
            },
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": title},
                    "properties": [
                        {"id": "unit", "value": _unit(series)},
                        {"id": "min", "value": 0},
                        {"id": "max", "value": 1},
                        {"id": "thresholds", "value": _activity_thresholds()},
                        {"id": "custom.cellOptions",
                         "value": {"mode": "basic", "type": "gauge", "valueDisplayMode": "text"}},
                    ],
                }
                for title, series in zip(columns, activity, strict=True)
            ],
        },
        "options": {
            "cellHeight": "sm",
            "footer": {"countRows": False, "fields": "", "reducer": ["sum"], "show": False},
            "showHeader": True,
            "sortBy": [{"desc": True, "displayName": columns[0]}],
        },
        "targets": _targets([Query(_selector(s.name, _host_filter(sel), POD_FILTER), table=True)
                             for s in activity]),
        "title": "Slice activity now",
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": hidden, "indexByName": order,
                                           "renameByName": rename}},
        ],
        "type": "table",
    }


def _status_history(title: str, description: str, query: Query) -> Json:
    return {
        "description": description,
        "fieldConfig": {
            "defaults": {
                "color": {"mode": "thresholds"},
                "custom": {"fillOpacity": 80, "lineWidth": 0},
                "max": 1,
                "min": 0,
                "thresholds": _activity_thresholds(),
                "unit": "percentunit",
            },
            "overrides": [],
        },
        "options": {
            "colWidth": 0.9,
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "rowHeight": 0.9,
            "showValue": "never",
            "tooltip": {"mode": "single", "sort": "none"},
        },
        "targets": _targets([query]),
        "title": title,
        "type": "status-history",
    }


def _health(b: _Builder) -> None:
    b.row("Exporter health")
    up = PREFIX + "upstream_up"
    b.add(_stat(
        "Upstream up",
        "1 when the exporter's latest cycle got an answer to every upstream query and is not "
        "stale (triton_mig_exporter_upstream_up).",
        Query(up, "{{instance}}"), "none",
        thresholds=_thresholds((None, _RED), (1, _GREEN)),
        mappings=[{"options": {"0": {"color": _RED, "index": 1, "text": "down"},
                               "1": {"color": _GREEN, "index": 0, "text": "up"}},
                   "type": "value"}],
        color_mode="background"), 6, 4)
    b.add(_stat(
        "Since the last good cycle",
        "Seconds since the latest cycle that got every answer from the upstream finished.",
        Query(f"time() - {PREFIX}last_success_timestamp_seconds", "{{instance}}"), "s",
        thresholds=_thresholds((None, _GREEN), (300, "yellow"), (900, _RED))), 6, 4)
    b.add(_stat(
        "Evaluation lag",
        "Seconds between now and the evaluation instant of the latest good cycle "
        "(now - eval_delay, aligned to the interval).",
        Query(f"time() - {PREFIX}last_evaluation_timestamp_seconds", "{{instance}}"), "s"),
        6, 4)
    b.add(_stat(
        "Missed cycles in range",
        "Scheduled cycles skipped because the previous one was still running or late, over "
        "the dashboard's time range.",
        Query(f"sum(increase({PREFIX}cycles_missed_total[$__range]))"), "none",
        thresholds=_thresholds((None, _GREEN), (1, "yellow")), decimals=0), 6, 4)

    duration = PREFIX + "cycle_duration_seconds"
    b.add(_timeseries(
        "Cycle duration",
        "Wall time of one cycle (upstream queries, derivation, rendering): 90th percentile and "
        "mean over the rate interval. Keep it well under evaluation.interval.",
        [Query(f"histogram_quantile(0.9, sum by (le, instance) "
               f"(rate({duration}_bucket[$__rate_interval])))", "p90 {{instance}}"),
         Query(f"sum by (instance) (rate({duration}_sum[$__rate_interval])) / "
               f"sum by (instance) (rate({duration}_count[$__rate_interval]))",
               "mean {{instance}}")],
        "s"), 8, 8)
    b.add(_timeseries(
        "Cycles by outcome",
        "Cycles per interval: success (every query answered), partial, failure.",
        [Query(f"sum by (outcome) (increase({PREFIX}cycles_total[$__rate_interval]))",
               "{{outcome}}"),
         Query(f"sum(increase({PREFIX}cycles_missed_total[$__rate_interval]))", "missed")],
        "none"), 8, 8)
    b.add(_timeseries(
        "Upstream requests",
        "Upstream HTTP API requests per second by outcome (ok or the error reason), and "
        "their 90th percentile duration (right axis), retries included.",
        [Query(f"sum by (outcome) (rate({PREFIX}upstream_requests_total[$__rate_interval]))",
               "{{outcome}}"),
         Query(f"histogram_quantile(0.9, sum by (le) "
               f"(rate({PREFIX}upstream_request_duration_seconds_bucket[$__rate_interval])))",
               "p90 duration")],
        "reqps", overrides=[_override_right_axis("B", "s")]), 8, 8)
    b.add(_timeseries(
        "Family errors",
        "Derived families that could not be computed, per family (the others publish); a "
        "family keeps its last value until the staleness bound, then vanishes.",
        [Query(f"sum by (family) (increase({PREFIX}family_errors_total[$__rate_interval]))"
               " > 0", "{{family}}")],
        "none"), 12, 8)
    b.add(_timeseries(
        "Series per family",
        "Series published per derived family (0 when withdrawn).",
        [Query(f"sum by (family) ({PREFIX}series)", "{{family}}")],
        "none"), 12, 8)


def _others(b: _Builder) -> None:
    """A panel for each catalog series no curated panel shows (a new series, say)."""
    rest = [s for s in catalog.SERIES if s.name not in b.used]
    if not rest:
        return
    b.row("Other catalog series")
    for series in rest:
        labels = series.labels(b.sel)
        matchers = [m for label, m in ((catalog.MODEL, MODEL_FILTER), (catalog.POD, POD_FILTER),
                                       (host_label(b.sel), _host_filter(b.sel)))
                    if label in labels]
        b.use(series.name)
        b.add(_timeseries(series.name, series.help,
                          [Query(_selector(series.name, *matchers), _legend(labels))],
                          _unit(series)), 8, 8)


def _variables(sel: Selectors) -> list[Json]:
    datasource: Json = {
        "current": {},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": "prometheus",
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
        "type": "datasource",
    }
    out = [datasource]
    host = host_label(sel)
    for name, source_label, label, source, description in (
        (catalog.MODEL, catalog.MODEL, "Model", "model_version:nv_inference_count:rate",
         "Model, for the per-model and per-server panels."),
        (catalog.POD, catalog.POD, "Triton server (pod)", "pod:nv_inference_count:rate",
         "Triton server pod, for the per-server panels and the slices it runs on."),
        ("host", host, "GPU host", "gpu_instance:dcgm_tensor_active:avg",
         HOST_DESCRIPTION.format(label=host)),
    ):
        _series(source)
        query = f"label_values({source}, {source_label})"
        out.append({
            # All means any value, not a regex of every value the variable listed.
            "allValue": ".*",
            "current": {},
            "datasource": DATASOURCE,
            "definition": query,
            "description": description,
            "hide": 0,
            "includeAll": True,
            "label": label,
            "multi": True,
            "name": name,
            "options": [],
            "query": query,
            "refresh": 2,
            "regex": "",
            "skipUrlSync": False,
            "sort": 1,
            "type": "query",
        })
    return out


def render(cfg: Config) -> dict[str, Any]:
    """The dashboard for ``cfg`` as a JSON-ready mapping (Grafana schema version 39)."""
    b = _Builder(Selectors.from_config(cfg))
    _fleet(b)
    _per_model(b)
    _per_server(b)
    _mig(b, cfg)
    _health(b)
    _others(b)
    return {
        "annotations": {"list": [{
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "description": "Fleet figures for NVIDIA Triton on MIG slices from triton-mig-exporter "
        "or its recording rules (generated from exporter/catalog.py; do not edit by hand).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": b.panels,
        # The figures change once per evaluation interval: refreshing faster shows nothing new.
        "refresh": format_duration(cfg.evaluation.interval),
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["triton", "mig", "dcgm", "triton-mig-exporter"],
        "templating": {"list": _variables(b.sel)},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": TITLE,
        "uid": UID,
        "version": 1,
        "weekStart": "",
    }


def dumps(dashboard: dict[str, Any]) -> str:
    """The stable text of a dashboard: sorted keys, two-space indent, a final newline."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(cfg: Config, path: str | Path) -> Path:
    """Render the dashboard for ``cfg`` into ``path`` (folders created); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dumps(render(cfg)), encoding="utf-8")
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the ``dashboard`` subcommand."""
    parser.add_argument(
        "--config.file", dest="config_file", type=Path, default=None,
        help="YAML configuration whose slice labels, idle threshold and interval the dashboard "
        "uses (default: built-in defaults, the same as config.yaml)",
    )
    parser.add_argument(
        "--output", "-o", default=str(DEFAULT_OUTPUT),
        help=f"where to write the dashboard JSON, - for stdout (default {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 when the file at --output differs from what would be written",
    )


def main_from_args(args: argparse.Namespace) -> int:
    """Run the ``dashboard`` subcommand: 0 done (or up to date), 1 out of date, 2 usage error."""
    try:
        cfg = config.load(args.config_file)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = dumps(render(cfg))
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if args.check:
        try:
            current = path.read_text(encoding="utf-8")
        except OSError as error:
            print(f"error: {path}: cannot read: {error.strerror or error}", file=sys.stderr)
            return 1
        if current != text:
            print(f"{path} is out of date: run triton-mig-exporter dashboard --output {path}",
                  file=sys.stderr)
            return 1
        return 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        print(f"error: {path}: cannot write: {error.strerror or error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m exporter.dashboard``: the subcommand on its own."""
    parser = argparse.ArgumentParser(
        prog="triton-mig-exporter dashboard",
        description="Render the Grafana dashboard from the catalog and the configuration.",
    )
    add_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

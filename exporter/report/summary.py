"""The notebook's statistics, computed from the wide table, and their JSON / Markdown forms.

Spreads are population standard deviations (``ddof=0``), as the notebook's
``np.sqrt(np.var(x))``. A statistic over no steps is ``None`` (``null`` in JSON), never 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from exporter.catalog import PHASES
from exporter.report.table import SUMMED_RATE, model_ids, slice_ids

__all__ = ["describe", "render_markdown", "summary_json", "summary_statistics"]

Stats = dict[str, float | int | None]
#: How an absent figure shows in summary.md.
NONE = "n/a"
#: A step whose drift is further than this from 1 counts as double counting (or unattributed).
DRIFT_TOLERANCE = 0.01


def _num(value: object) -> float | None:
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else None


def describe(values: pd.Series | np.ndarray) -> Stats:
    """steps, mean, max, min, std (population) over the finite values; None when there are none."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"steps": 0, "mean": None, "max": None, "min": None, "std": None}
    return {
        "steps": int(array.size),
        "mean": _num(array.mean()),
        "max": _num(array.max()),
        "min": _num(array.min()),
        "std": _num(array.std()),
    }


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    if name in table.columns:
        column: pd.Series = table[name].astype(np.float64)
        return column
    return pd.Series(np.nan, index=table.index, dtype=np.float64)


def _weighted(values: pd.Series, weights: pd.Series) -> float | None:
    """Sum(values x weights) / sum(weights) over steps where both are finite (None if no weight).

    Per-step mean seconds weighted by per-step requests/s gives the mean over all requests of
    the range (the per-step means alone over-weight quiet steps).
    """
    v, w = values.to_numpy(dtype=np.float64), weights.to_numpy(dtype=np.float64)
    ok = np.isfinite(v) & np.isfinite(w)
    total = float(w[ok].sum())
    if not ok.any() or total <= 0:
        return None
    return _num(float((v[ok] * w[ok]).sum()) / total)


def _time_of(table: pd.DataFrame, position: int) -> str:
    moment = pd.Timestamp(table.index[position])
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def summary_statistics(table: pd.DataFrame) -> dict[str, Any]:
    """The figures of ``summary.json`` computed from a wide table (:func:`wide_table`).

    - concurrency: summed_instances / num_instances over steps with active servers (the
      notebook's ``ii``); the table's ``concurrency`` column is the same ratio;
    - rate_consistency: summed_rate / rate over steps with active servers and traffic (the
      notebook's ``kk``). Both sides are deduplicated, so it is 1 by construction; it cannot see
      double counting, which is why ``drift`` (deduplicated / raw) is reported next to it;
    - per model: mean and peak rate, mean and peak active servers, share of the range's
      inferences, request-weighted mean seconds per phase;
    - per slice: mean tensor, DRAM and graphics-engine activity, and the share of steps in
      which the slice was idle.
    """
    servers = _column(table, "num_instances")
    active = (servers > 0).to_numpy()
    summed = _column(table, "summed_instances")
    rate = _column(table, "rate")
    ratio_ii = (summed / servers)[active]
    traffic = active & (rate > 0).to_numpy()
    ratio_kk = (_column(table, SUMMED_RATE) / rate)[traffic]
    drift = _column(table, "drift")
    drift_stats: dict[str, Any] = dict(describe(drift))
    finite_drift = drift[np.isfinite(drift.to_numpy())]
    drift_stats["steps_off"] = int((abs(finite_drift - 1.0) > DRIFT_TOLERANCE).sum())
    drift_stats["tolerance"] = DRIFT_TOLERANCE
    requests = _column(table, "requests")
    total_rate = float(np.nansum(rate.to_numpy()))
    models: dict[str, Any] = {}
    for model in model_ids(table):
        model_rate = _column(table, f"rate_{model}")
        model_requests = _column(table, f"requests_{model}")
        present = model_rate.notna()
        peak: dict[str, Any] = {"peak_rate": None, "peak_time": None}
        if present.any():
            position = int(np.nanargmax(model_rate.to_numpy()))
            peak = {"peak_rate": _num(model_rate.iloc[position]),
                    "peak_time": _time_of(table, position)}
        servers_m = describe(_column(table, f"num_instances_{model}"))
        models[model] = {
            "steps_present": int(present.sum()),
            "mean_rate": describe(model_rate)["mean"],
            **peak,
            "mean_servers": servers_m["mean"],
            "max_servers": servers_m["max"],
            "share_of_inferences": (
                _num(float(np.nansum(model_rate.to_numpy())) / total_rate)
                if total_rate > 0 else None
            ),
            "mean_seconds": {
                phase: _weighted(_column(table, f"{phase}_seconds_{model}"), model_requests)
                for phase in PHASES
            },
        }
    slices: dict[str, Any] = {}
    for slice_id in slice_ids(table):
        idle = _column(table, f"idle_{slice_id}")
        known = idle.notna()
        slices[slice_id] = {
            "steps_present": int(_column(table, f"tensor_{slice_id}").notna().sum()),
            "mean_tensor": describe(_column(table, f"tensor_{slice_id}"))["mean"],
            "mean_dram": describe(_column(table, f"dram_{slice_id}"))["mean"],
            "mean_gr_engine": describe(_column(table, f"gr_engine_{slice_id}"))["mean"],
            "idle_share": _num(float(idle[known].mean())) if known.any() else None,
        }
    return {
        "steps": len(table),
        "steps_with_triton_data": int(rate.notna().sum()),
        "steps_with_active_servers": int(active.sum()),
        "steps_with_dcgm_data": int(_column(table, "summed_tensor").notna().sum()),
        "concurrency": describe(ratio_ii),
        "rate_consistency": describe(ratio_kk),
        "drift": drift_stats,
        "fleet": {
            name: describe(_column(table, name))
            for name in ("rate", "rate_raw", "requests", "num_instances", "summed_instances",
                         "summed_tensor", "summed_dram", "gpu_equivalents", "idle_slices")
        },
        "mean_seconds": {
            phase: _weighted(_column(table, f"{phase}_seconds"), requests) for phase in PHASES
        },
        "models": models,
        "slices": slices,
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def summary_json(summary: Mapping[str, Any]) -> str:
    """Strict JSON (NaN and infinities as null), keys in insertion order, trailing newline."""
    return json.dumps(_clean(summary), indent=2, allow_nan=False) + "\n"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return NONE
    if isinstance(value, int | np.integer):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _ms(value: Any) -> str:
    return NONE if value is None else f"{float(value) * 1000:.3g}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _stats_row(name: str, stats: Mapping[str, Any]) -> str:
    return _row([name, stats["steps"], *(_fmt(stats[k]) for k in ("mean", "min", "max", "std"))])


def render_markdown(summary: Mapping[str, Any]) -> str:
    """summary.md: the headline statistics, then per model and per slice."""
    meta = summary.get("report", {})
    stats = summary["statistics"]
    lines = ["# Triton fleet report", ""]
    if meta:
        lines += [
            f"- range: {meta['start']} .. {meta['end']} (UTC), step {meta['step']}, "
            f"window W = {meta['window']}",
            f"- upstream: {meta['upstream']}",
            f"- steps: {stats['steps']} ({stats['steps_with_triton_data']} with Triton data, "
            f"{stats['steps_with_active_servers']} with active servers, "
            f"{stats['steps_with_dcgm_data']} with DCGM data)",
            f"- queries: {meta['queries']} in {meta['chunks']} chunks",
            "",
        ]
    if summary.get("message"):
        lines += [f"**{summary['message']}**", ""]
    for warning in summary.get("warnings", []):
        lines.append(f"> warning: {warning}")
    if summary.get("warnings"):
        lines.append("")
    lines += [
        "## Fleet",
        "",
        "Over the steps with active servers (std is the population standard deviation).",
        "",
        _row(["figure", "steps", "mean", "min", "max", "std"]),
        _row(["---"] * 6),
        _stats_row("concurrency (models per busy server)", stats["concurrency"]),
        _stats_row("rate consistency (summed per-model / fleet)", stats["rate_consistency"]),
        _stats_row("drift (deduplicated / raw rate)", stats["drift"]),
    ]
    for name, label in (("rate", "inference rate (inferences/s)"),
                        ("rate_raw", "raw inference rate (inferences/s)"),
                        ("num_instances", "active servers"),
                        ("summed_tensor", "summed tensor activity (slices)"),
                        ("summed_dram", "summed DRAM activity (slices)"),
                        ("gpu_equivalents", "tensor activity (GPU equivalents)"),
                        ("idle_slices", "idle slices")):
        lines.append(_stats_row(label, stats["fleet"][name]))
    drift = stats["drift"]
    lines += [
        "",
        f"Drift was more than {drift['tolerance']:g} away from 1 in {drift['steps_off']} of "
        f"{drift['steps']} steps. Rate consistency is 1 by construction (both sides are "
        "deduplicated); a drift of 0.5 is what the notebook's doubled rates looked like.",
        "",
        "## Models",
        "",
        _row(["model/version", "steps", "mean rate (/s)", "peak rate (/s)", "peak at",
              "mean servers", "max servers", "share", "request (ms)", "queue (ms)",
              "infer (ms)"]),
        _row(["---"] * 11),
    ]
    for model, m in stats["models"].items():
        seconds = m["mean_seconds"]
        share = m["share_of_inferences"]
        lines.append(_row([
            model, m["steps_present"], _fmt(m["mean_rate"]), _fmt(m["peak_rate"]),
            m["peak_time"] or NONE, _fmt(m["mean_servers"]), _fmt(m["max_servers"]),
            NONE if share is None else f"{share:.1%}", _ms(seconds["request"]),
            _ms(seconds["queue"]), _ms(seconds["compute_infer"]),
        ]))
    lines += [
        "",
        "## MIG slices",
        "",
        _row(["slice", "pods", "steps", "mean tensor", "mean DRAM", "mean GR engine",
              "idle share"]),
        _row(["---"] * 7),
    ]
    pods = summary.get("slice_pods", {})
    for slice_id, s in stats["slices"].items():
        idle = s["idle_share"]
        lines.append(_row([
            slice_id, ", ".join(pods.get(slice_id, [])) or NONE, s["steps_present"],
            _fmt(s["mean_tensor"]), _fmt(s["mean_dram"]), _fmt(s["mean_gr_engine"]),
            NONE if idle is None else f"{idle:.1%}",
        ]))
    files = summary.get("files")
    if files:
        lines += ["", "## Files", ""] + [f"- `{name}`" for name in files]
    return "\n".join(lines) + "\n"

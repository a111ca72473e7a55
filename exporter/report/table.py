"""The report's wide table: one row per step, one column per figure.

Built from the derived tables of :func:`exporter.derive.derive_all` (computed with
``keys=("timestamp",)`` over range frames); nothing here recomputes a contract figure. A series
that is absent at a step (no data, or a 0/0 ratio) is NaN in its column, never 0. Column names
are fixed by :data:`FLEET_COLUMNS`, :data:`MODEL_COLUMNS` and :data:`SLICE_COLUMNS`; per-model
columns are ``<prefix>_<model>/<version>`` and per-slice columns ``<prefix>_<slice id>``, where
the slice id joins the configured slice labels (default ``instance/device/GPU_I_ID/
GPU_I_PROFILE``) with ``/``. Every model (slice) seen anywhere in the range has all of its
columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from exporter.catalog import MODEL, PHASES, POD, VERSION
from exporter.report.chunking import to_millis

__all__ = [
    "FLEET_COLUMNS",
    "MODEL_COLUMNS",
    "SLICE_COLUMNS",
    "SLICE_IDLE",
    "TABLE_SERIES",
    "Column",
    "concat_tables",
    "model_ids",
    "slice_ids",
    "slice_pods",
    "wide_table",
]

TIMESTAMP = "timestamp"
VALUE = "value"
#: Report-only derived table: 1 where the slice's tensor activity stayed under the idle threshold
#: for the whole window (the per-slice flag that ``:dcgm_mig_slices_idle:count`` sums).
SLICE_IDLE = "gpu_instance:dcgm_mig_slice_idle:flag"
#: Not a series: the sum of the per-model ``rate_`` columns, the notebook's ``summed_rate``.
SUMMED_RATE = "summed_rate"


@dataclass(frozen=True)
class Column:
    """One column (fleet) or one family of columns (``<name>_<id>``, per model or slice)."""

    name: str
    series: str
    unit: str
    meaning: str
    notebook: str = ""


_PHASE_NOTEBOOK = {
    "request": "inf_req_dur_net",
    "queue": "inf_que_dur_net",
    "compute_input": "inf_inp_dur_net",
    "compute_infer": "inf_inf_dur_net",
    "compute_output": "inf_out_dur_net",
}

FLEET_COLUMNS: tuple[Column, ...] = (
    Column(TIMESTAMP, "", "unix seconds", "the step: every figure describes the window (t-W, t]",
           "the index"),
    Column("rate", ":nv_inference_count:rate", "inferences/s",
           "fleet inference rate, deduplicated across HA replicas, model-labelled series only",
           "rate"),
    Column("rate_raw", ":nv_inference_count:rate_raw", "inferences/s",
           "sum(rate(nv_inference_count[W])) over every series: what the notebook's rate was",
           "rate (as it was computed)"),
    Column("drift", ":triton_inference_rate_drift:ratio", "ratio",
           "rate / rate_raw: 1 when healthy, 0.5 while two HA replicas double count", ""),
    Column(SUMMED_RATE, "sum of the rate_<model>/<version> columns", "inferences/s",
           "per-model rates added up; equals rate (both are deduplicated)", "summed_rate"),
    Column("requests", ":nv_inference_request_success:rate", "requests/s",
           "successful requests per second over the fleet", "inf_reqs_net"),
    Column("failures", ":nv_inference_request_failure:rate", "requests/s",
           "failed requests per second over the fleet", ""),
    Column("num_instances", ":triton_servers_active:count", "servers",
           "Triton servers with at least one successful request in the window", "num_instances"),
    Column("summed_instances", ":triton_model_servers_active:sum", "servers",
           "sum over models of the servers active for each", "summed_instances"),
    Column("concurrency", ":triton_model_concurrency:ratio", "models/server",
           "summed_instances / num_instances: models a busy server serves", "ii (statistics cell)"),
    *(
        Column(f"{phase}_seconds", f":nv_inference_{phase}_duration:mean_seconds", "seconds",
               f"mean {phase.replace('_', ' ')} time per successful request over the fleet",
               _PHASE_NOTEBOOK[phase])
        for phase in PHASES
    ),
    Column("summed_tensor", ":dcgm_tensor_active:sum", "slices",
           "tensor-pipe activity summed over the selected MIG slices", "summed_gpu_tensor_util"),
    Column("summed_dram", ":dcgm_dram_active:sum", "slices",
           "DRAM activity summed over the selected MIG slices",
           "summed_gpu_dram_util (which summed the model columns)"),
    Column("gpu_equivalents", ":dcgm_tensor_active:gpu_equivalents", "GPUs",
           "tensor activity weighted by each slice's share of its GPU", ""),
    Column("idle_slices", ":dcgm_mig_slices_idle:count", "slices",
           "slices whose tensor activity stayed under the idle threshold for the whole window", ""),
)

MODEL_COLUMNS: tuple[Column, ...] = (
    Column("rate", "model_version:nv_inference_count:rate", "inferences/s",
           "inferences per second of the model version, summed over servers", "rate_<model>"),
    Column("requests", "model_version:nv_inference_request_success:rate", "requests/s",
           "successful requests per second of the model version", "inf_reqs (per pod)"),
    Column("failures", "model_version:nv_inference_request_failure:rate", "requests/s",
           "failed requests per second of the model version", ""),
    Column("num_instances", "model_version:triton_servers_active:count", "servers",
           "servers with at least one successful request for it in the window",
           "num_instances_<model>"),
    Column("batch_size", "model_version:nv_inference_batch_size:mean", "inferences/execution",
           "mean inferences per model execution", ""),
    Column("cache_hit_ratio", "model_version:nv_cache_hit:ratio", "ratio",
           "response-cache hits per successful request (only where the cache is on)",
           "inf_cache_hit_rate (per pod)"),
    *(
        Column(f"{phase}_seconds", f"model_version:nv_inference_{phase}_duration:mean_seconds",
               "seconds", f"mean {phase.replace('_', ' ')} time per successful request",
               _PHASE_NOTEBOOK[phase].removesuffix("_net") + " (per pod)")
        for phase in PHASES
    ),
)

SLICE_COLUMNS: tuple[Column, ...] = (
    Column("tensor", "gpu_instance:dcgm_tensor_active:avg", "ratio 0..1",
           "mean tensor-pipe activity of the slice over the window", "gpu_tensor_util_<n>"),
    Column("dram", "gpu_instance:dcgm_dram_active:avg", "ratio 0..1",
           "mean DRAM activity of the slice over the window", "gpu_dram_util_<n>"),
    Column("gr_engine", "gpu_instance:dcgm_gr_engine_active:avg", "ratio 0..1",
           "mean graphics-engine activity of the slice over the window", ""),
    Column("idle", SLICE_IDLE, "0 or 1",
           "1 when the slice's tensor activity stayed under the idle threshold all window", ""),
)

#: Every derived series the wide table reads.
TABLE_SERIES: frozenset[str] = frozenset(
    c.series for c in (*FLEET_COLUMNS, *MODEL_COLUMNS, *SLICE_COLUMNS) if ":" in c.series
)

_NATURAL = re.compile(r"(\d+)")


def _natural(text: str) -> list[tuple[int, int | str]]:
    """Sort key: GPU_I_ID 9 before 10, nvidia2 before nvidia10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _NATURAL.split(text)]


def _model_id(table: pd.DataFrame) -> pd.Series:
    ids: pd.Series = table[MODEL].astype(str) + "/" + table[VERSION].astype(str)
    return ids


def _slice_id(table: pd.DataFrame) -> pd.Series:
    labels = [c for c in table.columns if c not in (TIMESTAMP, POD, VALUE)]
    if not labels:
        return pd.Series("", index=table.index, dtype=object)
    ids: pd.Series = table[labels[0]].astype(str)
    for label in labels[1:]:
        ids = ids + "/" + table[label].astype(str)
    return ids


def _pivot(
    name: str,
    table: pd.DataFrame | None,
    ids: Callable[[pd.DataFrame], pd.Series],
    index_ms: np.ndarray,
    strict: bool,
) -> pd.DataFrame:
    """Columns per id, rows per step (NaN where absent). ``strict``: a repeated (step, id) is a
    bug upstream of here (e.g. overlapping chunks), not something to average away."""
    if table is None or table.empty:
        return pd.DataFrame(index=pd.Index(index_ms))
    long = pd.DataFrame({
        "ms": to_millis(table[TIMESTAMP].to_numpy(dtype=np.float64)),
        "id": ids(table).to_numpy(dtype=object),
        VALUE: table[VALUE].to_numpy(dtype=np.float64),
    })
    if strict:
        repeated = long.duplicated(["ms", "id"])
        if repeated.any():
            raise ValueError(
                f"derived table {name} holds {int(repeated.sum())} repeated (step, labels) rows; "
                "were overlapping ranges concatenated?"
            )
    # A slice whose workload pod changed inside the window has one row per pod: the highest,
    # as the replicas are deduplicated.
    grouped = long.groupby(["ms", "id"], sort=False)[VALUE].max()
    wide = grouped.unstack("id")
    return wide.reindex(index_ms)


def _entity_ids(frames: Sequence[pd.DataFrame]) -> list[str]:
    seen: set[str] = set()
    for frame in frames:
        seen.update(str(c) for c in frame.columns)
    return sorted(seen, key=_natural)


def wide_table(
    derived: Mapping[str, pd.DataFrame], steps: Sequence[float] | np.ndarray
) -> pd.DataFrame:
    """The report table: one row per step of ``steps`` (in order), the columns of the schema.

    ``derived`` maps series names (catalog names, plus :data:`SLICE_IDLE`) to derived tables
    with a ``timestamp`` column; a missing or empty table means the series is absent throughout.
    Rows whose steps have no data at all are all-NaN rows, never dropped. The index is the step
    as a UTC ``DatetimeIndex`` named ``time``.
    """
    index_ms = to_millis(np.asarray(steps, dtype=np.float64))
    if len(np.unique(index_ms)) != len(index_ms):
        raise ValueError("steps must not repeat")
    columns: dict[str, np.ndarray] = {TIMESTAMP: index_ms / 1000.0}

    def fleet(column: Column) -> np.ndarray:
        wide = _pivot(column.series, derived.get(column.series), lambda t: pd.Series(
            "", index=t.index, dtype=object), index_ms, strict=True)
        if wide.shape[1] == 0:
            return np.full(len(index_ms), np.nan)
        return wide.iloc[:, 0].to_numpy(dtype=np.float64)

    model_parts = {
        c.name: _pivot(c.series, derived.get(c.series), _model_id, index_ms, strict=True)
        for c in MODEL_COLUMNS
    }
    slice_parts = {
        c.name: _pivot(c.series, derived.get(c.series), _slice_id, index_ms, strict=False)
        for c in SLICE_COLUMNS
    }
    models = _entity_ids(list(model_parts.values()))
    slices = _entity_ids(list(slice_parts.values()))
    for column in FLEET_COLUMNS[1:]:
        if column.name == SUMMED_RATE:
            rates = model_parts["rate"].reindex(columns=models)
            summed = rates.sum(axis=1, min_count=1) if models else None
            columns[SUMMED_RATE] = (
                summed.to_numpy(dtype=np.float64) if summed is not None
                else np.full(len(index_ms), np.nan)
            )
        else:
            columns[column.name] = fleet(column)
    for parts, ids in ((model_parts, models), (slice_parts, slices)):
        for prefix, wide in parts.items():
            aligned = wide.reindex(columns=ids)
            for entity in ids:
                columns[f"{prefix}_{entity}"] = aligned[entity].to_numpy(dtype=np.float64)
    index = pd.DatetimeIndex(pd.to_datetime(index_ms, unit="ms", utc=True), name="time")
    return pd.DataFrame(columns, index=index)


def concat_tables(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Wide tables of consecutive step ranges (e.g. one per chunk) as one, in schema order.

    Each part has the models and slices of its own steps; the result has every one of them
    (NaN in the parts without it), ordered as :func:`wide_table` orders them, so building the
    table per chunk and concatenating equals building it over the whole range at once.
    """
    if not parts:
        raise ValueError("no tables to concatenate")
    models = sorted({m for part in parts for m in model_ids(part)}, key=_natural)
    slices = sorted({s for part in parts for s in slice_ids(part)}, key=_natural)
    order = [c.name for c in FLEET_COLUMNS]
    order += [f"{c.name}_{m}" for c in MODEL_COLUMNS for m in models]
    order += [f"{c.name}_{s}" for c in SLICE_COLUMNS for s in slices]
    whole = pd.concat([part.reindex(columns=order) for part in parts])
    if not whole.index.is_unique:
        raise ValueError("the tables' steps overlap")
    return whole


def model_ids(table: pd.DataFrame) -> list[str]:
    """``<model>/<version>`` of every model in a wide table, in column order."""
    prefix = "num_instances_"
    return [str(c)[len(prefix):] for c in table.columns if str(c).startswith(prefix)]


def slice_ids(table: pd.DataFrame) -> list[str]:
    """Slice ids of a wide table, in column order."""
    prefix = "tensor_"
    return [str(c)[len(prefix):] for c in table.columns if str(c).startswith(prefix)]


def slice_pods(derived: Mapping[str, pd.DataFrame]) -> dict[str, list[str]]:
    """The workload pods seen on each slice over the range (from the tensor table)."""
    table = derived.get(SLICE_COLUMNS[0].series)
    if table is None or table.empty or POD not in table.columns:
        return {}
    frame = pd.DataFrame({"id": _slice_id(table).to_numpy(dtype=object),
                          POD: table[POD].astype(str).to_numpy(dtype=object)})
    out: dict[str, list[str]] = {}
    for slice_id, pods in frame.groupby("id", sort=False)[POD]:
        out[str(slice_id)] = sorted({p for p in pods if p})
    return out

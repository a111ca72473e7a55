"""Derive the contract series from the grouped base query frames. Pure: no I/O.

Input frames are what :mod:`exporter.upstream` returns for the :data:`catalog.BASE_QUERIES`:
one string column per source label and a float ``value`` column. Output tables have the
series' published label columns (in catalog order) and ``value``; a table with no rows means
the series is absent. Rules every function keeps, to match the PromQL in the catalog:

- Triton series without a model label are ignored, except by the raw rate.
- HA replicas: per model, version and pod the replica with the highest figure is kept
  (``max by`` over the per-replica sums), so a doubled upstream never doubles a figure.
- A ratio whose denominator is 0 (no traffic: 0/0) is absent, never 0 or NaN.
- Non-finite samples (NaN, +-Inf from the API) are dropped before anything is computed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from exporter import catalog
from exporter.catalog import MODEL, POD, VERSION, Level, Selectors

VALUE = "value"
MV = [MODEL, VERSION]
MVP = [MODEL, VERSION, POD]
_PROFILE_SLICES = re.compile(r"^([1-7])g\.")


class MissingInput(Exception):
    """A base query this series needs did not answer in this cycle."""


@dataclass(frozen=True)
class DeriveError:
    series: str
    message: str


def _empty(labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({**{label: pd.Series([], dtype=object) for label in labels},
                         VALUE: pd.Series([], dtype=float)})


def _finite(frame: pd.DataFrame) -> pd.DataFrame:
    values = frame[VALUE].to_numpy(dtype=float)
    finite: pd.DataFrame = frame[np.isfinite(values)]
    return finite


def _with_columns(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The frame with every named label column present ("" where the source lacks it)."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        frame = frame.assign(**dict.fromkeys(missing, ""))
    return frame


def triton_series(frame: pd.DataFrame, sel: Selectors, keys: list[str]) -> pd.DataFrame:
    """Per (model, version, pod): model-labelled series only, deduplicated across replicas."""
    source = [sel.model, sel.version, sel.pod]
    frame = _finite(_with_columns(frame, source))
    frame = frame[frame[sel.model].astype(str) != ""]
    if frame.empty:
        return _empty([*keys, *MVP])
    renamed = frame.rename(columns={sel.model: MODEL, sel.version: VERSION, sel.pod: POD})
    # Replica columns are not grouping keys: max over them is the deduplication.
    return _group(renamed, [*keys, *MVP], "max")


def raw_total(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The sum over every series, duplicated or unlabelled: the naive fleet figure."""
    return aggregate(_finite(frame), keys)


def slice_series(frame: pd.DataFrame, sel: Selectors, keys: list[str]) -> pd.DataFrame:
    """Per MIG slice (+ workload pod): deduplicated across replicas."""
    labels = [*keys, *sel.slice_labels, POD]
    frame = _finite(_with_columns(frame, [*sel.slice_labels, sel.dcgm_pod]))
    if sel.dcgm_pod != POD:
        frame = frame.drop(columns=[POD], errors="ignore").rename(columns={sel.dcgm_pod: POD})
    if frame.empty:
        return _empty(labels)
    return _group(frame, labels, "max")


def _group(frame: pd.DataFrame, by: list[str], how: str) -> pd.DataFrame:
    return frame.groupby(by, as_index=False, sort=True).agg(**{VALUE: (VALUE, how)})


def aggregate(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """sum by (by): an empty input stays empty (PromQL sum of nothing is absent)."""
    if table.empty:
        return _empty(by)
    if not by:
        return pd.DataFrame({VALUE: [float(table[VALUE].sum())]})
    return _group(table, by, "sum")


def ratio(num: pd.DataFrame, den: pd.DataFrame, by: list[str], scale: float = 1.0) -> pd.DataFrame:
    """num / den / scale where both exist and den > 0 (absent otherwise)."""
    if num.empty or den.empty:
        return _empty(by)
    den = den[den[VALUE] > 0]
    if den.empty:
        return _empty(by)
    if by:
        joined = num.merge(den, on=by, suffixes=("_num", "_den"), how="inner")
    else:
        joined = pd.DataFrame({"value_num": num[VALUE].to_numpy()[:1],
                               "value_den": den[VALUE].to_numpy()[:1]})
    if joined.empty:
        return _empty(by)
    out = joined[by].copy()
    out[VALUE] = joined["value_num"] / joined["value_den"] / scale
    # A tiny denominator can still overflow to +Inf: never published.
    return _finite(out).reset_index(drop=True)


def count_positive(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """sum by (by) (table > bool 0): how many rows per group had a positive figure."""
    if table.empty:
        return _empty(by)
    flagged = table.assign(**{VALUE: (table[VALUE] > 0).astype(float)})
    return aggregate(flagged, by)


def gpu_equivalents(slices: pd.DataFrame, sel: Selectors, keys: list[str]) -> pd.DataFrame:
    """Sum of activity x (n/7) for an ``<n>g.*`` profile, x 1 for a whole GPU (no profile)."""
    if slices.empty:
        return _empty(keys)
    profiles = (slices[sel.profile] if sel.profile in slices.columns
                else pd.Series("", index=slices.index))
    weights = profiles.astype(str).map(_profile_weight).astype(float)
    known = weights.notna()
    weighted = slices[known].assign(**{VALUE: slices[VALUE][known] * weights[known]})
    return aggregate(weighted, keys)


def _profile_weight(profile: str) -> float:
    if profile == "":
        return 1.0
    match = _PROFILE_SLICES.match(profile)
    # Profiles we cannot read are left out, as the rule's regex alternatives leave them out.
    return int(match.group(1)) / catalog.MIG_SLICES_PER_GPU if match else math.nan


def idle_count(slice_max: pd.DataFrame, threshold: float, keys: list[str]) -> pd.DataFrame:
    """How many slices stayed under ``threshold`` for the window (0 when none; absent if none)."""
    if slice_max.empty:
        return _empty(keys)
    flagged = slice_max.assign(**{VALUE: (slice_max[VALUE] < threshold).astype(float)})
    return aggregate(flagged, keys)


class Inputs:
    """The base frames of one cycle, normalised on first use and cached.

    ``keys`` are extra columns every table keeps as a grouping key: none for a live cycle,
    ``timestamp`` when the frames come from range queries (the historical report).
    """

    def __init__(
        self, frames: Mapping[str, pd.DataFrame], sel: Selectors, keys: tuple[str, ...] = ()
    ) -> None:
        self._frames = frames
        self.sel = sel
        self.keys = list(keys)
        self._cache: dict[tuple[str, str], pd.DataFrame] = {}

    def by(self, labels: list[str] | tuple[str, ...] = ()) -> list[str]:
        return [*self.keys, *labels]

    def raw(self, name: str) -> pd.DataFrame:
        frame = self._frames.get(name)
        if frame is None:
            raise MissingInput(f"base query {name!r} did not answer")
        return frame

    def _cached(self, kind: str, name: str, make: Callable[[], pd.DataFrame]) -> pd.DataFrame:
        key = (kind, name)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def triton(self, name: str) -> pd.DataFrame:
        return self._cached(
            "triton", name, lambda: triton_series(self.raw(name), self.sel, self.keys)
        )

    def slices(self, name: str) -> pd.DataFrame:
        return self._cached(
            "slices", name, lambda: slice_series(self.raw(name), self.sel, self.keys)
        )

    def level(self, name: str, level: Level) -> pd.DataFrame:
        by = self.by(catalog.LEVEL_LABELS[level])
        return self._cached(f"level:{level.value}", name,
                            lambda: aggregate(self.triton(name), by))


Derivation = Callable[[Inputs], pd.DataFrame]


def _rate(short: str, level: Level) -> Derivation:
    return lambda i: i.level(short, level)


def _per_request(short: str, level: Level, scale: float = 1.0) -> Derivation:
    labels = catalog.LEVEL_LABELS[level]
    return lambda i: ratio(i.level(short, level), i.level("success", level), i.by(labels), scale)


def _servers_active(i: Inputs) -> pd.DataFrame:
    return count_positive(i.triton("success"), i.by(MV))


def _fleet_servers_active(i: Inputs) -> pd.DataFrame:
    return count_positive(i.level("success", Level.POD), i.by())


def _model_servers_sum(i: Inputs) -> pd.DataFrame:
    return aggregate(_servers_active(i), i.by())


def _derivations() -> dict[str, Derivation]:
    table: dict[str, Derivation] = {}
    rate_metrics = {
        "count": "nv_inference_count",
        "success": "nv_inference_request_success",
        "failure": "nv_inference_request_failure",
    }
    for short, metric in rate_metrics.items():
        for level in (Level.MODEL_VERSION_POD, Level.MODEL_VERSION, Level.POD, Level.FLEET):
            table[f"{level.value}:{metric}:rate"] = _rate(short, level)
    table[":nv_inference_count:rate_raw"] = lambda i: raw_total(i.raw("count"), i.keys)
    table[":triton_inference_rate_drift:ratio"] = lambda i: ratio(
        i.level("count", Level.FLEET), raw_total(i.raw("count"), i.keys), i.by()
    )
    table["model_version:nv_inference_batch_size:mean"] = lambda i: ratio(
        i.level("count", Level.MODEL_VERSION), i.level("exec", Level.MODEL_VERSION), i.by(MV)
    )
    table["model_version:nv_cache_hit:ratio"] = _per_request("cache_hits", Level.MODEL_VERSION)
    for phase in catalog.PHASES:
        for level in (Level.MODEL_VERSION, Level.FLEET):
            name = f"{level.value}:nv_inference_{phase}_duration:mean_seconds"
            table[name] = _per_request(f"{phase}_us", level, 1e6)
    table["model_version:triton_servers_active:count"] = _servers_active
    table["pod:triton_models_active:count"] = lambda i: count_positive(
        i.triton("success"), i.by([POD])
    )
    table[":triton_servers_active:count"] = _fleet_servers_active
    table[":triton_model_servers_active:sum"] = _model_servers_sum
    table[":triton_model_concurrency:ratio"] = lambda i: ratio(
        _model_servers_sum(i), _fleet_servers_active(i), i.by()
    )
    for short in ("tensor", "dram", "gr_engine"):
        table[f"gpu_instance:dcgm_{short}_active:avg"] = (lambda s: lambda i: i.slices(s))(short)
    for short in ("tensor", "dram"):
        table[f":dcgm_{short}_active:sum"] = (
            lambda s: lambda i: aggregate(i.slices(s), i.by())
        )(short)
    table[":dcgm_tensor_active:gpu_equivalents"] = lambda i: gpu_equivalents(
        i.slices("tensor"), i.sel, i.keys
    )
    table[":dcgm_mig_slices_idle:count"] = lambda i: idle_count(
        i.slices("tensor_max"), i.sel.idle_threshold, i.keys
    )
    return table


DERIVATIONS: dict[str, Derivation] = _derivations()


def derive_all(
    frames: Mapping[str, pd.DataFrame], sel: Selectors, keys: tuple[str, ...] = ()
) -> dict[str, pd.DataFrame | DeriveError]:
    """Every catalog series from this cycle's frames; a failing series does not stop the others.

    ``frames`` holds the base queries that answered; a series whose inputs are missing comes
    back as a :class:`DeriveError`. With ``keys`` (e.g. ``("timestamp",)`` for range frames)
    every table is computed per key value and carries the key columns first.
    """
    inputs = Inputs(frames, sel, keys)
    out: dict[str, pd.DataFrame | DeriveError] = {}
    for series in catalog.SERIES:
        try:
            table = DERIVATIONS[series.name](inputs)
            columns = [*keys, *series.labels(sel), VALUE]
            out[series.name] = table[columns].reset_index(drop=True)
        except MissingInput as error:
            out[series.name] = DeriveError(series.name, str(error))
        except Exception as error:  # one broken family must not take down the others
            out[series.name] = DeriveError(series.name, f"{type(error).__name__}: {error}")
    return out

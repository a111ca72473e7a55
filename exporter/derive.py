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

Internally a table is a :class:`Table` of numpy arrays (label codes and values), grouped with
``np.unique``/``np.bincount``: a cycle's few dozen groupings and joins on small frames cost a
fixed few milliseconds of pandas overhead each, which would bound the cycle at every fleet
size. Rows and their order are those of pandas' sorted ``groupby`` and inner ``merge``; sums
are float64 sums in row order. DataFrames come in (the base frames) and go out (derive_all,
slice_series).

A live cycle does not wait for every answer: :func:`plan` says which input tables each series
reads, :func:`prepare` computes a base query's tables from its frame alone as it arrives, and
``derive_all(..., prepared=..., only=...)`` derives the series whose queries have all answered.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from exporter import catalog
from exporter.catalog import MODEL, POD, VERSION, Level, Selectors

VALUE = "value"
MV = [MODEL, VERSION]
MVP = [MODEL, VERSION, POD]
_PROFILE_SLICES = re.compile(r"^([1-7])g\.")
_SERVER = re.compile(catalog.SERVER_PATTERN)
#: The dtype pandas gives a column of strings (``str`` in pandas 3): a label the source lacks.
_STR = pd.Series([""]).dtype
#: Combined group keys stay below this; beyond it they are renumbered first (no int64 overflow).
_KEY_LIMIT = 2**62


class MissingInput(Exception):
    """A base query this series needs did not answer in this cycle."""


@dataclass(frozen=True)
class DeriveError:
    series: str
    message: str


def _empty(labels: list[str]) -> pd.DataFrame:
    return pd.DataFrame({**{label: pd.Series([], dtype=object) for label in labels},
                         VALUE: pd.Series([], dtype=float)})


@dataclass(frozen=True)
class Table:
    """A derived table as arrays: per label, row codes into that label's sorted distinct values.

    Grouping then works on integers: a few numpy calls per table, where a pandas groupby or
    merge costs milliseconds of fixed overhead on the small frames of a cycle. Sorted levels
    keep the row order pandas' sorted groupby gave.
    """

    #: label -> int64 row codes (never -1: rows with a missing key are dropped on entry).
    codes: dict[str, np.ndarray]
    #: label -> the distinct values, sorted; ``codes`` index into it.
    levels: dict[str, np.ndarray]
    #: label -> the dtype the column is published with (the source column's).
    dtypes: dict[str, Any]
    value: np.ndarray

    def __len__(self) -> int:
        return len(self.value)

    @property
    def labels(self) -> list[str]:
        return list(self.codes)

    def take(self, rows: np.ndarray) -> Table:
        """The rows selected by a boolean mask or an index array."""
        return Table({k: c[rows] for k, c in self.codes.items()}, self.levels, self.dtypes,
                     self.value[rows])

    def with_value(self, value: np.ndarray) -> Table:
        return Table(self.codes, self.levels, self.dtypes, value)

    def frame(self, labels: list[str]) -> pd.DataFrame:
        """The table as a DataFrame: ``labels`` (KeyError if one is missing), then ``value``."""
        missing = [label for label in labels if label not in self.codes]
        if missing:
            raise KeyError(f"no label column {missing}")
        if not len(self):
            return _empty(labels)
        # The few distinct values become an array once; take() repeats them per row.
        columns: dict[str, Any] = {
            label: pd.array(self.levels[label], dtype=self.dtypes[label]).take(self.codes[label])
            for label in labels
        }
        columns[VALUE] = self.value
        return pd.DataFrame(columns, copy=False)


def _empty_table(labels: list[str]) -> Table:
    none = np.empty(0, dtype=np.int64)
    return Table({k: none for k in labels}, {k: np.empty(0, dtype=object) for k in labels},
                 dict.fromkeys(labels, object), np.empty(0, dtype=np.float64))


def _source(
    frame: pd.DataFrame, columns: Mapping[str, str], fill: Collection[str] = ()
) -> tuple[Table, np.ndarray]:
    """A base frame as a :class:`Table` (label ``out`` <- column ``src``) and the mask of its
    usable rows: finite value and no missing key. Columns named in ``fill`` that the frame
    lacks read as "" (a series without that label)."""
    value = frame[VALUE].to_numpy(dtype=np.float64)
    usable = np.isfinite(value)
    codes: dict[str, np.ndarray] = {}
    levels: dict[str, np.ndarray] = {}
    dtypes: dict[str, Any] = {}
    for out, src in columns.items():
        if src not in frame.columns and src in fill:
            codes[out] = np.zeros(len(frame), dtype=np.int64)
            levels[out] = np.array([""], dtype=object)
            dtypes[out] = _STR
            continue
        column = frame[src]
        row_codes, uniques = _factorize(column)
        usable &= row_codes >= 0  # a missing key: groupby drops the row
        codes[out] = row_codes
        levels[out] = uniques
        dtypes[out] = column.dtype
    return Table(codes, levels, dtypes, value), usable


def _factorize(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Row codes (-1: missing) and the sorted distinct values, in the order pandas' sorted
    groupby uses (code point order for strings)."""
    if isinstance(column.dtype, pd.StringDtype):
        # A dict over the few distinct labels beats pandas' hash table on a cycle's frames.
        values = column.tolist()
        distinct = set(values)
        if all(type(value) is str for value in distinct):  # else missing values: below
            uniques = sorted(distinct)
            position = {value: i for i, value in enumerate(uniques)}
            row_codes = np.fromiter(map(position.__getitem__, values), np.int64, len(values))
            return row_codes, np.array(uniques, dtype=object)
    row_codes, found = pd.factorize(column.to_numpy(), sort=True)
    return row_codes.astype(np.int64, copy=False), np.asarray(found)


def _combine(codes: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """One int64 key per row, ordered like the tuples of codes (mixed radix)."""
    n = len(codes[0]) if codes else 0
    key = np.zeros(n, dtype=np.int64)
    span = 1
    for column, size in zip(codes, sizes, strict=True):
        size = max(size, 1)
        if span * size >= _KEY_LIMIT:
            # Renumber the distinct keys so far (order kept) before the radix overflows.
            _, key = np.unique(key, return_inverse=True)
            span = int(key.max()) + 1 if n else 1
        key = key * size + column
        span *= size
    return key


def _group(table: Table, by: list[str], how: str) -> Table:
    """``how`` (sum or max) by the ``by`` labels; groups in sorted label order."""
    if not len(table):
        return _empty_table(by)
    key = _combine([table.codes[k] for k in by], [len(table.levels[k]) for k in by])
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    groups = len(first)
    if how == "sum":
        with np.errstate(over="ignore"):  # a sum past the float range is +Inf, as in PromQL
            value = np.bincount(inverse, weights=table.value, minlength=groups)
    else:
        value = np.full(groups, -np.inf)
        np.maximum.at(value, inverse, table.value)
    return Table({k: table.codes[k][first] for k in by}, {k: table.levels[k] for k in by},
                 {k: table.dtypes[k] for k in by}, value)


def triton_series(
    frame: pd.DataFrame, sel: Selectors, keys: list[str], extra: tuple[str, ...] = ()
) -> Table:
    """Per (model, version, server as pod, *extra): model-labelled series only, summed within
    each series group of the base query, deduplicated across replicas (the highest kept).

    A base frame has one row per label set (a PromQL vector never repeats one). Its labels that
    ``extra`` does not keep (a failure's reason) are summed away first, per replica, as the
    rule's ``sum by`` does; a frame with no such label needs no sum.
    """
    kept = {*keys, sel.model, sel.version, *sel.servers, *sel.replicas, *extra, VALUE}
    summed_away = any(column not in kept for column in frame.columns)
    labels = [*sel.servers, *(sel.replicas if summed_away else ())]
    source = {MODEL: sel.model, VERSION: sel.version, **{k: k for k in (*labels, *extra)}}
    table, usable = _source(frame, {**{k: k for k in keys}, **source}, fill=source.values())
    # One extra False at the end, for code -1 (no model at all: dropped anyway).
    has_model = np.append(table.levels[MODEL].astype(str) != "", False)
    usable &= has_model[table.codes[MODEL]]
    table = table.take(usable)
    if summed_away:
        table = _group(table, [*keys, MODEL, VERSION, *labels, *extra], "sum")
    # Replica labels are not grouping keys: max over them is the deduplication.
    return _group(_with_server(table, sel.servers), [*keys, *MVP, *extra], "max")


def server_identity(values: tuple[str, ...]) -> str:
    """The first non-empty of a series' server label values, as the rules read them: one label
    is taken as it is; several are joined with ";" and read with catalog.SERVER_PATTERN (left
    as joined where it does not match, as label_replace leaves them)."""
    if len(values) == 1:
        return values[0]
    joined = ";".join(values)
    match = _SERVER.fullmatch(joined)
    return match.group(1) if match else joined


def _with_server(table: Table, servers: list[str]) -> Table:
    """``table`` with a ``pod`` column: the server each row's server labels name."""
    if servers == [POD]:
        return table
    if not len(table):
        return Table({**table.codes, POD: np.empty(0, dtype=np.int64)},
                     {**table.levels, POD: np.empty(0, dtype=object)},
                     {**table.dtypes, POD: _STR}, table.value)
    # The few distinct label combinations, each named once.
    key = _combine([table.codes[k] for k in servers], [len(table.levels[k]) for k in servers])
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    values = [table.levels[k][table.codes[k][first]].astype(str) for k in servers]
    if any(np.char.find(v, ";").max(initial=-1) >= 0 for v in values):
        # A value with the join's separator: read the joined text as the rules do.
        names = np.array([server_identity(combo) for combo in zip(*values, strict=True)],
                         dtype=object)
    else:
        names = values[-1]
        for value in reversed(values[:-1]):
            names = np.where(value != "", value, names)
    uniques, codes = np.unique(names.astype(str), return_inverse=True)
    codes = codes.astype(np.int64)[inverse]
    return Table({**table.codes, POD: codes},
                 {**table.levels, POD: uniques.astype(object)},
                 {**table.dtypes, POD: _STR}, table.value)


def raw_total(frame: pd.DataFrame, keys: list[str]) -> Table:
    """The sum over every series, duplicated or unlabelled: the naive fleet figure."""
    table, usable = _source(frame, {k: k for k in keys})
    return aggregate(table.take(usable), keys)


def _slice_table(frame: pd.DataFrame, sel: Selectors, keys: list[str]) -> Table:
    source = {**{k: k for k in sel.slice_labels}, POD: sel.dcgm_pod}
    table, usable = _source(frame, {**{k: k for k in keys}, **source}, fill=source.values())
    return _group(table.take(usable), [*keys, *sel.slice_labels, POD], "max")


def slice_series(frame: pd.DataFrame, sel: Selectors, keys: list[str]) -> pd.DataFrame:
    """Per MIG slice (+ workload pod): deduplicated across replicas."""
    return _slice_table(frame, sel, keys).frame([*keys, *sel.slice_labels, POD])


def aggregate(table: Table, by: list[str]) -> Table:
    """sum by (by): an empty input stays empty (PromQL sum of nothing is absent)."""
    if not len(table):
        return _empty_table(by)
    if not by:
        with np.errstate(over="ignore"):
            return Table({}, {}, {}, np.array([float(table.value.sum())]))
    return _group(table, by, "sum")


def ratio(num: Table, den: Table, by: list[str], scale: float = 1.0) -> Table:
    """num / den / scale where both exist and den > 0 (absent otherwise); rows in num's order.

    Both are aggregates by ``by`` (one row per label tuple), as every caller passes.
    """
    if not len(num) or not len(den):
        return _empty_table(by)
    den = den.take(den.value > 0)
    if not len(den):
        return _empty_table(by)
    if not by:
        num, den = num.take(np.arange(1)), den.take(np.arange(1))
    matched = _rows_of(num, den, by)
    found = matched >= 0
    num = num.take(found)
    den_value = den.value[matched[found]]
    with np.errstate(over="ignore", under="ignore"):  # overflow is +Inf, dropped below
        out = num.with_value(num.value / den_value / scale)
    # A tiny denominator can still overflow to +Inf: never published.
    return out.take(np.isfinite(out.value))


def _recode(levels: np.ndarray, into: np.ndarray) -> np.ndarray:
    """Each of ``levels``' positions in ``into`` (-1 where absent)."""
    if levels is into or (len(levels) == len(into) and bool(np.all(levels == into))):
        return np.arange(len(levels))  # the usual case: both from the same fleet
    positions: np.ndarray = pd.Index(into).get_indexer(levels)
    return positions


def minus(left: Table, right: Table, by: list[str]) -> Table:
    """left - (right or left * 0): right subtracted where it has the row, else nothing."""
    if not len(right) or not len(left):
        return left
    matched = _rows_of(left, right, by)
    found = matched >= 0
    value = left.value.copy()
    value[found] -= right.value[matched[found]]
    return left.with_value(value)


def _rows_of(table: Table, other: Table, by: list[str]) -> np.ndarray:
    """For each row of ``table``, the row of ``other`` with the same ``by`` labels (-1: none).
    ``other``'s label tuples are unique."""
    if not by:
        return np.zeros(len(table), dtype=np.int64) if len(other) else np.full(len(table), -1)
    # other's codes renumbered into table's levels (-1: a value table lacks, never joined).
    mapped = {k: _recode(other.levels[k], table.levels[k])[other.codes[k]] for k in by}
    joinable = np.logical_and.reduce([c >= 0 for c in mapped.values()])
    rows = len(table)
    keys = _combine([np.concatenate([table.codes[k], mapped[k][joinable]]) for k in by],
                    [len(table.levels[k]) for k in by])
    # One key space for both sides, so equal label tuples get equal keys.
    left, right = keys[:rows], keys[rows:]
    out = np.full(rows, -1, dtype=np.int64)
    if not len(right):
        return out
    order = np.argsort(right)
    at = order[np.searchsorted(right, left, sorter=order).clip(max=len(right) - 1)]
    found = right[at] == left
    out[found] = np.flatnonzero(joinable)[at[found]]
    return out


def count_positive(table: Table, by: list[str]) -> Table:
    """sum by (by) (table > bool 0): how many rows per group had a positive figure."""
    if not len(table):
        return _empty_table(by)
    return aggregate(table.with_value((table.value > 0).astype(float)), by)


def gpu_equivalents(slices: Table, sel: Selectors, keys: list[str]) -> Table:
    """Sum of activity x (n/7) for an ``<n>g.*`` profile, x 1 for a whole GPU (no profile)."""
    if not len(slices):
        return _empty_table(keys)
    if sel.profile in slices.codes:
        levels = slices.levels[sel.profile]
        per_level = np.array([_profile_weight(str(p)) for p in levels], dtype=np.float64)
        weights = per_level[slices.codes[sel.profile]]
    else:
        weights = np.ones(len(slices))
    known = ~np.isnan(weights)
    weighted = slices.take(known)
    return aggregate(once_per_slice(weighted.with_value(weighted.value * weights[known]), sel,
                                    keys), keys)


def once_per_slice(slices: Table, sel: Selectors, keys: list[str]) -> Table:
    """One row per MIG slice: a slice shared by several pods has a row per pod, all equal."""
    if not len(slices):
        return _empty_table([*keys, *sel.slice_labels])
    return _group(slices, [*keys, *sel.slice_labels], "max")


def _profile_weight(profile: str) -> float:
    if profile == "":
        return 1.0
    match = _PROFILE_SLICES.match(profile)
    # Profiles we cannot read are left out, as the rule's regex alternatives leave them out.
    return int(match.group(1)) / catalog.MIG_SLICES_PER_GPU if match else math.nan


def idle_count(slice_max: Table, threshold: float, keys: list[str]) -> Table:
    """How many slices stayed under ``threshold`` for the window (0 when none; absent if none)."""
    if not len(slice_max):
        return _empty_table(keys)
    return aggregate(slice_max.with_value((slice_max.value < threshold).astype(float)), keys)


#: One normalised input table: (kind, base query), e.g. ``("triton", "count")``,
#: ``("level:model_version", "success")``, ``("slices", "tensor")``, ``("raw", "count")``.
Need = tuple[str, str]


class Inputs:
    """The base frames of one cycle, normalised on first use and cached.

    ``keys`` are extra columns every table keeps as a grouping key: none for a live cycle,
    ``timestamp`` when the frames come from range queries (the historical report).
    """

    def __init__(
        self,
        frames: Mapping[str, pd.DataFrame],
        sel: Selectors,
        keys: tuple[str, ...] = (),
        prepared: Mapping[Need, Table] | None = None,
    ) -> None:
        self._frames = frames
        self.sel = sel
        self.keys = list(keys)
        self._cache: dict[Need, Table] = dict(prepared or {})

    def by(self, labels: list[str] | tuple[str, ...] = ()) -> list[str]:
        return [*self.keys, *labels]

    def raw(self, name: str) -> pd.DataFrame:
        frame = self._frames.get(name)
        if frame is None:
            raise MissingInput(f"base query {name!r} did not answer")
        return frame

    def _cached(self, kind: str, name: str, make: Callable[[], Table]) -> Table:
        key = (kind, name)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def triton(self, name: str, extra: tuple[str, ...] = ()) -> Table:
        kind = "+".join(("triton", *extra))
        return self._cached(
            kind, name, lambda: triton_series(self.raw(name), self.sel, self.keys, extra)
        )

    def slices(self, name: str) -> Table:
        return self._cached(
            "slices", name, lambda: _slice_table(self.raw(name), self.sel, self.keys)
        )

    def raw_total(self, name: str) -> Table:
        return self._cached("raw", name, lambda: raw_total(self.raw(name), self.keys))

    def level(self, name: str, level: Level) -> Table:
        labels = catalog.LEVEL_LABELS[level]
        extra = tuple(label for label in labels if label not in MVP)
        return self._cached(f"level:{level.value}", name,
                            lambda: aggregate(self.triton(name, extra), self.by(labels)))

    def need(self, need: Need) -> Table:
        """The table a :data:`Need` names (``("level:pod", "success")``...)."""
        kind, name = need
        if kind.startswith("level:"):
            return self.level(name, Level(kind.removeprefix("level:")))
        if kind.startswith("triton"):
            return self.triton(name, tuple(kind.split("+")[1:]))
        readers: dict[str, Callable[[str], Table]] = {
            "slices": self.slices, "raw": self.raw_total,
        }
        return readers[kind](name)


class _Recorder(Inputs):
    """Inputs over empty frames that note every table a derivation asks for."""

    def __init__(self, sel: Selectors) -> None:
        super().__init__({}, sel)
        self.asked: set[Need] = set()

    def raw(self, name: str) -> pd.DataFrame:
        return pd.DataFrame({VALUE: np.empty(0, dtype=np.float64)})

    def _cached(self, kind: str, name: str, make: Callable[[], Table]) -> Table:
        self.asked.add((kind, name))
        return super()._cached(kind, name, make)


Derivation = Callable[[Inputs], Table]


def _rate(short: str, level: Level) -> Derivation:
    return lambda i: i.level(short, level)


def _per_request(short: str, level: Level, scale: float = 1.0) -> Derivation:
    labels = catalog.LEVEL_LABELS[level]
    return lambda i: ratio(i.level(short, level), i.level("success", level), i.by(labels), scale)


class Unidentified(Exception):
    """Model-labelled series carry none of the server labels: servers cannot be counted."""


def _identified(i: Inputs) -> Table:
    """The per-server successes, when every one names its server."""
    table = i.triton("success")
    if len(table):
        unnamed = int(np.count_nonzero(table.levels[POD][table.codes[POD]] == ""))
        if unnamed:
            raise Unidentified(
                f"servers cannot be told apart: {unnamed} model series carry none of the "
                f"server labels {', '.join(i.sel.servers)} (set triton.server_labels)"
            )
    return table


def _servers_active(i: Inputs) -> Table:
    return count_positive(_identified(i), i.by(MV))


def _fleet_servers_active(i: Inputs) -> Table:
    _identified(i)
    return count_positive(i.level("success", Level.POD), i.by())


def _executed(level: Level) -> Derivation:
    labels = catalog.LEVEL_LABELS[level]
    return lambda i: minus(i.level("success", level), i.level("cache_hits", level),
                           i.by(labels))


def _per_executed(short: str, level: Level, scale: float) -> Derivation:
    labels = catalog.LEVEL_LABELS[level]
    executed = _executed(level)
    return lambda i: ratio(i.level(short, level), executed(i), i.by(labels), scale)


def _model_servers_sum(i: Inputs) -> Table:
    return aggregate(_servers_active(i), i.by())


def _derivations() -> dict[str, Derivation]:
    table: dict[str, Derivation] = {}
    rate_metrics = {
        "count": "nv_inference_count",
        "success": "nv_inference_request_success",
        "failure": "nv_inference_request_failure",
    }
    per_server = (Level.MODEL_VERSION_POD, Level.MODEL_VERSION, Level.POD, Level.FLEET)
    for short, metric in rate_metrics.items():
        for level in per_server:
            table[f"{level.value}:{metric}:rate"] = _rate(short, level)
    for level in (Level.MODEL_VERSION_REASON, Level.REASON):
        table[f"{level.value}:nv_inference_request_failure:rate"] = _rate("failure", level)
    for level in per_server:
        table[f"{level.value}:nv_inference_pending_request_count:avg"] = _rate("pending", level)
    table[":nv_inference_count:rate_raw"] = lambda i: i.raw_total("count")
    table[":triton_inference_rate_drift:ratio"] = lambda i: ratio(
        i.level("count", Level.FLEET), i.raw_total("count"), i.by()
    )
    table["model_version:nv_inference_batch_size:mean"] = lambda i: ratio(
        i.level("count", Level.MODEL_VERSION), i.level("exec", Level.MODEL_VERSION), i.by(MV)
    )
    table["model_version:nv_cache_hit:ratio"] = _per_request("cache_hits", Level.MODEL_VERSION)
    for level in (Level.MODEL_VERSION, Level.FLEET):
        table[f"{level.value}:triton_requests_executed:rate"] = _executed(level)
    for phase in catalog.PHASES:
        for level in (Level.MODEL_VERSION, Level.FLEET):
            name = f"{level.value}:nv_inference_{phase}_duration:mean_seconds"
            per = _per_executed if phase.startswith("compute") else _per_request
            table[name] = per(f"{phase}_us", level, 1e6)
    table["model_version:triton_servers_active:count"] = _servers_active
    table["pod:triton_models_active:count"] = lambda i: count_positive(
        _identified(i), i.by([POD])
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
            lambda s: lambda i: aggregate(once_per_slice(i.slices(s), i.sel, i.keys), i.by())
        )(short)
    table[":dcgm_tensor_active:gpu_equivalents"] = lambda i: gpu_equivalents(
        i.slices("tensor"), i.sel, i.keys
    )
    table[":dcgm_mig_slices_idle:count"] = lambda i: idle_count(
        once_per_slice(i.slices("tensor_max"), i.sel, i.keys), i.sel.idle_threshold, i.keys
    )
    return table


DERIVATIONS: dict[str, Derivation] = _derivations()


@dataclass(frozen=True)
class Plan:
    """What each series reads: which input tables, hence which base queries.

    Lets a cycle prepare a base query's tables as soon as its answer arrives, and derive a
    series as soon as every base query it reads has answered, while other queries are still
    in flight.
    """

    #: series name -> the input tables its derivation reads.
    needs: Mapping[str, frozenset[Need]]

    def tables_of(self, name: str) -> list[Need]:
        """The input tables read from base query ``name``, in a stable order."""
        return sorted({need for needs in self.needs.values() for need in needs
                       if need[1] == name})

    def queries_of(self, series: str) -> frozenset[str]:
        """The base queries series ``series`` reads."""
        return frozenset(name for _, name in self.needs[series])


def plan(sel: Selectors) -> Plan:
    """Every derivation run once over empty frames, noting the tables it reads.

    Each derivation reads its inputs whatever their contents (they are its arguments), so
    empty frames show them all. A table missed here would only be computed later, from the
    frame, by :func:`derive_all`: slower, never different.
    """
    needs: dict[str, frozenset[Need]] = {}
    for series in catalog.SERIES:
        recorder = _Recorder(sel)
        # What was asked before a failure is still noted.
        with contextlib.suppress(Exception):
            DERIVATIONS[series.name](recorder)
        needs[series.name] = frozenset(recorder.asked)
    return Plan(needs)


def prepare(
    name: str,
    frame: pd.DataFrame,
    sel: Selectors,
    tables: Collection[Need],
    keys: tuple[str, ...] = (),
) -> dict[Need, Table]:
    """The input ``tables`` of base query ``name`` computed from its frame alone (as its answer
    arrives), for :func:`derive_all`'s ``prepared``.

    A table that cannot be computed is left out: derive_all then computes it again and reports
    the failure on each series that reads it, as without preparation.
    """
    inputs = Inputs({name: frame}, sel, keys)
    out: dict[Need, Table] = {}
    for need in tables:
        if need[1] != name:
            continue
        try:
            out[need] = inputs.need(need)
        except Exception:  # reported by derive_all, per series
            continue
    return out


def derive_all(
    frames: Mapping[str, pd.DataFrame],
    sel: Selectors,
    keys: tuple[str, ...] = (),
    *,
    prepared: Mapping[Need, Table] | None = None,
    only: Collection[str] | None = None,
    nonfinite: dict[str, int] | None = None,
) -> dict[str, pd.DataFrame | DeriveError]:
    """Every catalog series from this cycle's frames; a failing series does not stop the others.

    ``frames`` holds the base queries that answered; a series whose inputs are missing comes
    back as a :class:`DeriveError`. With ``keys`` (e.g. ``("timestamp",)`` for range frames)
    every table is computed per key value and carries the key columns first.

    ``prepared``: input tables already computed from these frames (:func:`prepare`, same
    ``keys``), used instead of computing them again. ``only``: derive just these series
    (catalog order kept), e.g. those whose base queries have all answered.

    A figure that is not finite (a sum past the float range, Inf - Inf) is dropped, never
    published; ``nonfinite`` gets the number dropped per series.
    """
    inputs = Inputs(frames, sel, keys, prepared)
    out: dict[str, pd.DataFrame | DeriveError] = {}
    for series in catalog.SERIES:
        if only is not None and series.name not in only:
            continue
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: dropped below
                table = DERIVATIONS[series.name](inputs)
            finite = np.isfinite(table.value)
            if not finite.all():
                if nonfinite is not None:
                    nonfinite[series.name] = int(np.count_nonzero(~finite))
                table = table.take(finite)
            out[series.name] = table.frame([*keys, *series.labels(sel)])
        except (MissingInput, Unidentified) as error:  # said as it is: no internal failure
            out[series.name] = DeriveError(series.name, str(error))
        except Exception as error:  # one broken family must not take down the others
            out[series.name] = DeriveError(series.name, f"{type(error).__name__}: {error}")
    return out

"""Range queries per chunk, retried; derive per chunk; the derived tables of the whole range.

The queries are the catalog's fixed :data:`~exporter.catalog.BASE_QUERIES` as range queries
(never one per model or slice), so a week at 60 s with 6 h chunks is 28 x 14 queries whatever
the fleet's size. Each chunk is derived as soon as it arrives (every derivation groups by the
timestamp, so chunks are independent) and only the derived tables are kept.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import pandas as pd
from tqdm import tqdm

from exporter import catalog, derive
from exporter.catalog import BaseQuery, Selectors
from exporter.report.table import SLICE_IDLE, TIMESTAMP, VALUE
from exporter.report.times import format_time
from exporter.upstream import QueryResult, UpstreamError

__all__ = ["Collected", "RangeQuerier", "ReportFetchError", "collect", "progress_bar"]

#: Failures worth another attempt: the upstream may come back. A refused query (4xx, bad
#: PromQL, an answer over max_response_bytes) fails the same way every time.
RETRYABLE = frozenset({"connection", "timeout", "http_5xx"})
KEYS = (TIMESTAMP,)


class RangeQuerier(Protocol):
    """What the report needs from the upstream (``PrometheusClient`` is one)."""

    def range(self, query: str, start: float, end: float, step: float) -> QueryResult: ...


class ReportFetchError(Exception):
    """A chunk failed after its retries; the message names the chunk, its span and the query."""

    def __init__(self, message: str, chunk: int, span: tuple[float, float], query: str) -> None:
        super().__init__(message)
        self.chunk = chunk
        self.span = span
        self.query = query


@dataclass
class Collected:
    """The derived tables of the whole range, and what went wrong without stopping it."""

    derived: dict[str, pd.DataFrame] = field(default_factory=dict)
    #: series -> derive error message (the series is absent from the report).
    errors: dict[str, str] = field(default_factory=dict)
    #: upstream warnings (deduplicated, in order of arrival).
    warnings: list[str] = field(default_factory=list)
    queries: int = 0
    retries: int = 0


def progress_bar(total: int, quiet: bool, stream: IO[str] | None = None) -> tqdm[Any]:
    """A chunks x queries bar on ``stream`` (stderr); off with ``quiet`` or when not a TTY."""
    out = sys.stderr if stream is None else stream
    isatty = getattr(out, "isatty", None)
    enabled = not quiet and callable(isatty) and bool(isatty())
    bar: tqdm[Any] = tqdm(total=total, file=out, disable=not enabled, unit="query",
                          desc="report", dynamic_ncols=True, leave=False)
    return bar


def _query(
    querier: RangeQuerier,
    query: BaseQuery,
    promql: str,
    index: int,
    spans: list[tuple[float, float]],
    step: float,
    retries: int,
    backoff: float,
    sleep: Callable[[float], None],
    collected: Collected,
) -> QueryResult:
    start, end = spans[index]
    attempt = 0
    while True:
        try:
            return querier.range(promql, start, end, step)
        except UpstreamError as error:
            if error.reason not in RETRYABLE or attempt >= retries:
                hint = ""
                if error.reason == "too_large":
                    hint = "; use a shorter --chunk (or raise upstream.max_response_bytes)"
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                message = (
                    f"chunk {index + 1}/{len(spans)} ({format_time(start)} .. "
                    f"{format_time(end)}) failed after {tries}: base query {query.name}: "
                    f"{error}{hint}"
                )
                raise ReportFetchError(message, index + 1, (start, end), query.name) from error
            sleep(backoff * 2**attempt)
            attempt += 1
            collected.retries += 1


def _append(parts: dict[str, list[pd.DataFrame]], name: str, table: pd.DataFrame) -> None:
    bucket = parts.setdefault(name, [])
    # Keep one empty table (for its columns) but never concatenate empties with data.
    if not table.empty or not bucket:
        bucket.append(table)


def _concat(tables: list[pd.DataFrame]) -> pd.DataFrame:
    filled = [t for t in tables if not t.empty]
    if not filled:
        return tables[0]
    if len(filled) == 1:
        return filled[0]
    return pd.concat(filled, ignore_index=True)


def slice_idle(frames: Mapping[str, pd.DataFrame], sel: Selectors) -> pd.DataFrame:
    """Per slice and step: 1 when its tensor activity stayed under the idle threshold all window.

    The flag ``:dcgm_mig_slices_idle:count`` sums, from the same deduplicated per-slice maxima
    (``derive.slice_series`` of the ``tensor_max`` query).
    """
    maxima = derive.slice_series(frames["tensor_max"], sel, list(KEYS))
    flags = (maxima[VALUE] < sel.idle_threshold).astype(float)
    return maxima.assign(**{VALUE: flags})


def collect(
    querier: RangeQuerier,
    sel: Selectors,
    spans: list[tuple[float, float]],
    step: float,
    *,
    retries: int = 2,
    backoff: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    bar: tqdm[Any] | None = None,
    on_query: Callable[[int, str], None] | None = None,
    keep: Collection[str] | None = None,
) -> Collected:
    """Query every chunk, derive it, and gather the derived tables of the whole range.

    A query that fails with a retryable error is retried ``retries`` times, waiting
    ``backoff * 2**n`` seconds before retry n+1; one that still fails raises
    :class:`ReportFetchError` and nothing is returned. ``on_query(chunk, name)`` is called
    after each successful query (chunk counts from 1). ``keep`` limits the derived tables kept
    across chunks to those series (the per-pod ones are the largest and the table has no use
    for them); ``None`` keeps all.
    """
    collected = Collected()
    parts: dict[str, list[pd.DataFrame]] = {}
    seen_warnings: set[str] = set()
    promql = {q.name: q.promql(sel) for q in catalog.BASE_QUERIES}
    for index in range(len(spans)):
        frames: dict[str, pd.DataFrame] = {}
        for query in catalog.BASE_QUERIES:
            result = _query(querier, query, promql[query.name], index, spans, step, retries,
                            backoff, sleep, collected)
            collected.queries += 1
            frames[query.name] = result.frame
            for warning in result.warnings:
                if warning not in seen_warnings:
                    seen_warnings.add(warning)
                    collected.warnings.append(warning)
            if bar is not None:
                bar.update(1)
            if on_query is not None:
                on_query(index + 1, query.name)
        for name, table in derive.derive_all(frames, sel, keys=KEYS).items():
            if isinstance(table, derive.DeriveError):
                collected.errors.setdefault(name, table.message)
            elif keep is None or name in keep:
                _append(parts, name, table)
        _append(parts, SLICE_IDLE, slice_idle(frames, sel))
    collected.derived = {
        name: _concat(tables) for name, tables in parts.items()
        if name not in collected.errors
    }
    return collected

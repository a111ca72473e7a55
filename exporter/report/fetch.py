"""Range queries per chunk, retried and run concurrently; derive per chunk; the derived tables.

The queries are the catalog's fixed :data:`~exporter.catalog.BASE_QUERIES` as range queries
(never one per model or slice), so a week at 60 s with 6 h chunks is 28 x 14 queries whatever
the fleet's size. Up to ``concurrency`` of them are in flight at once (the exporter's
``upstream.concurrency``), the next chunk's already while the last one is derived. Each chunk is
derived as soon as it arrives (every derivation groups by the timestamp, so chunks are
independent) and only the derived tables are kept.

The table shows Triton figures per model version and over the fleet only; per server it needs
just the successes (servers active). So the base queries it reads only per model version
(:data:`NARROW`) are asked for per model version: the upstream deduplicates the replicas per
pod (``max by``), exactly as ``exporter.derive`` does, and sums the pods, instead of returning
every (model, version, pod) series.

Those deduplicating forms cost the upstream most of its time: each grouping per (model, version,
pod) is built at every step (a 6 h chunk of fleet L: 0.23 s for the deduplicated form of one
family, 0.06 s for ``sum by (model, version)``). Deduplication changes nothing when every series
of a family carries one and the same replica label set, so the :data:`FAST` queries are first
asked as ``sum by (model, version, <replica labels>)`` of the rate: if the answer holds a single
replica label set it is exact (``count``'s raw rate is then the sum of its rows); if it holds
more, the query is asked again in the deduplicating form.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import pandas as pd
from tqdm import tqdm

from exporter import catalog, derive
from exporter.catalog import PHASES, BaseQuery, Level, Selectors
from exporter.report.command import Stopped
from exporter.report.table import SLICE_IDLE, TIMESTAMP, VALUE
from exporter.report.times import format_time
from exporter.upstream import QueryResult, UpstreamError

__all__ = [
    "FAST",
    "NARROW",
    "Collected",
    "RangeQuerier",
    "ReportFetchError",
    "collect",
    "fast_queries",
    "one_replica",
    "progress_bar",
    "report_queries",
]

#: Failures worth another attempt: the upstream may come back. A refused query (4xx, bad
#: PromQL, an answer over max_response_bytes) fails the same way every time.
RETRYABLE = frozenset({"connection", "timeout", "http_5xx"})
KEYS = (TIMESTAMP,)
#: Base queries the report reads only per model version (and summed over the fleet). ``count``
#: stays per pod (the raw rate sums every series, before deduplication) and so does
#: ``success`` (servers active count pods).
NARROW: frozenset[str] = frozenset(
    {"failure", "exec", "cache_hits", "pending", *(f"{phase}_us" for phase in PHASES)}
)
#: Base queries first asked summed per (model, version) and replica label set
#: (:func:`fast_queries`); the per-pod series of ``count`` are then not derivable either.
FAST: frozenset[str] = NARROW | {"count"}


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


Pending = list[tuple[BaseQuery, "Future[QueryResult]"]]


class _Abandoned(Exception):
    """A query not sent because another one of the report already failed for good."""


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


def report_queries(sel: Selectors, narrow: bool = True) -> dict[str, str]:
    """The PromQL the report sends per base query (catalog order).

    With ``narrow`` the :data:`NARROW` queries wrap the catalog's query (per model, version,
    pod and replica) in ``max by (model, version, pod)`` -- the replica deduplication of
    ``derive.triton_series`` -- and ``sum by (model, version)``: per model version and over the
    fleet every figure is the same; per pod those series are then absent (not derivable).
    """
    out: dict[str, str] = {}
    for query in catalog.BASE_QUERIES:
        promql = query.promql(sel)
        if narrow and query.name in NARROW:
            mv = sel.join([sel.model, sel.version, *query.extra])
            servers = sel.join([sel.model, sel.version, *sel.servers, *query.extra])
            promql = f"sum by ({mv}) (max by ({servers}) ({promql}))"
        out[query.name] = promql
    return out


def fast_queries(sel: Selectors) -> dict[str, str]:
    """The :data:`FAST` queries' cheap form: the rate summed per (model, version) and replica
    label set, with no grouping per pod in between.

    Exact when the answer holds one replica label set (:func:`one_replica`): each (model,
    version, pod) then has one replica, whose figure the deduplication keeps, and the sum of the
    answer's rows (series without a model label included) is ``count``'s raw rate.
    """
    return {
        query.name: f"sum by ({sel.join([sel.model, sel.version, *sel.replicas, *query.extra])})"
                    f" ({query.function}({query.metric}{{{sel.triton}}}[{sel.window}]))"
        for query in catalog.BASE_QUERIES if query.name in FAST
    }


def one_replica(frame: pd.DataFrame, replicas: Collection[str]) -> bool:
    """Whether every row of a :func:`fast_queries` answer has the same replica label set (a
    label a series lacks reads as "")."""
    present = [label for label in replicas if label in frame.columns]
    if frame.empty or not present:
        return True
    # One label set exactly when each label has one value (no row-wise de-duplication).
    return all(frame[label].nunique(dropna=False) <= 1 for label in present)


def _per_pod(narrowed: Collection[str]) -> frozenset[str]:
    """Series that would need a narrowed query per pod: not derivable from narrowed answers."""
    return frozenset(
        s.name for s in catalog.SERIES
        if s.level in (Level.MODEL_VERSION_POD, Level.POD) and set(s.inputs) & set(narrowed)
    )


def progress_bar(total: int, quiet: bool, stream: IO[str] | None = None) -> tqdm[Any]:
    """A chunks x queries bar on ``stream`` (stderr); off with ``quiet`` or when not a TTY."""
    out = sys.stderr if stream is None else stream
    isatty = getattr(out, "isatty", None)
    enabled = not quiet and callable(isatty) and bool(isatty())
    bar: tqdm[Any] = tqdm(total=total, file=out, disable=not enabled, unit="query",
                          desc="report", dynamic_ncols=True, leave=False)
    return bar


class _Fetcher:
    """Runs one query of one chunk with its retries; shared by the pool's threads."""

    def __init__(self, querier: RangeQuerier, spans: list[tuple[float, float]], step: float,
                 retries: int, backoff: float, sleep: Callable[[float], None],
                 replicas: Collection[str] = ()) -> None:
        self.querier = querier
        self.replicas = list(replicas)
        self.spans = spans
        self.step = step
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.lock = threading.Lock()
        self.retried = 0
        #: Fast answers with several replica label sets, asked again deduplicated.
        self.again = 0
        #: The first query to fail for good; once set, queries not yet sent are abandoned.
        self.failed: ReportFetchError | None = None

    def __call__(self, query: BaseQuery, promql: str, index: int,
                 fallback: str | None = None) -> QueryResult:
        """``promql``'s answer; with a ``fallback`` (``promql`` a fast form), the fallback's
        when the fast answer holds more than one replica label set."""
        result = self._ask(query, promql, index)
        if fallback is None or one_replica(result.frame, self.replicas):
            return result
        with self.lock:
            self.again += 1
        return self._ask(query, fallback, index)

    def _ask(self, query: BaseQuery, promql: str, index: int) -> QueryResult:
        start, end = self.spans[index]
        attempt = 0
        while True:
            if self.failed is not None:
                raise _Abandoned(query.name)
            try:
                return self.querier.range(promql, start, end, self.step)
            except UpstreamError as error:
                if error.reason not in RETRYABLE or attempt >= self.retries:
                    raise self._fail(error, query, index, attempt) from error
            self.sleep(self.backoff * 2**attempt)
            attempt += 1
            with self.lock:
                self.retried += 1

    def _fail(self, error: UpstreamError, query: BaseQuery, index: int,
              attempt: int) -> ReportFetchError:
        start, end = self.spans[index]
        hint = ""
        if error.reason == "too_large":
            hint = "; use a shorter --chunk (or raise upstream.max_response_bytes)"
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        message = (
            f"chunk {index + 1}/{len(self.spans)} ({format_time(start)} .. "
            f"{format_time(end)}) failed after {tries}: base query {query.name}: "
            f"{error}{hint}"
        )
        failure = ReportFetchError(message, index + 1, (start, end), query.name)
        with self.lock:
            if self.failed is None:
                self.failed = failure
        return failure


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


@contextmanager
def _shut_down(pool: ThreadPoolExecutor) -> Iterator[None]:
    """Shut ``pool`` down on the way out: after waiting for the queries in flight, unless the
    report was stopped by a signal (the command then leaves without them)."""
    try:
        yield
    except Stopped:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


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
    concurrency: int = 1,
    narrow: bool = True,
    fast: bool = True,
    on_chunk: Callable[[int, Mapping[str, pd.DataFrame]], None] | None = None,
    hold: bool = True,
) -> Collected:
    """Query every chunk, derive it, and gather the derived tables of the whole range.

    Up to ``concurrency`` queries are in flight at once; the next chunk's are sent while a
    chunk is derived. A query that fails with a retryable error is retried ``retries`` times,
    waiting ``backoff * 2**n`` seconds before retry n+1; one that still fails raises
    :class:`ReportFetchError` (the first failing query of the earliest chunk that failed;
    queries not yet sent are not sent) and nothing is returned. ``on_query(chunk, name)`` is
    called after each successful query (chunk counts from 1, in catalog order per chunk).
    ``keep`` limits the derived tables kept across chunks to those series (the per-pod ones are
    the largest and the table has no use for them); ``None`` keeps all. ``narrow`` asks for the
    :data:`NARROW` queries per model version (:func:`report_queries`), and with ``fast`` for
    the :data:`FAST` ones first in their cheap form (:func:`fast_queries`; asked again
    deduplicated when the answer holds several replica label sets, each such query counted in
    ``queries``); the per-pod series that would need them are then left out.
    ``on_chunk(index, tables)`` receives each chunk's derived tables (those in ``keep``; chunk
    counts from 0) as soon as it is derived; with ``hold=False`` nothing is held across chunks
    (``derived`` stays empty) and memory stays that of a chunk or two.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    collected = Collected()
    parts: dict[str, list[pd.DataFrame]] = {}
    seen_warnings: set[str] = set()
    promql = report_queries(sel, narrow)
    cheap = fast_queries(sel) if narrow and fast else {}
    skipped = _per_pod(cheap.keys() | NARROW) if narrow else frozenset()
    fetch = _Fetcher(querier, spans, step, retries, backoff, sleep, sel.replicas)

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="report")
    with _shut_down(pool):

        def submit(index: int) -> Pending:
            return [(q, pool.submit(fetch, q, cheap[q.name], index, promql[q.name])
                     if q.name in cheap else pool.submit(fetch, q, promql[q.name], index))
                    for q in catalog.BASE_QUERIES]

        def gather(index: int, pending: Pending) -> dict[str, pd.DataFrame]:
            frames: dict[str, pd.DataFrame] = {}
            for query, future in pending:
                try:
                    result = future.result()
                except _Abandoned:
                    continue
                except ReportFetchError:
                    raise
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
            if fetch.failed is not None:  # a later chunk failed; this one was cut short
                raise fetch.failed
            return frames

        try:
            pending = submit(0) if spans else []
            for index in range(len(spans)):
                following = submit(index + 1) if index + 1 < len(spans) else []
                frames = gather(index, pending)
                pending = following
                tables: dict[str, pd.DataFrame] = {}
                for name, table in derive.derive_all(frames, sel, keys=KEYS).items():
                    if name in skipped:
                        continue
                    if isinstance(table, derive.DeriveError):
                        collected.errors.setdefault(name, table.message)
                    else:
                        tables[name] = table
                tables[SLICE_IDLE] = slice_idle(frames, sel)
                del frames
                if on_chunk is not None:
                    on_chunk(index, {name: table for name, table in tables.items()
                                     if keep is None or name in keep or name == SLICE_IDLE})
                for name, table in tables.items():
                    if hold and (keep is None or name in keep):
                        _append(parts, name, table)
        except BaseException:
            # Ctrl-C or a failure: send nothing more, wait only for what is in flight.
            with fetch.lock:
                if fetch.failed is None:
                    fetch.failed = ReportFetchError("stopped", 0, (0.0, 0.0), "")
            raise
    collected.retries = fetch.retried
    collected.queries += fetch.again
    collected.derived = {
        name: _concat(tables) for name, tables in parts.items()
        if name not in collected.errors
    }
    return collected

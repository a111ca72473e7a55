"""The cycle: query the upstream at one pinned instant, derive, publish. And its schedule.

One cycle at a time: APScheduler runs the job with ``max_instances=1`` and ``coalesce=True``,
so a slow cycle makes the scheduler skip ticks (counted as missed) instead of queueing them. A
cycle ends by its deadline (:func:`cycle_deadline`), whatever the upstream does.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor, as_completed, wait
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.background import BackgroundScheduler

from exporter import catalog, derive, upstream
from exporter.catalog import Selectors
from exporter.config import Config
from exporter.publish import Publisher, RenderedFamily, SelfMetrics, render_family
from exporter.upstream import NOT_SENT, Querier, QueryResult, UpstreamError

log = logging.getLogger(__name__)


def unreachable(error: UpstreamError) -> bool:
    """Whether ``error`` says the upstream cannot be reached at all (refused, not resolved, its
    certificate refused: a connection error with a hint), not that one query failed. A timeout
    or an answer cut short may be that query's alone; the cycle's deadline bounds the rest."""
    return error.reason == "connection" and error.hint is not None


#: What a query cut by its cycle's deadline says of it.
CYCLE_DEADLINE = ("the cycle's deadline (the longer of evaluation.interval and "
                  "(retries + 1) x upstream.timeout)")


def cycle_deadline(cfg: Config) -> float:
    """Seconds a cycle may take: the evaluation interval, or one request's deadline
    (``(retries + 1) x timeout``) when that is longer, so that a query can take all of its own.
    """
    up = cfg.upstream
    return max(cfg.evaluation.interval, (up.retries + 1) * up.timeout)


def evaluation_time(now: float, eval_delay: float, interval: float) -> float:
    """``now - eval_delay`` truncated to the interval, as rule evaluators align it."""
    return math.floor((now - eval_delay) / interval) * interval


@dataclass
class CycleReport:
    evaluated_at: float
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    query_errors: dict[str, UpstreamError] = field(default_factory=dict)
    derived: dict[str, pd.DataFrame | derive.DeriveError] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: Families rendered from ``derived`` during the cycle (see :func:`compute`).
    rendered: dict[str, RenderedFamily] = field(default_factory=dict)
    #: Figures dropped as not finite, per series.
    nonfinite: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return not self.query_errors

    @property
    def outcome(self) -> str:
        if not self.query_errors:
            return "success"
        return "failure" if not self.frames else "partial"

    def tables(self) -> dict[str, pd.DataFrame]:
        return {k: v for k, v in self.derived.items() if isinstance(v, pd.DataFrame)}


def _query_pool(concurrency: int) -> Executor:
    return ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="query")


def query_base(
    querier: Querier,
    sel: Selectors,
    at: float,
    report: CycleReport,
    concurrency: int = 1,
    on_answer: Callable[[str, pd.DataFrame], None] | None = None,
    pool: Executor | None = None,
    deadline: float | None = None,
) -> None:
    """Run every base query at ``at``, up to ``concurrency`` at once, all done by ``deadline``
    (``time.monotonic()`` seconds; see :func:`exporter.upstream.deadline`).

    Failures are recorded per query, never raised, each naming its own query. Once the upstream
    proves unreachable the queries not yet sent fail with the same cause instead of waiting out
    their retries; so do those not sent by the deadline, as timeouts.
    ``on_answer(name, frame)`` runs in the calling thread as each answer arrives, while the
    other queries are still in flight. ``pool``: an executor of ``concurrency`` threads kept
    across cycles (none: one is started and stopped for this call).
    """
    down: list[UpstreamError] = []

    def one(query: catalog.BaseQuery) -> tuple[str, QueryResult | UpstreamError]:
        promql = query.promql(sel)
        if down:
            return query.name, down[0].for_query(promql)
        if deadline is not None and time.monotonic() >= deadline:
            return query.name, UpstreamError("timeout", NOT_SENT, query=promql)
        try:
            with upstream.deadline(deadline, CYCLE_DEADLINE):
                return query.name, querier.instant(promql, at)
        except UpstreamError as error:
            if unreachable(error):
                down.append(error)
            return query.name, error

    with nullcontext(pool) if pool is not None else _query_pool(concurrency) as running:
        futures = [running.submit(one, query) for query in catalog.BASE_QUERIES]
        try:
            if on_answer is not None:
                for future in as_completed(futures):
                    name, answer = future.result()
                    if not isinstance(answer, UpstreamError):
                        on_answer(name, answer.frame)
        finally:
            wait(futures)  # a shared pool: no query of this cycle left running
        results = [future.result() for future in futures]
    for name, result in results:  # catalog order, whatever order the answers came in
        if isinstance(result, UpstreamError):
            report.query_errors[name] = result
        else:
            report.frames[name] = result.frame
            report.warnings.extend(result.warnings)


#: The failure line's length bound: every failed query is named (14 at most, ~35 characters
#: each); what is cut when an upstream's error texts are long is the end of the last detail.
LINE_LIMIT = 1500


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters as escapes (``\\x1b``).

    Error details can quote what the upstream sent (label values, error pages): a terminal
    escape or a line separator in them must neither act on the reader's terminal nor split the
    line.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def failure_line(report: CycleReport) -> str:
    """One log line for a cycle that missed answers: every failed base query and its reason,
    then what the upstream said, once per reason (the first query that failed with it).

    ``cycle partial: 2 of 14 upstream queries failed: failure (http_5xx), queue_us (http_4xx);
    failure: HTTP 500: internal error; queue_us: HTTP 429: too_many_requests: slow down``
    """
    errors = report.query_errors
    named = ", ".join(f"{name} ({error.reason})" for name, error in errors.items())
    details: dict[str, str] = {}
    for name, error in errors.items():
        if error.reason not in details:
            details[error.reason] = f"{name}: {printable(error.detail)}{_check(error)}"
    line = (
        f"cycle {report.outcome}: {len(errors)} of {len(catalog.BASE_QUERIES)} upstream "
        f"queries failed: {named}; {'; '.join(details.values())}"
    )
    return line if len(line) <= LINE_LIMIT else line[: LINE_LIMIT - 3] + "..."


def not_computed(report: CycleReport) -> list[str]:
    """One line per reason some families were not computed, naming them."""
    by_reason: dict[str, list[str]] = {}
    for name, result in report.derived.items():
        if isinstance(result, derive.DeriveError):
            by_reason.setdefault(result.message, []).append(name)
    return [f"families not computed: {printable(reason)}: {', '.join(names)}"
            for reason, names in by_reason.items()]


def _check(error: UpstreamError) -> str:
    """What to check, when the cause is not the query: `` (check upstream.url)``."""
    hint = error.hint
    if hint is None:
        return ""
    return f" (check {hint.key}{'; ' + printable(hint.advice) if hint.advice else ''})"


def series_labels(sel: Selectors) -> dict[str, tuple[str, ...]]:
    return {s.name: s.labels(sel) for s in catalog.SERIES}


class Assembly:
    """One cycle's derivation, done as the answers arrive.

    Each answer's input tables are prepared when it arrives, and each series is derived (and
    rendered, given its labels) once every base query it reads has answered, while the others
    are still in flight: after the last answer only what depends on it is left. That work holds
    ``cpu`` (see :class:`~exporter.upstream.PrometheusClient`, which decodes answers holding
    the same lock in a live cycle).
    """

    def __init__(
        self,
        sel: Selectors,
        plan: derive.Plan,
        labels: Mapping[str, tuple[str, ...]] | None = None,
        cpu: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.sel = sel
        self.plan = plan
        self.labels = labels
        self.cpu = cpu if cpu is not None else nullcontext()
        self.frames: dict[str, pd.DataFrame] = {}
        self.prepared: dict[derive.Need, derive.Table] = {}
        self.derived: dict[str, pd.DataFrame | derive.DeriveError] = {}
        #: Families rendered from ``derived``'s tables (``computed_at`` set at publishing).
        self.rendered: dict[str, RenderedFamily] = {}
        self.nonfinite: dict[str, int] = {}
        self._pending = [series.name for series in catalog.SERIES]

    def answer(self, name: str, frame: pd.DataFrame) -> None:
        with self.cpu:
            self.frames[name] = frame
            self.prepared.update(
                derive.prepare(name, frame, self.sel, self.plan.tables_of(name))
            )
            answered = self.frames.keys()
            ready = [s for s in self._pending if self.plan.queries_of(s) <= answered]
            if ready:
                self._derive(ready)

    def finish(self) -> dict[str, pd.DataFrame | derive.DeriveError]:
        """Every series, in catalog order: the rest derived now (missing inputs included)."""
        with self.cpu:
            if self._pending:
                self._derive(list(self._pending))
            return {series.name: self.derived[series.name] for series in catalog.SERIES}

    def _derive(self, names: list[str]) -> None:
        out = derive.derive_all(self.frames, self.sel, prepared=self.prepared, only=names,
                                nonfinite=self.nonfinite)
        self.derived.update(out)
        self._pending = [name for name in self._pending if name not in out]
        if self.labels is None:
            return
        for series in catalog.SERIES:
            table = out.get(series.name)
            if isinstance(table, pd.DataFrame):
                self.rendered[series.name] = render_family(
                    series, self.labels[series.name], table, 0.0
                )


def compute(
    querier: Querier,
    sel: Selectors,
    at: float,
    concurrency: int = 1,
    *,
    plan: derive.Plan | None = None,
    labels: Mapping[str, tuple[str, ...]] | None = None,
    pool: Executor | None = None,
    cpu: AbstractContextManager[Any] | None = None,
    deadline: float | None = None,
) -> CycleReport:
    """One cycle's figures at instant ``at`` (no publishing): what ``once`` prints.

    With ``labels`` the derived families are also rendered (``report.rendered``) as they are
    derived, for :meth:`Publisher.publish`. ``cpu``: see :class:`Assembly`. ``deadline``: see
    :func:`query_base`.
    """
    started = time.monotonic()
    report = CycleReport(evaluated_at=at)
    assembly = Assembly(sel, plan or derive.plan(sel), labels, cpu)
    query_base(querier, sel, at, report, concurrency, assembly.answer, pool, deadline)
    report.derived = assembly.finish()
    report.rendered = assembly.rendered
    report.nonfinite = assembly.nonfinite
    report.seconds = time.monotonic() - started
    return report


class Worker:
    """Runs cycles against one upstream and publishes them.

    ``cpu``: held while a cycle derives and renders (see :class:`Assembly`); give the querier
    the same lock for decoding its answers.
    """

    def __init__(
        self,
        cfg: Config,
        querier: Querier,
        publisher: Publisher,
        metrics: SelfMetrics,
        clock: Callable[[], float] = time.time,
        cpu: AbstractContextManager[Any] | None = None,
        on_cycle_end: Callable[[], None] | None = None,
    ) -> None:
        """``on_cycle_end``: called after each scheduled cycle, once it is published and
        accounted for, good or not."""
        self.cfg = cfg
        self.sel = Selectors.from_config(cfg)
        self.labels = series_labels(self.sel)
        self.plan = derive.plan(self.sel)
        self.querier = querier
        self.publisher = publisher
        self.metrics = metrics
        self.clock = clock
        self._scheduler: BackgroundScheduler | None = None
        self._last_failure: str | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._pool: Executor | None = None
        self.cpu = cpu
        self.on_cycle_end = on_cycle_end

    def run_cycle(self) -> CycleReport:
        ev = self.cfg.evaluation
        started = time.monotonic()
        at = evaluation_time(self.clock(), ev.eval_delay, ev.interval)
        if self._pool is None:
            # Kept across cycles: starting and joining the threads each cycle costs about a
            # millisecond before the first request and after the last answer.
            self._pool = _query_pool(self.cfg.upstream.concurrency)
        report = compute(self.querier, self.sel, at, self.cfg.upstream.concurrency,
                         plan=self.plan, labels=self.labels, pool=self._pool, cpu=self.cpu,
                         deadline=started + cycle_deadline(self.cfg))
        self.publisher.publish(report.derived, self.labels, at, report.good,
                               rendered=report.rendered)
        report.seconds = time.monotonic() - started
        self._account(report)
        return report

    def _account(self, report: CycleReport) -> None:
        m = self.metrics
        m.cycle_duration.observe(report.seconds)
        m.cycles.labels(report.outcome).inc()
        if report.warnings:
            m.upstream_warnings.inc(len(report.warnings))
        for name, result in report.derived.items():
            if isinstance(result, derive.DeriveError):
                m.family_errors.labels(name).inc()
        for name, dropped in report.nonfinite.items():
            m.nonfinite.labels(name).inc(dropped)
        if report.query_errors:
            line = failure_line(report)
            # One line per change of state, not one per cycle while the upstream stays down.
            if line != self._last_failure:
                log.warning("%s", line)
            self._last_failure = line
        else:
            if self._last_failure is not None:
                log.info("cycle success: upstream answered every query again")
            self._last_failure = None
            for line in not_computed(report):
                log.warning("%s", line)

    def _safe_cycle(self) -> None:
        self._idle.clear()
        try:
            self.run_cycle()
        except Exception:  # the schedule must survive anything a cycle raises
            log.exception("cycle crashed")
            self.metrics.cycles.labels("failure").inc()
        finally:
            # The cycle's garbage in one full collection, now that its answers and frames are
            # gone (exporter.service.tune_interpreter leaves serve no automatic ones).
            gc.collect()
            self._idle.set()
            if self.on_cycle_end is not None:
                self.on_cycle_end()

    def _on_missed(self, event: JobExecutionEvent) -> None:
        self.metrics.cycles_missed.inc()

    def start(self) -> None:
        scheduler = BackgroundScheduler(
            executors={"default": {"type": "threadpool", "max_workers": 1}},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone="UTC",
        )
        scheduler.add_listener(self._on_missed, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)
        interval = self.cfg.evaluation.interval
        scheduler.add_job(
            self._safe_cycle,
            "interval",
            seconds=interval,
            next_run_time=datetime.now(UTC),
            misfire_grace_time=max(1, int(interval / 2)),
            id="cycle",
        )
        scheduler.start()
        self._scheduler = scheduler

    def stop(self, grace: float = 2.0) -> bool:
        """Stop scheduling; wait up to ``grace`` seconds for a running cycle.

        Returns False when a cycle is still waiting on the upstream: the caller decides whether
        to leave without it (its requests could take retries x timeout to give up).
        """
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        idle = self._idle.wait(grace)
        if idle and self._pool is not None:
            # A cycle still running keeps its pool: the caller leaves without it, or not.
            self._pool.shutdown()
            self._pool = None
        return idle


def exposition(report: CycleReport, labels: Mapping[str, tuple[str, ...]]) -> bytes:
    """The derived families of one report as exposition text (``once``)."""
    now = time.time()
    parts = []
    for series in catalog.SERIES:
        table = report.derived.get(series.name)
        if isinstance(table, pd.DataFrame):
            parts.append(render_family(series, labels[series.name], table, now).body)
    return b"".join(parts)

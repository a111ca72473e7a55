"""worker: the cycle derives and renders as the answers arrive, with the same result."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pandas as pd
import pytest

from exporter import catalog, config, derive, worker
from exporter.catalog import Selectors
from exporter.publish import Publisher, SelfMetrics, render_family
from exporter.upstream import Hint, PrometheusClient, QueryResult, UpstreamError

CFG = config.load(None, environ={})
SEL = Selectors.from_config(CFG)
LABELS = worker.series_labels(SEL)
COUNT = pd.DataFrame(
    [("a", "1", "p1", "r0", 2.0), ("a", "1", "p1", "r1", 3.0), ("b", "1", "p2", "r0", 1.0),
     ("", "", "p2", "r0", 4.0)],
    columns=["model", "version", "pod", "prometheus_replica", "value"])
SUCCESS = pd.DataFrame(
    [("a", "1", "p1", "r0", 1.0), ("b", "1", "p2", "r0", 0.0), ("b", "2", "p1", "r0", 0.5)],
    columns=["model", "version", "pod", "prometheus_replica", "value"])
SLICES = pd.DataFrame(
    [("h1:9400", "nvidia0", "1", "3g.40gb", "p1", "r0", 0.5),
     ("h1:9400", "nvidia0", "2", "1g.10gb", "", "r0", 0.0)],
    columns=["instance", "device", "GPU_I_ID", "GPU_I_PROFILE", "exported_pod",
             "prometheus_replica", "value"])
FRAMES = {q.name: (SLICES if q.source is catalog.Source.DCGM
                   else SUCCESS if q.name == "success" else COUNT)
          for q in catalog.BASE_QUERIES}


def same(left: pd.DataFrame | derive.DeriveError, right: pd.DataFrame | derive.DeriveError) -> bool:
    if isinstance(left, pd.DataFrame) and isinstance(right, pd.DataFrame):
        return left.equals(right) and list(left.columns) == list(right.columns)
    return left == right


@pytest.mark.parametrize("seed", range(4))
def test_assembly_in_any_answer_order_gives_what_derive_all_gives(seed: int) -> None:
    order = list(FRAMES)
    random.Random(seed).shuffle(order)
    assembly = worker.Assembly(SEL, derive.plan(SEL), LABELS)
    for name in order:
        assembly.answer(name, FRAMES[name])
    derived = assembly.finish()
    expected = derive.derive_all(FRAMES, SEL)
    assert list(derived) == [s.name for s in catalog.SERIES]
    for name, table in expected.items():
        assert same(derived[name], table), name
    for series in catalog.SERIES:
        table = expected[series.name]
        assert isinstance(table, pd.DataFrame)
        want = render_family(series, LABELS[series.name], table, 0.0)
        assert assembly.rendered[series.name] == want, series.name


def test_a_series_is_derived_once_every_query_it_reads_has_answered() -> None:
    assembly = worker.Assembly(SEL, derive.plan(SEL), LABELS)
    assembly.answer("success", FRAMES["success"])
    assert "model_version:triton_servers_active:count" in assembly.derived
    assert "model_version:triton_servers_active:count" in assembly.rendered
    assert "model_version:nv_cache_hit:ratio" not in assembly.derived
    assembly.answer("cache_hits", FRAMES["cache_hits"])
    assert "model_version:nv_cache_hit:ratio" in assembly.derived
    assert "gpu_instance:dcgm_tensor_active:avg" not in assembly.derived


def test_series_whose_queries_did_not_answer_fail_as_derive_all_fails_them() -> None:
    answered = {name: frame for name, frame in FRAMES.items() if name not in {"exec", "dram"}}
    assembly = worker.Assembly(SEL, derive.plan(SEL))
    for name, frame in answered.items():
        assembly.answer(name, frame)
    derived = assembly.finish()
    expected = derive.derive_all(answered, SEL)
    for name, table in expected.items():
        assert same(derived[name], table), name
    assert isinstance(derived["model_version:nv_inference_batch_size:mean"], derive.DeriveError)
    assert assembly.rendered == {}  # no labels: nothing rendered


class Upstream:
    """Answers each base query after a random delay, so the answers arrive out of order."""

    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.names = {q.promql(SEL): q.name for q in catalog.BASE_QUERIES}
        self.failing = failing
        self.rng = random.Random(1)
        self.lock = threading.Lock()
        self.threads: set[threading.Thread] = set()

    def instant(self, query: str, at: float) -> QueryResult:
        name = self.names[query]
        with self.lock:
            delay = self.rng.uniform(0, 0.01)
            self.threads.add(threading.current_thread())
        time.sleep(delay)
        if name in self.failing:
            raise UpstreamError("http_5xx", "HTTP 500: down", query=query)
        return QueryResult(FRAMES[name], ())


def test_query_base_hands_each_answer_over_in_the_calling_thread() -> None:
    seen: list[tuple[str, str]] = []

    def on_answer(name: str, frame: pd.DataFrame) -> None:
        assert frame is FRAMES[name]
        seen.append((name, threading.current_thread().name))

    report = worker.CycleReport(evaluated_at=0.0)
    worker.query_base(Upstream(frozenset({"exec"})), SEL, 0.0, report, 4, on_answer)
    assert sorted(name for name, _ in seen) == sorted(set(FRAMES) - {"exec"})
    assert {thread for _, thread in seen} == {threading.current_thread().name}
    assert list(report.frames) == [q.name for q in catalog.BASE_QUERIES if q.name != "exec"]
    assert list(report.query_errors) == ["exec"]


def test_cycles_publish_the_same_bytes_as_rendering_after_derive_all() -> None:
    publisher = Publisher(CFG.evaluation.staleness_bound, lambda: 1000.0)
    upstream = Upstream(frozenset({"dram"}))
    cycle = worker.Worker(CFG, upstream, publisher, SelfMetrics(publisher), lambda: 2000.0)
    report = cycle.run_cycle()
    reference = Publisher(CFG.evaluation.staleness_bound, lambda: 1000.0)
    reference.publish(derive.derive_all(report.frames, SEL), LABELS, 0.0, False)
    assert publisher.derived_body() == reference.derived_body()
    assert publisher.derived_body(gzipped=True) == reference.derived_body(gzipped=True)
    assert set(publisher.snapshot.families) == set(reference.snapshot.families)
    assert all(f.computed_at == 1000.0 for f in publisher.snapshot.families.values())


def test_the_query_threads_are_kept_across_cycles_and_stopped_with_the_worker() -> None:
    publisher = Publisher(CFG.evaluation.staleness_bound)
    upstream = Upstream()
    cycle = worker.Worker(CFG, upstream, publisher, SelfMetrics(publisher))
    for _ in range(4):
        cycle.run_cycle()
    # A pool per cycle would have started new threads each cycle.
    first = set(upstream.threads)
    assert 1 <= len(first) <= CFG.upstream.concurrency
    assert all(thread.is_alive() for thread in first)  # idle between cycles, not ended
    assert cycle.stop()
    for thread in first:
        thread.join(5)
    assert not any(thread.is_alive() for thread in first)
    assert cycle.run_cycle().good  # a later cycle starts a new pool


class Turns:
    """A lock that notes whether it was held whenever ``check`` runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[bool] = []

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def check(self) -> None:
        self.seen.append(self.lock.locked())


def test_a_cycle_derives_and_renders_holding_the_cpu_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    turns = Turns()
    derive_all = derive.derive_all

    def deriving(*args: object, **kwargs: object) -> object:
        turns.check()
        return derive_all(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(derive, "derive_all", deriving)
    publisher = Publisher(CFG.evaluation.staleness_bound)
    cycle = worker.Worker(CFG, Upstream(), publisher, SelfMetrics(publisher), cpu=turns)
    assert cycle.run_cycle().good
    assert turns.seen and all(turns.seen) and not turns.lock.locked()
    cycle.stop()


def test_each_scheduled_cycle_ends_with_a_garbage_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collected: list[bool] = []
    publisher = Publisher(CFG.evaluation.staleness_bound)
    cycle = worker.Worker(CFG, Upstream(), publisher, SelfMetrics(publisher))
    monkeypatch.setattr(worker.gc, "collect", lambda: collected.append(cycle._idle.is_set()))
    cycle._safe_cycle()
    monkeypatch.setattr(cycle, "run_cycle", lambda: 1 / 0)
    cycle._safe_cycle()  # a crashed cycle's garbage too
    assert collected == [False, False]
    cycle.stop()


def test_servers_that_cannot_be_told_apart_withhold_the_server_counts_and_say_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Real Triton sets no pod label: model series with neither pod nor instance (a federation
    that dropped them) would count every server as one. The server counts are withheld, each
    cycle says why in one line, and the family errors count it; the rates stay."""
    nameless = {name: frame.drop(columns="pod") if "pod" in frame.columns else frame
                for name, frame in FRAMES.items()}
    monkeypatch.setattr(__import__(__name__), "FRAMES", nameless)
    publisher = Publisher(CFG.evaluation.staleness_bound, lambda: 1000.0)
    metrics = SelfMetrics(publisher)
    cycle = worker.Worker(CFG, Upstream(), publisher, metrics, lambda: 2000.0)
    with caplog.at_level("WARNING", logger="exporter.worker"):
        report = cycle.run_cycle()
    for name in catalog.COUNTS_SERVERS:
        error = report.derived[name]
        assert isinstance(error, derive.DeriveError), name
        assert metrics.family_errors.labels(name)._value.get() == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("families not computed: servers cannot be told apart: ")
    assert "none of the server labels pod, instance" in lines[0]
    assert all(name in lines[0] for name in catalog.COUNTS_SERVERS)
    rates = report.derived["model_version:nv_inference_request_success:rate"]
    assert isinstance(rates, pd.DataFrame) and len(rates) == 3


PROMQL = {q.name: q.promql(SEL) for q in catalog.BASE_QUERIES}


class OneFails(Upstream):
    """``count`` fails with ``error``; the others answer."""

    def __init__(self, error: UpstreamError) -> None:
        super().__init__()
        self.error = error

    def instant(self, query: str, at: float) -> QueryResult:
        if self.names[query] == "count":
            raise self.error.for_query(query)
        return super().instant(query, at)


@pytest.mark.parametrize("error", [
    UpstreamError("timeout", "no answer from http://x within 1s"),
    UpstreamError("connection", "reading the answer: connection reset by peer"),
], ids=["slow", "cut short"])
def test_with_concurrency_1_a_query_that_fails_fails_alone_with_its_own_text(
    error: UpstreamError,
) -> None:
    report = worker.CycleReport(evaluated_at=0.0)
    worker.query_base(OneFails(error), SEL, 0.0, report, 1)
    assert list(report.query_errors) == ["count"]
    assert report.query_errors["count"].query == PROMQL["count"]
    assert list(report.frames) == [name for name in PROMQL if name != "count"]


class Refused:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def instant(self, query: str, at: float) -> QueryResult:
        self.sent.append(query)
        detail = "cannot reach upstream http://x: connection refused"
        # As the client has it: the upstream is not there, whatever the query.
        raise UpstreamError("connection", detail, query=query,
                            hint=Hint(detail, "upstream.url"))


def test_a_refused_connection_fails_the_queries_not_sent_each_with_its_own_text() -> None:
    upstream = Refused()
    report = worker.CycleReport(evaluated_at=0.0)
    worker.query_base(upstream, SEL, 0.0, report, 1)
    assert len(upstream.sent) == 1  # the upstream is not there: the rest are not sent
    assert {name: e.query for name, e in report.query_errors.items()} == PROMQL
    assert {(e.reason, e.detail) for e in report.query_errors.values()} == {
        ("connection", "cannot reach upstream http://x: connection refused")}


class Slow(Upstream):
    def instant(self, query: str, at: float) -> QueryResult:
        time.sleep(0.1)
        return QueryResult(FRAMES[self.names[query]], ())


def test_queries_not_answered_by_the_cycle_deadline_fail_on_their_own() -> None:
    report = worker.CycleReport(evaluated_at=0.0)
    started = time.monotonic()
    worker.query_base(Slow(), SEL, 0.0, report, 1, deadline=started + 0.35)
    assert time.monotonic() - started <= 0.35 + 0.15
    assert 2 <= len(report.frames) <= 4
    assert set(report.frames) | set(report.query_errors) == set(PROMQL)
    for name, error in report.query_errors.items():
        assert error.reason == "timeout" and error.query == PROMQL[name]
        assert error.detail == "not sent: the cycle's deadline had passed"


def test_a_cycle_is_bounded_by_the_interval_or_the_request_deadline() -> None:
    def bound(**upstream: object) -> float:
        cfg = config.from_mapping({"upstream": upstream, "evaluation": {"interval": "30s"}},
                                  environ={})
        return worker.cycle_deadline(cfg)

    assert bound() == 30.0  # (2 + 1) x 10 s, the interval: both 30 s
    assert bound(timeout="20s") == 60.0
    assert bound(timeout="1s", retries=0) == 30.0


def test_a_cycle_against_a_dripping_upstream_ends_by_its_deadline() -> None:
    from fakes import FakeUpstream, Reply

    def drip() -> Iterator[bytes]:
        end = time.monotonic() + 5
        while time.monotonic() < end:
            yield b" "
            time.sleep(0.1)

    cfg = config.from_mapping({"upstream": {"timeout": "500ms", "retries": 1,
                                            "concurrency": 1},
                               "evaluation": {"interval": "500ms"}}, environ={})
    fake = FakeUpstream(SEL).start()
    fake.answer = lambda seen: Reply(body=drip())
    try:
        client = PrometheusClient(cfg.upstream.model_copy(update={"url": fake.url}))
        bound = worker.cycle_deadline(cfg)
        assert bound == 1.0
        started = time.monotonic()
        report = worker.compute(client, SEL, 0.0, 1, deadline=started + bound)
        elapsed = time.monotonic() - started
        client.close()
    finally:
        fake.stop()
    assert elapsed <= bound + 0.5, elapsed
    assert set(report.query_errors) == set(PROMQL)
    assert {e.reason for e in report.query_errors.values()} == {"timeout"}

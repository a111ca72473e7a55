"""Real Triton Inference Servers scraped by a real Prometheus; the exporter against both.

Three ``tritonserver`` 2.51 processes (the ones ``nvidia-pytriton`` ships, on CPU, run by
tests/triton/server.py from the ``.venv-triton`` that ``make triton`` builds) serve Python
models on 127.0.0.1: one with dynamic batching, one with the response cache, one in two versions
(version 1 on two servers, version 2 on the third: PyTriton serves one version of a name per
server), and one that fails on a marked input. A real Prometheus scrapes their metrics ports
with a plain ``static_configs`` job every second, so the servers are told apart by ``instance``
alone: real Triton series carry no ``pod``. A client sends a fixed number of requests per model
and server (:data:`PLAN`) in one burst; the instant evaluated, T, comes after the scrapes that
follow the burst, and the window W holds the whole burst.

What is checked, and against what:
- Triton's own counters (read from each server before and after the burst) equal the plan:
  the harness is deterministic, and cache hits are outside nv_inference_count.
- Counts (servers active per model, models active per server, their sum and ratio) are exact;
  the drift is 1 (every series has a model and no replica exists).
- Rates: for a counter that grew by N inside W, rate() extrapolates the sampled span (at least
  W minus about two scrape intervals) to at most W, so N/W <= rate <= N/(W - SPAN_LOSS).
- Ratios of counters of one server cancel the extrapolation: the cache-hit ratio is exact, the
  batch size lies between the servers' own ratios.
- Latency means from the servers' counters never exceed what the client measured, and a compute
  mean is per executed request (cache hits excluded): at least the model's known execution time.
- ``once`` and ``serve`` equal the recording rules rendered for this configuration, each rule
  evaluated by this Prometheus at the same instant (inlined into one expression over raw
  series, as tests/test_rules_history.py does); and ``once`` equals what the rule files, loaded
  into this Prometheus, recorded at one of their instants: same samples, same functions, so
  equal to a relative 1e-9.

docs/real-triton-test.md says how it runs and what it proves.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from figures import (
    Figures,
    choose_rule_phase,
    exporter_figures,
    in_flight,
    prometheus_figures,
    recorded_figures,
    relative_difference,
    series_key,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalog, config, rules
from exporter.lab import promserver
from exporter.lab.process import ManagedProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.triton]

ROOT = Path(__file__).resolve().parent.parent
SERVER_SCRIPT = ROOT / "tests" / "triton" / "server.py"
#: The interpreter of the venv holding nvidia-pytriton (``make triton``); this overrides it.
PYTHON_ENV = "TRITON_TEST_PYTHON"

SCRAPE = 1.0
WINDOW = 15.0
#: How much shorter than W the sampled span of a counter can be: up to a scrape interval at
#: each end, plus scheduling jitter on a busy machine.
SPAN_LOSS = 2.5 * SCRAPE
#: Exporter and rules read the same samples with the same functions.
REL = 1e-9
#: ``cached`` sleeps this long per execution (tests/triton/server.py, CACHED_EXECUTION_S).
CACHED_EXECUTION_S = 0.02
MAX_BATCH = 16


@dataclass(frozen=True)
class Plan:
    """The requests one server gets for one model version."""

    ok: int
    #: Requests with the marked input (``flaky`` raises on them).
    failing: int = 0
    #: Each distinct input is sent this many times in a row: all but the first are cache hits.
    repeats: int = 1
    #: Batch items per request.
    rows: int = 1
    #: Requests in flight at once (dynamic batching needs several).
    concurrency: int = 1

    @property
    def hits(self) -> int:
        return self.ok - self.ok // self.repeats


#: (server, model, version) -> what the client sends. Loaded but idle: batched on c; only
#: failures: flaky on c. So servers active per model and models active per server differ from
#: what is merely loaded.
PLAN: dict[tuple[str, str, str], Plan] = {
    ("a", "batched", "1"): Plan(48, rows=2, concurrency=8),
    ("b", "batched", "1"): Plan(32, rows=2, concurrency=8),
    ("c", "batched", "1"): Plan(0),
    ("a", "cached", "1"): Plan(40, repeats=4),
    ("b", "cached", "1"): Plan(20, repeats=4),
    ("a", "versioned", "1"): Plan(30),
    ("c", "versioned", "1"): Plan(20),
    ("b", "versioned", "2"): Plan(25),
    ("a", "flaky", "1"): Plan(20, failing=4),
    ("b", "flaky", "1"): Plan(10, failing=10),
    ("c", "flaky", "1"): Plan(0, failing=6),
}
SERVERS = sorted({server for server, _, _ in PLAN})


def triton_python() -> Path:
    python = Path(os.environ.get(PYTHON_ENV) or ROOT / ".venv-triton" / "bin" / "python")
    if not python.exists():
        pytest.fail(f"{python} is missing: `make triton` builds it (or set {PYTHON_ENV})")
    return python


# --------------------------------------------------------------------------------------------
# The servers


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


class TritonServer(ManagedProcess):
    """tests/triton/server.py: one tritonserver with PyTriton's Python models, its own group."""

    name = "Triton"
    log_marker = "triton"
    LOG_NAME = "triton.log"

    def __init__(self, python: Path, workdir: Path, models: list[tuple[str, str]]) -> None:
        super().__init__(workdir)
        self.python = python
        self.models = models
        self.grpc_port = self.metrics_port = 0

    def prepare(self) -> None:
        self.grpc_port, self.metrics_port = free_port(), free_port()

    def command(self) -> list[str]:
        return [str(self.python), str(SERVER_SCRIPT), "--workspace",
                str(self.workdir / "workspace"), "--http-port", str(self.port), "--grpc-port",
                str(self.grpc_port), "--metrics-port", str(self.metrics_port), "--models",
                ",".join(f"{m}:{v}" for m, v in self.models)]

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def probe(self) -> str | None:
        for model, version in self.models:
            answer = requests.get(f"{self.url}/v2/models/{model}/versions/{version}/ready",
                                  timeout=2)
            if answer.status_code != 200:
                return f"{model} {version} not ready ({answer.status_code})"
        if requests.get(f"http://{self.instance}/metrics", timeout=2).status_code != 200:
            return "no /metrics"
        return None

    def port_lost(self, error: Exception) -> bool:
        return "address already in use" in self._run_log().lower()

    def counters(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = requests.get(f"http://{self.instance}/metrics", timeout=5).text
        (self.workdir / f"metrics-{time.time():.3f}.prom").write_text(text)
        # The parser names counter samples <name>_total; Triton's names have no such suffix.
        return {(s.name.removesuffix("_total"), tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server script alone (it stops its tritonserver and the model stubs), wait
        for its whole group and ports to go, SIGKILL the group when it does not. The group id
        is safe to signal after the leader is reaped: the kernel reuses no PID that still names
        a group with members."""
        proc = self._proc
        if proc is None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGTERM)
                elif group_members(proc.pid):  # the script died and left its tritonserver
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if group_members(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            self._proc = None
        ports = (self.port, self.grpc_port, self.metrics_port)
        promserver.wait_for(lambda: all(port_closed(p) for p in ports), 10,
                            what=f"ports {ports} to close")


# --------------------------------------------------------------------------------------------
# The load


@dataclass
class Sent:
    """What the client saw for one plan: per request (seconds, succeeded, cache-miss input)."""

    requests: list[tuple[float, bool, bool]] = field(default_factory=list)

    def mean(self, *, ok: bool = True, first_only: bool = False) -> float:
        chosen = [s for s, good, first in self.requests
                  if good == ok and (first or not first_only)]
        return sum(chosen) / len(chosen)


#: What each model answers for x (tests/triton/server.py).
ANSWERS = {
    "batched": lambda x, version: 2 * x,
    "cached": lambda x, version: x + 1,
    "versioned": lambda x, version: x * int(version),
    "flaky": lambda x, version: x,
}


def infer(session: requests.Session, server: TritonServer, model: str, version: str,
          value: float, rows: int) -> tuple[float, bool]:
    """One request: (seconds the client waited, succeeded); a success must carry the answer
    of the model version asked for."""
    shape = [rows, 1] if model == "batched" else [1]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                        "data": [value] * rows}]}
    started = time.perf_counter()
    answer = session.post(f"{server.url}/v2/models/{model}/versions/{version}/infer",
                          json=body, timeout=30)
    seconds = time.perf_counter() - started
    assert answer.status_code in (200, 400, 500), answer.text
    if answer.status_code == 200:
        assert answer.json()["outputs"][0]["data"] == [ANSWERS[model](value, version)] * rows
    return seconds, answer.status_code == 200


def send(server: TritonServer, model: str, version: str, plan: Plan) -> Sent:
    """The plan's requests: inputs >= 0 succeed, the marked ones (-1) fail."""
    jobs = [(float(i // plan.repeats), i % plan.repeats == 0) for i in range(plan.ok)]
    jobs += [(-1.0, True)] * plan.failing
    sent = Sent()

    def run(chunk: list[tuple[float, bool]]) -> None:
        with requests.Session() as session:
            for value, first in chunk:
                seconds, good = infer(session, server, model, version, value, plan.rows)
                assert good == (value >= 0), (server.instance, model, value)
                sent.requests.append((seconds, good, first))

    if plan.concurrency == 1:
        run(jobs)  # in order: a repeated input follows its first, cached, occurrence
    else:
        with concurrent.futures.ThreadPoolExecutor(plan.concurrency) as pool:
            list(pool.map(run, [jobs[i::plan.concurrency] for i in range(plan.concurrency)]))
    return sent


# --------------------------------------------------------------------------------------------
# The fleet


@dataclass
class Fleet:
    servers: dict[str, TritonServer]
    prom: promserver.PrometheusServer
    exporter_config: Path
    inlined: dict[str, str]
    sent: dict[tuple[str, str, str], Sent]
    before: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]
    after: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]
    load_start: float
    load_end: float
    #: The instant evaluated: after the scrapes that follow the load, the load inside W.
    at: float
    once: Figures
    #: A later instant of the loaded rules, what they recorded then, and ``once`` there.
    rule_at: float
    recorded: Figures
    once_at_rule: Figures

    def pod(self, server: str) -> str:
        """The server identity the exporter publishes: the scrape's instance."""
        return self.servers[server].instance

    def delta(self, name: str, key: tuple[str, str, str], **extra: str) -> float:
        """How much server ``key[0]``'s own counter ``name`` of model ``key[1]`` version
        ``key[2]`` (and ``extra`` labels) grew over the load."""
        server, model, version = key
        series = (name, tuple(sorted({"model": model, "version": version, **extra}.items())))
        return self.after[server].get(series, 0.0) - self.before[server].get(series, 0.0)

    def latest_useful(self) -> float:
        """The last instant whose window still starts a scrape before the load."""
        return self.load_start - 1.1 * SCRAPE + WINDOW


def start_all(servers: dict[str, TritonServer]) -> None:
    """Start the servers side by side (each loads its models one after another)."""
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(server.start, 180.0) for server in servers.values()]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]


def scraped_after(prom: promserver.PrometheusServer, since: float, count: int) -> float | None:
    """The latest of the Triton targets' last scrapes once each was scraped after ``since``."""
    stamps = [float(r["value"][1]) for r in prom.query('timestamp(up{job="triton"})')]
    return max(stamps) if len(stamps) == count and all(s > since for s in stamps) else None


def rule_instant(prom: promserver.PrometheusServer, not_before: float) -> float:
    """The first instant from ``not_before`` on at which the loaded rules were evaluated with
    no scrape in flight (whose samples a query at that instant would see but the rules not)."""
    late: list[str] = []
    for _ in range(5):
        def newest(since: float = not_before) -> float | None:
            found = prom.query("timestamp(:nv_inference_count:rate_raw)")
            stamp = float(found[0]["value"][1]) if found else 0.0
            return stamp if stamp >= since else None

        at = promserver.wait_for(newest, 10, 0.1, what="a rule evaluation")
        time.sleep(0.3)  # the group finishes the instant; scrapes stamped before it are stored
        late = in_flight(prom, at)
        if not late:
            return at
        not_before = at + 0.5
    pytest.fail(f"every rule instant raced a scrape: {late}")


@pytest.fixture(scope="module")
def fleet(prometheus_binaries: promserver.PrometheusBinaries,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    python = triton_python()
    root = tmp_path_factory.mktemp("triton")
    servers = {name: TritonServer(python, root / f"triton-{name}",
                                  [(m, v) for s, m, v in PLAN if s == name])
               for name in SERVERS}
    prom: promserver.PrometheusServer | None = None
    try:
        start_all(servers)
        base = {
            "global": {"scrape_interval": f"{SCRAPE:g}s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "triton",
                "static_configs": [{"targets": [s.instance for s in servers.values()]}],
            }],
        }
        prom = promserver.PrometheusServer(prometheus_binaries, base, root / "prometheus")
        prom.start()
        exporter_config = root / "exporter.yaml"
        exporter_config.write_text(yaml.safe_dump({
            "upstream": {"url": prom.url, "timeout": "5s", "retries": 1, "backoff": "100ms"},
            "evaluation": {"window": f"{WINDOW:g}s", "scrape_interval": f"{SCRAPE:g}s",
                           "interval": "1s"},
            "web": {"listen_address": "127.0.0.1:0"},
        }))
        cfg = config.load(exporter_config, environ={},
                          overrides={"rules": {"group_interval": "1s"}})
        inlined = rules.inline_recording_rules(rules.groups(cfg))

        # rate() over a series younger than W extrapolates less: the load starts once every
        # series has been scraped for W, so T - W falls after the first scrape. Meanwhile the
        # rules are loaded, evaluating away from the scrapes (tests/test_rules.py).
        started = time.time()
        first = promserver.wait_for(lambda: scraped_after(prom, started, len(servers)), 20,
                                    what="a scrape of every Triton server")
        choose_rule_phase(prom, base, cfg, root / "rules")
        time.sleep(max(0.0, first + WINDOW - 0.5 - time.time()))
        before = {name: s.counters() for name, s in servers.items()}
        load_start = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(PLAN)) as pool:
            futures = {key: pool.submit(send, servers[key[0]], key[1], key[2], plan)
                       for key, plan in PLAN.items()}
            sent = {key: future.result() for key, future in futures.items()}
        load_end = time.time()
        # Triton counts a request after answering it: a scrape half a second later holds it.
        promserver.wait_for(lambda: scraped_after(prom, load_end + 0.5, len(servers)), 10,
                            what="a scrape of every server after the load")
        after = {name: s.counters() for name, s in servers.items()}
        at = time.time()
        assert at <= load_start - 1.1 * SCRAPE + WINDOW, (
            f"the load took {load_end - load_start:.1f} s: W no longer holds it")
        once = exporter_figures(exporter_config, at)
        rule_at = rule_instant(prom, at)
        recorded = recorded_figures(prom, rule_at)
        once_at_rule = exporter_figures(exporter_config, rule_at)
        yield Fleet(servers, prom, exporter_config, inlined, sent, before, after, load_start,
                    load_end, at, once, rule_at, recorded, once_at_rule)
    finally:
        if prom is not None:
            prom.stop()
        with concurrent.futures.ThreadPoolExecutor(len(SERVERS)) as pool:
            list(pool.map(TritonServer.stop, servers.values()))


# --------------------------------------------------------------------------------------------
# The tests


def test_triton_counted_exactly_what_the_client_sent(fleet: Fleet) -> None:
    for key, plan in PLAN.items():
        server, model, version = key
        assert fleet.delta("nv_inference_request_success", key) == plan.ok, key
        failed = fleet.delta("nv_inference_request_failure", key, reason="BACKEND")
        assert failed == plan.failing, key
        for reason in ("REJECTED", "CANCELED", "OTHER"):
            assert fleet.delta("nv_inference_request_failure", key, reason=reason) == 0
        assert fleet.delta("nv_inference_count", key) == (plan.ok - plan.hits) * plan.rows
        if model == "cached":
            assert fleet.delta("nv_cache_num_hits_per_model", key) == plan.hits > 0
        else:
            key = ("nv_cache_num_hits_per_model",
                   (("model", model), ("version", version)))
            assert key not in fleet.after[server]
    # What the window holds, as Prometheus stored it: the whole load.
    grown = fleet.prom.query(
        f"max_over_time(nv_inference_request_success[{WINDOW:g}s]) - "
        f"min_over_time(nv_inference_request_success[{WINDOW:g}s])", fleet.at)
    by_instance = {s.instance: name for name, s in fleet.servers.items()}
    got = {(by_instance[r["metric"]["instance"]], r["metric"]["model"], r["metric"]["version"]):
           float(r["value"][1]) for r in grown}
    assert got == {key: float(plan.ok) for key, plan in PLAN.items()}
    # Every series has a sample within a scrape of each end of W (rate_bounds assumes it).
    start = fleet.at - WINDOW
    for row in fleet.prom.query(f"nv_inference_request_success[{WINDOW:g}s]", fleet.at):
        stamps = [float(stamp) for stamp, _ in row["values"]]
        assert stamps[0] - start <= 1.1 * SCRAPE and fleet.at - stamps[-1] <= 1.1 * SCRAPE, (
            row["metric"], stamps[0] - start, fleet.at - stamps[-1])
    assert all(r["metric"].get("pod") is None for r in grown), "real Triton has no pod label"


def rate_bounds(count: float) -> tuple[float, float]:
    """rate() of a counter that grew by ``count`` inside W: the growth over the sampled span,
    stretched to at most W (so at least count / W) and spanning at least W - SPAN_LOSS."""
    return count / WINDOW * (1 - REL), count / (WINDOW - SPAN_LOSS)


def assert_rate(value: float, count: float, what: Any) -> None:
    low, high = rate_bounds(count)
    assert low <= value <= high, (what, value, low, high)


def test_servers_active_models_active_concurrency_and_drift(fleet: Fleet) -> None:
    f = fleet.once
    active = {key for key, plan in PLAN.items() if plan.ok}
    servers_per_model: dict[tuple[str, str], int] = {}
    for _, model, version in active:
        servers_per_model[(model, version)] = servers_per_model.get((model, version), 0) + 1
    assert servers_per_model == {("batched", "1"): 2, ("cached", "1"): 2, ("versioned", "1"): 2,
                                 ("versioned", "2"): 1, ("flaky", "1"): 2}
    loaded = {(m, v) for _, m, v in PLAN}
    assert f["model_version:triton_servers_active:count"] == {
        (("model", m), ("version", v)): float(servers_per_model.get((m, v), 0))
        for m, v in loaded}
    models_per_server = {s: sum(1 for k in active if k[0] == s) for s in SERVERS}
    assert models_per_server == {"a": 4, "b": 4, "c": 1}
    assert f["pod:triton_models_active:count"] == {
        (("pod", fleet.pod(s)),): float(n) for s, n in models_per_server.items()}
    assert f[":triton_servers_active:count"] == {(): 3.0}
    assert f[":triton_model_servers_active:sum"] == {(): 9.0}
    assert f[":triton_model_concurrency:ratio"] == {(): 3.0}
    assert f[":triton_inference_rate_drift:ratio"][()] == pytest.approx(1.0, rel=REL)


@pytest.mark.parametrize(("family", "field_name"), [
    ("nv_inference_request_success", "ok"), ("nv_inference_request_failure", "failing")])
def test_success_and_failure_rates_within_rate_error(fleet: Fleet, family: str,
                                                     field_name: str) -> None:
    f = fleet.once
    per_pod = f[f"model_version_pod:{family}:rate"]
    assert set(per_pod) == {(("model", m), ("pod", fleet.pod(s)), ("version", v))
                            for s, m, v in PLAN}
    for (server, model, version), plan in PLAN.items():
        count = getattr(plan, field_name)
        value = per_pod[(("model", model), ("pod", fleet.pod(server)), ("version", version))]
        if count == 0:
            assert value == 0.0, (server, model)
        else:
            assert_rate(value, count, (server, model, version))
    levels = {
        f"model_version:{family}:rate": lambda k: (("model", k[1]), ("version", k[2])),
        f"pod:{family}:rate": lambda k: (("pod", fleet.pod(k[0])),),
        f":{family}:rate": lambda k: (),
    }
    for name, key_of in levels.items():
        want: dict[Any, int] = {}
        for key, plan in PLAN.items():
            want[key_of(key)] = want.get(key_of(key), 0) + getattr(plan, field_name)
        assert set(f[name]) == set(want), name
        for labels, count in want.items():
            if count:
                assert_rate(f[name][labels], count, (name, labels))
            else:
                assert f[name][labels] == 0.0, (name, labels)


def test_failures_per_reason_executed_requests_and_queue_depth(fleet: Fleet) -> None:
    f = fleet.once
    reasons = ("BACKEND", "CANCELED", "OTHER", "REJECTED")
    failing: dict[tuple[str, str], int] = {}
    executed: dict[tuple[str, str], int] = {}
    for (_, model, version), plan in PLAN.items():
        failing[(model, version)] = failing.get((model, version), 0) + plan.failing
        executed[(model, version)] = executed.get((model, version), 0) + plan.ok - plan.hits
    # A Python model that raises fails with reason BACKEND; the other reasons stay at 0.
    per_reason = f["model_version_reason:nv_inference_request_failure:rate"]
    assert set(per_reason) == {(("model", m), ("reason", r), ("version", v))
                               for m, v in failing for r in reasons}
    for (model, version), count in failing.items():
        for reason in reasons:
            value = per_reason[(("model", model), ("reason", reason), ("version", version))]
            if reason == "BACKEND" and count:
                assert_rate(value, count, (model, version))
            else:
                assert value == 0.0, (model, version, reason)
    fleet_reasons = f["reason:nv_inference_request_failure:rate"]
    assert set(fleet_reasons) == {(("reason", r),) for r in reasons}
    assert_rate(fleet_reasons[(("reason", "BACKEND"),)], sum(failing.values()), "BACKEND")
    assert all(fleet_reasons[(("reason", r),)] == 0.0 for r in reasons if r != "BACKEND")
    # Requests that ran the model: successes less cache hits.
    ran = f["model_version:triton_requests_executed:rate"]
    assert set(ran) == {(("model", m), ("version", v)) for m, v in executed}
    for (model, version), count in executed.items():
        assert_rate(ran[(("model", model), ("version", version))], count, (model, version))
    assert_rate(f[":triton_requests_executed:rate"][()], sum(executed.values()), "fleet")
    # Queue depth: a gauge averaged over W; nothing waits for a model that got no request.
    pending = f["model_version_pod:nv_inference_pending_request_count:avg"]
    assert set(pending) == {(("model", m), ("pod", fleet.pod(s)), ("version", v))
                            for s, m, v in PLAN}
    for (server, model, version), plan in PLAN.items():
        value = pending[(("model", model), ("pod", fleet.pod(server)), ("version", version))]
        assert value == 0.0 if plan.ok + plan.failing == 0 else value >= 0.0, (server, model)


def test_batch_size_and_cache_hit_ratio(fleet: Fleet) -> None:
    f = fleet.once
    batch = f["model_version:nv_inference_batch_size:mean"]
    for model, version in {(m, v) for _, m, v in PLAN}:
        own = [fleet.delta("nv_inference_count", key) / fleet.delta("nv_inference_exec_count", key)
               for key, plan in PLAN.items()
               if key[1:] == (model, version) and plan.ok + plan.failing]
        value = batch[(("model", model), ("version", version))]
        # Between the servers' own ratios: the extrapolation of one server cancels in its ratio.
        assert min(own) * (1 - REL) <= value <= max(own) * (1 + REL), (model, own, value)
    # Dynamic batching put more than one 2-row request in an execution, never over the maximum.
    assert 2.0 < batch[(("model", "batched"), ("version", "1"))] <= MAX_BATCH
    assert batch[(("model", "versioned"), ("version", "1"))] == 1.0
    # Hits are neither inferences nor executions.
    assert batch[(("model", "cached"), ("version", "1"))] == 1.0
    # A failed execution is an execution without inferences.
    assert batch[(("model", "flaky"), ("version", "1"))] < 1.0
    # Each server answered 3 of every 4 cached requests from the cache.
    assert f["model_version:nv_cache_hit:ratio"] == {
        (("model", "cached"), ("version", "1")): pytest.approx(0.75, rel=REL)}


def test_latency_means_are_at_most_what_the_client_measured(fleet: Fleet) -> None:
    f = fleet.once

    def mean(phase: str, model: str, version: str) -> float:
        series = f[f"model_version:nv_inference_{phase}_duration:mean_seconds"]
        return series[(("model", model), ("version", version))]

    def client(model: str, version: str, **how: bool) -> float:
        # The exporter weighs servers by their extrapolated share: at most the largest mean.
        return max(sent.mean(**how) for (s, m, v), sent in fleet.sent.items()
                   if (m, v) == (model, version) and PLAN[(s, m, v)].ok)

    for model, version in {(m, v) for (_, m, v), p in PLAN.items() if p.ok}:
        request = mean("request", model, version)
        assert 0 < request <= client(model, version), (model, version)
        assert mean("queue", model, version) <= request
        if model != "cached":
            for phase in ("compute_input", "compute_infer", "compute_output"):
                assert 0 < mean(phase, model, version) <= request, (model, phase)
    # The cached model: a compute mean is per executed request (cache misses), so it holds a
    # whole execution; a request mean is per request, hits included.
    infer = mean("compute_infer", "cached", "1")
    assert CACHED_EXECUTION_S <= infer <= client("cached", "1", first_only=True)
    assert mean("request", "cached", "1") < infer
    fleet_request = f[":nv_inference_request_duration:mean_seconds"][()]
    assert 0 < fleet_request <= max(s.mean() for k, s in fleet.sent.items() if PLAN[k].ok)


def compare(got: Figures, want: Figures, what: str) -> int:
    compared = 0
    for series in catalog.SERIES:
        ours, theirs = got.get(series.name, {}), want.get(series.name, {})
        assert set(ours) == set(theirs), (what, series.name, set(ours) ^ set(theirs))
        for labels, value in theirs.items():
            assert relative_difference(ours[labels], value) <= REL, (
                what, series.name, labels, ours[labels], value)
            compared += 1
    return compared


def test_once_equals_the_rules_evaluated_by_prometheus(fleet: Fleet) -> None:
    ruled = prometheus_figures(fleet.prom, fleet.inlined, fleet.at)
    assert compare(ruled, fleet.once, "once") > 50
    triton = {s.name for s in catalog.SERIES if not s.name.split(":")[1].startswith("dcgm")}
    assert {name for name, rows in fleet.once.items() if rows} >= triton


def test_once_equals_what_the_loaded_rules_recorded(fleet: Fleet) -> None:
    """The rule files as Prometheus loads them, each rule's output stored and read back by the
    rules after it, at one of their own instants after the load."""
    assert fleet.rule_at <= fleet.latest_useful()
    assert compare(fleet.recorded, fleet.once_at_rule, "recorded") > 50
    assert not set(fleet.recorded) - {s.name for s in catalog.SERIES}
    for group in requests.get(f"{fleet.prom.url}/api/v1/rules", timeout=5).json()["data"][
            "groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_serve_equals_the_rules_evaluated_by_prometheus(fleet: Fleet) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "serve", "--config.file", str(fleet.exporter_config)],
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        url = ""
        while not url:
            line = proc.stderr.readline()
            assert line, "serve exited before serving"
            if "serving http://" in line:
                url = line.split("serving ", 1)[1].split(";", 1)[0].rsplit("/", 1)[0]

        def evaluated() -> tuple[float, Figures] | None:
            text = requests.get(f"{url}/metrics", timeout=5).text
            figures: Figures = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    figures.setdefault(sample.name, {})[series_key(sample.labels)] = sample.value
            stamp = figures.get("triton_mig_exporter_last_evaluation_timestamp_seconds", {})
            instant = stamp.get((), 0.0)
            return (instant, figures) if instant >= fleet.at - 1 else None

        instant, served = promserver.wait_for(evaluated, 20, 0.2, what="a cycle after the load")
        assert instant <= fleet.latest_useful(), "serve evaluated after W lost the load"
        ruled = prometheus_figures(fleet.prom, fleet.inlined, instant)
        assert compare(ruled, served, "serve") > 50
        assert served[":triton_model_concurrency:ratio"][()] == 3.0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


def test_stopped_servers_leave_no_process_and_no_port(tmp_path: Path) -> None:
    """Two servers stopped by PID: one as it runs, one whose script was killed outright and left
    its tritonserver behind. Every process of both groups goes, and every port."""
    servers = {name: TritonServer(triton_python(), tmp_path / name, [("versioned", "3")])
               for name in ("running", "orphaned")}
    try:
        start_all(servers)
        # A response object still alive keeps its connection open, and tritonserver waits its
        # exit timeout (30 s) for open connections: this one closes at once.
        answer = requests.post(
            f"{servers['running'].url}/v2/models/versioned/versions/3/infer", timeout=10,
            headers={"Connection": "close"},
            json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2.0]}]})
        assert answer.json()["outputs"][0]["data"] == [6.0]
        orphaned = servers["orphaned"].pid
        assert orphaned is not None
        os.kill(orphaned, signal.SIGKILL)
        promserver.wait_for(lambda: servers["orphaned"]._proc is not None
                            and servers["orphaned"]._proc.poll() is not None, 5,
                            what="the script to die")
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in group_members(orphaned)}
        assert "tritonserver" in names, "killing the script alone leaves tritonserver running"
    finally:
        groups = [s.pid for s in servers.values()]
        with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(TritonServer.stop, servers.values()))
    assert all(pid is not None and group_members(pid) == [] for pid in groups)
    for server in servers.values():
        assert all(port_closed(p) for p in (server.port, server.grpc_port, server.metrics_port))
    assert not (tmp_path / "running" / "workspace").exists(), "PyTriton removed its workspace"

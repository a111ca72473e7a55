"""VictoriaMetrics as the upstream, vmalert as the ruler, vmauth in front, two exporter replicas.

Everything runs for real on 127.0.0.1, from Debian's ``victoria-metrics`` package (1.79.5; see
``vmharness``): VictoriaMetrics scrapes the simulator with its ``-promscrape.config`` (the same
Prometheus scrape config the Prometheus tests use), the exporter queries it, vmalert evaluates
``rules/`` against it and writes the results back through remote write.

What these tests prove, and the MetricsQL/vmalert differences they measure (docs/scaling.md):

* Inside one simulator epoch the exporter's figures on VictoriaMetrics equal ``Fleet.truth``
  within the 2 % of the Prometheus tests (seen: at most 0.2 %). MetricsQL's ``rate()`` does not
  extrapolate: it takes the slope from the last sample *before* the window to the last sample in
  it, which is exact for the simulator's linear counters, as Prometheus's extrapolation is.
* Where the counters are not linear over the window the figures differ from Prometheus's:
  ``test_metricsql_rate_keeps_the_full_rate_of_series_that_start_or_stop_in_the_window`` shows
  that a model unloaded (or loaded) during the window keeps its *full* rate in MetricsQL until
  the window has passed, where the true average (and, nearly, Prometheus) is the pro-rata share.
* vmalert runs the generated rules unchanged, but a rule that reads a recorded series reads the
  result of the *previous* evaluation (results come back through remote write): each level of
  the rule chain lags one group interval. Inside an epoch the recorded series equal ``once`` at
  the same instants within 2 % (across a change the lag shows; not asserted here).
* VictoriaMetrics 1.79 shows a new series to queries near "now" only after its next 10 s index
  refresh: the fixture creates the series the fault tests switch on before any test, and the
  vmalert comparisons wait until the rule chain has settled (``chain_settled``).
* With the default ``-search.latencyOffset`` (30 s) VictoriaMetrics evaluates a query for an
  instant less than 30 s old at ``now - 30s`` instead, for the exporter and vmalert alike.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from vmharness import (
    AlertSink,
    TenantGate,
    VictoriaMetrics,
    VMAlert,
    VMAuth,
    VMBinaries,
    find_vm_binaries,
    vmalert_dry_run,
    wait_for,
)

from exporter import catalog, config, rules, upstream
from exporter.catalog import Selectors
from exporter.config import Config, format_duration
from exporter.lab import promserver, simulate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"

SCRAPE, WINDOW = 1.0, 5.0
#: The live fleet changes nothing for two minutes: one epoch holds every live test instant.
EPOCH = 120.0
#: The recorded history: epochs of a minute, its first boundary unloads five (model, version,
#: pod) pairs and loads two (seed 7, four models).
HISTORY_EPOCH = 60.0
GROUP_INTERVAL = 1.0
REL = 0.02
TOKEN, TENANT = "vm-test-token-5f1c2e", "inference"
RECORDED = re.compile(r"[a-z_]*:[a-zA-Z0-9_]+:[a-z_]+")
SERIES_NAMES = {s.name for s in catalog.SERIES}
PAIR_RATE = "model_version_pod:nv_inference_count:rate"
LATENCY_RECORD = "vm_app:uptime_sample_timestamp:max"

Figures = dict[str, dict[tuple[tuple[str, str], ...], float]]


# --------------------------------------------------------------------------------------------
# The stack


def exporter_settings() -> dict[str, Any]:
    return {"evaluation": {"window": f"{WINDOW:g}s", "scrape_interval": f"{SCRAPE:g}s",
                           "interval": "1s"}}


def rules_config() -> Config:
    """The configuration the vmalert rules are rendered from: the defaults but for the window
    and the group interval (a 2 m window and 30 s groups do not fit in a test)."""
    return config.from_mapping(
        {**exporter_settings(), "rules": {"group_interval": f"{GROUP_INTERVAL:g}s"}}, "test",
        environ={})


def chain_depth() -> int:
    """The longest chain of recording rules reading recorded series (0: reads raw series)."""
    sel = Selectors.from_config(rules_config())
    depth: dict[str, int] = {}
    for series in catalog.SERIES:
        deps = set(RECORDED.findall(series.expr(sel))) & depth.keys()
        depth[series.name] = 1 + max(depth[d] for d in deps) if deps else 0
    return max(depth.values())


def fleet_spec(start: float, epoch: float) -> simulate.FleetSpec:
    return simulate.FleetSpec(servers=4, models=4, hosts=2, gpus_per_host=1, seed=7,
                              epoch_seconds=epoch, churn=0.3, start=start)


@dataclass
class History:
    """Scrapes every second around an epoch boundary, stored in VictoriaMetrics and in
    Prometheus alike: the same samples in both engines."""

    fleet: simulate.Fleet
    boundary: float
    vm: VictoriaMetrics
    prom: promserver.PrometheusServer


@dataclass
class VMStack:
    fleet: simulate.Fleet
    faults: simulate.Faults
    binaries: VMBinaries
    vm: VictoriaMetrics
    vm_dedup: VictoriaMetrics
    vm_default: VictoriaMetrics
    vmalert: VMAlert
    vmalert_default: VMAlert
    sink: AlertSink
    history: History
    folder: Path
    started: float
    _once: dict[tuple[str, float], str] = field(default_factory=dict)

    def config_file(self, name: str, url: str | None = None, **up: Any) -> Path:
        path = self.folder / f"{name}.yaml"
        upstream_section = {"url": url or self.vm.url, "timeout": "2s", "retries": 1,
                            "backoff": "100ms", **up}
        path.write_text(yaml.safe_dump({"upstream": upstream_section, **exporter_settings(),
                                        "web": {"listen_address": "127.0.0.1:0"}}))
        return path

    def settle(self, at: float) -> None:
        """Wait until every sample stamped at or before ``at`` is stored and searchable.

        A scrape is stamped when it starts and stored when it ends, and VictoriaMetrics buffers
        about a second more: a young instant can gain a sample between two queries of it. Each
        target is scraped in sequence, so once every ``up`` series holds a sample newer than
        ``at`` no older one is still on its way."""
        deadline = time.monotonic() + 10 * SCRAPE
        for vm in (self.vm, self.vm_dedup):
            while True:
                vm.force_flush()
                newest = [max(series["timestamps"]) / 1000
                          for series in vm.export("up", at - WINDOW, time.time() + 1)]
                if newest and min(newest) > at:
                    break
                assert time.monotonic() < deadline, f"{vm.url}: no scrape after {at:.3f}"
                time.sleep(SCRAPE / 10)
        self.vm_default.force_flush()

    def once(self, at: float, url: str | None = None) -> str:
        """``once --at`` on ``url`` (the main VictoriaMetrics by default); cached per instant."""
        key = (url or self.vm.url, at)
        if key not in self._once:
            self.settle(at)
            (done,) = run_once([self.config_file(f"once-{len(self._once)}", url)], at)
            assert done.returncode == 0, done.stderr
            self._once[key] = done.stdout
        return self._once[key]

    def instant(self, lead: float = 0.0, not_before: float = 0.0, whole: bool = False,
                age: float = 0.5) -> float:
        """A past instant at least ``age`` old whose window plus two scrapes plus ``lead`` lies
        inside one epoch, after the first scrapes and after ``not_before``; waits for one.
        ``whole``: a whole second (where vmalert's aligned evaluations are stamped)."""
        margin = WINDOW + 2 * SCRAPE + lead
        deadline = time.monotonic() + EPOCH
        while True:
            t = time.time() - age
            if whole:
                t = math.floor(t)
            start, _ = self.fleet.epoch_bounds(t)
            earliest = max(start + margin, self.started + 6 + margin, not_before + margin)
            if t >= earliest:
                return t
            assert time.monotonic() < deadline, "no usable instant within an epoch"
            time.sleep(min(max(earliest - t, 0.1), 5.0))


@pytest.fixture(scope="module")
def vm_binaries() -> VMBinaries:
    return find_vm_binaries()


def _history(vm_binaries: VMBinaries, prometheus_binaries: promserver.PrometheusBinaries,
             folder: Path, now: float) -> History:
    fleet = simulate.Fleet(fleet_spec(math.floor(now) - 200, HISTORY_EPOCH))
    boundary = fleet.spec.start + HISTORY_EPOCH
    path = folder / "history.om"
    written = fleet.write_openmetrics(path, boundary - 12, boundary + 8, SCRAPE)
    assert promserver.backfill(prometheus_binaries, path, folder / "prom-history") == written
    prom = promserver.PrometheusServer(prometheus_binaries, {"global": {"scrape_interval": "1s"}},
                                       folder / "prom-history")
    vm = VictoriaMetrics(vm_binaries, folder / "vm-history")
    return History(fleet, boundary, vm, prom)


@pytest.fixture(scope="module")
def vm_stack(vm_binaries: VMBinaries, prometheus_binaries: promserver.PrometheusBinaries,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMStack]:
    folder = tmp_path_factory.mktemp("victoriametrics")
    now = time.time()
    faults = simulate.Faults()
    fleet = simulate.Fleet(fleet_spec(now - 10, EPOCH), faults)
    sim = simulate.serve(fleet, "127.0.0.1", 0)
    scrape = fleet.prometheus_config(f"127.0.0.1:{sim.server_address[1]}", SCRAPE)
    # HA the VictoriaMetrics way: the replica label dropped at ingestion, the copies merged by
    # -dedup.minScrapeInterval (one sample per interval and series).
    deduplicated = copy.deepcopy(scrape)
    for job in deduplicated["scrape_configs"]:
        job["relabel_configs"] = [{"action": "labeldrop", "regex": "prometheus_replica"}]
    vm = VictoriaMetrics(vm_binaries, folder / "vm", scrape)
    vm_dedup = VictoriaMetrics(vm_binaries, folder / "vm-dedup", deduplicated,
                               extra_args=[f"-dedup.minScrapeInterval={SCRAPE:g}s"])
    # VictoriaMetrics with its default query flags, scraping itself every second.
    vm_default = VictoriaMetrics(vm_binaries, folder / "vm-default",
                                 extra_args=[f"-selfScrapeInterval={SCRAPE:g}s"], tuned=False)
    history: History | None = None
    sink = AlertSink()
    rendered = rules.write(rules_config(), folder / "rules")
    latency_rule = folder / "latency.rules.yaml"
    latency_rule.write_text(yaml.safe_dump({"groups": [{
        "name": "latency", "interval": f"{GROUP_INTERVAL:g}s",
        "rules": [{"record": LATENCY_RECORD, "expr": "max(timestamp(vm_app_uptime_seconds))"}],
    }]}))
    vmalert: VMAlert | None = None
    vmalert_default: VMAlert | None = None
    live = (vm, vm_dedup)
    try:
        history = _history(vm_binaries, prometheus_binaries, folder, now)
        for service in (*live, vm_default):
            service.start()
        # VictoriaMetrics 1.79 lets a query near "now" see a new series only after its next
        # 10 s index refresh: have the series the fault tests switch on exist from the start.
        faults.duplicate_replica = faults.unlabeled_series = True
        switched = time.time()

        def replicas_scraped() -> bool:
            return all(t["lastSamplesScraped"] > 0 and _seconds(t["lastScrape"]) > switched
                       for service in live for t in service.targets()
                       if t["labels"].get("prometheus_replica") == "prometheus-k8s-1")

        wait_for(replicas_scraped, 10, 0.1, what="a scrape of every replica target")
        faults.duplicate_replica = faults.unlabeled_series = False
        vmalert = VMAlert(vm_binaries, folder / "vmalert", rendered, vm.url, vm.url, sink.url,
                          ["-remoteWrite.flushInterval=100ms"])
        vmalert.start()
        vmalert_default = VMAlert(vm_binaries, folder / "vmalert-default", [latency_rule],
                                  vm_default.url, vm_default.url, sink.url,
                                  ["-remoteWrite.flushInterval=100ms"])
        vmalert_default.start()
        history.vm.start()
        history.vm.import_openmetrics(folder / "history.om")
        history.prom.start()
        yield VMStack(fleet, faults, vm_binaries, vm, vm_dedup, vm_default, vmalert,
                      vmalert_default, sink, history, folder, now)
    finally:
        faults.duplicate_replica = faults.unlabeled_series = False
        for ruler in (vmalert, vmalert_default):
            if ruler is not None:
                ruler.stop()
        for service in (*live, vm_default):
            service.stop()
        if history is not None:
            history.vm.stop()
            history.prom.stop()
        sink.close()
        sim.shutdown()
        sim.server_close()


def _seconds(rfc3339: str) -> float:
    """Unix seconds of an RFC 3339 UTC time such as ``2026-11-25T02:11:45.233Z``."""
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------------------------
# Helpers


def run_once(configs: list[Path], at: float) -> list[subprocess.CompletedProcess[str]]:
    """``once --at`` for each config file, run side by side (about 1.5 s each on its own)."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "exporter", "once", "--config.file", str(path), "--at",
         f"{at:.3f}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for path in configs]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done


def _key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    # VictoriaMetrics drops empty labels; the exposition may print them as "".
    return tuple(sorted((k, v) for k, v in labels.items() if v and k != "__name__"))


def parse(text: str) -> Figures:
    out: Figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[_key(sample.labels)] = sample.value
    return out


def truth(fleet: simulate.Fleet, at: float, strict: bool = True) -> Figures:
    return {name: {_key(dict(k)): v for k, v in rows.items()}
            for name, rows in fleet.truth(at, WINDOW, strict=strict).items()}


def worst_difference(got: Figures, want: Figures) -> tuple[float, str]:
    """Assert the same label sets family by family and values within REL; the largest relative
    difference seen (reported in failure messages and the docs)."""
    worst, where = 0.0, ""
    for name in sorted(SERIES_NAMES):
        expected, actual = want.get(name, {}), got.get(name, {})
        assert set(actual) == set(expected), (name, set(actual) ^ set(expected))
        for labels, value in expected.items():
            assert actual[labels] == pytest.approx(value, rel=REL, abs=1e-9), (
                name, labels, actual[labels], value)
            if value:
                diff = abs(actual[labels] - value) / abs(value)
                if diff > worst:
                    worst, where = diff, f"{name}{dict(labels)}"
    return worst, where


def derived_lines(exposition: str) -> str:
    """The contract families of an exposition (HELP, TYPE and samples), self-metrics left out."""
    kept = []
    for line in exposition.splitlines():
        if line.startswith("# "):
            name = line.split(" ", 3)[2] if line.count(" ") >= 2 else ""
        else:
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in SERIES_NAMES:
            kept.append(line)
    return "\n".join(kept)


def recorded_at(stack: VMStack, at: float) -> Figures:
    """Every sample vmalert recorded with timestamp ``at`` (raw samples, no lookback)."""
    out: Figures = {}
    stamp = round(at * 1000)
    for series in stack.vm.export('{__name__=~".*:.*:.*"}', at - 0.5, at + 0.5):
        for ts, value in zip(series["timestamps"], series["values"], strict=True):
            if ts == stamp and value is not None:
                name = series["metric"]["__name__"]
                out.setdefault(name, {})[_key(series["metric"])] = float(value)
    return out


def read_by_rules() -> set[str]:
    """The recorded series that other recording rules read."""
    sel = Selectors.from_config(rules_config())
    return {name for series in catalog.SERIES
            for name in RECORDED.findall(series.expr(sel)) if name in SERIES_NAMES}


#: VictoriaMetrics 1.79 lets a query near "now" see a new series only after its next index
#: refresh, every 10 s; a rule reading a younger series may miss it.
SETTLE = 12.0


def chain_settled(stack: VMStack, at: float) -> bool:
    """Every contract series is recorded at ``at`` and every recorded series a rule reads had
    already been recorded SETTLE seconds before: no rule evaluated up to ``at`` missed one."""
    found: set[str] = set()
    stamp = round(at * 1000)
    inputs = read_by_rules()
    for series in stack.vm.export('{__name__=~".*:.*:.*"}', at - SETTLE - 1, at + 0.5):
        stamps = series["timestamps"]
        if stamp not in stamps:
            continue
        name = series["metric"]["__name__"]
        found.add(name)
        if name in inputs and min(stamps) > stamp - SETTLE * 1000:
            return False
    return found == SERIES_NAMES


def recorded_instant(stack: VMStack, not_before: float = 0.0) -> float:
    """A whole second vmalert evaluated whose rule chain, window and scrapes lie in one epoch,
    with every contract series recorded, written back and searchable.

    On a fresh VictoriaMetrics each level of the rule chain appears about 10 s after the one it
    reads (seen: the last level 40 s after the first scrape); :func:`chain_settled` waits for
    the chain to be complete at the instant compared."""
    lead = (chain_depth() + 3) * GROUP_INTERVAL
    deadline = time.monotonic() + 90
    while True:
        at = stack.instant(lead=lead, not_before=not_before, whole=True, age=1.5)
        stack.settle(at)
        if chain_settled(stack, at):
            return at
        assert time.monotonic() < deadline, "vmalert's rule chain never settled"
        not_before = at + 1 - WINDOW - 2 * SCRAPE - lead


class Serve:
    """``serve`` in a subprocess, its log in a file (polled for the URL)."""

    def __init__(self, config_file: Path, log: Path) -> None:
        self.log = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", "--config.file", str(config_file)],
            stdout=subprocess.DEVNULL, stderr=self._log, text=True)

        def url() -> str | None:
            for line in log.read_text().splitlines():
                if "serving http://" in line:
                    return line.split("serving ", 1)[1].split(";", 1)[0].rsplit("/", 1)[0]
            assert self.proc.poll() is None, log.read_text()
            return None

        try:
            self.url: str = wait_for(url, 30, 0.1, what="serve to listen")
        except BaseException:
            self.stop()
            raise

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=5).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# --------------------------------------------------------------------------------------------
# The rule files, without a server


def test_committed_rules_parse_in_vmalert_and_the_tested_rules_differ_only_in_window_and_interval(
    vm_binaries: VMBinaries,
) -> None:
    committed = [RULES / rules.RECORDING_FILE, RULES / rules.ALERTS_FILE]
    done = vmalert_dry_run(vm_binaries, committed)
    assert done.returncode == 0, done.stdout + done.stderr
    # The rule files vmalert runs below are the committed ones but for the window (5 s, not
    # 2 m) and the group interval (1 s, not 30 s).
    ours, defaults = rules_config(), config.load(ROOT / "config.yaml", environ={})

    def window_and_interval(cfg: Config) -> tuple[str, str]:
        return (f"[{format_duration(cfg.evaluation.window)}]",
                f"interval: {rules.prometheus_duration(cfg.rules.group_interval)}\n")

    (our_window, our_interval), (window, interval) = (window_and_interval(c)
                                                      for c in (ours, defaults))
    rendered = rules.render(ours)
    assert our_window in rendered[rules.RECORDING_FILE]
    for path in committed:
        text = rendered[path.name]
        assert window not in text and our_interval in text
        normalised = text.replace(our_window, window).replace(our_interval, interval)
        assert normalised == path.read_text(encoding="utf-8"), path.name


# --------------------------------------------------------------------------------------------
# The exporter on VictoriaMetrics


def test_once_on_victoriametrics_equals_the_ground_truth(vm_stack: VMStack) -> None:
    at = vm_stack.instant()
    got = parse(vm_stack.once(at))
    want = truth(vm_stack.fleet, at)
    assert {n for n, v in want.items() if v} == SERIES_NAMES
    worst, where = worst_difference(got, want)
    assert got[":triton_inference_rate_drift:ratio"][()] == pytest.approx(1.0, rel=1e-6)
    print(f"\nonce on VictoriaMetrics vs truth: worst relative difference {worst:.2e} ({where})")


def test_two_exporter_replicas_publish_byte_identical_figures(vm_stack: VMStack) -> None:
    """HA of the exporter: what two replicas behind one Service publish for one evaluation
    instant is identical, byte for byte, whichever of them Prometheus scrapes."""
    at = vm_stack.instant()
    vm_stack.settle(at)
    first, second = run_once([vm_stack.config_file("replica-a"),
                              vm_stack.config_file("replica-b")], at)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    assert derived_lines(first.stdout).count("\n") > 100

    # Two `serve` processes. eval_delay covers VictoriaMetrics' ingestion lag (samples become
    # searchable about 1 s after a scrape): both evaluate an instant whose data is complete.
    servers = []
    for name in ("a", "b"):
        cfg = vm_stack.config_file(f"serve-{name}")
        text = yaml.safe_load(cfg.read_text())
        text["evaluation"]["eval_delay"] = "3s"
        cfg.write_text(yaml.safe_dump(text))
        servers.append(Serve(cfg, vm_stack.folder / f"serve-{name}.log"))
    try:
        def same_instant() -> tuple[str, str] | None:
            a, b = (s.metrics() for s in servers)
            stamp = "triton_mig_exporter_last_evaluation_timestamp_seconds"
            ta, tb = (parse(x).get(stamp, {}).get((), 0.0) for x in (a, b))
            if ta == tb > 0 and ":nv_inference_count:rate" in a:
                return a, b
            return None

        a, b = wait_for(same_instant, 20, 0.05, what="both replicas at one instant")
        assert derived_lines(a) == derived_lines(b)
        assert derived_lines(a).count("\n") > 100
    finally:
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------------------------
# A Mimir/Cortex-like endpoint: /prometheus prefix, bearer token, tenant header


def test_prefix_token_and_tenant_in_front_of_a_real_server(vm_stack: VMStack) -> None:
    auth = VMAuth(vm_stack.binaries, vm_stack.folder / "vmauth", {"users": [{
        "bearer_token": TOKEN,
        "url_map": [{"src_paths": ["/prometheus/api/v1/.+"], "url_prefix": vm_stack.vm.url}],
    }]})
    with auth, TenantGate(auth.url, TENANT) as gate:
        endpoint = f"{gate.url}/prometheus"
        good = {"bearer_token": TOKEN, "headers": {"X-Scope-OrgID": TENANT}}
        configs = [
            vm_stack.config_file("good", endpoint, **good),
            vm_stack.config_file("bad-token", endpoint, bearer_token="wrong-" + TOKEN,
                                 headers={"X-Scope-OrgID": TENANT}),
            vm_stack.config_file("no-tenant", endpoint, bearer_token=TOKEN),
            vm_stack.config_file("no-prefix", gate.url, **good),
        ]
        at = vm_stack.instant()
        vm_stack.settle(at)
        ok, bad_token, no_tenant, no_prefix = run_once(configs, at)
        assert ok.returncode == 0, ok.stderr
        # Through the prefix, the token and the tenant header: the very same figures.
        assert ok.stdout == vm_stack.once(at)
        for done, says in ((bad_token, "HTTP 400: cannot find the provided auth token"),
                           (no_tenant, "HTTP 401: no org id"),
                           (no_prefix, "HTTP 400: ")):
            assert done.returncode == 1 and done.stdout == ""
            assert says in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
            assert TOKEN not in done.stderr  # vmauth echoes the token it refused: redacted
        for done in (bad_token, no_prefix):  # what vmauth says is each query's, as far as we know
            assert "could not be queried" in done.stderr
        # Mimir's and Cortex's "no org id": one line, naming the key to set.
        [line] = no_tenant.stderr.splitlines()
        assert line.endswith("; set X-Scope-OrgID, as Mimir and Cortex need)"), line
        # vmauth's answer names the path it has no route for (the rest is cut at 300 chars).
        assert "requestURI: /api/v1/query?" in no_prefix.stderr

        cfg = vm_stack.config_file("serve-bad-token", endpoint, bearer_token="wrong-" + TOKEN,
                                   headers={"X-Scope-OrgID": TENANT})
        serve = Serve(cfg, vm_stack.folder / "serve-bad-token.log")
        try:
            def down() -> Figures | None:
                figures = parse(serve.metrics())
                up = figures.get("triton_mig_exporter_upstream_up", {}).get(())
                failed = figures.get("triton_mig_exporter_upstream_requests_total", {}).get(
                    (("outcome", "http_4xx"),), 0.0)
                # The cycle's warning is logged just after its figures are published.
                logged = "cannot find the provided auth token" in serve.log.read_text()
                return figures if up == 0.0 and failed > 0 and logged else None

            figures = wait_for(down, 15, 0.2, what="upstream_up 0 with a wrong token")
            assert not SERIES_NAMES & set(figures)
            assert TOKEN not in serve.log.read_text()
        finally:
            serve.stop()


# --------------------------------------------------------------------------------------------
# Where MetricsQL changes a figure


def test_metricsql_rate_keeps_the_full_rate_of_series_that_start_or_stop_in_the_window(
    vm_stack: VMStack,
) -> None:
    """Half a window after an epoch boundary that unloads some (model, version, pod) pairs and
    loads others, on the same samples (scrapes every second) in both engines.

    The true mean rate over the window (``truth(strict=False)``) of a pair that stopped at the
    boundary is half its old rate; of a pair that started, half its new rate. MetricsQL's rate()
    is the slope from the last sample *before* the window to the last one in it: it reports the
    full old rate of a stopped series until the window has passed (2x the truth here) and the
    full new rate of a started one from its second sample on (2x). Prometheus extrapolates from
    the samples inside the window: towards zero for a new counter (exact here), by half a scrape
    interval past the last sample of a stopped one (0.8x the truth here)."""
    h = vm_stack.history
    at = h.boundary + WINDOW / 2
    vm_config = vm_stack.config_file("history-vm", h.vm.url)
    prom_config = vm_stack.config_file("history-prom", h.prom.url)

    def both() -> tuple[Figures, Figures] | None:
        h.vm.force_flush()
        done = run_once([vm_config, prom_config], at)
        assert all(d.returncode == 0 for d in done), [d.stderr for d in done]
        vm_out, prom_out = (parse(d.stdout) for d in done)
        # Imported series become visible at VictoriaMetrics' next 10 s index refresh.
        return (vm_out, prom_out) if set(vm_out) == set(prom_out) else None

    vm_figures, prom_figures = wait_for(both, 30, 1.0, what="the history in both engines")
    metricsql, promql = vm_figures[PAIR_RATE], prom_figures[PAIR_RATE]
    exact = truth(h.fleet, at, strict=False)[PAIR_RATE]
    before = truth(h.fleet, h.boundary - 0.5)[PAIR_RATE]
    after = truth(h.fleet, h.boundary + WINDOW + 2 * SCRAPE)[PAIR_RATE]
    stopped, started = set(before) - set(after), set(after) - set(before)
    assert len(stopped) == 5 and len(started) == 2, "seed 7, four models, first boundary"
    assert set(metricsql) == set(promql) == set(exact) == set(before) | set(after)
    for key in stopped:
        assert exact[key] == pytest.approx(before[key] / 2)
        assert metricsql[key] == pytest.approx(before[key], rel=1e-3), key
        # Samples at b-2 and b-1, extended by half an interval each way: 2 s of 5.
        assert promql[key] == pytest.approx(before[key] * 2 / WINDOW, rel=1e-3), key
    for key in started:
        assert exact[key] == pytest.approx(after[key] / 2)
        assert metricsql[key] == pytest.approx(after[key], rel=1e-3), key
        assert promql[key] == pytest.approx(exact[key], rel=1e-3), key
    for key in set(before) & set(after):
        # A rate that changes at the boundary: both off the true mean by at most about one
        # scrape interval's weight of the change.
        bound = abs(after[key] - before[key]) * 1.2 * SCRAPE / WINDOW + 1e-3 * exact[key]
        for engine in (metricsql, promql):
            assert abs(engine[key] - exact[key]) <= bound, (key, engine[key], exact[key])
    fleet = ":nv_inference_count:rate"
    want = truth(h.fleet, at, strict=False)[fleet][()]
    got_vm, got_prom = vm_figures[fleet][()], prom_figures[fleet][()]
    assert got_vm > got_prom and got_vm > want
    print(f"\n{fleet} at boundary + {WINDOW / 2:g}s: truth {want:.1f}, "
          f"MetricsQL {got_vm:.1f} ({got_vm / want:.3f}x), "
          f"PromQL {got_prom:.1f} ({got_prom / want:.3f}x)")


# --------------------------------------------------------------------------------------------
# rules/ in vmalert


def test_rules_in_vmalert_record_what_once_prints(vm_stack: VMStack) -> None:
    at = recorded_instant(vm_stack)
    recorded = recorded_at(vm_stack, at)
    assert set(recorded) == SERIES_NAMES, SERIES_NAMES ^ set(recorded)
    exported = parse(vm_stack.once(at))
    worst, where = worst_difference(recorded, exported)
    assert recorded[":triton_inference_rate_drift:ratio"][()] == pytest.approx(1.0, rel=REL)
    for group in vm_stack.vmalert.groups():
        for rule in group["rules"]:
            assert not rule.get("lastError"), (rule["name"], rule["lastError"])
    # A rule reading a recorded series reads the previous evaluation's result (it comes back
    # through remote write): the fleet rate recorded at T is the sum of the per-pair rates
    # recorded one group interval before (two when that one was not yet searchable).
    fleet = recorded[":nv_inference_count:rate"][()]
    sums = [sum(recorded_at(vm_stack, at - k * GROUP_INTERVAL)[PAIR_RATE].values())
            for k in (0, 1, 2)]
    lags = [k for k, total in enumerate(sums) if total == pytest.approx(fleet, rel=1e-9)]
    assert (lags and lags[0] >= 1) or sums[0] == pytest.approx(sums[1], rel=1e-9), (fleet, sums)
    print(f"\nvmalert vs once at T: worst relative difference {worst:.2e} ({where}); "
          f"chained rules lag {lags} group interval(s)")


@pytest.fixture(scope="module")
def faulty(vm_stack: VMStack) -> Iterator[float]:
    """An instant (recorded by vmalert) with an undeduplicated HA replica and unlabelled series
    in the upstream for the whole window and rule chain."""
    vm_stack.faults.duplicate_replica = True
    vm_stack.faults.unlabeled_series = True
    try:
        yield recorded_instant(vm_stack, not_before=time.time() + SCRAPE)
    finally:
        vm_stack.faults.duplicate_replica = False
        vm_stack.faults.unlabeled_series = False


def test_faults_on_victoriametrics_with_and_without_replica_dedup(
    vm_stack: VMStack, faulty: float
) -> None:
    at = faulty
    want = truth(vm_stack.fleet, at)
    kept = parse(vm_stack.once(at))
    merged = parse(vm_stack.once(at, vm_stack.vm_dedup.url))
    # Replica label kept (as Prometheus stores it): the exporter deduplicates, the drift shows
    # the double counting and the unlabelled series.
    worst, where = worst_difference(kept, want)
    assert kept[":triton_inference_rate_drift:ratio"][()] < 0.51
    # Replica label dropped at ingestion + -dedup.minScrapeInterval: one copy is stored, the
    # raw rate is not doubled; every other figure is the same.
    raw = ":nv_inference_count:rate_raw"
    assert merged[raw][()] == pytest.approx(want[raw][()] / 2, rel=REL)
    drift = ":triton_inference_rate_drift:ratio"
    assert merged[drift][()] == pytest.approx(want[drift][()] * 2, rel=REL)
    assert 0.9 < merged[drift][()] < 0.99  # the unlabelled series alone
    others = {n: v for n, v in want.items() if n not in (raw, drift)}
    worst_merged, _ = worst_difference(
        {n: v for n, v in merged.items() if n not in (raw, drift)}, others)
    print(f"\nfaults, replica label kept: drift {kept[drift][()]:.4f}, worst {worst:.2e} "
          f"({where}); label dropped + dedup: drift {merged[drift][()]:.4f}, raw "
          f"{merged[raw][()] / want[raw][()]:.4f} of the doubled truth, worst {worst_merged:.2e}")
    # Both replicas are scraped, yet one sample per interval is kept.
    counts = vm_stack.vm_dedup.query(f"count_over_time(nv_inference_count[{WINDOW:g}s])", at)
    assert counts and max(float(c["value"][1]) for c in counts) <= WINDOW / SCRAPE + 1
    copies = vm_stack.vm.query('count(nv_inference_count{prometheus_replica="prometheus-k8s-1"})',
                               at)
    assert copies and float(copies[0]["value"][1]) > 0


def test_rules_in_vmalert_under_faults(vm_stack: VMStack, faulty: float) -> None:
    at = faulty
    recorded = recorded_at(vm_stack, at)
    worst, where = worst_difference(recorded, parse(vm_stack.once(at)))
    assert recorded[":triton_inference_rate_drift:ratio"][()] < 0.51
    print(f"\nvmalert vs once under faults: worst relative difference {worst:.2e} ({where})")

    # The committed alerts read the recorded series: the mismatch alert is pending (for: 10m).
    def pending() -> bool:
        return any(a["name"] == "TritonInferenceRateMismatch"
                   and a["state"] in ("pending", "firing") for a in vm_stack.vmalert.alerts())

    wait_for(pending, 10, 0.2, what="TritonInferenceRateMismatch pending in vmalert")


# --------------------------------------------------------------------------------------------
# VictoriaMetrics' default latency offset


def test_default_latency_offset_evaluates_recent_instants_30s_earlier(vm_stack: VMStack) -> None:
    """-search.latencyOffset (default 30s): a query for an instant less than 30 s old is
    evaluated at now - 30s instead, without a warning (the answer carries the requested time).
    The exporter and vmalert alike; an instant older than the offset is answered as asked."""
    wait_for(lambda: time.time() > vm_stack.started + 34, 60, 0.5, what="35 s of data")
    query = "max(timestamp({}))"
    default = upstream.UpstreamConfig(url=vm_stack.vm_default.url)
    tuned = upstream.UpstreamConfig(url=vm_stack.vm.url)
    with upstream.PrometheusClient(default) as client, upstream.PrometheusClient(tuned) as other:
        now = time.time()
        newest = query.format("vm_app_uptime_seconds")
        recent = client.instant(newest, now - 1).frame["value"].iloc[0]
        delayed = client.instant(newest, now - 31).frame["value"].iloc[0]
        fresh = other.instant(query.format("up"), now - 1).frame["value"].iloc[0]
    assert (now - 1) - recent > 25  # the newest sample it used is about 30 s old
    assert (now - 31) - delayed < 3 * SCRAPE
    assert (now - 1) - fresh < 3 * SCRAPE
    # vmalert on the same VictoriaMetrics: what it records at T was computed from data that
    # ends about 30 s before T.
    vm_stack.vm_default.force_flush()
    recorded = vm_stack.vm_default.export(LATENCY_RECORD, now - 10, now)
    ages = [ts / 1000 - value for series in recorded
            for ts, value in zip(series["timestamps"], series["values"], strict=True)]
    assert ages and min(ages) > 25, ages
    print(f"\ndefault latencyOffset: newest sample {(now - 1) - recent:.1f} s old at now-1s, "
          f"{(now - 31) - delayed:.1f} s at now-31s; tuned: {(now - 1) - fresh:.1f} s; "
          f"vmalert's records: {min(ages):.1f}-{max(ages):.1f} s")

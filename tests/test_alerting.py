"""Alerting end to end: series -> rule evaluation -> firing alert -> Alertmanager -> a receiver.

promtool unit tests prove the alert expressions (``rules/tests``); this module proves the path a
user relies on, with real processes on 127.0.0.1: the simulator, scraped by a real Prometheus that
loads the rules rendered with short ``for:`` durations and sends its alerts to a real Alertmanager
(Debian's ``prometheus-alertmanager``) routed as ``deploy/alertmanager/alertmanager.yml`` routes
them, to a webhook receiver in this process. The exporter alerts come from a running exporter
(in process) whose upstream is a second Prometheus, stopped and started again by the test.

Each scenario waits for both notifications (firing, then resolved) and checks the labels and
annotations the runbook promises, and Alertmanager's own view of the alerts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter import config, rules
from exporter.catalog import Selectors
from exporter.config import Config
from exporter.lab import amserver, demo, promserver, simulate
from exporter.service import Service

ROOT = Path(__file__).resolve().parent.parent
DEPLOYED = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DEPLOYED_WEBHOOK = "http://alert-receiver.example:5001/triton-mig-exporter"
RUNBOOK = ROOT / "docs" / "runbook.md"

SCRAPE, WINDOW, EPOCH = 1.0, 5.0, 15.0
#: Short `for:` durations; the alerts not exercised here wait long enough never to fire.
TEST_RULES: dict[str, Any] = {
    "group_interval": "1s",
    "mismatch_for": "2s",
    "upstream_down_for": "1s",
    "stale_for": "8s",  # well after UpstreamDown is notified: Stale then inhibits it
    "absent_for": "10m",
    "idle_for": "2s",
    "queue_for": "10m",
    "alert_labels": {"team": "inference"},
}
FLEET = {"servers": 4, "models": 3, "hosts": 2, "gpus_per_host": 1,
         "epoch_seconds": EPOCH, "churn": 0.0}


@pytest.fixture(scope="session")
def am_binaries() -> amserver.AlertmanagerBinaries:
    return amserver.find_alertmanager()


# --------------------------------------------------------------------------------------------
# The deployed example and the pieces, without servers


def test_the_deployed_example_is_the_example_config() -> None:
    """deploy/alertmanager/alertmanager.yml (hand-written, commented) holds exactly what
    example_config() builds, which the demo and the end-to-end tests run."""
    deployed = yaml.safe_load(DEPLOYED.read_text(encoding="utf-8"))
    assert deployed == amserver.example_config(DEPLOYED_WEBHOOK)
    route = deployed["route"]["routes"][0]
    assert route["group_by"] == ["alertname", "model"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == (
        "30s", "5m", "4h")
    assert deployed["receivers"][1]["webhook_configs"][0]["send_resolved"] is True


def test_the_example_route_matches_every_alert_by_name_and_nothing_else() -> None:
    matcher = amserver.example_config("http://x/")["route"]["routes"][0]["matchers"][0]
    name, _, pattern = matcher.partition("=~")
    assert name == "alertname"
    regex = re.compile(json.loads(pattern))  # Alertmanager anchors regex matchers
    assert all(regex.fullmatch(alert) for alert in rules.ALERT_NAMES)
    assert not any(regex.fullmatch(other) for other in ("Watchdog", "TritonMigExporter", ""))


def test_ensure_templates_copies_once_and_leaves_existing_files_alone(tmp_path: Path) -> None:
    source, target = tmp_path / "package", tmp_path / "usr-share" / "alertmanager"
    source.mkdir()
    for name in amserver.TEMPLATES:
        (source / name).write_text(f"{{{{ define {name!r} }}}}{{{{ end }}}}")
    written = amserver.ensure_templates(source, target)
    assert [p.name for p in written] == list(amserver.TEMPLATES)
    assert all((target / n).read_text() == (source / n).read_text() for n in amserver.TEMPLATES)
    assert all((target / n).stat().st_mode & 0o777 == 0o644 for n in amserver.TEMPLATES)
    assert amserver.ensure_templates(source, target) == []  # idempotent
    (target / "email.tmpl").write_text("owned by an installed package")
    (target / "default.tmpl").unlink()
    assert [p.name for p in amserver.ensure_templates(source, target)] == ["default.tmpl"]
    assert (target / "email.tmpl").read_text() == "owned by an installed package"
    assert sorted(p.name for p in target.iterdir()) == sorted(amserver.TEMPLATES)  # no leftovers


def test_ensure_templates_as_non_root_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = tmp_path / "package", tmp_path / "target"
    source.mkdir()
    for name in amserver.TEMPLATES:
        (source / name).write_text("x")
    monkeypatch.setattr(amserver.os, "geteuid", lambda: 1000)
    with pytest.raises(amserver.AlertmanagerUnavailable) as error:
        amserver.ensure_templates(source, target)
    message = str(error.value)
    assert "only root can put them there" in message and "sudo install -D -m 0644" in message
    assert str(target) in message and "apt-get install prometheus-alertmanager" in message
    assert not target.exists()
    target.mkdir()
    for name in amserver.TEMPLATES:
        (target / name).write_text("x")
    assert amserver.ensure_templates(source, target) == []  # present: no root needed


def test_webhook_receiver_keeps_notifications_and_refuses_garbage() -> None:
    heard: list[dict[str, Any]] = []
    with amserver.WebhookReceiver(on_notification=heard.append) as receiver:
        body = {"status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": "A"}},
            {"status": "resolved", "labels": {"alertname": "B"}}]}
        assert requests.post(receiver.url, json=body, timeout=5).status_code == 200
        assert requests.post(receiver.url, data=b"[", timeout=5).status_code == 400
        assert requests.post(receiver.url, json=[1], timeout=5).status_code == 400
        assert receiver.notifications() == [body] == heard
        assert [a["labels"]["alertname"] for a in receiver.alerts()] == ["A", "B"]
        assert receiver.alerts("B", "resolved") == [body["alerts"][1]]
        assert receiver.alerts("A", "resolved") == []


def test_demo_fails_clearly_when_alertmanager_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable() -> amserver.AlertmanagerBinaries:
        raise amserver.AlertmanagerUnavailable("no package here")

    monkeypatch.setattr(amserver, "find_alertmanager", unavailable)
    monkeypatch.setattr(promserver, "find_prometheus", lambda: promserver.PrometheusBinaries(
        Path("/bin/true"), Path("/bin/true"), "2.42.0"))
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.main_from_args(parser.parse_args([])) == 1
    assert capsys.readouterr().err == "error: alertmanager: no package here\n"


# --------------------------------------------------------------------------------------------
# amtool on the deployed example


@pytest.mark.integration
def test_amtool_checks_the_deployed_config(am_binaries: amserver.AlertmanagerBinaries) -> None:
    report = amserver.check_config(am_binaries, DEPLOYED)
    assert "SUCCESS" in report and "1 inhibit rules" in report and "2 receivers" in report


@pytest.mark.integration
def test_amtool_check_config_refuses_a_broken_config(
    am_binaries: amserver.AlertmanagerBinaries, tmp_path: Path
) -> None:
    broken = amserver.example_config("http://x/")
    broken["route"]["routes"][0]["receiver"] = "nobody"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(amserver.AlertmanagerConfigError, match="nobody"):
        amserver.check_config(am_binaries, path)


@pytest.mark.integration
def test_the_deployed_route_sends_every_alert_to_the_receiver(
    am_binaries: amserver.AlertmanagerBinaries,
) -> None:
    cfg = config.load(ROOT / "config.yaml", environ={})
    severities = {a.name: a.severity for a in rules.alerts(cfg, Selectors.from_config(cfg))}
    for name, expected in [*((n, amserver.RECEIVER) for n in rules.ALERT_NAMES),
                           ("Watchdog", "default")]:
        labels = [f"alertname={name}", f"severity={severities.get(name, 'none')}"]
        done = amserver.run_amtool(am_binaries, ["config", "routes", "test",
                                                 f"--config.file={DEPLOYED}", *labels])
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == expected, (name, done.stdout)


# --------------------------------------------------------------------------------------------
# The whole path, on real servers


def pick_seed() -> int:
    """A fleet whose first epoch has idle Triton slices and whose next three have none, with
    traffic throughout: the idle alert fires in epoch 0 and resolves when epoch 1 begins."""
    for seed in range(1, 500):
        fleet = simulate.Fleet(simulate.FleetSpec(seed=seed, start=0.0, **FLEET))
        truths = [fleet.truth((k + 1) * EPOCH - 0.5, WINDOW) for k in range(4)]
        idle = [t[":dcgm_mig_slices_idle:count"][()] for t in truths]
        traffic = all(t[":nv_inference_count:rate"][()] > 0 for t in truths)
        if idle[0] >= 1 and idle[1:] == [0, 0, 0] and traffic:
            return seed
    raise AssertionError("no seed gives an idle first epoch followed by busy ones")


@dataclass
class Alerting:
    fleet: simulate.Fleet
    cfg: Config
    prom: promserver.PrometheusServer  # rules + alerts; scrapes the simulator and the exporter
    upstream: promserver.PrometheusServer  # the exporter's upstream
    am: amserver.AlertmanagerServer
    receiver: amserver.WebhookReceiver
    exporter: str  # host:port, the `instance` of its self-metrics


@pytest.fixture(scope="module")
def alerting(
    prometheus_binaries: promserver.PrometheusBinaries,
    am_binaries: amserver.AlertmanagerBinaries,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Alerting]:
    folder = tmp_path_factory.mktemp("alerting")
    seed = pick_seed()
    with contextlib.ExitStack() as cleanup:
        fleet = simulate.Fleet(simulate.FleetSpec(seed=seed, start=time.time(), **FLEET))
        sim = simulate.serve(fleet, "127.0.0.1", 0)
        cleanup.callback(sim.server_close)
        cleanup.callback(sim.shutdown)
        target = f"127.0.0.1:{sim.server_address[1]}"

        receiver = cleanup.enter_context(amserver.WebhookReceiver())
        am = amserver.AlertmanagerServer(
            am_binaries,
            amserver.example_config(receiver.url, group_wait="1s", group_interval="1s",
                                    repeat_interval="1m"),
            folder / "alertmanager")
        cleanup.enter_context(am)

        upstream = promserver.PrometheusServer(
            prometheus_binaries, fleet.prometheus_config(target, SCRAPE), folder / "upstream",
            port=promserver.free_port())  # a fixed port: it is stopped and started again
        cleanup.enter_context(upstream)

        cfg = config.from_mapping({
            "upstream": {"url": upstream.url, "timeout": "1s", "retries": 0},
            "evaluation": {"interval": "1s", "window": f"{WINDOW:g}s",
                           "scrape_interval": f"{SCRAPE:g}s"},
            "web": {"listen_address": "127.0.0.1:0"},
            "rules": TEST_RULES,
        }, "alerting test", environ={})
        service = Service(cfg)
        service.start()
        cleanup.callback(service.stop)
        host, port = service.address
        exporter = f"{host}:{port}"

        base = fleet.prometheus_config(target, SCRAPE)
        prom = promserver.PrometheusServer(prometheus_binaries, {
            **base,
            "scrape_configs": [*base["scrape_configs"],
                               demo.exporter_scrape_job(cfg.rules.exporter_job, exporter)],
            "rule_files": [str(p) for p in rules.write(cfg, folder / "rules")],
            "alerting": amserver.prometheus_alerting(am.listen_address),
        }, folder / "prometheus", extra_args=[amserver.RESEND_DELAY_ARG])
        cleanup.enter_context(prom)
        yield Alerting(fleet, cfg, prom, upstream, am, receiver, exporter)


def diagnosis(a: Alerting) -> str:
    """What each stage holds, for a failure message."""
    out = []
    for what, get in (
        ("prometheus alerts", lambda: [(x["labels"]["alertname"], x["state"], x["activeAt"])
                                       for x in requests.get(f"{a.prom.url}/api/v1/alerts",
                                                             timeout=5).json()["data"]["alerts"]]),
        ("unhealthy rules", lambda: [(r["name"], r.get("lastError")) for g in requests.get(
            f"{a.prom.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            for r in g["rules"] if r["health"] != "ok"]),
        ("alertmanagers", lambda: requests.get(f"{a.prom.url}/api/v1/alertmanagers",
                                               timeout=5).json()["data"]),
        ("exporter up", lambda: a.prom.query('up{job="triton-mig-exporter"}')),
        ("upstream_up", lambda: a.prom.query("triton_mig_exporter_upstream_up")),
        ("alertmanager alerts", lambda: [(x["labels"]["alertname"], x["status"]["state"])
                                         for x in a.am.alerts()]),
        ("received", lambda: [(x["labels"]["alertname"], x["status"])
                              for x in a.receiver.alerts()]),
    ):
        try:
            out.append(f"{what}: {get()}")
        except Exception as error:  # a stage that is down says so
            out.append(f"{what}: {type(error).__name__}: {error}")
    out.append(f"prometheus log:\n{a.prom.log_tail(10)}")
    out.append(f"alertmanager log:\n{a.am.log_tail(10)}")
    return "\n".join(out)


def wait_alert(a: Alerting, name: str, status: str, timeout: float,
               fingerprint: str | None = None) -> dict[str, Any]:
    """The first alert ``name`` with ``status`` the receiver got (of ``fingerprint``)."""
    def found() -> dict[str, Any] | None:
        for alert in a.receiver.alerts(name, status):
            if fingerprint is None or alert["fingerprint"] == fingerprint:
                return alert
        return None

    try:
        alert: dict[str, Any] = promserver.wait_for(
            found, max(timeout, 0.1), 0.1, what=f"a {status} notification of {name}")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{diagnosis(a)}") from None
    return alert


def check_promises(alert: dict[str, Any], cfg: Config, **labels: str) -> list[str]:
    """The labels and annotations the runbook promises; returns the expanded ``$value``s."""
    name = alert["labels"]["alertname"]
    spec = next(a for a in rules.alerts(cfg, Selectors.from_config(cfg)) if a.name == name)
    assert alert["labels"] == {"alertname": name, "severity": spec.severity,
                               **cfg.rules.alert_labels, **labels}
    annotations = alert["annotations"]
    assert annotations["summary"] == spec.summary
    assert annotations["runbook_url"] == f"{cfg.rules.runbook_url}#{name.lower()}"
    assert f"\n## {name}\n" in RUNBOOK.read_text(encoding="utf-8")  # the anchor exists
    pattern = ""
    for text, action in re.findall(r"(.*?)(\{\{.*?\}\}|$)", spec.description, flags=re.S):
        pattern += re.escape(text)
        label = re.fullmatch(r"\{\{ \$labels\.(\w+) \}\}", action)
        if label:
            pattern += re.escape(alert["labels"].get(label.group(1), ""))
        elif action:
            pattern += "(.+?)"
    match = re.fullmatch(pattern, annotations["description"], flags=re.S)
    assert match, (annotations["description"], spec.description)
    return list(match.groups())


def am_alert(am: amserver.AlertmanagerServer, fingerprint: str) -> dict[str, Any] | None:
    return next((a for a in am.alerts() if a["fingerprint"] == fingerprint), None)


@pytest.mark.integration
def test_idle_slices_alert_reaches_the_receiver_and_resolves_when_the_slices_get_work(
    alerting: Alerting,
) -> None:
    a = alerting
    busy_from = a.fleet.epoch_start(1)
    if time.time() > busy_from - 8:
        pytest.fail("the idle-slice test must run first in this module: its fleet's slices are "
                    "idle in the first epoch only")
    truth = a.fleet.truth(busy_from - 0.5, WINDOW)
    idle = [dict(key) for key, value in truth["gpu_instance:dcgm_tensor_active:avg"].items()
            if value < simulate.IDLE_THRESHOLD]
    assert len(idle) == truth[":dcgm_mig_slices_idle:count"][()] >= 1

    fired = wait_alert(a, "TritonMigSlicesIdle", "firing", busy_from - time.time())
    (count,) = check_promises(fired, a.cfg)
    assert float(count) == len(idle)
    held = am_alert(a.am, fired["fingerprint"])
    assert held is not None and held["status"]["state"] == "active"
    assert held["receivers"] == [{"name": amserver.RECEIVER}]
    # The per-slice alert names each idle slice and the pod on it.
    promserver.wait_for(lambda: len(a.receiver.alerts("TritonMigSliceIdle", "firing"))
                        >= len(idle), busy_from - time.time(), what="every TritonMigSliceIdle")
    slices = a.receiver.alerts("TritonMigSliceIdle", "firing")
    assert sorted(s["labels"]["pod"] for s in slices) == sorted(s["pod"] for s in idle)
    for alert in slices:
        identity = next(s for s in idle if s["pod"] == alert["labels"]["pod"])
        check_promises(alert, a.cfg, **identity)

    # In the next epoch every slice has work: the resolved notification follows.
    resolved = wait_alert(a, "TritonMigSlicesIdle", "resolved",
                          busy_from + 12 - time.time(), fired["fingerprint"])
    assert resolved["endsAt"] > fired["startsAt"]
    check_promises(resolved, a.cfg)
    promserver.wait_for(lambda: am_alert(a.am, fired["fingerprint"]) is None, 5,
                        what="Alertmanager to drop the resolved alert")


@pytest.mark.integration
def test_rate_mismatch_alert_reaches_the_receiver_and_resolves(alerting: Alerting) -> None:
    a = alerting
    assert not a.receiver.alerts("TritonInferenceRateMismatch")  # a clean fleet adds up
    faults = a.fleet.faults
    faults.duplicate_replica = True  # the upstream now holds an HA replica it does not dedup
    try:
        fired = wait_alert(a, "TritonInferenceRateMismatch", "firing", 20)
        (value,) = check_promises(fired, a.cfg)
        assert value.endswith("%") and float(value[:-1]) < 95, value  # off by over 5%

        def settled() -> dict[str, Any] | None:
            """Prometheus re-sends the alert with the current value: once the window holds only
            replica samples, it says what the runbook promises for two replicas, about 50%."""
            held = am_alert(a.am, fired["fingerprint"])
            if held is None:
                return None
            (now,) = check_promises(held, a.cfg)
            return held if 45 <= float(now.rstrip("%")) <= 55 else None

        held = promserver.wait_for(settled, WINDOW + 10, 0.2, what="the drift to settle at 50%")
        assert held["status"]["state"] == "active"
        assert held["receivers"] == [{"name": amserver.RECEIVER}]
    finally:
        faults.duplicate_replica = False
    resolved = wait_alert(a, "TritonInferenceRateMismatch", "resolved", 20,
                          fired["fingerprint"])
    check_promises(resolved, a.cfg)
    promserver.wait_for(lambda: am_alert(a.am, fired["fingerprint"]) is None, 5,
                        what="Alertmanager to drop the resolved alert")


@pytest.mark.integration
def test_exporter_stale_and_upstream_down_alerts_reach_the_receiver_and_resolve(
    alerting: Alerting,
) -> None:
    a = alerting
    exporter_labels = {"job": a.cfg.rules.exporter_job, "instance": a.exporter}
    promserver.wait_for(
        lambda: a.prom.query("triton_mig_exporter_last_success_timestamp_seconds > 0"), 15,
        what="a successful exporter cycle scraped")
    assert not a.receiver.alerts("TritonMigExporterStale")
    a.upstream.stop()  # the exporter's upstream goes away
    try:
        down = wait_alert(a, "TritonMigExporterUpstreamDown", "firing", 20)
        check_promises(down, a.cfg, **exporter_labels)
        stale = wait_alert(a, "TritonMigExporterStale", "firing", 20)
        (age,) = check_promises(stale, a.cfg, **exporter_labels)
        assert re.fullmatch(r"[0-9.]+s", age), age
        # Stale (critical) inhibits UpstreamDown of the same exporter: one cause, one page.
        held = promserver.wait_for(
            lambda: (x := am_alert(a.am, down["fingerprint"])) is not None
            and x["status"]["state"] == "suppressed" and x, 5, what="UpstreamDown inhibited")
        assert held["status"]["inhibitedBy"] == [stale["fingerprint"]]
        source = am_alert(a.am, stale["fingerprint"])
        assert source is not None and source["status"]["state"] == "active"
    finally:
        a.upstream.start()
    for alert in (stale, down):
        resolved = wait_alert(a, alert["labels"]["alertname"], "resolved", 20,
                              alert["fingerprint"])
        check_promises(resolved, a.cfg, **exporter_labels)


# --------------------------------------------------------------------------------------------
# The demo


def _lines(stream: Any, into: queue.Queue[str]) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))


@pytest.mark.integration
def test_demo_runs_alertmanager_with_the_rules_and_stops_everything(
    prometheus_binaries: promserver.PrometheusBinaries,
    am_binaries: amserver.AlertmanagerBinaries,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo", "--web.listen-address", "127.0.0.1:0",
         "--fault", "duplicate-replica", "--scrape-interval", "1s", "--window", "4s",
         "--interval", "1s"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    urls: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 60
        while "exporter" not in urls:
            assert proc.poll() is None, "the demo exited early"
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                name, _, rest = line.partition(": ")
                urls[name] = rest.split()[0] if rest else ""
            assert time.monotonic() < deadline, f"no exporter line; got {urls}"
        am, prom = urls["alertmanager"], urls["prometheus"]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", am)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", urls["exporter"])
        page = requests.get(am + "/", timeout=5)
        assert page.status_code == 200 and "api/v2/alerts" in page.text
        assert requests.get(am + "/api/v2/alerts", timeout=5).json() == []

        def discovered() -> bool:
            data = requests.get(prom + "/api/v1/alertmanagers", timeout=5).json()["data"]
            return [x["url"] for x in data["activeAlertmanagers"]] == [am + "/api/v2/alerts"]

        promserver.wait_for(discovered, 10, what="Prometheus to find the demo's Alertmanager")
        groups = requests.get(prom + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        by_name = {g["name"]: g for g in groups}
        assert sorted(by_name) == sorted([rules.RECORDING_GROUP, rules.ALERTS_GROUP])
        durations = {r["name"]: r["duration"] for r in by_name[rules.ALERTS_GROUP]["rules"]}
        assert durations["TritonInferenceRateMismatch"] == 60  # demo_rules: 1m
        first = by_name[rules.RECORDING_GROUP]["rules"][0]["query"]
        assert "[4s]" in first, first  # the demo's window
        promserver.wait_for(lambda: requests.get(prom + "/api/v1/query", params={
            "query": 'up{job="triton-mig-exporter"} == 1'}, timeout=5).json()["data"]["result"],
            15, what="Prometheus scraping the exporter")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:  # a failed check: interrupt, so the demo stops what it started
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        reader.join(5)
    for url in (am + "/-/ready", prom + "/-/ready", urls["exporter"]):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=2)

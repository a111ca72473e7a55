"""``demo``: the simulator, a real Prometheus scraping it with the recording rules and alerts
loaded, an Alertmanager that Prometheus sends its alerts to, and the exporter querying that
Prometheus, all on 127.0.0.1, until Ctrl-C. Every process it starts, it stops.

The rules are rendered into the demo's temporary folder for the demo's window with short
``for:`` durations (:data:`DEMO_RULES`), so an alert fires within minutes:
``--fault duplicate-replica`` (or ``POST /-/faults`` on the simulator) makes
TritonInferenceRateMismatch fire in about two. Alertmanager routes the alerts as
``deploy/alertmanager/alertmanager.yml`` does, to a webhook receiver in this process that prints
each notification; its page (the URL printed as ``alertmanager:``) lists the current alerts.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter import config, rules
from exporter.config import format_duration, parse_duration
from exporter.lab import amserver, promserver, simulate
from exporter.service import Service, wait_for_signal

#: ``rules:`` settings of the demo: ``for:`` durations short enough to watch an alert fire.
DEMO_RULES: dict[str, str] = {
    "mismatch_for": "1m",
    "upstream_down_for": "1m",
    "stale_for": "2m",
    "absent_for": "1m",
    "idle_for": "2m",
    "queue_for": "2m",
}
#: Alertmanager timings of the demo (the deployed example waits 30s / 5m / 4h).
DEMO_GROUP_WAIT, DEMO_GROUP_INTERVAL, DEMO_REPEAT_INTERVAL = "10s", "30s", "1h"
SELF_METRICS = "triton_mig_exporter_.*"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web.listen-address", dest="listen_address", default="127.0.0.1:9410",
                        help="where the exporter serves /metrics (default 127.0.0.1:9410; "
                        "a busy port falls back to a free one)")
    parser.add_argument("--servers", type=int, default=8, help="Triton servers (default 8)")
    parser.add_argument("--models", type=int, default=5, help="models (default 5)")
    parser.add_argument("--hosts", type=int, default=2, help="GPU hosts (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scrape-interval", type=parse_duration, default=5.0,
                        help="Prometheus scrape (and rule evaluation) interval (default 5s)")
    parser.add_argument("--interval", type=parse_duration, default=10.0,
                        help="exporter cycle interval (default 10s)")
    parser.add_argument("--window", type=parse_duration, default=30.0,
                        help="rate window, at least 4x the scrape interval (default 30s)")
    parser.add_argument("--fault", action="append", default=[],
                        choices=["duplicate-replica", "unlabeled-series"],
                        help="start with this simulator fault on (repeatable); "
                        "duplicate-replica makes TritonInferenceRateMismatch fire in about 2 "
                        "minutes")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Prometheus data folder (default: a temporary one, removed on exit)")


def _listen(requested: str) -> str:
    """The requested address, or a free port on the same host when it is taken."""
    host, _, port = requested.rpartition(":")
    host = host or "127.0.0.1"
    try:
        with socket.socket() as sock:
            sock.bind((host, int(port)))
    except OSError:
        return f"{host}:0"
    return f"{host}:{port}"


def exporter_scrape_job(job: str, target: str) -> dict[str, Any]:
    """A scrape job for the exporter that keeps only its self-metrics.

    For a Prometheus that also runs the recording rules: the exporter's copies of the derived
    series would be a second series of each name next to the recorded one (and double every
    alert on them). The exporter alerts need only the self-metrics and ``up``.
    """
    return {
        "job_name": job,
        "honor_labels": True,
        "static_configs": [{"targets": [target]}],
        "metric_relabel_configs": [
            {"source_labels": ["__name__"], "regex": SELF_METRICS, "action": "keep"},
        ],
    }


#: The demo's upstream timeout and retries (its Prometheus answers on 127.0.0.1 in
#: milliseconds).
DEMO_TIMEOUT = 2.0
DEMO_RETRIES = 2


def demo_config(prometheus_url: str | None, args: argparse.Namespace) -> config.Config:
    """The exporter's configuration, whose ``rules:`` section renders the demo's rules (which
    do not depend on the upstream: ``None`` leaves its default)."""
    upstream: dict[str, Any] = {"url": prometheus_url} if prometheus_url is not None else {}
    # The Prometheus is local: a short timeout, and a staleness bound a slow cycle cannot
    # outlast, so figures that answered are never withdrawn between two cycles.
    upstream |= {"timeout": format_duration(DEMO_TIMEOUT), "retries": DEMO_RETRIES}
    worst = config.worst_case_seconds(DEMO_TIMEOUT, DEMO_RETRIES, config.UpstreamConfig().backoff)
    return config.from_mapping({
        "upstream": upstream,
        "evaluation": {
            "interval": format_duration(args.interval),
            "window": format_duration(args.window),
            "scrape_interval": format_duration(args.scrape_interval),
            "staleness": format_duration(max(3 * args.interval, worst + args.interval)),
        },
        "web": {"listen_address": _listen(args.listen_address)},
        "rules": {"group_interval": format_duration(args.scrape_interval), **DEMO_RULES},
    }, "demo", environ={})


def _printer() -> Callable[[dict[str, Any]], None]:
    """A webhook callback printing each alert once per state (notifications repeat groups)."""
    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def on_notification(notification: dict[str, Any]) -> None:
        for alert in notification.get("alerts", []):
            key = (str(alert.get("fingerprint")), str(alert.get("status")))
            with lock:
                if key in seen:
                    continue
                seen.add(key)
            labels = alert.get("labels", {})
            extra = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())
                              if k not in ("alertname", "severity"))
            print(f"alertmanager notified: {alert.get('status')} {labels.get('alertname')} "
                  f"({labels.get('severity', '')}{'; ' + extra if extra else ''}): "
                  f"{alert.get('annotations', {}).get('summary', '')}", flush=True)

    return on_notification


def main_from_args(args: argparse.Namespace) -> int:
    if args.window < 4 * args.scrape_interval:
        print("error: --window must be at least 4x --scrape-interval", file=sys.stderr)
        return 2
    try:
        binaries = promserver.find_prometheus()
    except promserver.PrometheusUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        am_binaries = amserver.find_alertmanager()
    except amserver.AlertmanagerUnavailable as error:
        print(f"error: alertmanager: {error}", file=sys.stderr)
        return 1
    faults = simulate.Faults(duplicate_replica="duplicate-replica" in args.fault,
                             unlabeled_series="unlabeled-series" in args.fault)
    spec = simulate.FleetSpec(servers=args.servers, models=args.models, hosts=args.hosts,
                              seed=args.seed, start=time.time() - 600)
    fleet = simulate.Fleet(spec, faults)
    with tempfile.TemporaryDirectory(prefix="triton-mig-demo-") as tmp:
        folder = Path(tmp)
        sim = simulate.serve(fleet, "127.0.0.1", 0)
        target = f"127.0.0.1:{sim.server_address[1]}"
        receiver = amserver.WebhookReceiver(on_notification=_printer())
        am = amserver.AlertmanagerServer(
            am_binaries,
            amserver.example_config(receiver.url, group_wait=DEMO_GROUP_WAIT,
                                    group_interval=DEMO_GROUP_INTERVAL,
                                    repeat_interval=DEMO_REPEAT_INTERVAL),
            folder / "alertmanager",
            ui_path=amserver.write_status_page(folder / "alertmanager-ui"),
        )
        prom: promserver.PrometheusServer | None = None
        service: Service | None = None
        try:
            receiver.start()
            try:
                am.start()
            except amserver.AlertmanagerError as error:
                print(f"error: alertmanager did not start: {error}", file=sys.stderr)
                return 1
            rule_files = rules.write(demo_config(None, args), folder / "rules")
            base = {
                **fleet.prometheus_config(target, args.scrape_interval),
                "rule_files": [str(path) for path in rule_files],
                "alerting": amserver.prometheus_alerting(am.listen_address),
            }
            prom = promserver.PrometheusServer(
                binaries, base, args.data_dir or folder / "prometheus",
                extra_args=[amserver.RESEND_DELAY_ARG],
            )
            try:
                prom.start()
            except promserver.PrometheusError as error:
                print(f"error: prometheus did not start: {error}", file=sys.stderr)
                return 1
            cfg = demo_config(prom.url, args)
            service = Service(cfg)
            service.start()
            host, port = service.address
            shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
            prom.config = {**base, "scrape_configs": [
                *base["scrape_configs"], exporter_scrape_job(cfg.rules.exporter_job,
                                                             f"{shown}:{port}")]}
            prom.reload()
            print(f"simulator: http://{target}/  (faults: POST JSON to /-/faults, e.g. "
                  f"curl -d '{{\"duplicate_replica\": true}}' http://{target}/-/faults)")
            print(f"prometheus: {prom.url}  (rules and alerts: {prom.url}/alerts)")
            print(f"alertmanager: {am.url}")
            print(f"exporter: {service.metrics_url}", flush=True)
            # Two scrapes give a first rate, then for:, then the next evaluation.
            fire = parse_duration(DEMO_RULES["mismatch_for"]) + 3 * args.scrape_interval
            print("first figures within about "
                  f"{int(5 + args.scrape_interval * 2 + args.interval)} s; with "
                  "--fault duplicate-replica (or that curl) TritonInferenceRateMismatch reaches "
                  f"Alertmanager about {int(fire)} s later ({am.url}, {am.url}/api/v2/alerts) "
                  f"and its notification is printed here {DEMO_GROUP_WAIT} after that; "
                  "Ctrl-C stops everything", file=sys.stderr, flush=True)
            wait_for_signal()
        finally:
            if service is not None:
                service.stop()
            if prom is not None:
                prom.stop()
            am.stop()
            receiver.stop()
            sim.shutdown()
            sim.server_close()
    return 0

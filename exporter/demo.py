"""``demo``: the simulator, a real Prometheus scraping it and the exporter querying that
Prometheus, all on 127.0.0.1, until Ctrl-C. Every process it starts, it stops.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from exporter import config, promserver, simulate
from exporter.config import format_duration, parse_duration
from exporter.service import Service, wait_for_signal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web.listen-address", dest="listen_address", default="127.0.0.1:9410",
                        help="where the exporter serves /metrics (default 127.0.0.1:9410; "
                        "a busy port falls back to a free one)")
    parser.add_argument("--servers", type=int, default=8, help="Triton servers (default 8)")
    parser.add_argument("--models", type=int, default=5, help="models (default 5)")
    parser.add_argument("--hosts", type=int, default=2, help="GPU hosts (default 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scrape-interval", type=parse_duration, default=5.0,
                        help="Prometheus scrape interval (default 5s)")
    parser.add_argument("--interval", type=parse_duration, default=10.0,
                        help="exporter cycle interval (default 10s)")
    parser.add_argument("--window", type=parse_duration, default=30.0,
                        help="rate window, at least 4x the scrape interval (default 30s)")
    parser.add_argument("--fault", action="append", default=[],
                        choices=["duplicate-replica", "unlabeled-series"],
                        help="start with this simulator fault on (repeatable)")
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


def main_from_args(args: argparse.Namespace) -> int:
    if args.window < 4 * args.scrape_interval:
        print("error: --window must be at least 4x --scrape-interval", file=sys.stderr)
        return 2
    try:
        binaries = promserver.find_prometheus()
    except promserver.PrometheusUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    faults = simulate.Faults(duplicate_replica="duplicate-replica" in args.fault,
                             unlabeled_series="unlabeled-series" in args.fault)
    spec = simulate.FleetSpec(servers=args.servers, models=args.models, hosts=args.hosts,
                              seed=args.seed, start=time.time() - 600)
    fleet = simulate.Fleet(spec, faults)
    with tempfile.TemporaryDirectory(prefix="triton-mig-demo-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        sim = simulate.serve(fleet, "127.0.0.1", 0)
        sim_port = sim.server_address[1]
        target = f"127.0.0.1:{sim_port}"
        prom = promserver.PrometheusServer(
            binaries, fleet.prometheus_config(target, args.scrape_interval), data_dir
        )
        service: Service | None = None
        try:
            prom.start()
            cfg = config.from_mapping({
                "upstream": {"url": prom.url},
                "evaluation": {
                    "interval": format_duration(args.interval),
                    "window": format_duration(args.window),
                    "scrape_interval": format_duration(args.scrape_interval),
                },
                "web": {"listen_address": _listen(args.listen_address)},
            }, "demo", environ={})
            service = Service(cfg)
            service.start()
            print(f"simulator: http://{target}/  (faults: POST JSON to /-/faults, e.g. "
                  f"curl -d '{{\"duplicate_replica\": true}}' http://{target}/-/faults)")
            print(f"prometheus: {prom.url}")
            print(f"exporter: {service.metrics_url}", flush=True)
            print("first figures within about "
                  f"{int(5 + args.scrape_interval * 2 + args.interval)} s; Ctrl-C stops "
                  "everything", file=sys.stderr, flush=True)
            wait_for_signal()
        finally:
            if service is not None:
                service.stop()
            prom.stop()
            sim.shutdown()
            sim.server_close()
    return 0

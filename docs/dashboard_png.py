"""Draw what the Grafana dashboard's main panels show, as one PNG for the README.

Runs the demo's pieces on 127.0.0.1 (the simulator, a real Prometheus scraping it with the
recording rules loaded, the exporter querying that Prometheus, its self-metrics scraped back),
lets the fleet run for a few minutes with an HA replica that the upstream does not deduplicate
switched on part-way (the drift panel's reason to exist), then runs the main panels' queries
from the generated dashboard JSON, variables substituted as Grafana does with All selected, as
range queries over that time, and draws them with matplotlib in a grid titled like the panels.

    .venv/bin/python docs/dashboard_png.py                 # writes docs/img/dashboard.png
    .venv/bin/python docs/dashboard_png.py --seconds 60 --out /tmp/board.png

Needs the ``report`` extra (matplotlib) and Prometheus (``make prometheus``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import requests
from matplotlib.axes import Axes

from exporter import catalog, rules
from exporter.lab import demo, promserver, simulate
from exporter.service import Service

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "triton-mig-exporter.json"
DEFAULT_OUT = ROOT / "docs" / "img" / "dashboard.png"

#: The panels drawn, in grid order (titles as in the dashboard).
MAIN_PANELS = (
    "Inference rate: deduplicated and raw",
    "Rate drift and its tolerance band",
    "Servers active and model concurrency",
    "Requests",
    "Latency phases (fleet)",
    "Inference rate by model",
    "Inference rate per server",
    "Batch size by model",
    "Tensor activity in GPU-equivalents",
    "Activity summed over slices",
    "Idle MIG slices",
    "Cycle duration",
)
COLUMNS = 3
SCRAPE = 2.0  # scrape, rule and exporter interval, seconds
WINDOW = 20.0  # rate window of the rules and the exporter, seconds

#: Grafana units as axis labels, and the factor applied to the values.
AXIS_UNITS: dict[str, tuple[str, float]] = {
    "reqps": ("requests/s", 1.0),
    "percentunit": ("%", 100.0),
    "s": ("ms", 1000.0),  # the latencies here are milliseconds
}


# --------------------------------------------------------------------------------------------
# The queries


def grafana_values(board: dict[str, Any], step: float, seconds: float) -> dict[str, str]:
    """Template and interval variables as Grafana sets them with All selected."""
    values = {v["name"]: v.get("allValue", ".*") for v in board["templating"]["list"]
              if v["type"] == "query"}
    values["__interval"] = f"{step:g}s"
    values["__rate_interval"] = f"{max(step + SCRAPE, 4 * SCRAPE):g}s"
    values["__range"] = f"{math.ceil(seconds):d}s"
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {text}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def legend(fmt: str, labels: dict[str, str]) -> str:
    if fmt in ("", "__auto"):
        shown = {k: v for k, v in labels.items() if k != "__name__"}
        return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def query_range(prom: str, expr: str, start: float, end: float,
                step: float) -> list[dict[str, Any]]:
    answer = requests.post(f"{prom}/api/v1/query_range", timeout=30, data={
        "query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    body = answer.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error', answer.text)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def has_data(prom: str, expr: str) -> bool:
    answer = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    return answer.get("status") == "success" and bool(answer["data"]["result"])


def main_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    by_title = {p["title"]: p for p in board["panels"]}
    missing = [title for title in MAIN_PANELS if title not in by_title]
    if missing:
        raise KeyError(f"not in {DASHBOARD.name}: {', '.join(missing)}")
    return [by_title[title] for title in MAIN_PANELS]


# --------------------------------------------------------------------------------------------
# Drawing


def axis_unit(panel: dict[str, Any], unit: str) -> tuple[str, float]:
    if unit in AXIS_UNITS:
        return AXIS_UNITS[unit]
    if unit.startswith("suffix:"):
        return unit.removeprefix("suffix:").strip(), 1.0
    # "none": the catalog unit of the first series the panel shows (servers, slices, GPUs).
    for target in panel["targets"]:
        for name in re.findall(r"[\w:]+", target["expr"]):
            if name in catalog.SERIES_BY_NAME:
                return catalog.SERIES_BY_NAME[name].unit, 1.0
    return "", 1.0


def right_axis_refs(panel: dict[str, Any]) -> dict[str, str]:
    """refId -> unit of the targets an override puts on the right axis."""
    out = {}
    for override in panel["fieldConfig"]["overrides"]:
        props = {p["id"]: p["value"] for p in override["properties"]}
        if props.get("custom.axisPlacement") == "right":
            out[override["matcher"]["options"]] = props.get("unit", "none")
    return out


def unstacked_refs(panel: dict[str, Any]) -> set[str]:
    """The targets drawn over a stack rather than in it (the whole-request line)."""
    return {o["matcher"]["options"] for o in panel["fieldConfig"]["overrides"]
            if any(p["id"] == "custom.stacking" for p in o["properties"])}


def draw(ax: Axes, panel: dict[str, Any], data: dict[str, list[dict[str, Any]]],
         fault_at: float | None, seconds: float) -> None:
    defaults = panel["fieldConfig"]["defaults"]
    stacked = defaults["custom"]["stacking"]["mode"] == "normal"
    right = right_axis_refs(panel)
    over = unstacked_refs(panel)
    label, factor = axis_unit(panel, defaults["unit"])
    ax.set_title(panel["title"], fontsize=10, loc="left")
    ax.set_ylabel(label, fontsize=8)
    twin: Axes | None = None
    stack_x: list[datetime] = []
    stack_ys: list[list[float]] = []
    stack_labels: list[str] = []
    for target in panel["targets"]:
        ref = target["refId"]
        axis = ax
        scale = factor
        if ref in right:
            if twin is None:
                twin = ax.twinx()
                twin_label, _ = axis_unit({"targets": [target]}, right[ref])
                twin.set_ylabel(twin_label, fontsize=8)
                twin.tick_params(labelsize=7)
            axis, scale = twin, 1.0
        for series in data[ref]:
            xs = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
            ys = [float(v) * scale for _, v in series["values"]]
            name = legend(target["legendFormat"], series["metric"])
            if stacked and ref not in over and ref not in right:
                if not stack_x:
                    stack_x = xs
                if len(xs) == len(stack_x):  # stack only aligned series (no gaps)
                    stack_ys.append(ys)
                    stack_labels.append(name)
                    continue
            style = "--" if ref in over else ("-." if axis is twin else "-")
            axis.plot(xs, ys, style, linewidth=1.2, label=name,
                      color="0.2" if ref in over else None)
    if stack_ys:
        ax.stackplot(stack_x, *stack_ys, labels=stack_labels, alpha=0.7)
    steps = defaults["thresholds"]["steps"]
    if defaults["custom"].get("thresholdsStyle", {}).get("mode") == "line+area":
        # The green band between the thresholds (the drift tolerance).
        bounds = [s["value"] for s in steps if s["value"] is not None]
        if len(bounds) == 2:
            ax.axhspan(bounds[0] * factor, bounds[1] * factor, color="tab:green", alpha=0.15,
                       label="tolerance")
    if fault_at is not None:
        ax.axvline(datetime.fromtimestamp(fault_at), color="tab:red", linestyle=":",
                   linewidth=1)
    if "min" in defaults:
        ax.set_ylim(bottom=defaults["min"])
    # About six ticks on whole 10 or 30 seconds (AutoDateLocator has no 30 s step).
    every = 30 if seconds >= 120 else 10
    ax.xaxis.set_major_locator(mdates.SecondLocator(bysecond=range(0, 60, every)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin is not None:
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles[:8], labels[:8], fontsize=6, loc="upper left", ncol=2,
                  framealpha=0.6)


def render_png(prom: str, board: dict[str, Any], start: float, end: float, step: float,
               fault_at: float | None, out: Path, subtitle: str) -> None:
    panels = main_panels(board)
    values = grafana_values(board, step, end - start)
    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(5.2 * COLUMNS, 3.1 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        data = {t["refId"]: query_range(prom, substitute(t["expr"], values), start, end, step)
                for t in panel["targets"]}
        draw(ax, panel, data, fault_at, end - start)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{board['title']}\n{subtitle}", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, pil_kwargs={"optimize": True})
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The stack


def run(args: argparse.Namespace) -> int:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    main_panels(board)  # fail before starting anything
    binaries = promserver.find_prometheus()
    spec = simulate.FleetSpec(servers=args.servers, models=args.models, hosts=2, seed=args.seed,
                              epoch_seconds=30.0, start=time.time() - 600)
    faults = simulate.Faults()
    fleet = simulate.Fleet(spec, faults)
    settings = argparse.Namespace(interval=SCRAPE, window=WINDOW, scrape_interval=SCRAPE,
                                  listen_address="127.0.0.1:0")
    sim = simulate.serve(fleet, "127.0.0.1", 0)
    target = f"127.0.0.1:{sim.server_address[1]}"
    prom: promserver.PrometheusServer | None = None
    service: Service | None = None
    with tempfile.TemporaryDirectory(prefix="dashboard-png-") as tmp:
        folder = Path(tmp)
        try:
            rule_files = rules.write(demo.demo_config(None, settings), folder / "rules")
            base = {**fleet.prometheus_config(target, SCRAPE),
                    "rule_files": [str(p) for p in rule_files]}
            prom = promserver.PrometheusServer(binaries, base, folder / "prometheus")
            prom.start()
            cfg = demo.demo_config(prom.url, settings)
            service = Service(cfg)
            service.start()
            _, port = service.address
            prom.config = {**base, "scrape_configs": [
                *base["scrape_configs"],
                demo.exporter_scrape_job(cfg.rules.exporter_job, f"127.0.0.1:{port}")]}
            prom.reload()
            url = prom.url
            exprs = [substitute(t["expr"], grafana_values(board, SCRAPE, 60))
                     for p in main_panels(board) for t in p["targets"]]
            print(f"waiting for every main panel to have data ({url})", file=sys.stderr)
            promserver.wait_for(lambda: all(has_data(url, e) for e in exprs), timeout=120,
                                interval=1, what="data in every main panel")
            # A rate over a window reaching back before the first scrape is too low (no
            # extrapolation past the first sample): draw from one full window later.
            time.sleep(WINDOW + 2 * SCRAPE)
            start = time.time()
            fault_at = None
            if args.fault_after < args.seconds:
                # Mid-epoch, so the drift it causes is not mistaken for the fleet's own change.
                lo, hi = fleet.epoch_bounds(start + args.fault_after)
                fault_at = (lo + hi) / 2
            print(f"recording {args.seconds:g}s of history"
                  + (f"; duplicate HA replica from +{fault_at - start:.0f}s" if fault_at else ""),
                  file=sys.stderr)
            if fault_at is not None:
                time.sleep(max(fault_at - time.time(), 0))
                faults.duplicate_replica = True
            time.sleep(max(start + args.seconds - time.time(), 0))
            end = time.time()
            subtitle = (f"simulated fleet: {args.servers} Triton servers, {args.models} models, "
                        f"2 GPU hosts; {SCRAPE:g}s scrapes, {WINDOW:g}s rate window")
            if fault_at is not None:
                subtitle += "; dotted red line: an HA replica the upstream does not deduplicate"
            render_png(url, board, start, end, SCRAPE, fault_at, args.out, subtitle)
        finally:
            if service is not None:
                service.stop()
            if prom is not None:
                prom.stop()
            sim.shutdown()
            sim.server_close()
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size // 1024} KiB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"PNG to write (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--seconds", type=float, default=180.0,
                        help="history to record and draw, after the first data (default 180)")
    parser.add_argument("--fault-after", type=float, default=120.0,
                        help="switch the duplicate HA replica on in the middle of the "
                        "simulator epoch this many seconds in (default 120; >= --seconds: never)")
    parser.add_argument("--servers", type=int, default=8)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

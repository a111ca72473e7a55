"""PNG plots of a wide table, drawn on matplotlib's Agg canvas directly: pyplot, its global
state and the process-wide backend are never touched (safe inside a notebook or a thread).

Every plot has a title, labelled axes with units and a legend where there is more than one
line. A plot with nothing to show is not written (the summary lists the files that were).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from exporter.catalog import PHASES
from exporter.report.table import model_ids, slice_ids

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "write_plots"]

DPI = 110
TIME_LABEL = "time (UTC)"


def _times(table: pd.DataFrame) -> np.ndarray:
    index = pd.DatetimeIndex(table.index)
    return index.tz_convert(None).to_numpy() if index.tz is not None else index.to_numpy()


def _values(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.full(len(table), np.nan)
    return table[column].to_numpy(dtype=np.float64)


def _has(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).any())


def _figure(**options: Any) -> Figure:
    # matplotlib is imported when a plot is drawn: the report's table does not wait for it.
    from matplotlib.figure import Figure

    return Figure(**options)


def _dates() -> Any:
    """matplotlib.dates (not annotated: its few functions are used through Any)."""
    from matplotlib import dates

    return dates


def _time_axis(ax: Axes) -> None:
    locator = _dates().AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(_dates().ConciseDateFormatter(locator))
    ax.set_xlabel(TIME_LABEL)
    ax.grid(True, alpha=0.3)


def _save(fig: Figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def rate_and_tensor(table: pd.DataFrame, path: Path) -> bool:
    rate, tensor = _values(table, "rate"), _values(table, "summed_tensor")
    if not (_has(rate) or _has(tensor)):
        return False
    times = _times(table)
    fig = _figure(figsize=(11, 4.8), layout="constrained")
    ax = fig.add_subplot()
    left = ax.plot(times, rate, color="tab:blue", label="inference rate (deduplicated)")
    ax.set_ylabel("inferences/s", color="tab:blue")
    ax.set_ylim(bottom=0)
    right_ax = ax.twinx()
    right = right_ax.plot(times, tensor, color="tab:red",
                          label="summed tensor activity (right axis)")
    right_ax.set_ylabel("summed tensor-pipe activity (slices busy)", color="tab:red")
    right_ax.set_ylim(bottom=0)
    _time_axis(ax)
    lines = [*left, *right]
    fig.legend(lines, [str(line.get_label()) for line in lines], loc="outside lower center",
               ncols=2)
    ax.set_title("Inference rate and tensor activity")
    _save(fig, path)
    return True


def _scatter(ax: Axes, x: np.ndarray, y: np.ndarray, title: str, color: str) -> None:
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    ax.scatter(x[ok], y[ok], s=14, alpha=0.6, color=color, label=f"{int(ok.sum())} steps")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("active servers")
    ax.set_ylabel("inferences/s")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def rate_vs_servers(table: pd.DataFrame, path: Path) -> bool:
    servers, rate = _values(table, "num_instances"), _values(table, "rate")
    if not _has(servers * rate):
        return False
    models = model_ids(table)
    panels = 1 + len(models)
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig = _figure(figsize=(4.2 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    _scatter(flat[0], servers, rate, "fleet", "tab:red")
    palette = [f"C{i}" for i in range(10)]
    for i, model in enumerate(models):
        _scatter(flat[i + 1], _values(table, f"num_instances_{model}"),
                 _values(table, f"rate_{model}"), model, palette[i % len(palette)])
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle("Inference rate vs active servers (steps with active servers)")
    _save(fig, path)
    return True


def concurrency(table: pd.DataFrame, path: Path) -> bool:
    ratio = _values(table, "concurrency")
    if not _has(ratio):
        return False
    times = _times(table)
    fig = _figure(figsize=(11, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(times, ratio, color="tab:purple", label="concurrency")
    mean = float(np.nanmean(ratio))
    top.axhline(mean, color="tab:purple", linestyle="--", alpha=0.6, label=f"mean {mean:.2f}")
    top.set_ylabel("models per busy server")
    top.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)
    top.legend(loc="lower left", ncols=2, fontsize=8)
    top.set_title("Model concurrency: summed servers per model / active servers")
    bottom.step(times, _values(table, "num_instances"), where="post", label="active servers")
    bottom.step(times, _values(table, "summed_instances"), where="post",
                label="sum over models of active servers")
    bottom.set_ylabel("servers")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="lower left", ncols=2, fontsize=8)
    _time_axis(bottom)
    _save(fig, path)
    return True


def slice_heatmap(
    table: pd.DataFrame, path: Path, pods: Mapping[str, list[str]] | None = None
) -> bool:
    slices = slice_ids(table)
    if not slices:
        return False
    grid = np.vstack([_values(table, f"tensor_{s}") for s in slices])
    if not _has(grid):
        return False
    # Scale to the data (at least 0..0.1) so a quiet fleet is not one dark colour.
    top = max(0.1, math.ceil(float(np.nanmax(grid)) * 10) / 10)
    times = np.asarray(_dates().date2num(_times(table)), dtype=np.float64)
    step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / 1440
    fig = _figure(figsize=(12, max(3.0, 0.32 * len(slices) + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="viridis",
        vmin=0.0, vmax=top,
        extent=(times[0] - step / 2, times[-1] + step / 2, len(slices) - 0.5, -0.5),
    )
    ax.xaxis_date()
    _time_axis(ax)
    ax.grid(False)
    names = []
    for s in slices:
        on = ", ".join((pods or {}).get(s, []))
        names.append(f"{s} ({on})" if on else s)
    ax.set_yticks(range(len(slices)), names, fontsize=7)
    ax.set_ylabel("MIG slice (workload pod)")
    fig.colorbar(image, ax=ax, label="tensor-pipe activity (ratio)")
    ax.set_title("Tensor-pipe activity per MIG slice (blank: no data)")
    _save(fig, path)
    return True


def latency_breakdown(summary: Mapping[str, Any], path: Path) -> bool:
    models = summary.get("models", {})
    names = [m for m, v in models.items() if v["mean_seconds"].get("request") is not None]
    if not names:
        return False
    parts = [p for p in PHASES if p != "request"]
    fig = _figure(figsize=(max(7.5, 1.3 * len(names) + 4.5), 5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for phase in parts:
        heights = np.array([(models[m]["mean_seconds"].get(phase) or 0.0) * 1000 for m in names])
        ax.bar(x, heights, bottom=bottom, label=phase.replace("_", " "), width=0.6)
        bottom += heights
    request = np.array([models[m]["mean_seconds"]["request"] * 1000 for m in names])
    other = np.clip(request - bottom, 0.0, None)
    ax.bar(x, other, bottom=bottom, label="other (request minus phases)", width=0.6,
           color="lightgrey")
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right"
                  if len(names) > 4 else "center")
    ax.set_ylabel("mean time per successful request (ms)")
    ax.set_xlabel("model/version")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, title="phase")
    ax.set_title("Latency by phase (request-weighted mean over the range)")
    _save(fig, path)
    return True


PLOTS: tuple[str, ...] = (
    "rate_tensor.png",
    "rate_vs_servers.png",
    "concurrency.png",
    "slice_heatmap.png",
    "latency_breakdown.png",
)


def write_plots(
    table: pd.DataFrame,
    statistics: Mapping[str, Any],
    directory: Path,
    pods: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """Write every plot that has data into ``directory``; the file names written."""
    makers: dict[str, Callable[[Path], bool]] = {
        "rate_tensor.png": lambda p: rate_and_tensor(table, p),
        "rate_vs_servers.png": lambda p: rate_vs_servers(table, p),
        "concurrency.png": lambda p: concurrency(table, p),
        "slice_heatmap.png": lambda p: slice_heatmap(table, p, pods),
        "latency_breakdown.png": lambda p: latency_breakdown(statistics, p),
    }
    return [name for name in PLOTS if makers[name](directory / name)]

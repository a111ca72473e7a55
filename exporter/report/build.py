"""The report in memory (:func:`generate`) and on disk (:func:`write_report`).

Flow: aligned chunks -> the catalog's base queries as range queries per chunk (retried) ->
``derive_all`` per chunk -> the wide table -> statistics -> files, written into a temporary
folder next to the output folder and moved into place only when all of them are complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exporter import __version__
from exporter.catalog import BASE_QUERIES, Selectors
from exporter.config import Config, format_duration
from exporter.report.chunking import chunks, step_grid
from exporter.report.command import EXIT_UPSTREAM, EXIT_USAGE
from exporter.report.fetch import Collected, RangeQuerier, collect, progress_bar
from exporter.report.plots import PLOTS, write_plots
from exporter.report.summary import render_markdown, summary_json, summary_statistics
from exporter.report.table import (
    FLEET_COLUMNS,
    MODEL_COLUMNS,
    SLICE_COLUMNS,
    TABLE_SERIES,
    concat_tables,
    model_ids,
    slice_ids,
    slice_pods,
    wide_table,
)
from exporter.report.times import format_time

__all__ = [
    "REPORT_FILES",
    "Report",
    "ReportError",
    "generate",
    "prepare_output",
    "remove_output",
    "window_warning",
    "write_report",
]

TABLE_FILES = ("report.parquet", "report.csv")
SUMMARY_FILES = ("summary.json", "summary.md")
#: Every file a report may write; stale ones from an earlier report in the same folder are removed.
REPORT_FILES: tuple[str, ...] = (*TABLE_FILES, *SUMMARY_FILES, *PLOTS)


class ReportError(Exception):
    """A report that cannot be made; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_UPSTREAM) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Report:
    """Everything a report writes, in memory."""

    table: pd.DataFrame
    summary: dict[str, Any]
    pods: dict[str, list[str]] = field(default_factory=dict)
    collected: Collected | None = None

    @property
    def empty(self) -> bool:
        stats = self.summary["statistics"]
        return bool(stats["steps_with_triton_data"] == 0 and stats["steps_with_dcgm_data"] == 0)


# --- building ------------------------------------------------------------------------------------


def window_warning(step: float, window: float) -> str | None:
    """The warning for a step longer than the window W (rows would skip data), if any."""
    if step <= window:
        return None
    return (
        f"step {format_duration(step)} is longer than the window evaluation.window="
        f"{format_duration(window)}: each row covers only the last {format_duration(window)} "
        f"of its step and the samples in between are skipped; use --step "
        f"{format_duration(window)} or less, or raise evaluation.window"
    )


def generate(
    querier: RangeQuerier,
    cfg: Config,
    start: float,
    end: float,
    step: float,
    chunk: float,
    *,
    quiet: bool = True,
    retries: int = 2,
    backoff: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    on_query: Callable[[int, str], None] | None = None,
    upstream: str | None = None,
    concurrency: int | None = None,
    narrow: bool = True,
    fast: bool = True,
) -> Report:
    """Query, derive and summarise ``[start, end]``: the report in memory (no files).

    ``concurrency``: queries in flight at once (default ``upstream.concurrency`` of ``cfg``);
    ``narrow``: ask for the queries the table reads per model version only at that grain
    (see :func:`~exporter.report.fetch.report_queries`; off only to measure what it saves);
    ``fast``: with ``narrow``, ask for the fast forms first
    (:func:`~exporter.report.fetch.fast_queries`; off likewise only to measure).

    Raises :class:`ReportError` (code 2) for a range without any aligned step and
    :class:`ReportFetchError` when a chunk fails after its retries.
    """
    sel = Selectors.from_config(cfg)
    window = cfg.evaluation.window
    steps = step_grid(start, end, step)
    spans = chunks(start, end, step, chunk)
    if len(steps) == 0:
        raise ReportError(
            f"no {format_duration(step)} step between {format_time(start)} and "
            f"{format_time(end)} (steps are aligned to multiples of --step)", EXIT_USAGE)
    warnings: list[str] = []
    if (message := window_warning(step, window)) is not None:
        warnings.append(message)
    if concurrency is None:
        concurrency = cfg.upstream.concurrency
    bar = progress_bar(len(spans) * len(BASE_QUERIES), quiet)
    parts: list[pd.DataFrame] = []
    seen_pods: dict[str, set[str]] = {}

    def on_chunk(index: int, derived: Mapping[str, pd.DataFrame]) -> None:
        # Pivot each chunk at once: the range then costs its table's floats, not the derived
        # tables' rows (a week of them would not fit in a small container).
        parts.append(wide_table(derived, step_grid(*spans[index], step)))
        for slice_id, names in slice_pods(derived).items():
            seen_pods.setdefault(slice_id, set()).update(names)

    try:
        collected = collect(querier, sel, spans, step, retries=retries, backoff=backoff,
                            sleep=sleep, bar=bar, on_query=on_query, keep=TABLE_SERIES,
                            concurrency=concurrency, narrow=narrow, fast=fast, on_chunk=on_chunk,
                            hold=False)
    finally:
        bar.close()
    table = concat_tables(parts)
    if not np.array_equal(table["timestamp"].to_numpy(), steps):
        raise ValueError("the chunks' steps are not the range's steps")  # a chunking bug
    _blank(table, collected.errors)
    stats = summary_statistics(table)
    pods = {slice_id: sorted(names) for slice_id, names in seen_pods.items()}
    for name, error in collected.errors.items():
        warnings.append(f"series {name} could not be derived and is absent: {error}")
    warnings += [f"upstream: {w}" for w in collected.warnings]
    message = None
    span = f"between {format_time(float(steps[0]))} and {format_time(float(steps[-1]))}"
    if stats["steps_with_triton_data"] == 0 and stats["steps_with_dcgm_data"] == 0:
        message = (
            f"no Triton or DCGM data {span}: the report is empty (one row of absent values per "
            "step); check --upstream, the range, and the triton/dcgm selectors of the config"
        )
    else:
        if stats["steps_with_triton_data"] == 0:
            warnings.append(f"no Triton series (nv_inference_count with a model label) {span}")
        if stats["steps_with_dcgm_data"] == 0:
            warnings.append(f"no DCGM series matching dcgm.selector {sel.dcgm!r} {span}")
    summary: dict[str, Any] = {
        "report": {
            "start": format_time(float(steps[0])),
            "end": format_time(float(steps[-1])),
            "requested_start": format_time(start),
            "requested_end": format_time(end),
            "step": format_duration(step),
            "window": format_duration(window),
            "chunk": format_duration(chunk),
            "chunks": len(spans),
            "queries": collected.queries,
            "concurrency": concurrency,
            "retries": collected.retries,
            "upstream": upstream,
            "generated_at": format_time(round(time.time())),
            "version": __version__,
        },
        "message": message,
        "warnings": warnings,
        "slice_labels": list(sel.slice_labels),
        "slice_pods": pods,
        "statistics": stats,
        "files": [],
    }
    return Report(table, summary, pods, collected)


def _blank(table: pd.DataFrame, errors: Mapping[str, str]) -> None:
    """A series that failed to derive in any chunk is absent from the whole report."""
    for column in FLEET_COLUMNS:
        if column.series in errors:
            table[column.name] = np.nan
    for families, ids in ((MODEL_COLUMNS, model_ids(table)), (SLICE_COLUMNS, slice_ids(table))):
        for family in families:
            if family.series in errors:
                for entity in ids:
                    table[f"{family.name}_{entity}"] = np.nan


# --- writing -------------------------------------------------------------------------------------


def _write_table(table: pd.DataFrame, directory: Path) -> None:
    table.to_parquet(directory / "report.parquet", engine="pyarrow")
    stamps = table["timestamp"].to_numpy(dtype=np.float64)
    whole = bool((stamps == np.floor(stamps)).all())
    date_format = "%Y-%m-%dT%H:%M:%SZ" if whole else "%Y-%m-%dT%H:%M:%S.%fZ"
    table.to_csv(directory / "report.csv", date_format=date_format, index_label="time")


def _publish(tmp: Path, out: Path, files: list[str]) -> None:
    if not out.exists():
        tmp.rename(out)  # one rename: the folder appears complete or not at all
        return
    if not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a folder", EXIT_USAGE)
    for name in files:
        os.replace(tmp / name, out / name)  # each file is whole, old or new
    for name in REPORT_FILES:
        if name not in files:
            (out / name).unlink(missing_ok=True)  # a plot the earlier report had, stale now
    tmp.rmdir()


#: The temporary folder of a report beside its output folder ``out``:
#: ``.<out name>.<pid>.<random>.partial``; the pid tells a killed report's leftover apart.
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.[^.]+\.partial$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def prepare_output(out: Path) -> Path:
    """The temporary folder the report is written into, made beside ``out`` before anything is
    queried (so a folder that cannot be written fails at once), after removing the leftovers
    of reports into ``out`` that were killed (their process is gone).

    :class:`ReportError` (code 2) when ``out`` is not a folder or cannot be written beside.
    """
    given = out
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {given} exists and is not a folder", EXIT_USAGE)
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write the report into {given}: permission denied", EXIT_USAGE)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for left in out.parent.iterdir():
            match = _PARTIAL.match(left.name)
            if match and match["name"] == out.name and not _alive(int(match["pid"])):
                shutil.rmtree(left, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial",
                                    dir=out.parent))
        os.chmod(tmp, 0o755)
    except OSError as error:
        raise ReportError(f"cannot write the report next to {given}: {error}", EXIT_USAGE
                          ) from None
    return tmp


def remove_output(tmp: Path | None) -> None:
    """Remove a temporary folder of :func:`prepare_output` (if it is still there)."""
    if tmp is not None and tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)


def write_report(report: Report, out: Path, tmp: Path | None = None) -> list[str]:
    """Write every file into a temporary folder beside ``out`` (``tmp``, from
    :func:`prepare_output`, or a new one), then move them into ``out``.

    A failure leaves ``out`` as it was (nothing half-written) and removes the temporary folder.
    Returns the file names written, in the order listed in ``summary.json``.
    """
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a folder", EXIT_USAGE)
    if tmp is None:
        try:
            tmp = prepare_output(out)
        except ReportError as error:
            raise ReportError(str(error)) from None  # code 1: the files could not be written
    try:
        _write_table(report.table, tmp)
        plots = write_plots(report.table, report.summary["statistics"], tmp, report.pods)
        files = [*TABLE_FILES, *SUMMARY_FILES, *plots]
        report.summary["files"] = files
        (tmp / "summary.json").write_text(summary_json(report.summary), encoding="utf-8")
        (tmp / "summary.md").write_text(render_markdown(report.summary), encoding="utf-8")
        _publish(tmp, out, files)
    except OSError as error:
        raise ReportError(f"cannot write the report into {out}: {error}") from None
    finally:
        remove_output(tmp)
    return files

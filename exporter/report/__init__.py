"""The historical report: the seed notebook's analysis, made correct (``report`` subcommand).

Public API (see ``docs/report.md``):

- :func:`add_arguments`, :func:`main_from_args`: the ``report`` subcommand;
- :func:`parse_time`: ``--start`` / ``--end`` forms;
- :func:`chunks`, :func:`step_grid`: the aligned step grid and its split into range queries;
- :func:`collect`: the base queries per chunk, retried, derived with ``derive_all``;
- :func:`wide_table`: derived tables -> one row per step;
- :func:`summary_statistics`: the notebook's statistics from a wide table;
- :func:`generate`, :func:`write_report`: the whole report in memory, then on disk atomically.

Importing the package is cheap (the CLI does it to build its parser): only the two command
functions load eagerly; everything else, with pandas, matplotlib and dateparser behind it, loads
on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from exporter.report.command import (
    EXIT_UPSTREAM,
    EXIT_USAGE,
    MAX_QUERIES,
    MAX_ROWS,
    add_arguments,
    main_from_args,
)

if TYPE_CHECKING:
    from exporter.report.build import (
        REPORT_FILES,
        Report,
        ReportError,
        generate,
        prepare_output,
        remove_output,
        window_warning,
        write_report,
    )
    from exporter.report.chunking import MAX_POINTS, chunks, extent, step_grid
    from exporter.report.fetch import (
        FAST,
        NARROW,
        Collected,
        RangeQuerier,
        ReportFetchError,
        collect,
        fast_queries,
        one_replica,
        progress_bar,
        report_queries,
    )
    from exporter.report.plots import PLOTS, write_plots
    from exporter.report.summary import (
        describe,
        render_markdown,
        summary_json,
        summary_statistics,
    )
    from exporter.report.table import (
        FLEET_COLUMNS,
        MODEL_COLUMNS,
        SLICE_COLUMNS,
        SLICE_IDLE,
        TABLE_SERIES,
        Column,
        concat_tables,
        model_ids,
        slice_ids,
        slice_pods,
        wide_table,
    )
    from exporter.report.times import TimeError, format_time, parse_time

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("REPORT_FILES", "Report", "ReportError", "generate", "prepare_output", "remove_output",
         "window_warning", "write_report"),
        "build",
    ),
    **dict.fromkeys(("MAX_POINTS", "chunks", "extent", "step_grid"), "chunking"),
    **dict.fromkeys(
        ("FAST", "NARROW", "Collected", "RangeQuerier", "ReportFetchError", "collect",
         "fast_queries", "one_replica", "progress_bar", "report_queries"), "fetch"
    ),
    **dict.fromkeys(("PLOTS", "write_plots"), "plots"),
    **dict.fromkeys(("describe", "render_markdown", "summary_json", "summary_statistics"),
                    "summary"),
    **dict.fromkeys(
        ("FLEET_COLUMNS", "MODEL_COLUMNS", "SLICE_COLUMNS", "SLICE_IDLE", "TABLE_SERIES",
         "Column", "concat_tables", "model_ids", "slice_ids", "slice_pods", "wide_table"),
        "table",
    ),
    **dict.fromkeys(("TimeError", "format_time", "parse_time"), "times"),
}

__all__ = [
    "EXIT_UPSTREAM",
    "EXIT_USAGE",
    "FAST",
    "FLEET_COLUMNS",
    "MAX_POINTS",
    "MAX_QUERIES",
    "MAX_ROWS",
    "MODEL_COLUMNS",
    "NARROW",
    "PLOTS",
    "REPORT_FILES",
    "SLICE_COLUMNS",
    "SLICE_IDLE",
    "TABLE_SERIES",
    "Collected",
    "Column",
    "RangeQuerier",
    "Report",
    "ReportError",
    "ReportFetchError",
    "TimeError",
    "add_arguments",
    "chunks",
    "collect",
    "concat_tables",
    "describe",
    "extent",
    "fast_queries",
    "format_time",
    "generate",
    "main_from_args",
    "model_ids",
    "one_replica",
    "parse_time",
    "prepare_output",
    "progress_bar",
    "remove_output",
    "render_markdown",
    "report_queries",
    "slice_ids",
    "slice_pods",
    "step_grid",
    "summary_json",
    "summary_statistics",
    "wide_table",
    "window_warning",
    "write_plots",
    "write_report",
]


def __getattr__(name: str) -> object:
    """Load the module behind ``name`` on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

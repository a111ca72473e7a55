"""``triton-mig-exporter report``: the notebook's historical analysis, over any range.

This module is what the CLI imports to build its parser, so it imports nothing heavy at module
level: pandas, matplotlib, pyarrow and dateparser load only when the command runs.

Exit codes: 0 report written (also when the range holds no data: the report is then empty and
says so), 1 the upstream failed (the chunk is named), the files could not be written or the
``report`` extra is not installed, 2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from exporter import config
from exporter.config import ConfigError, parse_duration

__all__ = ["EXIT_UPSTREAM", "EXIT_USAGE", "add_arguments", "main_from_args"]

EXIT_UPSTREAM = 1
EXIT_USAGE = 2


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the ``report`` subcommand."""
    parser.add_argument(
        "--upstream", dest="upstream", default=None, metavar="URL",
        help="upstream Prometheus API base URL, e.g. http://host:9009/prometheus "
        "(overrides upstream.url of the config)",
    )
    parser.add_argument(
        "--config.file", dest="config_file", type=Path, default=None, metavar="F",
        help="YAML configuration: upstream auth, selectors, evaluation.window (the W of every "
        "rate and average; default 2m)",
    )
    parser.add_argument(
        "--start", required=True, metavar="S",
        help="first instant: unix seconds, RFC 3339 (2023-03-30T22:00:00Z), relative "
        "(now-7d) or a date with a zone ('2023-03-30 at 16:00:00 MDT')",
    )
    parser.add_argument("--end", default="now", metavar="E",
                        help="last instant, same forms as --start (default: now)")
    parser.add_argument("--step", type=_duration, default=60.0, metavar="DURATION",
                        help="one row per step, aligned to multiples of it (default 60s)")
    parser.add_argument("--chunk", type=_duration, default=6 * 3600.0, metavar="DURATION",
                        help="longest range per query (default 6h; never over 11,000 steps)")
    parser.add_argument("--out", type=Path, default=Path("report"), metavar="DIR",
                        help="output folder (default ./report); files in it are replaced")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no closing message (warnings still shown)")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="retries of a failed chunk query, with exponential backoff "
                        "(default 2; on top of upstream.retries per request)")
    parser.add_argument("--retry-backoff", dest="retry_backoff", type=_duration, default=2.0,
                        metavar="DURATION", help="wait before the first retry, doubled after "
                        "each (default 2s)")


# --- the command ---------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"report: warning: {message}", file=sys.stderr)


def _times(args: argparse.Namespace, now: float) -> tuple[float, float]:
    from exporter.report.times import TimeError, format_time, parse_time

    start = parse_time(str(args.start), now)
    end = parse_time(str(args.end), now)
    if end < start:
        raise TimeError(f"--end {args.end!r} ({format_time(end)}) is before --start "
                        f"{args.start!r} ({format_time(start)})")
    return start, end


#: The ``report`` extra of the package (pyproject.toml): module names to look for.
EXTRA_MODULES = ("pyarrow", "matplotlib", "dateparser", "tqdm")


def missing_modules() -> list[str]:
    """The modules of the ``report`` extra that are not installed."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def main_from_args(args: argparse.Namespace) -> int:
    """Run the report from parsed ``report`` flags; returns the exit code."""
    missing = missing_modules()
    if missing:
        print(f"report: error: {', '.join(missing)} not installed; the report needs the "
              "'report' extra: pip install 'triton-mig-exporter[report]'", file=sys.stderr)
        return EXIT_UPSTREAM
    from exporter.report.build import ReportError, generate, window_warning, write_report
    from exporter.report.fetch import ReportFetchError
    from exporter.report.table import model_ids, slice_ids
    from exporter.report.times import TimeError
    from exporter.upstream import PrometheusClient

    try:
        start, end = _times(args, time.time())
        overrides = {"upstream": {"url": args.upstream}} if args.upstream else None
        cfg = config.load(args.config_file, overrides=overrides)
    except (TimeError, ConfigError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"report: error: --out {out} exists and is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.retries < 0:
        print("report: error: --retries must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    if (message := window_warning(args.step, cfg.evaluation.window)) is not None:
        _warn(message)
    try:
        with PrometheusClient(cfg.upstream) as client:
            report = generate(
                client, cfg, start, end, args.step, args.chunk, quiet=args.quiet,
                retries=args.retries, backoff=args.retry_backoff, upstream=client.url,
            )
        files = write_report(report, out)
    except ReportFetchError as error:
        print(f"report: error: {error}; nothing was written to {out}", file=sys.stderr)
        return EXIT_UPSTREAM
    except (ReportError, ConfigError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return error.code if isinstance(error, ReportError) else EXIT_USAGE
    for warning in report.summary["warnings"]:
        if warning != message:
            _warn(warning)
    if report.empty:
        print(f"report: {report.summary['message']}; wrote it to {out}", file=sys.stderr)
    elif not args.quiet:
        stats = report.summary["statistics"]
        print(
            f"report: wrote {out} ({stats['steps']} steps, {len(model_ids(report.table))} "
            f"model versions, {len(slice_ids(report.table))} MIG slices): {', '.join(files)}"
        )
    return 0

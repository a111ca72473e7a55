"""``triton-mig-exporter report``: the notebook's historical analysis, over any range.

This module is what the CLI imports to build its parser, so it imports nothing heavy at module
level: pandas, matplotlib, pyarrow and dateparser load only when the command runs.

Exit codes: 0 report written (also when the range holds no data: the report is then empty and
says so), 1 the upstream failed (the chunk is named), the files could not be written or the
``report`` extra is not installed, 2 bad arguments or configuration (a range over the limits
without ``--force``, an output folder that cannot be written included), 128 + the signal's
number when stopped by SIGTERM or SIGINT (nothing is written then).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from exporter import config
from exporter.config import LAST_INSTANT, ConfigError, parse_duration

__all__ = [
    "EXIT_UPSTREAM",
    "EXIT_USAGE",
    "MAX_QUERIES",
    "MAX_ROWS",
    "Stopped",
    "add_arguments",
    "main_from_args",
]

EXIT_UPSTREAM = 1
EXIT_USAGE = 2
#: A range over either limit is refused unless ``--force``: its table is held in memory
#: (rows x columns x 8 bytes; 1,000 columns is a fleet of about 80 model versions and 40
#: slices) and its queries take the upstream a while. 100,000 rows: 69 days at 60 s; 5,000
#: queries: 89 days in 6 h chunks.
MAX_ROWS = 100_000
MAX_QUERIES = 5_000


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while the report ran (a BaseException, like Ctrl-C's
    KeyboardInterrupt, so that nothing catches it on the way out)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return seconds


def _grid_duration(text: str) -> float:
    """A step or chunk: whole milliseconds (the API's resolution, the grid's unit), at least
    one, at most the span of the instants a report takes."""
    seconds = _duration(text)
    millis = seconds * 1000
    if millis < 1 or millis != round(millis):
        raise argparse.ArgumentTypeError(
            f"must be a whole number of milliseconds, at least 1ms, got {text!r}")
    if seconds > LAST_INSTANT:
        raise argparse.ArgumentTypeError(f"must be at most 10,000 years, got {text!r}")
    return seconds


def _wait(text: str) -> float:
    seconds = _duration(text)
    if seconds > 86400:
        raise argparse.ArgumentTypeError(f"must be at most 1d, got {text!r}")
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
    parser.add_argument("--step", type=_grid_duration, default=60.0, metavar="DURATION",
                        help="one row per step, aligned to multiples of it (default 60s)")
    parser.add_argument("--chunk", type=_grid_duration, default=6 * 3600.0, metavar="DURATION",
                        help="longest range per query (default 6h; never over 11,000 steps)")
    parser.add_argument("--out", type=Path, default=Path("report"), metavar="DIR",
                        help="output folder (default ./report); files in it are replaced")
    parser.add_argument("--quiet", action="store_true",
                        help="no estimate, no progress bar and no closing message (warnings "
                        "still shown)")
    parser.add_argument("--force", action="store_true",
                        help=f"run a range over the limits ({MAX_ROWS:,} rows or {MAX_QUERIES:,} "
                        "queries), which is otherwise refused")
    parser.add_argument("--retries", type=int, default=2, metavar="N",
                        help="retries of a failed chunk query, with exponential backoff "
                        "(default 2; on top of upstream.retries per request)")
    parser.add_argument("--retry-backoff", dest="retry_backoff", type=_wait, default=2.0,
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


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Stopped` in the main thread while the report runs, so
    the temporary folder is removed on the way out (SIGTERM's default ends the process
    without that)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _estimate(args: argparse.Namespace, start: float, end: float) -> tuple[str, str | None]:
    """The line shown before starting, and the error when the range is over the limits
    (None when it is not, or ``--force`` was given). TimeError without any step."""
    from exporter.catalog import BASE_QUERIES
    from exporter.report.chunking import extent
    from exporter.report.times import TimeError, format_time

    step = config.format_duration(args.step)
    rows, spans = extent(start, end, args.step, args.chunk)
    if rows == 0:
        raise TimeError(f"no {step} step between {format_time(start)} and {format_time(end)} "
                        "(steps are aligned to multiples of --step)")
    first = -(-round(start * 1000) // round(args.step * 1000)) * args.step
    last = first + (rows - 1) * args.step
    queries = spans * len(BASE_QUERIES)
    line = (f"{format_time(first)} .. {format_time(last)} every {step}: {rows:,} row"
            f"{'s' if rows != 1 else ''}, {spans:,} chunk{'s' if spans != 1 else ''}, at least "
            f"{queries:,} queries")
    if rows <= MAX_ROWS and queries <= MAX_QUERIES:
        return line, None
    if args.force:
        return f"{line} (over the limits: --force)", None
    return line, (
        f"the range would be {rows:,} rows (limit {MAX_ROWS:,}) and {queries:,} queries (limit "
        f"{MAX_QUERIES:,}); narrow the range, raise --step or --chunk, or add --force to run it "
        "anyway"
    )


def _leave(code: int) -> int:
    """``code``, or leave at once with it when queries are still in flight: their threads would
    hold the interpreter open until the upstream answers or times out."""
    if any(t.name.startswith("report") for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main_from_args(args: argparse.Namespace) -> int:
    """Run the report from parsed ``report`` flags; returns the exit code."""
    missing = missing_modules()
    if missing:
        print(f"report: error: {', '.join(missing)} not installed; the report needs the "
              "'report' extra: pip install 'triton-mig-exporter[report]'", file=sys.stderr)
        return EXIT_UPSTREAM
    from exporter.report.build import remove_output

    out = Path(args.out)
    made: list[Path] = []  # the temporary folder beside --out, once made
    try:
        with _stopped_by_signals():
            try:
                return _run(args, out, made)
            finally:
                for folder in made:
                    remove_output(folder)
    except Stopped as stop:
        print(f"report: stopped by {signal.Signals(stop.signum).name}; nothing was written to "
              f"{out}", file=sys.stderr)
        return _leave(128 + stop.signum)


def _run(args: argparse.Namespace, out: Path, made: list[Path]) -> int:
    from exporter.report.build import (
        ReportError,
        generate,
        prepare_output,
        window_warning,
        write_report,
    )
    from exporter.report.fetch import ReportFetchError
    from exporter.report.table import model_ids, slice_ids
    from exporter.report.times import TimeError
    from exporter.upstream import PrometheusClient

    try:
        start, end = _times(args, time.time())
        overrides = {"upstream": {"url": args.upstream}} if args.upstream else None
        cfg = config.load(args.config_file, overrides=overrides)
        estimate, over = _estimate(args, start, end)
    except (TimeError, ConfigError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.retries < 0:
        print("report: error: --retries must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    if over is not None:
        print(f"report: error: {over}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Before the first query: a folder that cannot be written fails now, not after hours.
        made.append(prepare_output(out))
    except ReportError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return error.code
    if not args.quiet:
        print(f"report: {estimate}", file=sys.stderr)
    if (message := window_warning(args.step, cfg.evaluation.window)) is not None:
        _warn(message)
    try:
        with PrometheusClient(cfg.upstream) as client:
            report = generate(
                client, cfg, start, end, args.step, args.chunk, quiet=args.quiet,
                retries=args.retries, backoff=args.retry_backoff, upstream=client.url,
            )
        files = write_report(report, out, made[0])
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

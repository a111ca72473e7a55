"""Command line: serve, once, check-config, discover, report, rules, dashboard, simulate, demo,
hash-password.

Flags follow Prometheus conventions (``--config.file``, ``--web.listen-address``). A bad
configuration is a one-line usage error (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from exporter import __version__, config, dashboard, discover, report, rules, upstream
from exporter.catalog import Selectors
from exporter.config import Config, ConfigError
from exporter.scrape_process import ScrapeProcessError
from exporter.service import (
    Service,
    catch_hangups,
    quiet_libraries,
    tune_interpreter,
    wait_for_signal,
)
from exporter.upstream import Hint, UpstreamError
from exporter.web import bcrypt_hash
from exporter.worker import (
    compute,
    cycle_deadline,
    evaluation_time,
    exposition,
    not_computed,
    printable,
    series_labels,
)

log = logging.getLogger("exporter")

EXIT_USAGE = 2


def parse_instant(text: str) -> float:
    """Unix seconds from RFC 3339 (``2026-11-24T10:00:00Z``) or a number of seconds, between
    1970 and 9999 (:func:`config.check_instant`)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = _rfc3339(text)
    try:
        return config.check_instant(seconds, text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _rfc3339(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected RFC 3339 (2026-11-24T10:00:00Z) or unix seconds, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or +HH:MM")
    return moment.timestamp()


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config.file", dest="config_file", type=Path, default=None,
        help="YAML configuration (default: built-in defaults, the same as config.yaml)",
    )
    parser.add_argument(
        "--upstream", dest="upstream", default=None,
        help="upstream Prometheus API base URL, e.g. http://host:9009/prometheus "
        "(overrides upstream.url)",
    )
    parser.add_argument(
        "--log.level", dest="log_level", default="info",
        choices=["debug", "info", "warning", "error"],
    )


def _add_web_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--web.config.file", dest="web_config_file", type=Path, default=None,
        help="exporter-toolkit web configuration file: TLS, client certificates and basic auth "
        "on /metrics (overrides web.config_file)",
    )


#: The lab's commands: their module is imported only when one of them runs, so every other
#: command starts without the simulator and the Prometheus fetchers.
LAB_COMMANDS = {
    "simulate": ("exporter.lab.simulate", "run the Triton + dcgm-exporter fleet simulator"),
    "demo": ("exporter.lab.demo", "simulator + a real Prometheus (rules and alerts loaded) + "
             "Alertmanager + the exporter, all on 127.0.0.1"),
}


def _lab(command: str) -> Any:
    return importlib.import_module(LAB_COMMANDS[command][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a lab command's flags are added when ``command`` is that command."""
    parser = argparse.ArgumentParser(
        prog="triton-mig-exporter",
        description="Fleet figures for NVIDIA Triton on MIG slices, derived from an upstream "
        "Prometheus and served on /metrics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the exporter service")
    _add_config_flags(serve)
    serve.add_argument(
        "--web.listen-address", dest="listen_address", default=None,
        help="HOST:PORT to serve /metrics on (default from config: :9410)",
    )
    _add_web_config_flag(serve)

    once = sub.add_parser("once", help="run one cycle and print the exposition to stdout")
    _add_config_flags(once)
    once.add_argument(
        "--at", type=parse_instant, default=None,
        help="evaluate at this instant (RFC 3339 or unix seconds) instead of now",
    )

    check = sub.add_parser("check-config", help="validate the configuration and exit")
    check.add_argument("--config.file", dest="config_file", type=Path, default=None)
    check.add_argument("config_path", nargs="?", type=Path, default=None,
                       help="the file to check (same as --config.file)")
    _add_web_config_flag(check)

    sub.add_parser(
        "hash-password",
        help="read a password on stdin (not echoed on a terminal) and print its bcrypt hash "
        "for basic_auth_users",
    )

    _add_config_flags(sub.add_parser(
        "discover", help="list the source series the upstream has and which families they allow"
    ))
    report.add_arguments(sub.add_parser(
        "report", help="the notebook's historical analysis over a past range: table, summary, "
        "plots"
    ))
    rules.add_arguments(sub.add_parser(
        "rules", help="render the recording rules and alerts as Prometheus rule files"
    ))
    dashboard.add_arguments(sub.add_parser(
        "dashboard", help="render the Grafana dashboard from the catalog"
    ))
    for name, (_, text) in LAB_COMMANDS.items():
        lab = sub.add_parser(name, help=text)
        if name == command:
            _lab(name).add_arguments(lab)
    return parser


def load_config(args: argparse.Namespace, path: Path | None = None) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "upstream", None):
        overrides["upstream"] = {"url": args.upstream}
    web = {"listen_address": getattr(args, "listen_address", None),
           "config_file": getattr(args, "web_config_file", None)}
    if any(web.values()):
        overrides["web"] = {key: str(value) for key, value in web.items() if value}
    return config.load(path or args.config_file, overrides=overrides)


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.config_file or args.config_path
    cfg = load_config(args, path)
    for warning in cfg.warnings():
        print(f"warning: {path or '<defaults>'}: {warning}", file=sys.stderr)
    print(f"{path or '<defaults>'}: ok")
    if args.web_config_file is not None:
        print(f"{args.web_config_file}: ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    previous = signal.getsignal(signal.SIGHUP)
    hangup = catch_hangups()  # from the start: a SIGHUP while starting must not end serve
    try:
        return _serve(args, hangup)
    finally:
        signal.signal(signal.SIGHUP, previous)


def _serve(args: argparse.Namespace, hangup: threading.Event) -> int:
    cfg = load_config(args)
    for warning in cfg.warnings():
        log.warning("%s", warning)
    service = Service(cfg)
    tune_interpreter()
    try:
        service.start()
    except OSError as error:
        print(f"error: cannot listen on {cfg.web.listen_address}: {error.strerror}",
              file=sys.stderr)
        service.stop()
        return 1
    except ScrapeProcessError as error:
        print(f"error: {error}", file=sys.stderr)
        service.stop()
        return 1
    try:
        wait_for_signal(service.failed, lambda: reload(args, service), hangup)
    finally:
        if service.failed.is_set():
            log.error("%s", service.failure)
        log.info("shutting down")
        idle = service.stop()
    code = 1 if service.failed.is_set() else 0
    if not idle:
        # A cycle is still waiting on the upstream; its thread would hold the interpreter
        # open until its requests time out. Nothing it would produce is needed any more.
        log.warning("leaving a cycle in progress behind")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def reload(args: argparse.Namespace, service: Service) -> None:
    """SIGHUP: read the configuration again (the same file and flags) and run with it; a
    configuration that does not load is logged and the running one kept, as Prometheus does."""
    where = args.config_file or "<defaults>"
    try:
        cfg = load_config(args)
        lasting = service.reload(cfg)
    except (ConfigError, ScrapeProcessError) as error:
        log.error("reloading the configuration failed, keeping the running configuration: %s",
                  error)
        return
    for warning in cfg.warnings():
        log.warning("%s", warning)
    for key in lasting:
        log.warning("%s changed: it takes effect when serve restarts", key)
    log.info("reloaded the configuration from %s", where)


def cmd_once(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    sel = Selectors.from_config(cfg)
    ev = cfg.evaluation
    at = args.at if args.at is not None else evaluation_time(
        time.time(), ev.eval_delay, ev.interval)
    with upstream.PrometheusClient(cfg.upstream) as client:
        report = compute(client, sel, at, cfg.upstream.concurrency,
                         deadline=time.monotonic() + cycle_deadline(cfg))
    hinted = False
    for names, error in _failures(report.query_errors):
        if error.hint is not None:
            hinted = True
            line = _explain(error.hint, args)
        elif len(names) == 1:
            line = f"base query {names[0]}: {error}"
        else:
            line = (f"base queries {', '.join(names)} failed ({error.reason}): "
                    f"{printable(error.detail)}")
        print(f"error: {line}", file=sys.stderr)
    if report.query_errors and not report.frames:
        if not hinted:
            print(f"error: upstream {cfg.upstream.url} could not be queried", file=sys.stderr)
        return 1
    if not report.query_errors:
        for line in not_computed(report):
            print(f"warning: {line}", file=sys.stderr)
    sys.stdout.buffer.write(exposition(report, series_labels(sel)))
    sys.stdout.flush()
    return 1 if report.query_errors else 0


def _failures(errors: dict[str, UpstreamError]) -> list[tuple[list[str], UpstreamError]]:
    """The failed base queries grouped by cause (reason, status and detail alike), in order."""
    groups: dict[tuple[str, int | None, str], tuple[list[str], UpstreamError]] = {}
    for name, error in errors.items():
        names, _ = groups.setdefault((error.reason, error.status, error.detail), ([], error))
        names.append(name)
    return list(groups.values())


def _explain(hint: Hint, args: argparse.Namespace) -> str:
    """``hint`` as one line: what failed, and where the key to check was set
    (``cannot reach upstream http://...: connection refused (upstream.url in my.yaml)``)."""
    advice = f"; {hint.advice}" if hint.advice else ""
    return f"{printable(hint.problem)} ({_where(hint.key, args)}{printable(advice)})"


def _where(key: str, args: argparse.Namespace) -> str:
    """Where ``key`` got its value: a flag, an environment variable, the file or the default."""
    if key == "upstream.url" and getattr(args, "upstream", None):
        return "--upstream"
    variable = config.ENV_PREFIX + key.upper().replace(".", "__")
    if any(name.upper() == variable for name in os.environ):
        return variable
    if args.config_file is not None:
        return f"{key} in {args.config_file}"
    return f"{key}: the built-in default"


def read_password() -> str | None:
    """The password: asked twice without echo on a terminal (None if the two differ), else the
    first line of stdin. UnicodeError when it is not UTF-8 text."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        return password if getpass.getpass("Again: ") == password else None
    line = sys.stdin.buffer.readline()
    # Only the line ending goes: spaces at either end may be part of the password.
    return line.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")


def cmd_hash_password(args: argparse.Namespace) -> int:
    try:
        password = read_password()
        if password is not None:
            password.encode("utf-8")  # a terminal's undecodable bytes arrive as surrogates
    except UnicodeError:
        print("error: the password is not UTF-8 text", file=sys.stderr)
        return EXIT_USAGE
    if not password:
        problem = "the two passwords differ" if password is None else "empty password"
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        print(bcrypt_hash(password))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    return discover.run(load_config(args))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "once": cmd_once,
    "check-config": cmd_check_config,
    "discover": cmd_discover,
    "report": report.main_from_args,
    "rules": rules.main_from_args,
    "dashboard": dashboard.main_from_args,
    **{name: (lambda args: int(_lab(args.command).main_from_args(args)))
       for name in LAB_COMMANDS},
    "hash-password": cmd_hash_password,
}


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if not word.startswith("-")), None)
    args = build_parser(command).parse_args(words)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_libraries()  # urllib3's retries and the like: at --log.level debug only
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

"""A real Alertmanager on 127.0.0.1 for the demo and the alerting tests.

The binaries come from PATH when present, else from Debian's ``prometheus-alertmanager`` package
unpacked into the project's cache folder (``apt-get download`` + ``dpkg -x``, as
:mod:`exporter.lab.promserver` does for Prometheus; no service is installed or started).

Debian's build of Alertmanager 0.25 reads its notification templates at run time from
``/usr/share/prometheus/alertmanager/`` (``default.tmpl`` and ``email.tmpl``) and refuses every
configuration without them ("failed to parse templates"). :func:`find_alertmanager` copies the
two files there from the unpacked package when they are missing: once, atomically, as root
(a clear error otherwise), and never over an existing file (an installed package owns those).

The same package has no web UI either (``/`` answers 404): :func:`write_status_page` writes a
small page listing the current alerts from the HTTP API, for ``--web.ui-path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests

from exporter.lab import promserver
from exporter.lab.process import ConfiguredServer, ProcessStartError, url_host
from exporter.rules import ALERT_NAMES

__all__ = [
    "PACKAGE",
    "RESEND_DELAY_ARG",
    "TEMPLATES",
    "TEMPLATE_DIR",
    "AlertmanagerBinaries",
    "AlertmanagerConfigError",
    "AlertmanagerError",
    "AlertmanagerServer",
    "AlertmanagerStartError",
    "AlertmanagerUnavailable",
    "WebhookReceiver",
    "check_config",
    "ensure_templates",
    "example_config",
    "find_alertmanager",
    "prometheus_alerting",
    "run_amtool",
    "write_status_page",
]

PACKAGE = "prometheus-alertmanager"
#: Where Debian's build looks for its notification templates, whatever its configuration says.
TEMPLATE_DIR = Path("/usr/share/prometheus/alertmanager")
TEMPLATES = ("default.tmpl", "email.tmpl")
#: For a Prometheus that must notify quickly: an alert that fires before Prometheus has found its
#: Alertmanager is dropped and only re-sent after the resend delay (default 1m).
RESEND_DELAY_ARG = "--rules.alert.resend-delay=1s"
#: The receiver of the example route for the triton-mig-exporter alerts.
RECEIVER = "triton-mig-exporter"

_SERVER_NAMES = ("prometheus-alertmanager", "alertmanager")


class AlertmanagerUnavailable(RuntimeError):
    """A binary or the Debian templates cannot be had; the message says how to fix it."""


class AlertmanagerError(RuntimeError):
    """A running Alertmanager refused a request (reload, query)."""


class AlertmanagerStartError(AlertmanagerError, ProcessStartError):
    """Alertmanager exited or never became ready; the message carries the tail of its log."""


class AlertmanagerConfigError(AlertmanagerError):
    """``amtool check-config`` refused a configuration; the message carries its output."""


@dataclass(frozen=True)
class AlertmanagerBinaries:
    """The server and amtool (from one place), their version, and whether it is Debian's build."""

    alertmanager: Path
    amtool: Path
    version: str
    #: Debian's build: reads its templates from :data:`TEMPLATE_DIR` at run time.
    debian: bool


# --------------------------------------------------------------------------------------------
# Finding the binaries and the templates


def _version_line(binary: Path) -> str:
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    text = (result.stdout or result.stderr).strip()
    if result.returncode != 0 or not text:
        raise AlertmanagerUnavailable(
            f"{binary} --version failed (exit {result.returncode}): {text or 'no output'}"
        )
    return text.splitlines()[0]


def ensure_templates(source_dir: Path, target_dir: Path = TEMPLATE_DIR) -> list[Path]:
    """Copy Debian's notification templates from ``source_dir`` into ``target_dir`` where missing.

    Idempotent and safe to run concurrently: an existing file is left alone (an installed
    package owns it), a missing one appears by one rename. Returns the files written (none when
    all were there). Needs root for the default ``target_dir``; otherwise a clear error.
    """
    missing = [name for name in TEMPLATES if not (target_dir / name).is_file()]
    if not missing:
        return []
    sources = [source_dir / name for name in missing]
    absent = [str(path) for path in sources if not path.is_file()]
    if absent:
        raise AlertmanagerUnavailable(
            f"Debian's Alertmanager needs {', '.join(missing)} in {target_dir}, and the package "
            f"unpacked in {source_dir} lacks {', '.join(absent)}; "
            f"install the package: 'sudo apt-get install {PACKAGE}'"
        )
    if os.geteuid() != 0:
        raise AlertmanagerUnavailable(
            f"Debian's Alertmanager reads its notification templates from {target_dir} at run "
            f"time, and it lacks {', '.join(missing)}; only root can put them there. Run "
            "this once as root, or: 'sudo install -D -m 0644 -t "
            f"{target_dir} {' '.join(map(str, sources))}', or 'sudo apt-get install {PACKAGE}'"
        )
    written = []
    try:
        target_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name, source in zip(missing, sources, strict=True):
            target = target_dir / name
            partial = target_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                shutil.copyfile(source, partial)
                partial.chmod(0o644)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            written.append(target)
    except OSError as error:
        raise AlertmanagerUnavailable(
            f"cannot write Debian's Alertmanager templates into {target_dir}: "
            f"{error.strerror or error}; install the package: 'sudo apt-get install {PACKAGE}'"
        ) from None
    return written


def find_alertmanager(
    cache_dir: Path | None = None, template_dir: Path = TEMPLATE_DIR
) -> AlertmanagerBinaries:
    """The server and amtool from PATH (both there), else from Debian's package in the cache.

    For Debian's build the templates are made available in ``template_dir`` (from the unpacked
    package, fetched for them if the binaries came from PATH): see :func:`ensure_templates`.
    """
    server = next((found for name in _SERVER_NAMES if (found := shutil.which(name))), None)
    amtool = shutil.which("amtool")
    try:
        if server is not None and amtool is not None:
            binaries = (Path(server).resolve(), Path(amtool).resolve())
        else:
            binaries = (
                promserver.find_binary(PACKAGE, _SERVER_NAMES[0], cache_dir, use_path=False),
                promserver.find_binary(PACKAGE, "amtool", cache_dir, use_path=False),
            )
    except promserver.PrometheusUnavailable as error:
        raise AlertmanagerUnavailable(str(error)) from None
    line = _version_line(binaries[0])
    match = re.search(r"\bversion\s+(\S+)", line)
    debian = "debian" in line.lower()
    if debian and any(not (template_dir / name).is_file() for name in TEMPLATES):
        cache = (cache_dir if cache_dir is not None else promserver.default_cache_dir()).resolve()
        try:  # binaries from PATH without their templates: the package's copy is the source
            promserver.find_binary(PACKAGE, "amtool", cache, use_path=False)
        except promserver.PrometheusUnavailable as error:
            raise AlertmanagerUnavailable(str(error)) from None
        ensure_templates(cache / PACKAGE / TEMPLATE_DIR.relative_to("/"), template_dir)
    return AlertmanagerBinaries(
        alertmanager=binaries[0],
        amtool=binaries[1],
        version=match.group(1) if match else line,
        debian=debian,
    )


def run_amtool(
    binaries: AlertmanagerBinaries, args: Sequence[str], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``amtool ARGS`` (no amtool.yml from $HOME applies: HOME is a fresh folder)."""
    env = {key: value for key, value in os.environ.items() if key != "HOME"}
    env["HOME"] = "/nonexistent"
    return subprocess.run(
        [str(binaries.amtool), *args],
        capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )


def check_config(binaries: AlertmanagerBinaries, path: Path) -> str:
    """``amtool check-config PATH``: its report, or :class:`AlertmanagerConfigError`."""
    result = run_amtool(binaries, ["check-config", str(path)])
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise AlertmanagerConfigError(f"amtool check-config {path} failed:\n{output}")
    return output


# --------------------------------------------------------------------------------------------
# Configuration


def example_config(
    webhook_url: str,
    *,
    group_wait: str = "30s",
    group_interval: str = "5m",
    repeat_interval: str = "4h",
) -> dict[str, Any]:
    """The route, receiver and inhibition of ``deploy/alertmanager/alertmanager.yml``.

    The triton-mig-exporter alerts (by name) go to one webhook receiver, grouped by alert name
    and model, repeated every ``repeat_interval`` while they fire, with resolved notifications.
    A stale exporter (critical) inhibits the upstream-down warning of the same exporter: both
    have one cause, and the runbook of the first covers the second. Everything else goes to
    ``default``, a receiver without notifiers: merge the route into your own tree.
    """
    return {
        "route": {
            "receiver": "default",
            "group_by": ["alertname"],
            "routes": [
                {
                    "receiver": RECEIVER,
                    "matchers": ["alertname=~" + json.dumps("|".join(ALERT_NAMES))],
                    "group_by": ["alertname", "model"],
                    "group_wait": group_wait,
                    "group_interval": group_interval,
                    "repeat_interval": repeat_interval,
                },
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": ['alertname="TritonMigExporterStale"'],
                "target_matchers": ['alertname="TritonMigExporterUpstreamDown"'],
                "equal": ["job", "instance"],
            },
        ],
        "receivers": [
            {"name": "default"},
            {
                "name": RECEIVER,
                "webhook_configs": [{"url": webhook_url, "send_resolved": True}],
            },
        ],
    }


def prometheus_alerting(*addresses: str) -> dict[str, Any]:
    """The ``alerting:`` section of a Prometheus config sending to these ``host:port``."""
    return {"alertmanagers": [{"api_version": "v2",
                               "static_configs": [{"targets": list(addresses)}]}]}


# --------------------------------------------------------------------------------------------
# The server


class AlertmanagerServer(ConfiguredServer):
    """One Alertmanager process in its own process group, HA gossip off, on one dir and port.

    A config given as a mapping is written into ``data_dir`` as ``alertmanager.yml``; the
    process log goes to ``alertmanager.log`` there (appended across restarts); notification
    log and silences live in ``data_dir`` too.
    """

    name = "Alertmanager"
    log_marker = "amserver"
    CONFIG_NAME = "alertmanager.yml"
    LOG_NAME = "alertmanager.log"
    request_error = AlertmanagerError
    start_error = AlertmanagerStartError

    def __init__(
        self,
        binaries: AlertmanagerBinaries,
        config: Mapping[str, Any] | Path,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        ui_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(config, data_dir, host, port)
        self.binaries = binaries
        self.ui_path = ui_path
        self.extra_args = tuple(extra_args)

    def command(self) -> list[str]:
        command = [
            str(self.binaries.alertmanager),
            f"--config.file={self.config_path}",
            f"--storage.path={self.data_dir}",
            f"--web.listen-address={self.listen_address}",
            f"--web.external-url={self.url}",
            "--cluster.listen-address=",  # no HA gossip: nothing listens beyond the web port
        ]
        if self.ui_path is not None:
            command.append(f"--web.ui-path={Path(self.ui_path).absolute()}/")
        return [*command, *self.extra_args]

    def probe(self) -> str | None:
        """``/-/ready`` answers 200 and our own log says it listens on our address (a foreign
        Alertmanager on the port answers too while ours fails to bind)."""
        answer = requests.get(f"{self.url}/-/ready", timeout=2)
        listening = f'msg="Listening on" address={self.listen_address}'
        if answer.status_code == 200 and listening in self._run_log():
            return None
        return f"/-/ready answered {answer.status_code}"

    def alerts(
        self,
        *matchers: str,
        active: bool = True,
        silenced: bool = True,
        inhibited: bool = True,
        unprocessed: bool = True,
    ) -> list[dict[str, Any]]:
        """``GET /api/v2/alerts``: the alerts Alertmanager holds (resolved ones are not listed),
        each with ``status.state`` (active, suppressed, unprocessed) and ``status.inhibitedBy``.
        ``matchers`` filter by label, e.g. ``'alertname="X"'``."""
        params: list[tuple[str, str]] = [
            ("active", str(active).lower()),
            ("silenced", str(silenced).lower()),
            ("inhibited", str(inhibited).lower()),
            ("unprocessed", str(unprocessed).lower()),
            *(("filter", matcher) for matcher in matchers),
        ]
        answer = requests.get(f"{self.url}/api/v2/alerts", params=params, timeout=10)
        if not answer.ok:
            raise AlertmanagerError(f"GET /api/v2/alerts: {answer.status_code}: {answer.text}")
        result: list[dict[str, Any]] = answer.json()
        return result


# --------------------------------------------------------------------------------------------
# A webhook receiver


class WebhookReceiver:
    """An Alertmanager webhook receiver served from a thread of this process.

    Keeps every notification (the JSON body Alertmanager posts) and calls ``on_notification``
    with each one; a failing callback does not fail the request.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._notifications: list[dict[str, Any]] = []
        self._on_notification = on_notification
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except ValueError:
                    body = None
                ok = isinstance(body, dict)
                self.send_response(200 if ok else 400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if ok:
                    receiver._record(body)

        return Handler

    def _record(self, notification: dict[str, Any]) -> None:
        with self._lock:
            self._notifications.append(notification)
        if self._on_notification is not None:
            with contextlib.suppress(Exception):
                self._on_notification(notification)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{url_host(str(host))}:{port}/alerts"

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="webhook-receiver", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def notifications(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._notifications)

    def alerts(self, alertname: str | None = None, status: str | None = None
               ) -> list[dict[str, Any]]:
        """Every alert of every notification so far, oldest first, optionally filtered."""
        return [
            alert
            for notification in self.notifications()
            for alert in notification.get("alerts", [])
            if (alertname is None or alert.get("labels", {}).get("alertname") == alertname)
            and (status is None or alert.get("status") == status)
        ]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# A status page where Debian's package has no UI

_STATUS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Alertmanager: alerts</title>
<style>
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
.active { color: #b00; } .suppressed { color: #777; }
</style>
</head>
<body>
<h1>Alertmanager: alerts</h1>
<p>Debian's Alertmanager package ships no web UI; this page lists what
<a href="api/v2/alerts">api/v2/alerts</a> holds, every 5 s. Also:
<a href="api/v2/status">api/v2/status</a>, <a href="metrics">metrics</a>, or
<code>amtool --alertmanager.url=URL alert query</code>.</p>
<p id="updated">loading...</p>
<table>
<thead><tr><th>state</th><th>alert</th><th>severity</th><th>labels</th><th>summary</th>
<th>since</th></tr></thead>
<tbody id="alerts"></tbody>
</table>
<script>
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) { td.className = cls; }
  row.appendChild(td);
}
async function refresh() {
  const out = document.getElementById("updated");
  try {
    const answer = await fetch("api/v2/alerts");
    const alerts = await answer.json();
    const body = document.getElementById("alerts");
    body.replaceChildren();
    alerts.sort((a, b) => a.labels.alertname.localeCompare(b.labels.alertname));
    for (const a of alerts) {
      const row = document.createElement("tr");
      const other = Object.entries(a.labels)
        .filter(([k]) => k !== "alertname" && k !== "severity")
        .map(([k, v]) => k + "=" + v).join(", ");
      cell(row, a.status.state, a.status.state);
      cell(row, a.labels.alertname);
      cell(row, a.labels.severity || "");
      cell(row, other);
      cell(row, (a.annotations && a.annotations.summary) || "");
      cell(row, a.startsAt);
      body.appendChild(row);
    }
    out.textContent = alerts.length + " alert(s) at " + new Date().toLocaleTimeString();
  } catch (error) {
    out.textContent = "cannot read api/v2/alerts: " + error;
  }
}
refresh();
setInterval(refresh, 5000);
</script>
</body>
</html>
"""


def write_status_page(folder: Path) -> Path:
    """Write ``index.html`` (the current alerts, from the API) into ``folder`` for
    ``AlertmanagerServer(ui_path=folder)``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.html").write_text(_STATUS_PAGE, encoding="utf-8")
    return folder

"""Test-only helpers: VictoriaMetrics, vmalert and vmauth as processes on 127.0.0.1.

The binaries come from Debian's ``victoria-metrics`` package (1.79.5 on Debian 12), fetched once
into the project's cache with ``exporter.lab.promserver.find_binary`` (``apt-get download`` +
``dpkg -x``; no service is installed). They are always taken from that package, never from PATH:
the flags and query semantics the tests rely on are those of that version.

Every process is an ``exporter.lab.process.ManagedProcess``: it runs in its own process group,
logs to a file in its work folder and is stopped by its own PID (SIGTERM, then SIGKILL). The
fixtures that create them stop them.

Two small in-process helpers complete a "Mimir-like" endpoint and a notifier:

* :class:`TenantGate`: a reverse proxy that refuses requests without the expected
  ``X-Scope-OrgID`` (401 ``no org id``, as Mimir and Cortex answer) and forwards the rest.
* :class:`AlertSink`: accepts what vmalert posts to an Alertmanager (``/api/v2/alerts``).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import http.server
import json
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests

from exporter.lab.process import ManagedProcess, ProcessStartError, write_yaml
from exporter.lab.promserver import find_binary, wait_for

PACKAGE = "victoria-metrics"
HOST = "127.0.0.1"


class VMStartError(ProcessStartError):
    """A process exited or never became ready; the message carries its log tail."""


@dataclass(frozen=True)
class VMBinaries:
    victoria_metrics: Path
    vmalert: Path
    vmauth: Path
    #: The Debian package version (the binaries of Debian's build print no version).
    version: str


def find_vm_binaries() -> VMBinaries:
    """The three binaries from Debian's package, fetched into the cache on first use."""
    paths = {name: find_binary(PACKAGE, name, use_path=False)
             for name in ("victoria-metrics", "vmalert", "vmauth")}
    return VMBinaries(paths["victoria-metrics"], paths["vmalert"], paths["vmauth"],
                      _package_version(paths["victoria-metrics"]))


def _package_version(binary: Path) -> str:
    changelog = binary.parent.parent / "share" / "doc" / PACKAGE / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as text:
            first = text.readline()
    except OSError:
        return "unknown"
    # "victoriametrics (1.79.5+ds1-2) unstable; urgency=medium"
    return first.split("(", 1)[1].split(")", 1)[0] if "(" in first else "unknown"


# --------------------------------------------------------------------------------------------
# Processes


class Service(ManagedProcess):
    """One process in its own process group on 127.0.0.1:<free port>, ready when ``/health``
    answers 200 (every VictoriaMetrics component serves it)."""

    name = "service"
    log_marker = "vmharness"
    start_error = VMStartError

    def __init__(self, binary: Path, workdir: Path) -> None:
        super().__init__(workdir, HOST)
        self.binary = binary

    # -- to override --

    def args(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return requests.get(f"{self.url}/health", timeout=2).status_code == 200

    # -- common --

    @property
    def listen(self) -> str:
        return self.listen_address

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        return [str(self.binary), *self.args()]

    def probe(self) -> str | None:
        return None if self.ready() else "not ready"


class VictoriaMetrics(Service):
    """Single-node VictoriaMetrics, optionally scraping with a Prometheus ``scrape_configs``.

    Flags that make it behave like the Prometheus the tests compare with (``tuned=False``
    leaves them out, to show VictoriaMetrics' defaults):

    * ``-search.latencyOffset=0s``: by default (30s) the newest samples are hidden from queries
      and an instant query near "now" is moved back.
    * ``-search.disableCache``: no rollup-result cache between queries of the same expression.
    * ``-retentionPeriod=100y``: nothing is deleted while a test runs.
    """

    name = "victoria-metrics"

    def __init__(self, binaries: VMBinaries, workdir: Path,
                 scrape_config: Mapping[str, Any] | None = None,
                 extra_args: Sequence[str] = (), *, tuned: bool = True) -> None:
        super().__init__(binaries.victoria_metrics, workdir)
        self.scrape_config = scrape_config
        self.extra_args = tuple(extra_args)
        self.tuned = tuned

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def scrape_path(self) -> Path:
        return self.workdir / "promscrape.yml"

    def prepare(self) -> None:
        if self.scrape_config is not None:
            write_yaml(self.scrape_path, prometheus_to_promscrape(self.scrape_config))

    def args(self) -> list[str]:
        args = [f"-storageDataPath={self.data_dir}", f"-httpListenAddr={self.listen}",
                "-retentionPeriod=100y", "-loggerLevel=WARN"]
        if self.tuned:
            args += ["-search.latencyOffset=0s", "-search.disableCache"]
        if self.scrape_config is not None:
            args.append(f"-promscrape.config={self.scrape_path}")
        return [*args, *self.extra_args]

    def force_flush(self) -> None:
        """Make every sample ingested so far searchable now (VictoriaMetrics buffers about 1 s)."""
        answer = requests.get(f"{self.url}/internal/force_flush", timeout=10)
        answer.raise_for_status()

    def query(self, promql: str, at: float | None = None, **params: str) -> list[dict[str, Any]]:
        form = {"query": promql, **params}
        if at is not None:
            form["time"] = f"{at:.3f}"
        answer = requests.post(f"{self.url}/api/v1/query", data=form, timeout=10)
        body = answer.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body.get('error', answer.text)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The scrape targets (``/api/v1/targets``, active ones)."""
        answer = requests.get(f"{self.url}/api/v1/targets", timeout=10)
        answer.raise_for_status()
        found: list[dict[str, Any]] = answer.json()["data"]["activeTargets"]
        return found

    def import_openmetrics(self, path: Path) -> int:
        """Import a backfill file of ``Fleet.write_openmetrics`` (timestamps in seconds) through
        ``/api/v1/import/prometheus`` (timestamps in milliseconds); the samples sent."""
        lines = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line or line.startswith("#"):
                continue
            head, stamp = line.rsplit(" ", 1)
            lines.append(f"{head} {round(float(stamp) * 1000)}")
        answer = requests.post(f"{self.url}/api/v1/import/prometheus",
                               data="\n".join(lines).encode() + b"\n", timeout=60)
        answer.raise_for_status()
        return len(lines)

    def export(self, match: str, start: float, end: float) -> list[dict[str, Any]]:
        """Raw samples (``/api/v1/export``: one JSON object per series, times in ms)."""
        answer = requests.post(f"{self.url}/api/v1/export",
                               data={"match[]": match, "start": f"{start:.3f}",
                                     "end": f"{end:.3f}"}, timeout=10)
        answer.raise_for_status()
        return [json.loads(line) for line in answer.text.splitlines() if line.strip()]


def prometheus_to_promscrape(config: Mapping[str, Any]) -> dict[str, Any]:
    """A Prometheus config as ``-promscrape.config`` takes it: VictoriaMetrics parses strictly
    and has no ``evaluation_interval`` (it evaluates no rules; vmalert does)."""
    out = dict(config)
    if "global" in out:
        out["global"] = {k: v for k, v in dict(out["global"]).items()
                         if k != "evaluation_interval"}
    return out


class VMAlert(Service):
    """vmalert evaluating rule files against ``datasource`` and writing results back through
    remote write (``-remoteWrite.url``), notifying ``notifier``."""

    name = "vmalert"

    def __init__(self, binaries: VMBinaries, workdir: Path, rule_files: Sequence[Path],
                 datasource: str, remote_write: str, notifier: str,
                 extra_args: Sequence[str] = ()) -> None:
        super().__init__(binaries.vmalert, workdir)
        self.rule_files = [Path(p).absolute() for p in rule_files]
        self.datasource = datasource
        self.remote_write = remote_write
        self.notifier = notifier
        self.extra_args = tuple(extra_args)

    def args(self) -> list[str]:
        return [*(f"-rule={p}" for p in self.rule_files),
                f"-datasource.url={self.datasource}", f"-remoteWrite.url={self.remote_write}",
                f"-notifier.url={self.notifier}", f"-httpListenAddr={self.listen}",
                "-loggerLevel=WARN", *self.extra_args]

    def groups(self) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.url}/api/v1/rules", timeout=5)
        answer.raise_for_status()
        groups: list[dict[str, Any]] = answer.json()["data"]["groups"]
        return groups

    def alerts(self) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.url}/api/v1/alerts", timeout=5)
        answer.raise_for_status()
        alerts: list[dict[str, Any]] = answer.json()["data"]["alerts"]
        return alerts


def vmalert_dry_run(
    binaries: VMBinaries, rule_files: Sequence[Path]
) -> subprocess.CompletedProcess[str]:
    """``vmalert -dryRun``: parse the rule files, their MetricsQL and their templates, and exit."""
    return subprocess.run([str(binaries.vmalert), "-dryRun", "-loggerLevel=WARN",
                           *(f"-rule={p}" for p in rule_files)],
                          capture_output=True, text=True, timeout=60, check=False)


class VMAuth(Service):
    """vmauth with the auth config given as a mapping (written to ``auth.yml``)."""

    name = "vmauth"

    def __init__(self, binaries: VMBinaries, workdir: Path, auth_config: Mapping[str, Any]) -> None:
        super().__init__(binaries.vmauth, workdir)
        self.auth_config = auth_config

    @property
    def config_path(self) -> Path:
        return self.workdir / "auth.yml"

    def prepare(self) -> None:
        write_yaml(self.config_path, self.auth_config)

    def args(self) -> list[str]:
        return [f"-auth.config={self.config_path}", f"-httpListenAddr={self.listen}",
                "-loggerLevel=WARN"]


# --------------------------------------------------------------------------------------------
# In-process helpers


class _Background:
    """A ThreadingHTTPServer on 127.0.0.1 served from a daemon thread; ``close()`` stops it."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer((HOST, 0), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                         "te", "trailers", "transfer-encoding", "upgrade", "host",
                         "content-length"})


class TenantGate(_Background):
    """A reverse proxy that, like a Mimir or Cortex gateway, answers 401 ``no org id`` to any
    request without ``X-Scope-OrgID: <tenant>`` and forwards the others to ``upstream``
    (path, query, body and headers, Authorization included)."""

    def __init__(self, upstream: str, tenant: str) -> None:
        target = upstream.rstrip("/").removeprefix("http://")
        gate = self
        self.refused = 0
        self.forwarded = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes, headers: Sequence[tuple[str, str]]) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("X-Scope-OrgID") != tenant:
                    gate.refused += 1
                    self._answer(401, b"no org id\n", [("Content-Type", "text/plain")])
                    return
                gate.forwarded += 1
                connection = http.client.HTTPConnection(target, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_BY_HOP}
                    connection.request(self.command, self.path, body=body or None,
                                       headers=headers)
                    answer = connection.getresponse()
                    self._answer(answer.status, answer.read(), answer.getheaders())
                finally:
                    connection.close()

            do_GET = do_POST = _handle

        super().__init__(Handler)


class AlertSink(_Background):
    """Stands in for Alertmanager: keeps every alert vmalert posts (``/api/v2/alerts``)."""

    def __init__(self) -> None:
        sink = self
        self.alerts: list[dict[str, Any]] = []
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"[]"
                with contextlib.suppress(ValueError):
                    posted = json.loads(raw)
                    if isinstance(posted, list):
                        with sink._lock:
                            sink.alerts.extend(a for a in posted if isinstance(a, dict))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)

    def names(self) -> set[str]:
        with self._lock:
            return {str(a.get("labels", {}).get("alertname")) for a in self.alerts}


__all__ = [
    "AlertSink",
    "TenantGate",
    "VMAlert",
    "VMAuth",
    "VMBinaries",
    "VMStartError",
    "VictoriaMetrics",
    "find_vm_binaries",
    "prometheus_to_promscrape",
    "vmalert_dry_run",
    "wait_for",
]

"""The fake upstream and the ``serve`` wrapper that the fault and security tests share.

:class:`FakeUpstream` is a Prometheus query API served from the test process: scripted answers,
every request recorded with when it arrived and when it was answered or the client hung up.
:class:`Serve` runs the exporter as ``python -m exporter serve``, as an operator would, and
collects its stderr line by line.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalog, config
from exporter.catalog import Selectors
from exporter.lab.promserver import wait_for

PREFIX = "triton_mig_exporter_"
DERIVED = frozenset(s.name for s in catalog.SERIES)
INTERVAL = 0.5
FLEET_RATE = ":nv_inference_count:rate"

Labels = tuple[tuple[str, str], ...]
Samples = dict[str, dict[Labels, float]]


# --- what the fake upstream answers ----------------------------------------------------------


TRITON_FACTOR = {"count": 1.0, "success": 0.5, "failure": 0.01, "exec": 0.25, "cache_hits": 0.05,
                 "pending": 0.1}
TRITON_FACTOR |= {f"{p}_us": 1000.0 * (i + 1) for i, p in enumerate(catalog.PHASES)}
DCGM_FACTOR = {"tensor": 1.0, "dram": 0.5, "gr_engine": 0.8, "tensor_max": 1.0}


@dataclass
class Fleet:
    """Per (model, version, pod) an inference rate; per MIG slice a tensor activity. The other
    base queries answer fixed multiples of these (TRITON_FACTOR, DCGM_FACTOR)."""

    triton: list[tuple[dict[str, str], float]]
    slices: list[tuple[dict[str, str], float]]

    @staticmethod
    def small(
        models: Iterable[tuple[str, str]] = (("resnet50", "1"), ("bert", "2")),
        pods: Iterable[str] = ("triton-a", "triton-b", "triton-c"),
    ) -> Fleet:
        pods, models = list(pods), list(models)
        triton = [
            ({"model": m, "version": v, "pod": pod}, float(1 + i * len(models) + j))
            for i, pod in enumerate(pods)
            for j, (m, v) in enumerate(models)
        ]
        slices = [
            ({"instance": "10.0.0.1:9400", "device": "nvidia0", "GPU_I_ID": str(i + 1),
              "GPU_I_PROFILE": "3g.40gb", "exported_pod": pod}, 0.25 * (i + 1))
            for i, pod in enumerate(pods)
        ]
        return Fleet(triton, slices)

    def result(self, name: str, at: str) -> list[dict[str, Any]]:
        if name in TRITON_FACTOR:
            rows, factor = self.triton, TRITON_FACTOR[name]
        else:
            rows, factor = self.slices, DCGM_FACTOR[name]
        return [
            {"metric": {**labels, "prometheus_replica": "prom-0"},
             "value": [float(at), repr(value * factor)]}
            for labels, value in rows
        ]

    @property
    def rate(self) -> float:
        return sum(value for _, value in self.triton)

    def pairs(self) -> set[tuple[str, str, str]]:
        return {(m["model"], m["version"], m["pod"]) for m, _ in self.triton}


def payload(result: list[dict[str, Any]], result_type: str = "vector") -> dict[str, Any]:
    return {"status": "success", "data": {"resultType": result_type, "result": result}}


def encode(document: object) -> bytes:
    return json.dumps(document).encode()


# --- the fake upstream -----------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    #: Bytes (sent with a Content-Length) or chunks (sent until the connection closes).
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: Hold the answer this long, or until the client hangs up.
    delay: float = 0.0


@dataclass
class Seen:
    name: str | None  # the base query's name; None when the query is not a base query
    query: str
    at: str  # the evaluation time sent with it
    headers: dict[str, str]
    arrived: float  # time.monotonic()
    left: float | None = None  # answered, or the client hung up
    status: int | None = None


class FakeUpstream:
    """The Prometheus query API, answering ``self.answer(seen)`` (default: :meth:`valid`)."""

    def __init__(self, sel: Selectors, fleet: Fleet | None = None) -> None:
        self.names = {q.promql(sel): q.name for q in catalog.BASE_QUERIES}
        self.fleet = fleet or Fleet.small()
        self.answer: Callable[[Seen], Reply] = self.valid
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0
        self.scheme = "http"

    def valid(self, seen: Seen) -> Reply:
        if seen.name is None:
            error = {"status": "error", "errorType": "bad_data", "error": "not a base query"}
            return Reply(400, encode(error))
        return Reply(body=encode(payload(self.fleet.result(seen.name, seen.at))))

    def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> FakeUpstream:
        self.closing.clear()
        httpd = _FakeServer(("127.0.0.1", port), _FakeHandler)
        httpd.fake = self
        if tls is not None:
            httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self._httpd = httpd
        self.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self.closing.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def since(self, t: float) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.arrived >= t]


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients giving up on a slow or huge answer are the point of some tests


class _FakeHandler(BaseHTTPRequestHandler):
    server: _FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_error(404)

    def do_POST(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        query = form.get("query", [""])[0]
        seen = Seen(fake.names.get(query), query, form.get("time", ["0"])[0],
                    {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
        with fake.lock:
            fake.seen.append(seen)
        reply = fake.answer(seen)
        seen.status = reply.status
        try:
            if reply.delay and not self._hold(reply.delay, seen):
                return
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if isinstance(reply.body, bytes):
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
            else:
                self.end_headers()
                for chunk in reply.body:
                    self.wfile.write(chunk)
        except OSError:
            pass  # the client hung up
        finally:
            if seen.left is None:
                seen.left = time.monotonic()

    def _hold(self, delay: float, seen: Seen) -> bool:
        """Wait ``delay`` seconds; False (and ``seen.left`` set) when the client hangs up."""
        deadline = time.monotonic() + delay
        closing = self.server.fake.closing
        while not closing.is_set() and (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.01))
            if readable:
                with contextlib.suppress(OSError):
                    if self.connection.recv(1, socket.MSG_PEEK):
                        continue
                seen.left = time.monotonic()
                return False
        return not closing.is_set()


# --- the exporter under test ------------------------------------------------------------------


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


def exporter_config(url: str, interval: float = INTERVAL, **upstream: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": url, "timeout": "1s", "retries": 1, "backoff": "50ms", **upstream},
        "evaluation": {"interval": f"{round(interval * 1000)}ms"},
        "web": {"listen_address": "127.0.0.1:0"},
    }


SEL = Selectors.from_config(config.from_mapping(exporter_config("http://x"), environ={}))


class Serve:
    """``python -m exporter serve`` in a subprocess; stderr collected line by line."""

    def __init__(self, cfg: dict[str, Any], folder: Path, *args: str,
                 verify: bool | str = True, auth: tuple[str, str] | None = None,
                 cert: tuple[str, str] | None = None) -> None:
        path = folder / "exporter.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", "--config.file", str(path), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace")
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self.verify, self.auth, self.cert = verify, auth, cert
        assert self.proc.stderr is not None and self.proc.stdout is not None
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        line = wait_for(self._started, 30, what="serve to start")
        found = re.search(r"serving (\S+)/metrics;", line)
        assert found, line
        self.url = found.group(1)

    @staticmethod
    def _drain(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def _started(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited {self.proc.returncode}: {self.lines}")
        return next((line for line in list(self.lines) if " serving http" in line), None)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("auth", self.auth)
        kwargs.setdefault("cert", self.cert)
        return requests.get(self.url + path, timeout=5, **kwargs)

    def samples(self) -> Samples:
        response = self.get("/metrics")
        assert response.status_code == 200, response.status_code
        return parse(response.text)

    def until(self, predicate: Callable[[Samples], Any], timeout: float, what: str) -> Samples:
        """Scrape until ``predicate(samples)`` holds; the samples that satisfied it."""
        def check() -> Samples | None:
            samples = self.samples()
            return samples if predicate(samples) else None

        return wait_for(check, timeout, interval=0.05, what=what)

    def count(self, name: str, **labels: str) -> float:
        return value(self.samples(), name, **labels) or 0.0

    def warnings(self) -> list[str]:
        """WARNING lines, but the start-up one about a cycle that can outlast the staleness
        bound: these tests' configurations (0.5 s cycles, 1 s timeouts) are in that regime on
        purpose, so that faults show within a second or two."""
        return [line for line in self.lines
                if " WARNING " in line and "a cycle can take up to" not in line]

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak resident set) of the process, in KiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status,
                                                               re.MULTILINE)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


def start_fake(cleanup: contextlib.ExitStack, port: int = 0, fleet: Fleet | None = None,
               tls: ssl.SSLContext | None = None) -> FakeUpstream:
    fake = FakeUpstream(SEL, fleet).start(port, tls)
    cleanup.callback(fake.stop)
    return fake


def start_serve(cleanup: contextlib.ExitStack, cfg: dict[str, Any], folder: Path,
                *args: str, **kwargs: Any) -> Serve:
    serve = Serve(cfg, folder, *args, **kwargs)
    cleanup.callback(serve.stop)
    return serve


def derived(samples: Samples) -> set[str]:
    return DERIVED & set(samples)


def finish(serve: Serve) -> None:
    """SIGTERM: exit 0, and nothing in the log was a traceback."""
    assert serve.stop() == 0
    assert not [line for line in serve.lines if "Traceback" in line], serve.lines

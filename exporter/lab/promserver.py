"""A real Prometheus on 127.0.0.1 for the demo and the integration tests.

Mocks of Prometheus drift from its real query semantics (lookback, closed ranges, staleness), so
the tests run the real binary. On a fresh Debian machine nothing is installed: the binaries are
taken from PATH when present, else unpacked from Debian's package into a cache folder with
``apt-get download`` + ``dpkg -x`` (no service is installed or started that way).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

# free_port is re-exported: callers import it from here.
from exporter.lab.process import ConfiguredServer, ProcessStartError, free_port

__all__ = [
    "BackfillError",
    "PrometheusBinaries",
    "PrometheusError",
    "PrometheusServer",
    "PrometheusStartError",
    "PrometheusUnavailable",
    "backfill",
    "default_cache_dir",
    "find_binary",
    "find_prometheus",
    "free_port",
    "parse_backfill_samples",
    "wait_for",
]

CACHE_ENV = "TRITON_MIG_EXPORTER_CACHE"
_BIN_DIRS = ("usr/bin", "usr/sbin", "bin", "sbin")
_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_PROGRESS_PREFIX = "promserver:"

T = TypeVar("T")


class PrometheusUnavailable(RuntimeError):
    """A needed binary is neither on PATH nor fetchable; the message says how to install it."""


class PrometheusError(RuntimeError):
    """A running Prometheus refused a request (query, reload)."""


class PrometheusStartError(PrometheusError, ProcessStartError):
    """Prometheus exited or never became ready; the message carries the tail of its log."""


class BackfillError(RuntimeError):
    """promtool refused the file, or its report could not be read; carries promtool's output."""


@dataclass(frozen=True)
class PrometheusBinaries:
    """Where the two binaries are, and which version they are (tests depend on 2.x semantics)."""

    prometheus: Path
    promtool: Path
    version: str


# --------------------------------------------------------------------------------------------
# Finding and fetching binaries


def default_cache_dir() -> Path:
    """``$TRITON_MIG_EXPORTER_CACHE`` or ``./.cache``, absolute (so a later chdir is harmless)."""
    raw = os.environ.get(CACHE_ENV) or ".cache"
    return (Path.cwd() / Path(raw).expanduser()).resolve()


def _cached_binary(root: Path, binary: str) -> Path | None:
    for sub in _BIN_DIRS:
        candidate = root / sub / binary
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no output"])[-1]


def _manual_hint(package: str) -> str:
    return (
        f"install it by hand with 'sudo apt-get install {package}' (Debian/Ubuntu), "
        f"or put the binaries on PATH"
    )


def _apt_download(apt_get: str, package: str, into: Path) -> Path:
    """Download the .deb into ``into``; on failure refresh the package lists once and retry."""

    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [apt_get, "download", package],
            cwd=into,
            capture_output=True,
            text=True,
            check=False,
        )

    result = attempt()
    if result.returncode != 0:
        update = subprocess.run([apt_get, "update"], capture_output=True, text=True, check=False)
        result = attempt()
        if result.returncode != 0:
            reason = _one_line(result.stderr or result.stdout)
            if update.returncode != 0:
                reason += f"; apt-get update also failed: {_one_line(update.stderr)}"
            raise PrometheusUnavailable(
                f"cannot fetch Debian package {package!r} (apt-get download: {reason}); "
                + _manual_hint(package)
            )
    debs = sorted(into.glob("*.deb"))
    if not debs:
        raise PrometheusUnavailable(
            f"apt-get download {package} left no .deb file; " + _manual_hint(package)
        )
    return debs[-1]


def _fetch_package(package: str, cache: Path) -> Path:
    """Unpack ``package`` into ``<cache>/<package>`` exactly once, atomically, under a file lock.

    Concurrent callers (pytest workers, parallel make targets) block on the lock; the loser finds
    the finished tree. The tree appears by one rename, so nobody sees half of it.
    """
    dest = cache / package
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{package}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if dest.is_dir():
            return dest
        apt_get, dpkg = shutil.which("apt-get"), shutil.which("dpkg")
        if apt_get is None or dpkg is None:
            missing = "apt-get" if apt_get is None else "dpkg"
            raise PrometheusUnavailable(
                f"cannot fetch Debian package {package!r}: {missing} not found; "
                + _manual_hint(package)
            )
        started = time.monotonic()
        print(
            f"{_PROGRESS_PREFIX} fetching Debian package {package} into {dest} (first run only)...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{package}-") as tmp:
            work = Path(tmp)
            download = work / "download"
            download.mkdir()
            deb = _apt_download(apt_get, package, download)
            tree = work / "tree"
            result = subprocess.run(
                [dpkg, "-x", str(deb), str(tree)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise PrometheusUnavailable(
                    f"dpkg -x {deb.name} failed: {_one_line(result.stderr)}; "
                    + _manual_hint(package)
                )
            tree.rename(dest)
        print(
            f"{_PROGRESS_PREFIX} {package} ready in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
        return dest


def find_binary(
    package: str, binary: str, cache_dir: Path | None = None, *, use_path: bool = True
) -> Path:
    """Path of ``binary`` from PATH, else from the cache, else fetched from Debian's ``package``.

    Generalises the Prometheus case so that e.g. ``("victoria-metrics", "vmalert")`` or
    ``("prometheus-alertmanager", "amtool")`` are found the same way.
    """
    if use_path:
        found = shutil.which(binary)
        if found is not None:
            return Path(found).resolve()
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).resolve()
    cached = _cached_binary(cache / package, binary)
    if cached is not None:
        return cached
    root = _fetch_package(package, cache)
    cached = _cached_binary(root, binary)
    if cached is None:
        raise PrometheusUnavailable(
            f"Debian package {package!r} unpacked in {root} has no executable {binary!r}; "
            + _manual_hint(package)
        )
    return cached


def _version(binary: Path) -> str:
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    text = (result.stdout or result.stderr).strip()
    if result.returncode != 0 or not text:
        raise PrometheusUnavailable(
            f"{binary} --version failed (exit {result.returncode}): {_one_line(result.stderr)}"
        )
    first = text.splitlines()[0]
    match = re.search(r"\bversion\s+(\S+)", first)
    return match.group(1) if match else first.strip()


def find_prometheus(cache_dir: Path | None = None) -> PrometheusBinaries:
    """Both binaries from one place (PATH only if both are there) so their versions match."""
    on_path = shutil.which("prometheus"), shutil.which("promtool")
    if on_path[0] is not None and on_path[1] is not None:
        prometheus, promtool = Path(on_path[0]).resolve(), Path(on_path[1]).resolve()
    else:
        prometheus = find_binary("prometheus", "prometheus", cache_dir, use_path=False)
        promtool = find_binary("prometheus", "promtool", cache_dir, use_path=False)
    return PrometheusBinaries(
        prometheus=prometheus, promtool=promtool, version=_version(prometheus)
    )


# --------------------------------------------------------------------------------------------
# Small helpers


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    ignore: tuple[type[Exception], ...] = (),
) -> T:
    """Poll until ``predicate()`` is truthy and return that value; never sleep blindly in tests.

    Exceptions listed in ``ignore`` count as "not yet"; the last one is named on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as error:
            last = error
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# The server


class PrometheusServer(ConfiguredServer):
    """One Prometheus process in its own process group, stoppable and restartable on one dir/port.

    The TSDB lives in ``data_dir``; a config given as a mapping is written there as
    ``prometheus.yml`` and the process log goes to ``prometheus.log`` (appended across restarts).
    """

    name = "Prometheus"
    log_marker = "promserver"
    CONFIG_NAME = "prometheus.yml"
    LOG_NAME = "prometheus.log"
    request_error = PrometheusError
    start_error = PrometheusStartError

    def __init__(
        self,
        binaries: PrometheusBinaries,
        config: Mapping[str, Any] | Path,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        retention: str = "100y",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(config, data_dir, host, port)
        self.binaries = binaries
        self.retention = retention
        self.extra_args = tuple(extra_args)

    def command(self) -> list[str]:
        return [
            str(self.binaries.prometheus),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={self.listen_address}",
            f"--storage.tsdb.retention.time={self.retention}",
            "--web.enable-lifecycle",
            *self.extra_args,
        ]

    def _get(self, path: str, **params: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", params=params or None, timeout=2)

    def probe(self) -> str | None:
        """``/-/ready``, then one real query, and the answer must come from *our* process.

        The last check (``storage.tsdb.path`` in the flags) catches a foreign Prometheus that
        already listens on the port while ours is still failing to bind.
        """
        if self._get("/-/ready").status_code != 200:
            return "/-/ready not 200"
        answer = self._get("/api/v1/query", query="1")
        if not (answer.ok and answer.json().get("status") == "success"):
            return f"query answered {answer.status_code}"
        flags = self._get("/api/v1/status/flags").json().get("data", {})
        served = flags.get("storage.tsdb.path")
        if served is not None and Path(served) != self.data_dir:
            raise PrometheusStartError(
                f"{self.url} is served by another Prometheus (TSDB {served}); "
                f"ours log tail:\n{self._run_log_tail()}"
            )
        return None

    def port_lost(self, error: Exception) -> bool:
        return super().port_lost(error) or "another" in str(error)

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query ``promql`` (at unix time ``at``); the ``result`` list of the answer."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        answer = requests.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = answer.json()
        if body.get("status") != "success":
            raise PrometheusError(f"query {promql!r} failed: {body.get('error', answer.text)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


# --------------------------------------------------------------------------------------------
# Backfill


def _table_rows(output: str) -> Iterator[tuple[list[str], list[str]]]:
    header: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("BLOCK ULID"):
            header = re.split(r"\s{2,}", line.strip())
            continue
        tokens = line.split()
        if header is not None and tokens and _ULID.match(tokens[0]):
            yield header, tokens


def parse_backfill_samples(output: str) -> int:
    """Total ``NUM SAMPLES`` over the block table promtool prints (one row per block written).

    promtool prints nothing when the file held no samples (0). Without ``--human-readable`` no
    cell contains a space, so header columns (split on 2+ spaces) index the row tokens.
    """
    if not output.strip():
        return 0
    total = 0
    rows = 0
    for header, tokens in _table_rows(output):
        try:
            total += int(tokens[header.index("NUM SAMPLES")])
        except (ValueError, IndexError) as error:
            raise BackfillError(f"cannot read the sample count from promtool:\n{output}") from error
        rows += 1
    if rows == 0:
        raise BackfillError(f"cannot find a block table in promtool's output:\n{output}")
    return total


def backfill(binaries: PrometheusBinaries, openmetrics_file: Path, data_dir: Path) -> int:
    """Write blocks for ``openmetrics_file`` into ``data_dir``; the number of samples stored.

    promtool drops out-of-order samples silently with exit code 0, so callers compare the
    returned count with what they wrote.
    """
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    command = [
        str(binaries.promtool),
        "tsdb",
        "create-blocks-from",
        "openmetrics",
        str(openmetrics_file),
        str(data_dir),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackfillError(
            f"{' '.join(command)} failed with exit code {result.returncode}:\n"
            f"{(result.stdout + result.stderr).strip()}"
        )
    return parse_backfill_samples(result.stdout)

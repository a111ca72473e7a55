"""Tests for exporter.lab.promserver, mostly against the real Prometheus binary.

The first run may download Debian's prometheus package (~20 MB) into ./.cache; later runs reuse it.
Every process a test starts is stopped by a fixture finalizer, also when an assertion fails.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.lab import promserver
from exporter.lab.promserver import (
    BackfillError,
    PrometheusBinaries,
    PrometheusServer,
    PrometheusStartError,
    PrometheusUnavailable,
    backfill,
    find_binary,
    find_prometheus,
    free_port,
    parse_backfill_samples,
    wait_for,
)

ServerFactory = Callable[..., PrometheusServer]


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def binaries() -> PrometheusBinaries:
    return find_prometheus()


@pytest.fixture
def make_server(binaries: PrometheusBinaries) -> Iterator[ServerFactory]:
    """Build servers that are always stopped at teardown, whatever the test did."""
    servers: list[PrometheusServer] = []

    def make(config: Any, data_dir: Path, **kwargs: Any) -> PrometheusServer:
        server = PrometheusServer(binaries, config, data_dir, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def self_scrape(port: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        ],
    }


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def port_free(port: int) -> bool:
    """Nobody accepts connections there and a new server could bind it (as Prometheus would)."""
    with socket.socket() as client:
        client.settimeout(1)
        if client.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def up_value(server: PrometheusServer, at: float | None = None) -> str | None:
    result = server.query('up{job="prometheus"}', at)
    return str(result[0]["value"][1]) if result else None


# --------------------------------------------------------------------------------------------
# Finding binaries


@pytest.mark.integration
def test_find_prometheus_gives_runnable_2x(
    binaries: PrometheusBinaries, capfd: pytest.CaptureFixture[str]
) -> None:
    assert binaries.version.startswith("2."), binaries.version
    for binary in (binaries.prometheus, binaries.promtool):
        assert binary.is_absolute() and os.access(binary, os.X_OK), binary
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "version 2." in (out.stdout + out.stderr)
    # A second call finds the extracted tree (or PATH) and says nothing.
    capfd.readouterr()
    assert find_prometheus() == binaries
    assert "fetching" not in capfd.readouterr().err


FAKE_APT = """#!/bin/sh
# fake apt-get: logs its calls; "download" fails until "update" ran when FAIL_UNTIL_UPDATE is set
echo "$@" >> "$FAKE_LOG"
case "$1" in
  update) [ -n "$FAIL_UPDATE" ] && { echo "E: update refused" >&2; exit 100; }
          touch "$FAKE_LOG.updated"; exit 0;;
  download)
    if [ -n "$FAIL_UNTIL_UPDATE" ] && [ ! -e "$FAKE_LOG.updated" ]; then
      echo "E: Can't find a source to download version of '$2'" >&2; exit 100
    fi
    sleep 0.3; echo deb > "${2}_1.0_amd64.deb"; exit 0;;
esac
exit 1
"""

FAKE_DPKG = """#!/bin/sh
# fake dpkg -x DEB DIR: slow, so a reader racing the extraction would see a partial tree
[ "$1" = "-x" ] || exit 2
mkdir -p "$3/usr/bin"; sleep 0.3
printf '#!/bin/sh\\necho fakebin, version 9.9.9\\n' > "$3/usr/bin/fakebin"
chmod +x "$3/usr/bin/fakebin"
"""


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """apt-get and dpkg stand-ins first on PATH; returns the file listing apt-get's calls."""
    bin_dir = tmp_path / "fakebin-path"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT), ("dpkg", FAKE_DPKG)):
        script = bin_dir / name
        script.write_text(text)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "apt.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return log


def test_fetch_is_done_once_and_atomically(
    fake_apt: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(find_binary("fakepkg", "fakebin", cache))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    seen_partial = False
    while any(thread.is_alive() for thread in threads):
        tree = cache / "fakepkg"
        if tree.exists() and not (tree / "usr/bin/fakebin").exists():
            seen_partial = True
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [cache / "fakepkg/usr/bin/fakebin"] * 3
    assert fake_apt.read_text().splitlines() == ["download fakepkg"]
    assert not seen_partial
    assert sorted(p.name for p in cache.iterdir()) == ["fakepkg", "fakepkg.lock"]
    assert capfd.readouterr().err.count("fetching Debian package fakepkg") == 1
    # Already extracted: no apt-get call and no output.
    assert find_binary("fakepkg", "fakebin", cache) == results[0]
    assert fake_apt.read_text().splitlines() == ["download fakepkg"]
    assert capfd.readouterr().err == ""


def test_fetch_updates_lists_once_then_retries(
    fake_apt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_UNTIL_UPDATE", "1")
    monkeypatch.setenv(promserver.CACHE_ENV, str(tmp_path / "envcache"))
    path = find_binary("fakepkg", "fakebin")
    assert path == tmp_path / "envcache/fakepkg/usr/bin/fakebin"
    assert fake_apt.read_text().splitlines() == ["download fakepkg", "update", "download fakepkg"]


def test_fetch_failure_says_how_to_install(
    fake_apt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_UNTIL_UPDATE", "1")
    monkeypatch.setenv("FAIL_UPDATE", "1")
    with pytest.raises(PrometheusUnavailable) as caught:
        find_binary("fakepkg", "fakebin", tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message
    assert "apt-get install fakepkg" in message and "update refused" in message
    assert fake_apt.read_text().splitlines() == ["download fakepkg", "update", "download fakepkg"]
    # Nothing half-made is left behind for the next caller.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fakepkg.lock"]


def test_no_apt_get_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(PrometheusUnavailable, match=r"apt-get not found.*apt-get install"):
        find_binary("fakepkg", "fakebin", tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# Running a server


@pytest.mark.integration
def test_scrape_stop_restart_keeps_data(make_server: ServerFactory, tmp_path: Path) -> None:
    port = free_port()
    server = make_server(self_scrape(port), tmp_path / "tsdb", port=port)
    server.start()
    assert server.url == f"http://127.0.0.1:{port}"
    assert server.is_running()
    # Prometheus 2.x applies discovered targets every 5 s: the first scrape lands ~5 s in.
    wait_for(lambda: up_value(server) == "1", timeout=20, what="up == 1 from the self-scrape")
    seen_at = time.time()
    server.reload()

    pgid = server.pid
    assert pgid is not None and os.getpgid(pgid) == pgid  # its own process group
    server.stop()
    assert not server.is_running() and server.pid is None
    assert not group_alive(pgid)
    assert port_free(port)
    server.stop()  # idempotent

    server.start()
    assert server.port == port and server.pid != pgid
    assert up_value(server, at=seen_at) == "1"  # the first run's samples survived the restart
    assert "promserver: starting" in server.log_tail(200)


@pytest.mark.integration
def test_context_manager_stops(binaries: PrometheusBinaries, tmp_path: Path) -> None:
    with PrometheusServer(binaries, {}, tmp_path / "tsdb") as server:
        pgid = server.pid
        assert pgid is not None
        assert requests.get(f"{server.url}/-/healthy", timeout=5).ok
    assert not group_alive(pgid)
    assert port_free(server.port)


@pytest.mark.integration
def test_bad_config_fails_with_log_tail(make_server: ServerFactory, tmp_path: Path) -> None:
    server = make_server({"global": {"scrape_interval": "soon"}}, tmp_path / "tsdb")
    with pytest.raises(PrometheusStartError, match=r"exited with code [1-9].*(?s:.*)soon"):
        server.start(timeout=10)
    assert not server.is_running()


@pytest.mark.integration
def test_port_taken_by_another_prometheus_is_detected(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    first = make_server({}, tmp_path / "a").start()
    second = make_server({}, tmp_path / "b", port=first.port)
    with pytest.raises(PrometheusStartError, match=r"another Prometheus|exited with code"):
        second.start(timeout=10)
    assert not second.is_running()
    assert first.is_running()


# --------------------------------------------------------------------------------------------
# Backfill


def write_openmetrics(path: Path, start: int, step: int = 30, n: int = 10) -> None:
    lines = ["# HELP test_gauge_ratio A gauge.", "# TYPE test_gauge_ratio gauge"]
    lines += [f'test_gauge_ratio{{slice="0"}} {i / 10} {start + i * step}' for i in range(n)]
    # Triton's counters have no _total suffix; "unknown" keeps the name exactly as written.
    lines += ["# HELP nv_inference_count Inferences.", "# TYPE nv_inference_count unknown"]
    lines += [f'nv_inference_count{{model="m"}} {i * 7} {start + i * step}' for i in range(n)]
    lines.append("# EOF")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.integration
def test_backfill_then_query_the_past(
    binaries: PrometheusBinaries, make_server: ServerFactory, tmp_path: Path
) -> None:
    start = int(time.time()) - 3 * 3600
    source = tmp_path / "history.om"
    write_openmetrics(source, start)
    data = tmp_path / "tsdb"
    assert backfill(binaries, source, data) == 20

    server = make_server({}, data, retention="100y").start()
    names = requests.get(f"{server.url}/api/v1/label/__name__/values", timeout=5).json()["data"]
    assert "nv_inference_count" in names and "test_gauge_ratio" in names
    at = start + 5 * 30
    counter = server.query('nv_inference_count{model="m"}', at=at)
    assert [sample["value"] for sample in counter] == [[at, "35"]]
    gauge = server.query("test_gauge_ratio", at=at + 10)  # 10 s after the sample: lookback
    assert [sample["value"][1] for sample in gauge] == ["0.5"]


@pytest.mark.integration
def test_backfill_reports_promtool_errors(binaries: PrometheusBinaries, tmp_path: Path) -> None:
    source = tmp_path / "no-eof.om"
    source.write_text("# TYPE g gauge\ng 1 1000\n")
    with pytest.raises(BackfillError, match="does not end with # EOF"):
        backfill(binaries, source, tmp_path / "tsdb")


def test_parse_backfill_samples_sums_blocks() -> None:
    output = (
        "BLOCK ULID                  MIN TIME       MAX TIME       DURATION     NUM SAMPLES  "
        "NUM CHUNKS   NUM SERIES   SIZE\n"
        "01M882AZSYAHC019BHK692QZXY  1795563622000  1795563892001  4m30.001s    20           "
        "2            2            744\n"
        "01M882AZV5R791MB60KSZW94GK  1795570800000  1795578000001  2h0m0.001s   123456       "
        "20           4            9000\n"
    )
    assert parse_backfill_samples(output) == 123476
    assert parse_backfill_samples("") == 0
    with pytest.raises(BackfillError, match="cannot find"):
        parse_backfill_samples("something else entirely\n")


# --------------------------------------------------------------------------------------------
# Helpers


def test_wait_for_returns_value_and_names_what_on_timeout() -> None:
    calls = iter([0, None, 42])
    assert wait_for(lambda: next(calls), timeout=5, interval=0.01) == 42
    with pytest.raises(TimeoutError, match="the moon"):
        wait_for(lambda: False, timeout=0.05, interval=0.01, what="the moon")

    def flaky() -> bool:
        raise ConnectionError("not yet")

    with pytest.raises(TimeoutError, match="not yet"):
        wait_for(flaky, timeout=0.05, interval=0.01, ignore=(ConnectionError,))


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536 and port_free(port)

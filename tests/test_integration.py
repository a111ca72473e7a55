"""The simulator scraped by a real Prometheus; the exporter's figures against the ground truth.

Tolerances: the simulator's counters are exact integrals of rates that are constant within an
epoch, and every instant checked has its whole window inside one epoch, so Prometheus's rate()
extrapolation is exact for a linear counter. What remains is the few milliseconds between the
simulator computing a value and Prometheus stamping the scrape: relative errors of about
2 x 5 ms / 5 s = 0.2 %. We allow 2 %. Counts and slice averages are exact.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
from conftest import Stack
from prometheus_client.parser import text_string_to_metric_families

from exporter import catalog, config
from exporter.config import UpstreamConfig
from exporter.lab.promserver import wait_for
from exporter.service import Service
from exporter.upstream import PrometheusClient

pytestmark = pytest.mark.integration

Figures = dict[str, dict[tuple[tuple[str, str], ...], float]]
REL = 0.02


def parse(text: str) -> Figures:
    out: Figures = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def run_once(stack: Stack, tmp_path: Path, at: float) -> Figures:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "once", "--config.file",
         str(stack.config_file(tmp_path)), "--at", f"{at:.3f}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return parse(done.stdout)


def truth(stack: Stack, at: float) -> Figures:
    return stack.fleet.truth(at, stack.window)


def assert_matches(got: Figures, want: Figures, names: list[str] | None = None) -> None:
    for name in names or [s.name for s in catalog.SERIES]:
        expected = want.get(name, {})
        actual = got.get(name, {})
        assert set(actual) == set(expected), (name, set(actual) ^ set(expected))
        for labels, value in expected.items():
            assert actual[labels] == pytest.approx(value, rel=REL, abs=1e-9), (name, labels)


def test_once_equals_the_ground_truth_for_every_family(stack: Stack, tmp_path: Path) -> None:
    at = stack.instant()
    got = run_once(stack, tmp_path, at)
    want = truth(stack, at)
    # The simulator's truth covers the whole contract, and so does the exporter.
    assert {s.name for s in catalog.SERIES} == {n for n, v in want.items() if v}
    assert_matches(got, want)
    assert got[":triton_inference_rate_drift:ratio"][()] == pytest.approx(1.0, rel=1e-6)
    concurrency = got[":triton_model_concurrency:ratio"][()]
    assert 1.0 <= concurrency <= 3.0


def test_models_unloaded_in_the_last_epoch_are_gone(stack: Stack, tmp_path: Path) -> None:
    at = stack.instant()
    start, _ = stack.fleet.epoch_bounds(at)
    before = {(pod, m, v) for pod in stack.fleet.pods
              for m, v in stack.fleet.loaded_models(pod, start - 1)}
    now = {(pod, m, v) for pod in stack.fleet.pods
           for m, v in stack.fleet.loaded_models(pod, at)}
    gone = before - now
    if start - 1 < stack.started + 6:
        pytest.fail("the stack should have crossed an epoch boundary by now")
    assert gone, "seed 7 with churn 0.3 unloads a model at the first epoch boundary"
    got = run_once(stack, tmp_path, at)
    published = {(dict(k)["pod"], dict(k)["model"], dict(k)["version"])
                 for k in got["model_version_pod:nv_inference_count:rate"]}
    assert not gone & published
    assert published == now


def test_duplicated_replica_halves_the_drift_and_changes_no_figure(
    stack: Stack, tmp_path: Path
) -> None:
    stack.faults.duplicate_replica = True
    try:
        on = time.time()
        at = stack.instant(not_before=on + stack.scrape)
        got = run_once(stack, tmp_path, at)
    finally:
        stack.faults.duplicate_replica = False
    want = truth(stack, at)
    assert got[":triton_inference_rate_drift:ratio"][()] == pytest.approx(0.5, rel=REL)
    assert_matches(got, want)


def test_unlabelled_series_lower_the_drift_and_nothing_else(
    stack: Stack, tmp_path: Path
) -> None:
    stack.faults.unlabeled_series = True
    try:
        at = stack.instant(not_before=time.time() + stack.scrape)
        got = run_once(stack, tmp_path, at)
    finally:
        stack.faults.unlabeled_series = False
    want = truth(stack, at)
    assert got[":triton_inference_rate_drift:ratio"][()] < 0.99
    assert_matches(got, want)


def test_a_server_restart_gives_no_negative_rate(stack: Stack, tmp_path: Path) -> None:
    pod = stack.fleet.pods[0]
    # Restart where the window of an instant 3 s later fits in the same epoch.
    lead, settle = stack.window + 2 * stack.scrape, 3 * stack.scrape
    while True:
        now = time.time()
        start, end = stack.fleet.epoch_bounds(now)
        if start + lead <= now <= end - settle - 1 and now > stack.started + 6 + lead:
            break
        time.sleep(0.2)
    stack.faults.restart(pod, now)
    time.sleep(settle)
    at = time.time() - 0.5
    assert stack.fleet.epoch_bounds(at)[0] <= at - stack.window - 2 * stack.scrape
    got = run_once(stack, tmp_path, at)
    want = truth(stack, at)
    rates = got["model_version_pod:nv_inference_count:rate"]
    assert all(v >= 0 for v in rates.values())
    # rate() loses what a counter gained between its last scrape and the restart: at most one
    # scrape interval's worth of the sampled span (window - scrape, extrapolated to the window).
    loss = stack.scrape / (stack.window - stack.scrape)
    for labels, expected in want["model_version_pod:nv_inference_count:rate"].items():
        actual = rates[labels]
        low = expected * (1 - loss) * (1 - REL)
        assert low <= actual <= expected * (1 + REL) + 1e-9, (labels, actual, expected)
    restarted = [k for k in rates if dict(k)["pod"] == pod]
    assert restarted, "the restarted pod still serves models"


class Serve:
    def __init__(self, stack: Stack, tmp_path: Path, web: dict[str, Any] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "serve", "--config.file",
             str(stack.config_file(tmp_path, web=web))],
            stderr=subprocess.PIPE, text=True)
        self.url = ""
        line = ""
        deadline = time.time() + 30
        assert self.proc.stderr is not None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if "serving http://" in line:
                self.url = line.split("serving ", 1)[1].split(";", 1)[0].rsplit("/", 1)[0]
                break
        assert self.url, f"serve did not start: {line}"

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=5)

    def figures(self) -> Figures:
        return parse(self.get("/metrics").text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def test_serve_publishes_goes_stale_and_recovers(stack: Stack, tmp_path: Path) -> None:
    stack.instant()
    serve = Serve(stack, tmp_path)
    try:
        assert serve.get("/healthz").status_code == 200
        wait_for(lambda: serve.get("/readyz").status_code == 200, 20, what="ready")
        figures = wait_for(
            lambda: (f := serve.figures()).get(":triton_model_concurrency:ratio") and f,
            20, what="derived figures")
        assert figures["triton_mig_exporter_upstream_up"][()] == 1.0
        for series in catalog.SERIES:
            if series.name != "model_version:nv_cache_hit:ratio" or series.name in figures:
                assert series.name in figures, series.name
        body = serve.get("/metrics")
        assert body.headers["Content-Type"].startswith("text/plain; version=0.0.4")

        stack.prom.stop()
        stopped = time.time()
        wait_for(lambda: serve.figures()["triton_mig_exporter_upstream_up"][()] == 0.0,
                 10, what="upstream_up 0")
        assert time.time() - stopped < 2 * 1.0 + 4  # two cycles plus a request's retries
        gone = wait_for(lambda: ":nv_inference_count:rate" not in (f := serve.figures()) and f,
                        15, what="derived series withdrawn after the staleness bound")
        assert time.time() - stopped >= 2.0  # kept at least until close to the 3 s bound
        assert gone["triton_mig_exporter_series"][(("family", ":nv_inference_count:rate"),)] == 0
        assert serve.get("/readyz").status_code == 503

        stack.prom.start()
        back = time.time()
        wait_for(lambda: ":nv_inference_count:rate" in serve.figures(), 15, what="recovery")
        assert time.time() - back < 10
        assert serve.get("/readyz").status_code == 200

        started = time.time()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(5) == 0
        assert time.time() - started < 5
        assert serve.proc.stderr is not None
        assert "Traceback" not in serve.proc.stderr.read()
    finally:
        serve.stop()
        if not stack.prom.is_running():
            stack.prom.start()


def test_gzip_scrape_and_self_metrics_over_http(stack: Stack, tmp_path: Path) -> None:
    serve = Serve(stack, tmp_path)
    try:
        wait_for(lambda: serve.get("/readyz").status_code == 200, 20, what="ready")
        response = requests.get(serve.url + "/metrics", headers={"Accept-Encoding": "gzip"},
                                timeout=5)
        assert response.headers.get("Content-Encoding") == "gzip"
        figures = parse(response.text)  # requests decodes the concatenated gzip members
        assert figures["triton_mig_exporter_upstream_requests_total"][
            (("outcome", "ok"),)] >= len(catalog.BASE_QUERIES)
        assert not any(math.isnan(v) for f in figures.values() for v in f.values())
    finally:
        serve.stop()


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """Exited (a zombie nobody has reaped yet counts: it holds nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_scrapes_are_answered_while_the_cycling_process_is_stopped(
        stack: Stack, tmp_path: Path) -> None:
    """/metrics comes from the scrape process: it answers while serve's own process cannot
    run at all, and it goes when serve goes, freeing the port."""
    serve = Serve(stack, tmp_path, web={"scrape_process": True})
    try:
        [child] = children(serve.proc.pid)
        assert "exporter.scrape_process" in Path(f"/proc/{child}/cmdline").read_text()
        wait_for(lambda: ":nv_inference_count:rate" in serve.figures(), 20, what="figures")
        os.kill(serve.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                response = serve.get("/metrics")
                assert response.status_code == 200
                assert ":nv_inference_count:rate" in parse(response.text)
        finally:
            os.kill(serve.proc.pid, signal.SIGCONT)
        serve.proc.kill()
        serve.proc.wait(5)
        wait_for(lambda: gone(child), 5, what="the scrape process to exit with serve")
        port = int(serve.url.rsplit(":", 1)[1])
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # OSError if anything still listens
    finally:
        serve.stop()


def test_serve_exits_with_an_error_when_its_scrape_process_dies(
        stack: Stack, tmp_path: Path) -> None:
    serve = Serve(stack, tmp_path, web={"scrape_process": True})
    try:
        [child] = children(serve.proc.pid)
        os.kill(child, signal.SIGKILL)
        assert serve.proc.wait(10) == 1
        assert serve.proc.stderr is not None
        assert "the scrape process exited (code -9): /metrics is down" in serve.proc.stderr.read()
    finally:
        serve.stop()


@pytest.mark.parametrize("mode", ["auto", False])
def test_one_process_serves_a_small_fleet(stack: Stack, tmp_path: Path,
                                          mode: str | bool) -> None:
    """Never a second process with false; with auto (the default) not for a fleet this small."""
    serve = Serve(stack, tmp_path, web={"scrape_process": mode})
    try:
        wait_for(lambda: serve.get("/readyz").status_code == 200, 20, what="ready")
        figures = wait_for(
            lambda: (f := serve.figures()).get(":triton_model_concurrency:ratio") and f,
            20, what="derived figures")
        assert figures["triton_mig_exporter_upstream_up"][()] == 1.0
        published = {name for name in figures if not name.startswith("triton_mig_exporter_")}
        assert published <= {series.name for series in catalog.SERIES}
        assert len(published) >= len(catalog.SERIES) - 1  # the cache family may be absent
        assert children(serve.proc.pid) == []
    finally:
        serve.stop()


def test_auto_hands_the_scrapes_over_without_losing_one(stack: Stack, tmp_path: Path) -> None:
    """web.scrape_process auto, its threshold at 0 series: the first cycle that publishes
    anything starts the scrape process on the same socket, and a scraper fetching all the
    while sees only complete answers."""
    cfg = config.load(stack.config_file(tmp_path), environ={})
    assert cfg.web.scrape_process == "auto"
    service = Service(cfg, scrape_process_above=0)
    answers: list[tuple[int, bool, bool]] = []  # status, self-metrics, derived figures
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            response = requests.get(service.metrics_url, timeout=5)
            figures = parse(response.text)
            answers.append((response.status_code, "triton_mig_exporter_upstream_up" in figures,
                            any(not name.startswith("triton_mig_exporter_") for name in figures)))

    scraper = threading.Thread(target=scrape)
    service.start()
    try:
        assert service.scrapes is None  # before the first cycle: this process answers
        scraper.start()
        scrapes = wait_for(lambda: service.scrapes, 20, what="the hand-over")
        child = scrapes.pid
        wait_for(lambda: service._server is None, 10, what="this process to stop accepting")
        handed = len(answers)
        wait_for(lambda: len(answers) >= handed + 20, 10, what="scrapes after the hand-over")
        done.set()
        scraper.join(10)
        assert answers and all(answer[:2] == (200, True) for answer in answers), answers
        # Figures, once published, are in every later answer: the scrape process starts with
        # the snapshot, never serves an empty one.
        first = [answer[2] for answer in answers].index(True)
        assert all(answer[2] for answer in answers[first:]), answers
    finally:
        done.set()
        service.stop()
    assert gone(child)


def test_once_fails_clearly_when_the_upstream_is_unreachable(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "once", "--upstream", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error: cannot reach upstream http://127.0.0.1:9: connection refused (--upstream)"]
    assert done.stdout == ""


def test_discover_lists_the_source_series_and_every_computable_family(
    stack: Stack, tmp_path: Path
) -> None:
    stack.instant()
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "discover", "--config.file",
         str(stack.config_file(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "nv_inference_count" in out and "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE" in out
    assert f"{len(catalog.SERIES)} of {len(catalog.SERIES)} families can be computed" in out
    # The notebook's all_metrics() step: every Triton/DCGM name the upstream holds is listed.
    assert "DCGM_FI_DEV_POWER_USAGE" in out and "nv_inference_pending_request_count" in out


def test_discover_names_what_is_missing(stack: Stack, tmp_path: Path) -> None:
    config = stack.config_file(tmp_path)
    config.write_text(config.read_text() + "dcgm: {selector: 'exported_namespace=\"nowhere\"'}\n")
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "discover", "--config.file", str(config)],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "no  gpu_instance:dcgm_tensor_active:avg  (needs DCGM_FI_PROF_PIPE_TENSOR_ACTIVE)" \
        in done.stdout
    assert "yes :triton_model_concurrency:ratio" in done.stdout


def test_servers_that_cannot_be_told_apart_are_marked_by_discover_and_once(
    stack: Stack, tmp_path: Path
) -> None:
    """server_labels naming a label the upstream does not hold: every server would count as
    one. discover marks the server counts, once withholds them and says why, rates stay."""
    config = stack.config_file(tmp_path)
    config.write_text(config.read_text() + "triton: {server_labels: [kubernetes_pod]}\n")
    at = stack.instant()
    found = subprocess.run(
        [sys.executable, "-m", "exporter", "discover", "--config.file", str(config)],
        capture_output=True, text=True, timeout=60, check=False)
    assert found.returncode == 0, found.stderr
    for name in catalog.COUNTS_SERVERS:
        assert f"no  {name}  (servers cannot be told apart: " in found.stdout, name
    assert "yes model_version:nv_inference_request_success:rate" in found.stdout
    once = subprocess.run(
        [sys.executable, "-m", "exporter", "once", "--config.file", str(config), "--at",
         str(at)], capture_output=True, text=True, timeout=60, check=False)
    assert once.returncode == 0, once.stderr
    (warning,) = [line for line in once.stderr.splitlines() if line.startswith("warning:")]
    assert "servers cannot be told apart" in warning and "kubernetes_pod" in warning
    published = {line.split("{")[0].split(" ")[0] for line in once.stdout.splitlines()
                 if line and not line.startswith("#")}
    assert published.isdisjoint(catalog.COUNTS_SERVERS)
    assert "model_version:nv_inference_request_success:rate" in published


def test_sigterm_during_a_slow_cycle_exits_0_within_5_seconds(tmp_path: Path) -> None:
    """The upstream takes 30 s to answer: serve must not wait for it to leave."""
    import http.server

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            time.sleep(30)

        def log_message(self, *args: object) -> None:
            pass

    slow = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(f"upstream: {{url: 'http://127.0.0.1:{slow.server_address[1]}', "
                   "timeout: 20s}\nweb: {listen_address: '127.0.0.1:0'}\n")
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "serve", "--config.file",
                             str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        while "serving http://" not in proc.stderr.readline():
            pass
        time.sleep(1.0)  # the first cycle is now waiting on the slow upstream
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.time() - started < 5
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
        slow.shutdown()
        slow.server_close()


def test_gzip_and_plain_answers_of_a_real_prometheus_are_the_same_frame(stack: Stack) -> None:
    """``upstream.compression``: Prometheus compresses when asked, and the frames agree."""
    at = stack.instant()
    frames, encodings = [], []
    for compression in ("gzip", "none"):
        cfg = UpstreamConfig(url=stack.prom.url, compression=compression)
        with PrometheusClient(cfg) as client:
            client.session.hooks["response"].append(
                lambda r, *_, **__: encodings.append(r.headers.get("Content-Encoding")))
            query = f"rate(nv_inference_count[{stack.window:g}s])"
            frames.append(client.range(query, at - 60, at, 1.0).frame)
    assert encodings == ["gzip", None]
    assert len(frames[0]) > 100
    pd.testing.assert_frame_equal(frames[0], frames[1])

"""Shared fixtures: the real Prometheus, the simulator, and a stack of both on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.lab import promserver, simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TRITON_MIG_EXPORTER_* config override from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("TRITON_MIG_EXPORTER_") and name != promserver.CACHE_ENV:
            monkeypatch.delenv(name)
    # Subprocesses resolve the cache folder against their cwd: pin it to the repo's.
    monkeypatch.setenv(promserver.CACHE_ENV, str(promserver.default_cache_dir()))


@pytest.fixture(scope="session")
def prometheus_binaries() -> promserver.PrometheusBinaries:
    return promserver.find_prometheus()


@dataclass
class Stack:
    """The simulator (in this process) and a real Prometheus scraping it."""

    fleet: simulate.Fleet
    faults: simulate.Faults
    sim_url: str
    prom: promserver.PrometheusServer
    scrape: float
    window: float
    started: float

    def config_file(self, tmp_path: Path, web: Mapping[str, Any] | None = None,
                    **evaluation: Any) -> Path:
        """An exporter configuration against this Prometheus (``web``: keys added to the web
        section; ``evaluation``: to the evaluation section)."""
        path = tmp_path / "exporter.yaml"
        settings = {"window": f"{self.window:g}s", "scrape_interval": f"{self.scrape:g}s",
                    "interval": "1s", **evaluation}
        path.write_text(yaml.safe_dump({
            "upstream": {"url": self.prom.url, "timeout": "2s", "retries": 1,
                         "backoff": "100ms"},
            "evaluation": settings,
            "web": {"listen_address": "127.0.0.1:0", **(web or {})},
        }))
        return path

    def instant(self, not_before: float = 0.0) -> float:
        """A past instant whose window (plus a scrape) lies inside one simulator epoch and has
        been scraped, waiting for one when needed. truth() is exact for such windows."""
        margin = self.window + 2 * self.scrape
        while True:
            t = time.time() - 0.5
            start, _ = self.fleet.epoch_bounds(t)
            earliest = max(start + margin, self.started + 6 + margin, not_before + margin)
            if t >= earliest:
                return t
            time.sleep(min(earliest - t + 0.1, 30))


@contextlib.contextmanager
def simulated_stack(binaries: promserver.PrometheusBinaries, folder: Path, *, scrape: float,
                    window: float, lead: float, **spec: Any) -> Iterator[Stack]:
    """The simulator (first epoch ending ``lead`` s from now) scraped by a real Prometheus."""
    now = time.time()
    faults = simulate.Faults()
    fleet = simulate.Fleet(simulate.FleetSpec(**spec, start=now - spec["epoch_seconds"] + lead),
                           faults)
    sim = simulate.serve(fleet, "127.0.0.1", 0)
    target = f"127.0.0.1:{sim.server_address[1]}"
    prom = promserver.PrometheusServer(binaries, fleet.prometheus_config(target, scrape), folder)
    try:
        prom.start()
        yield Stack(fleet, faults, f"http://{target}", prom, scrape, window, now)
    finally:
        prom.stop()
        sim.shutdown()
        sim.server_close()


@pytest.fixture(scope="module")
def stack(prometheus_binaries: promserver.PrometheusBinaries,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Epoch 0 ends 12 s from now, so the tests see a change of loaded models (churn).
    with simulated_stack(prometheus_binaries, tmp_path_factory.mktemp("prometheus"), scrape=1.0,
                         window=5.0, lead=12, servers=4, models=3, hosts=2, gpus_per_host=1,
                         seed=7, epoch_seconds=20.0, churn=0.3) as st:
        yield st

"""Fleet sizes, their backfilled history, and a Prometheus serving it (benchmarks only).

A size is a :class:`exporter.lab.simulate.FleetSpec` plus how much history to write. The history is
written with ``Fleet.write_openmetrics`` at a 15 s step, backfilled with promtool into a fresh
TSDB, and served by a real Prometheus on 127.0.0.1. The evaluation instant is pinned inside the
history (``after`` seconds before its end), so every figure is computed on full windows whatever
the wall clock does while the benchmark runs.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from exporter.lab import promserver, simulate

STEP = 15.0
#: Families the exporter's base queries and the notebook's queries read.
TRITON_USED = frozenset({
    "nv_inference_count",
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_exec_count",
    "nv_cache_num_hits_per_model",
    *(f"nv_inference_{phase}_duration_us" for phase in simulate.PHASES),
})
DCGM_USED = frozenset({
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
})


@dataclass(frozen=True)
class Size:
    name: str
    servers: int
    models: int
    hosts: int
    gpus_per_host: int
    models_per_server: int
    #: "all": every family the simulator prints (what a real Prometheus holds); "used": only
    #: the families read by the queries (XL: the full history would not fit in 24 GB).
    families: str = "all"
    history_minutes: float = 40.0
    epoch_seconds: float = 300.0
    seed: int = 1

    @property
    def slices(self) -> int:
        return self.hosts * self.gpus_per_host * len(simulate.LAYOUTS["all-balanced"])

    def spec(self, start: float) -> simulate.FleetSpec:
        return simulate.FleetSpec(
            servers=self.servers, models=self.models, hosts=self.hosts,
            gpus_per_host=self.gpus_per_host, models_per_server=self.models_per_server,
            seed=self.seed, epoch_seconds=self.epoch_seconds, start=start,
        )

    def describe(self) -> str:
        return (f"{self.servers} servers x {self.models} models x {self.slices} slices "
                f"({self.hosts} hosts x {self.gpus_per_host} GPUs, {self.models_per_server} "
                f"models/server)")


# Slices: hosts x GPUs x 4 (the all-balanced MIG layout: 3g + 2g + 1g + 1g).
SIZES: dict[str, Size] = {
    "S": Size("S", servers=4, models=3, hosts=1, gpus_per_host=2, models_per_server=3),
    "M": Size("M", servers=12, models=10, hosts=2, gpus_per_host=4, models_per_server=4),
    "L": Size("L", servers=40, models=50, hosts=5, gpus_per_host=5, models_per_server=10),
    "XL": Size("XL", servers=1000, models=200, hosts=125, gpus_per_host=4,
               models_per_server=20, families="used", history_minutes=30.0),
}


class UsedFamiliesFleet(simulate.Fleet):
    """The simulator with only the families the queries read (saves memory and disk at XL).

    Filters the simulator's per-scrape family lists; the numbers are the same as the full
    fleet's. A benchmark shim over private methods, not part of the exporter.
    """

    def _triton_families(self, s: int, t: float, unlabeled: bool) -> list[Any]:
        families = super()._triton_families(s, t, unlabeled)
        return [f for f in families if f.name in TRITON_USED]

    def _dcgm_families(self, h: int, t: float) -> list[Any]:
        return [f for f in super()._dcgm_families(h, t) if f.name in DCGM_USED]


@dataclass
class History:
    size: Size
    start: float
    end: float
    at: float
    samples_written: int
    samples_stored: int
    write_seconds: float
    backfill_seconds: float
    openmetrics_bytes: int


def pinned_instant(now: float, interval: float) -> float:
    """The evaluation instant: ``now`` truncated to the cycle interval."""
    return math.floor(now / interval) * interval


def write_history(size: Size, binaries: promserver.PrometheusBinaries, workdir: Path,
                  at: float, after: float = 300.0) -> tuple[History, Path]:
    """Write ``size``'s history around ``at`` and backfill it into ``workdir/tsdb``."""
    end = at + after
    start = end - size.history_minutes * 60.0
    # Counters start at 0 one epoch before the history starts.
    spec = size.spec(start - size.epoch_seconds)
    fleet_cls = UsedFamiliesFleet if size.families == "used" else simulate.Fleet
    fleet = fleet_cls(spec)
    om = workdir / "history.om"
    began = time.monotonic()
    written = fleet.write_openmetrics(om, start, end, STEP)
    write_seconds = time.monotonic() - began
    om_bytes = om.stat().st_size
    data = workdir / "tsdb"
    began = time.monotonic()
    stored = promserver.backfill(binaries, om, data)
    backfill_seconds = time.monotonic() - began
    om.unlink()  # can be GBs at XL
    if stored != written:
        raise RuntimeError(f"promtool stored {stored} of {written} samples (out of order?)")
    del fleet  # the simulator's history caches: GBs at XL
    history = History(size, start, end, at, written, stored, write_seconds,
                      backfill_seconds, om_bytes)
    return history, data


def prometheus_on(binaries: promserver.PrometheusBinaries,
                  data: Path) -> promserver.PrometheusServer:
    """A Prometheus (not started) on the backfilled TSDB, scraping nothing: its own /metrics is
    read directly."""
    config = {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"}}
    return promserver.PrometheusServer(binaries, config, data, host="127.0.0.1")


_QUERY_HANDLER = 'handler="/api/v1/query"'
_VALUE = re.compile(r"\s(\S+)$")


@dataclass(frozen=True)
class QueryStats:
    """Prometheus's own counters for /api/v1/query: requests and their summed handling time."""

    requests: float
    seconds: float

    def __sub__(self, other: QueryStats) -> QueryStats:
        return QueryStats(self.requests - other.requests, self.seconds - other.seconds)


def query_stats(prom_url: str, session: requests.Session | None = None) -> QueryStats:
    """Read ``prometheus_http_requests_total`` and the duration histogram's sum for the instant
    query handler from Prometheus's own /metrics (not through the API, so it counts nothing)."""
    getter = session or requests
    text = getter.get(f"{prom_url}/metrics", timeout=10).text
    total = seconds = 0.0
    for line in text.splitlines():
        if _QUERY_HANDLER not in line:
            continue
        match = _VALUE.search(line)
        if match is None:
            continue
        if line.startswith("prometheus_http_requests_total{"):
            total += float(match.group(1))
        elif line.startswith("prometheus_http_request_duration_seconds_sum{"):
            seconds += float(match.group(1))
    return QueryStats(total, seconds)

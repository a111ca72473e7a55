"""A deterministic Triton + dcgm-exporter fleet simulator with a known truth.

Why it exists: the exporter derives fleet figures from counters in a Prometheus. To prove those
figures right we need sources whose every number is known exactly. This module models a fleet of
NVIDIA Triton servers on MIG slices of H100 GPUs, serves their ``/metrics`` the way Triton and
dcgm-exporter print them (so a real Prometheus can scrape it), writes the same scrapes as an
OpenMetrics backfill file, and computes the exact expected value of every derived series of the
contract (``Fleet.truth``) by a separate plain-Python calculation.

The model is a pure function of ``FleetSpec`` (including its seed) and the fault log: no wall
clock inside. Time is cut into epochs of ``epoch_seconds`` from ``spec.start``; within an epoch
every rate and every DCGM gauge is constant, so counters are exact integrals and a window that
lies inside one epoch has a closed-form truth.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import json
import math
import signal
import sys
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import yaml

__all__ = [
    "DCGM_FAMILIES",
    "HOST_LABELS",
    "IDLE_THRESHOLD",
    "PHASES",
    "REASONS",
    "SCRAPE_LABELS",
    "TRITON_FAMILIES",
    "Faults",
    "Fleet",
    "FleetSpec",
    "MigSlice",
    "add_arguments",
    "escape_label_value",
    "format_value",
    "main_from_args",
    "run",
    "serve",
    "spec_from_args",
]

Labels = tuple[tuple[str, str], ...]
"""Label pairs; in expositions in print order, as truth keys sorted by name."""
Pair = tuple[int, str]
"""A loaded model version: (model index, version string)."""
Truth = dict[str, dict[Labels, float]]

# --- source facts (copied from the reference expositions; never read at run time) -------------

REASONS = ("OTHER", "BACKEND", "CANCELED", "REJECTED")
"""Failure reasons in the order Triton prints them."""
PHASES = ("request", "queue", "compute_input", "compute_infer", "compute_output")
IDLE_THRESHOLD = 0.01
"""Tensor activity under which a slice counts as idle (the exporter's default)."""

NAMED_MODELS = ("pn_demo", "svj_tch_gnn", "particlenet_aa")
GPU_MODEL_NAME = "NVIDIA H100 80GB HBM3"
DRIVER_VERSION = "570.133.20"
MAX_EPOCHS = 100_000
"""Refuse histories longer than this: set ``FleetSpec.start`` near the times you query."""

_QUANTILES = (("0.5", 0.9), ("0.9", 1.35), ("0.95", 1.6), ("0.99", 2.3), ("0.999", 4.0))
_BUCKETS = ("100", "500", "2000", "5000")
_K8S_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_PCI_BUS_IDS = ("1B", "43", "52", "61", "9D", "C3", "D1", "DF")
_FB_TOTAL_MIB = {"1g.10gb": 9728, "2g.20gb": 19968, "3g.40gb": 40192, "7g.80gb": 80896,
                 "7g.79gb": 80896}
SCRAPE_LABELS = ("kubernetes", "plain")
"""How Prometheus labels Triton targets: Kubernetes SD (``pod``...) or a plain static scrape."""
HOST_LABELS = ("Hostname", "hostname")
"""dcgm-exporter's node label: ``Hostname`` up to 4.5.3-4.8.2, ``hostname`` after."""
_DRIFTED_PROFILES = {"7g.80gb": "7g.79gb"}
"""Profile names as some drivers report them (the requested name differs)."""

# Triton families in the order prometheus-cpp prints them (counters, gauges, histogram, summaries).
TRITON_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("nv_inference_request_success", "counter",
     "Number of successful inference requests, all batch sizes"),
    ("nv_inference_request_failure", "counter",
     "Number of failed inference requests, all batch sizes"),
    ("nv_inference_count", "counter",
     "Number of inferences performed (does not include cached requests)"),
    ("nv_inference_exec_count", "counter",
     "Number of model executions performed (does not include cached requests)"),
    ("nv_inference_request_duration_us", "counter",
     "Cumulative inference request duration in microseconds (includes cached requests)"),
    ("nv_inference_queue_duration_us", "counter",
     "Cumulative inference queuing duration in microseconds (includes cached requests)"),
    ("nv_inference_compute_input_duration_us", "counter",
     "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_infer_duration_us", "counter",
     "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_output_duration_us", "counter",
     "Cumulative inference compute output duration in microseconds "
     "(does not include cached requests)"),
    ("nv_cache_num_hits_per_model", "counter", "Number of cache hits per model"),
    ("nv_cache_hit_duration_per_model", "counter",
     "Total cache hit duration per model, in microseconds"),
    ("nv_cache_num_misses_per_model", "counter", "Number of cache misses per model"),
    ("nv_cache_miss_duration_per_model", "counter",
     "Total cache miss (insert+lookup) duration per model, in microseconds"),
    ("nv_energy_consumption", "counter",
     "GPU energy consumption in joules since the Triton Server started"),
    ("nv_inference_pending_request_count", "gauge",
     "Instantaneous number of pending requests awaiting execution per-model."),
    ("nv_model_load_duration_secs", "gauge", "Model load time in seconds"),
    ("nv_pinned_memory_pool_total_bytes", "gauge",
     "Pinned memory pool total memory size, in bytes"),
    ("nv_pinned_memory_pool_used_bytes", "gauge", "Pinned memory pool used memory size, in bytes"),
    ("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)"),
    ("nv_gpu_memory_total_bytes", "gauge", "GPU total memory, in bytes"),
    ("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes"),
    ("nv_gpu_power_usage", "gauge", "GPU power usage in watts"),
    ("nv_gpu_power_limit", "gauge", "GPU power management limit in watts"),
    ("nv_cpu_utilization", "gauge", "CPU utilization rate [0.0 - 1.0]"),
    ("nv_cpu_memory_total_bytes", "gauge", "CPU total memory (RAM), in bytes"),
    ("nv_cpu_memory_used_bytes", "gauge", "CPU used memory (RAM), in bytes"),
    ("nv_inference_first_response_histogram_ms", "histogram",
     "Duration from request to first response in milliseconds"),
    ("nv_inference_request_summary_us", "summary",
     "Summary of inference request duration in microseconds (includes cached requests)"),
    ("nv_inference_queue_summary_us", "summary",
     "Summary of inference queuing duration in microseconds (includes cached requests)"),
    ("nv_inference_compute_input_summary_us", "summary",
     "Cumulative compute input duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_infer_summary_us", "summary",
     "Cumulative compute inference duration in microseconds (does not include cached requests)"),
    ("nv_inference_compute_output_summary_us", "summary",
     "Cumulative inference compute output duration in microseconds "
     "(does not include cached requests)"),
    ("nv_cache_hit_summary_per_model", "summary",
     "Summary of cache hit counts/durations per model, in microseconds."),
    ("nv_cache_miss_summary_per_model", "summary",
     "Summary of cache miss counts/durations per model, in microseconds."),
)

# dcgm-exporter families (name, type, help, printed as %f rather than %d).
DCGM_FAMILIES: tuple[tuple[str, str, str, bool], ...] = (
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", False),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", False),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", "Memory temperature (in C).", False),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", False),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", True),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter",
     "Total energy consumption since boot (in mJ).", False),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", "Total number of PCIe retries.", False),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge", "Value of the last XID error encountered.", False),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", False),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", False),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).", False),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter",
     "Number of remapped rows for correctable errors", False),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter",
     "Number of remapped rows for uncorrectable errors", False),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", "Whether remapping of rows has failed", False),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", "Ratio of time the graphics engine is active.",
     True),
    ("DCGM_FI_PROF_SM_ACTIVE", "gauge", "The ratio of cycles an SM has at least 1 warp assigned.",
     True),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "gauge", "The ratio of number of warps resident on an SM.",
     True),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge",
     "Ratio of cycles the tensor (HMMA) pipe is active.", True),
    ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge",
     "Ratio of cycles the device memory interface is active sending or receiving data.", True),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge",
     "The rate of data transmitted over the PCIe bus - including both protocol headers and data "
     "payloads - in bytes per second.", False),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge",
     "The rate of data received over the PCIe bus - including both protocol headers and data "
     "payloads - in bytes per second.", False),
)

# MIG layouts: (profile, GPU_I_ID) per GPU, in the order dcgm-exporter lists them.
LAYOUTS: dict[str, tuple[tuple[str, int], ...]] = {
    "all-balanced": (("3g.40gb", 2), ("2g.20gb", 3), ("1g.10gb", 9), ("1g.10gb", 10)),
    "all-1g.10gb": tuple(("1g.10gb", gi) for gi in range(7, 14)),
    "all-3g.40gb": (("3g.40gb", 1), ("3g.40gb", 2)),
    "all-7g.80gb": (("7g.80gb", 0),),
}
"""Per-GPU layouts; ``mixed`` alternates all-balanced and all-3g.40gb GPUs."""

# Indices of the integrated primitives; every Triton counter is a non-negative combination of
# them, so every counter is monotone between resets.
_H, _M, _C, _X, _DQ, _DIN, _DINF, _DOUT = range(8)
_NPRIM = 8
_ZERO_RATES = (0.0,) * (_NPRIM + 1)
# Per-pod DCGM activity values stored per epoch.
_GR, _TENSOR, _DRAM, _SM, _OCC, _TX, _RX = range(7)
_NACT = 7


# --- small pure helpers ------------------------------------------------------------------------


def _uniforms(key: str, n: int = 8) -> tuple[float, ...]:
    """``n`` (<= 8) deterministic uniforms in [0, 1) from a key; random access, no state."""
    digest = hashlib.blake2b(key.encode(), digest_size=8 * n).digest()
    return tuple(int.from_bytes(digest[8 * i : 8 * i + 8], "big") / 2.0**64 for i in range(n))


def escape_label_value(value: str) -> str:
    """Escape a label value for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without decimals, other floats with at most 6 decimals."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _format_double(value: float) -> str:
    return f"{value:.6f}"


def _format_int(value: float) -> str:
    return str(int(value))


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def _format_timestamp(t: float) -> str:
    millis = round(t * 1000)
    whole, frac = divmod(millis, 1000)
    return str(whole) if frac == 0 else f"{whole}.{frac:03d}".rstrip("0")


def _format_duration(seconds: float) -> str:
    """A Prometheus config duration (``5s``, ``2500ms``)."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"duration must be positive, got {seconds}")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _parse_seconds(text: str) -> float:
    """Seconds from ``90``, ``1.5``, ``90s``, ``2m``, ``1h`` or ``500ms`` (CLI flags)."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    raw = text.strip()
    for suffix, factor in units:
        if raw.endswith(suffix) and raw[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(raw[: -len(suffix)]) * factor
    try:
        return float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds such as 5, 2.5 or 30s: {text!r}"
        ) from None


def _key(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def _k8s_name(key: str, length: int) -> str:
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return "".join(_K8S_ALPHABET[b % len(_K8S_ALPHABET)] for b in digest[:length])


# --- the spec ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSpec:
    """What fleet to simulate; together with the fault log it determines every number.

    ``start`` is the origin of all counters (unix seconds): every server starts there with all
    counters at 0, so query times should lie after it and not too far (``MAX_EPOCHS``).
    Models 0-2 are named like the notebook's (pn_demo, svj_tch_gnn, particlenet_aa), then
    model_003...; ``versioned_models`` also serve version "2"; ``cache_models`` have the response
    cache on (the others print empty cache families).

    Source shapes (defaults: the notebook's setup): ``scrape_labels="plain"`` scrapes Triton as a
    static_configs job would, with ``instance`` and no ``pod``; ``shared_slices`` MIG slices each
    run two Triton servers (time-sliced: each gets half the slice, dcgm-exporter prints the slice
    once per pod); ``host_label`` is dcgm-exporter's node label name; ``profile_drift`` reports
    7g.80gb slices as the driver sometimes names them, 7g.79gb.
    """

    servers: int = 6
    models: int = 4
    hosts: int = 2
    gpus_per_host: int = 2
    seed: int = 1
    epoch_seconds: float = 60.0
    models_per_server: int | None = None
    churn: float = 0.2
    start: float = 0.0
    versioned_models: tuple[int, ...] = (0,)
    cache_models: tuple[int, ...] = (1,)
    layout: str = "all-balanced"
    scrape_labels: str = "kubernetes"
    shared_slices: int = 0
    host_label: str = "Hostname"
    profile_drift: bool = False

    def __post_init__(self) -> None:
        for name in ("servers", "models", "hosts", "gpus_per_host"):
            if getattr(self, name) < 1:
                raise ValueError(f"FleetSpec.{name} must be >= 1, got {getattr(self, name)}")
        if not self.epoch_seconds > 0:
            raise ValueError(f"FleetSpec.epoch_seconds must be > 0, got {self.epoch_seconds}")
        if not 0.0 <= self.churn <= 1.0:
            raise ValueError(f"FleetSpec.churn must be within 0..1, got {self.churn}")
        mps = self.models_per_server
        if mps is not None and not 1 <= mps <= self.models:
            raise ValueError(f"FleetSpec.models_per_server must be within 1..models, got {mps}")
        if self.layout not in LAYOUTS and self.layout != "mixed":
            known = ", ".join([*LAYOUTS, "mixed"])
            raise ValueError(f"FleetSpec.layout must be one of {known}, got {self.layout!r}")
        if not math.isfinite(self.start):
            raise ValueError("FleetSpec.start must be finite")
        if self.scrape_labels not in SCRAPE_LABELS:
            raise ValueError(f"FleetSpec.scrape_labels must be one of {', '.join(SCRAPE_LABELS)}, "
                             f"got {self.scrape_labels!r}")
        if self.host_label not in HOST_LABELS:
            raise ValueError(f"FleetSpec.host_label must be one of {', '.join(HOST_LABELS)}, "
                             f"got {self.host_label!r}")
        if not 0 <= 2 * self.shared_slices <= self.servers:
            raise ValueError(f"FleetSpec.shared_slices must be within 0..servers/2, got "
                             f"{self.shared_slices}")
        slices = sum(len(self.gpu_layout(g)) for g in range(self.hosts * self.gpus_per_host))
        if self.servers > slices + self.shared_slices:
            raise ValueError(
                f"FleetSpec.servers ({self.servers}) exceeds the {slices} MIG slices of "
                f"{self.hosts} hosts x {self.gpus_per_host} GPUs ({self.layout}, "
                f"{self.shared_slices} of them shared by two); raise hosts or gpus_per_host, or "
                "use layout='all-1g.10gb'"
            )

    @property
    def per_server(self) -> int:
        """Model slots per server (``models_per_server`` or min(models, 3))."""
        return self.models_per_server if self.models_per_server is not None else min(self.models, 3)

    def gpu_layout(self, gpu_index: int) -> tuple[tuple[str, int], ...]:
        """The (profile, GPU_I_ID) slices of the fleet-wide GPU ``gpu_index``."""
        if self.layout == "mixed":
            return LAYOUTS["all-balanced" if gpu_index % 2 == 0 else "all-3g.40gb"]
        return LAYOUTS[self.layout]

    def versions(self, model: int) -> tuple[str, ...]:
        return ("1", "2") if model in self.versioned_models else ("1",)


@dataclass(frozen=True)
class MigSlice:
    """One row of dcgm-exporter for a MIG GPU instance, and what runs on it.

    A slice shared by several pods has a row per pod (same ``physical``, different ``pod``).
    """

    index: int
    physical: int
    host: str
    host_index: int
    gpu: int
    gpu_index: int
    uuid: str
    pci_bus_id: str
    profile: str
    gi_id: int
    instance: str
    container: str | None = None
    namespace: str | None = None
    pod: str | None = None
    host_label: str = "Hostname"

    @property
    def size(self) -> int:
        """The slice's share of its GPU in sevenths (the leading digit of the profile)."""
        return int(self.profile.split("g", 1)[0])

    @property
    def triton(self) -> bool:
        return self.container == "triton" and self.namespace == "triton"

    def labels(self) -> Labels:
        """dcgm-exporter's labels for this slice, in its print order."""
        out: list[tuple[str, str]] = [
            ("gpu", str(self.gpu)),
            ("UUID", self.uuid),
            ("pci_bus_id", self.pci_bus_id),
            ("device", f"nvidia{self.gpu}"),
            ("modelName", GPU_MODEL_NAME),
            ("GPU_I_PROFILE", self.profile),
            ("GPU_I_ID", str(self.gi_id)),
            (self.host_label, self.host),
            ("DCGM_FI_DRIVER_VERSION", DRIVER_VERSION),
        ]
        if self.container is not None and self.namespace is not None and self.pod is not None:
            out += [("container", self.container), ("namespace", self.namespace),
                    ("pod", self.pod)]
        return tuple(out)

    def identity(self) -> Labels:
        """The published slice labels (truth key): instance, device, GPU_I_ID, GPU_I_PROFILE
        and the workload pod when there is one."""
        labels = {"instance": self.instance, "device": f"nvidia{self.gpu}",
                  "GPU_I_ID": str(self.gi_id), "GPU_I_PROFILE": self.profile}
        if self.pod is not None:
            labels["pod"] = self.pod
        return _key(**labels)


# --- faults ------------------------------------------------------------------------------------


TIMED_SWITCHES = ("duplicate_replica", "unlabeled_series")
"""Switches that change what Prometheus stores, so truth(t) needs their state at t."""


class Faults:
    """Live fault switches shared by the HTTP handlers and the model; thread-safe.

    Everything that changes stored data is time-stamped, so the model stays a pure function of
    the log and ``truth(t)`` uses the state at t even after a switch was flipped back:
    ``duplicate_replica`` and ``unlabeled_series`` hold their constructor value for all time
    and each later change from its time (the wall clock for the property setters, any time
    with ``set_switch``); restarts and churn boosts are events too. ``failing`` and
    ``slow_seconds`` only act on the transport (HTTP, and ``up`` in a backfill) and do not
    change ``Fleet.truth``.
    """

    def __init__(
        self,
        *,
        duplicate_replica: bool = False,
        unlabeled_series: bool = False,
        slow_seconds: float = 0.0,
        failing: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        initial = {"duplicate_replica": duplicate_replica, "unlabeled_series": unlabeled_series}
        # Per timed switch: change times (sorted, -inf first) and the values set then.
        self._switch_times: dict[str, list[float]] = {n: [-math.inf] for n in TIMED_SWITCHES}
        self._switch_values: dict[str, list[bool]] = {n: [bool(initial[n])]
                                                      for n in TIMED_SWITCHES}
        self._slow_seconds = self._check_slow(slow_seconds)
        self._failing = failing
        self._events: list[tuple[str, str, float, float]] = []

    @staticmethod
    def _check_slow(value: float) -> float:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"slow_seconds must be a finite number >= 0, got {value}")
        return float(value)

    def set_switch(self, name: str, value: bool, at: float | None = None) -> None:
        """Set a timed switch (``TIMED_SWITCHES``) from ``at`` on (unix seconds, default now)."""
        if name not in TIMED_SWITCHES:
            raise ValueError(f"not a timed switch: {name!r}")
        when = time.time() if at is None else float(at)
        with self._lock:
            times = self._switch_times[name]
            i = bisect.bisect_right(times, when)
            times.insert(i, when)
            self._switch_values[name].insert(i, bool(value))

    def switch_at(self, name: str, t: float) -> bool:
        """The state of a timed switch at time ``t``."""
        with self._lock:
            i = bisect.bisect_right(self._switch_times[name], t)
            return self._switch_values[name][max(i, 1) - 1]

    @property
    def duplicate_replica(self) -> bool:
        """A second HA replica (prometheus-k8s-1) scrapes the same data (state now)."""
        return self.switch_at("duplicate_replica", time.time())

    @duplicate_replica.setter
    def duplicate_replica(self, value: bool) -> None:
        self.set_switch("duplicate_replica", value)

    @property
    def unlabeled_series(self) -> bool:
        """Each server also exposes count/success series with no model label (state now)."""
        return self.switch_at("unlabeled_series", time.time())

    @unlabeled_series.setter
    def unlabeled_series(self, value: bool) -> None:
        self.set_switch("unlabeled_series", value)

    @property
    def slow_seconds(self) -> float:
        """Delay before answering any /metrics request."""
        with self._lock:
            return self._slow_seconds

    @slow_seconds.setter
    def slow_seconds(self, value: float) -> None:
        checked = self._check_slow(value)
        with self._lock:
            self._slow_seconds = checked

    @property
    def failing(self) -> bool:
        """Triton endpoints answer HTTP 500."""
        with self._lock:
            return self._failing

    @failing.setter
    def failing(self, value: bool) -> None:
        with self._lock:
            self._failing = bool(value)

    def restart(self, pod: str, at: float | None = None) -> None:
        """Restart ``pod`` at ``at`` (unix seconds, default now): all its counters restart at 0."""
        when = time.time() if at is None else float(at)
        with self._lock:
            self._events.append(("restart", pod, when, 0.0))

    def set_churn_boost(self, factor: float, at: float | None = None) -> None:
        """Multiply the churn probability by ``factor`` for epochs starting at or after ``at``."""
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f"churn boost must be a finite number >= 0, got {factor}")
        when = time.time() if at is None else float(at)
        with self._lock:
            self._events.append(("churn_boost", "", when, float(factor)))

    @property
    def churn_boost(self) -> float:
        """The most recently set churn boost (1.0 when never set)."""
        with self._lock:
            boosts = [value for kind, _, _, value in self._events if kind == "churn_boost"]
        return boosts[-1] if boosts else 1.0

    def restarts(self) -> dict[str, list[float]]:
        """Restart times per pod, in the order they were requested."""
        out: dict[str, list[float]] = {}
        with self._lock:
            for kind, pod, at, _ in self._events:
                if kind == "restart":
                    out.setdefault(pod, []).append(at)
        return out

    def events(self, since: int = 0) -> list[tuple[str, str, float, float]]:
        """The event log from position ``since``: (kind, pod, at, value)."""
        with self._lock:
            return self._events[since:]

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view of every switch."""
        flags: dict[str, Any] = {name: getattr(self, name) for name in TIMED_SWITCHES}
        with self._lock:
            flags["slow_seconds"] = self._slow_seconds
            flags["failing"] = self._failing
        flags["churn_boost"] = self.churn_boost
        flags["restarts"] = self.restarts()
        return flags


# --- per-pair constants and the derived counters -------------------------------------------------


@dataclass(frozen=True)
class _PairConst:
    """Per (model, version) constants drawn once from the seed."""

    model: str
    version: str
    cache: bool
    ipr: float
    rpb_max: float
    infer_us: float
    in_us: float
    out_us: float
    q_us: float
    overhead_us: float
    hit_us: float
    miss_us: float
    fail: tuple[float, ...]
    buckets: tuple[float, ...]
    load_secs: float
    mem_mib: int
    tensor_frac: float
    dram_frac: float
    idle_p: float
    g_max: float
    bytes_in: float
    bytes_out: float


class _Derived(NamedTuple):
    """Counter values (or increases) derived from the integrated primitives."""

    success: float
    failures: tuple[float, ...]
    inferences: float
    executions: float
    durations: tuple[float, ...]  # in PHASES order
    hits: float
    misses: float


def _derive(c: _PairConst, prims: Sequence[float]) -> _Derived:
    """Every Triton counter is a non-negative linear map of the primitives; this is that map."""
    hits, misses = prims[_H], prims[_M]
    success = hits + misses
    queue, cin, cinf, cout = prims[_DQ], prims[_DIN], prims[_DINF], prims[_DOUT]
    request = c.hit_us * hits + c.overhead_us * misses + queue + cin + cinf + cout
    return _Derived(
        success=success,
        failures=tuple(f * success for f in c.fail),
        inferences=prims[_C],
        executions=prims[_X],
        durations=(request, queue, cin, cinf, cout),
        hits=hits,
        misses=misses,
    )


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    fmt: Callable[[float], str] = format_value
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


def _render(families: Sequence[_Family]) -> str:
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        lines.extend(f"{name}{_format_labels(labels)} {fam.fmt(value)}"
                     for name, labels, value in fam.samples)
    return "\n".join(lines) + "\n"


@dataclass
class _ServerHistory:
    """Loaded pairs per epoch and the primitives' values at each epoch start (flat arrays)."""

    slots: list[tuple[int, ...]] = field(default_factory=list)
    loaded: list[tuple[Pair, ...]] = field(default_factory=list)
    offset: array[int] = field(default_factory=lambda: array("q"))
    base: array[float] = field(default_factory=lambda: array("d"))
    activity: array[float] = field(default_factory=lambda: array("d"))

    def truncate(self, n: int) -> None:
        """Forget epochs >= n (their state depends on an event that just arrived)."""
        if n >= len(self.loaded):
            return
        n = max(n, 0)
        if n < len(self.offset):
            del self.base[self.offset[n]:]
        del self.slots[n:]
        del self.loaded[n:]
        del self.offset[n:]
        del self.activity[n * _NACT:]


@dataclass(frozen=True)
class _Target:
    """One scrape target of the generated Prometheus config."""

    job: str
    kind: str  # "triton" or "dcgm"
    name: str  # pod or host
    replica: bool
    path: str
    labels: tuple[tuple[str, str], ...]  # target labels (job included) but __metrics_path__


# --- the fleet ---------------------------------------------------------------------------------


class Fleet:
    """The simulated fleet: expositions, history, truth, Prometheus config and backfill.

    Thread-safe: the HTTP server calls it from many threads. History (loaded sets and counter
    bases per epoch) is computed lazily from ``spec.start`` and cached, so a counter at any time
    costs O(1) once its epoch is known.
    """

    def __init__(self, spec: FleetSpec, faults: Faults | None = None) -> None:
        self.spec = spec
        self.faults = faults if faults is not None else Faults()
        self._lock = threading.RLock()
        seed = spec.seed
        self.models: list[str] = [
            NAMED_MODELS[i] if i < len(NAMED_MODELS) else f"model_{i:03d}"
            for i in range(spec.models)
        ]
        deployment = _k8s_name(f"{seed}|deployment", 9)
        self.pods: list[str] = []
        used: set[str] = set()
        for i in range(spec.servers):
            n = 0
            while True:
                suffix = _k8s_name(f"{seed}|pod|{i}|{n}", 5)
                if suffix not in used:
                    break
                n += 1
            used.add(suffix)
            self.pods.append(f"triton-{deployment}-{suffix}")
        self.hosts: list[str] = [f"gpu-node-{h + 1:02d}" for h in range(spec.hosts)]
        self.host_ips: list[str] = [f"10.0.{h // 250}.{h % 250 + 4}" for h in range(spec.hosts)]
        self.dcgm_pods: list[str] = [
            f"nvidia-dcgm-exporter-{_k8s_name(f'{seed}|dcgm|{h}', 5)}" for h in range(spec.hosts)
        ]
        self._pod_index = {pod: i for i, pod in enumerate(self.pods)}
        self._host_index = {host: h for h, host in enumerate(self.hosts)}
        self.slices: list[MigSlice] = self._place_slices()
        self.pod_slice: dict[str, MigSlice] = {
            sl.pod: sl for sl in self.slices if sl.triton and sl.pod is not None
        }
        self.pod_ips: list[str] = [f"10.42.{i // 250}.{i % 250 + 4}" for i in range(spec.servers)]
        # The `pod` the exporter publishes per server: the pod name under Kubernetes SD, else the
        # target's `instance` (the first of the exporter's server labels that is set).
        self.server_ids: list[str] = (
            list(self.pods) if spec.scrape_labels == "kubernetes"
            else [f"{ip}:8002" for ip in self.pod_ips]
        )
        on_physical: dict[int, list[int]] = {}
        for sl in self.slices:
            if sl.triton and sl.pod is not None:
                on_physical.setdefault(sl.physical, []).append(self._pod_index[sl.pod])
        # Per dcgm row: the Triton servers whose work the row's GPU instance does.
        self._slice_servers: list[tuple[int, ...]] = [
            tuple(on_physical.get(sl.physical, ())) if sl.triton else () for sl in self.slices
        ]
        # Per server: its share of its slice's time (time-slicing splits it evenly).
        self._share: list[float] = [1.0] * spec.servers
        for servers in on_physical.values():
            for s in servers:
                self._share[s] = 1.0 / len(servers)
        # Physical GPU instances per GPU (a shared slice once).
        self._gpu_slices: dict[int, list[MigSlice]] = {}
        seen: set[int] = set()
        for sl in self.slices:
            if sl.physical not in seen:
                seen.add(sl.physical)
                self._gpu_slices.setdefault(sl.gpu_index, []).append(sl)
        self.pairs: list[Pair] = [(m, v) for m in range(spec.models) for v in spec.versions(m)]
        # Most (model, version) pairs one server can hold: the bound of the concurrency ratio.
        versioned = sum(1 for m in set(spec.versioned_models) if 0 <= m < spec.models)
        self.max_pairs = spec.per_server + min(spec.per_server, versioned)
        self._const: dict[Pair, _PairConst] = {p: self._pair_const(p) for p in self.pairs}
        self._hist: list[_ServerHistory] = [_ServerHistory() for _ in range(spec.servers)]
        self._energy: list[array[float]] = [array("d") for _ in self._gpu_slices]
        self._rate_cache: dict[tuple[int, Pair, int], tuple[float, ...]] = {}
        self._restarts: list[list[float]] = [[] for _ in range(spec.servers)]
        self._boost_at: list[float] = []
        self._boost_value: list[float] = []
        self._events_seen = 0

    # -- construction ------------------------------------------------------------------------

    def _place_slices(self) -> list[MigSlice]:
        spec = self.spec
        bare: list[MigSlice] = []
        gpu_index = 0
        for h, host in enumerate(self.hosts):
            for g in range(spec.gpus_per_host):
                x = hashlib.blake2b(f"{spec.seed}|uuid|{h}|{g}".encode(),
                                    digest_size=16).hexdigest()
                variant = "89ab"[int(x[16], 16) % 4]
                uuid = f"GPU-{x[:8]}-{x[8:12]}-4{x[13:16]}-{variant}{x[17:20]}-{x[20:32]}"
                bus = _PCI_BUS_IDS[g] if g < len(_PCI_BUS_IDS) else f"{(0x10 + 7 * g) % 256:02X}"
                for profile, gi in spec.gpu_layout(gpu_index):
                    if spec.profile_drift:
                        profile = _DRIFTED_PROFILES.get(profile, profile)
                    bare.append(MigSlice(
                        index=len(bare), physical=len(bare), host=host, host_index=h, gpu=g,
                        gpu_index=gpu_index, uuid=uuid, pci_bus_id=f"00000000:{bus}:00.0",
                        profile=profile, gi_id=gi, instance=f"{self.host_ips[h]}:9400",
                        host_label=spec.host_label,
                    ))
                gpu_index += 1
        order = sorted(range(len(bare)),
                       key=lambda i: _uniforms(f"{spec.seed}|place|{i}", 1)[0])
        # The first shared_slices slices each take two pods, then one pod per slice.
        owners: dict[int, list[tuple[str, str, str]]] = {}
        shared = spec.shared_slices
        for i, pod in enumerate(self.pods):
            slot = i // 2 if i < 2 * shared else i - shared
            owners.setdefault(order[slot], []).append(("triton", "triton", pod))
        free = order[len(self.pods) - shared:]
        if free:
            big = [i for i in free if bare[i].size >= 3]
            owners[(big or free)[0]] = [("notebook", "ml-train", "jupyter-alice-0")]
        out: list[MigSlice] = []
        for sl in bare:
            if sl.index not in owners:
                out.append(dataclasses.replace(sl, index=len(out)))
            # dcgm-exporter prints a device mapped to several pods once per pod.
            for container, namespace, pod in owners.get(sl.index, []):
                out.append(dataclasses.replace(sl, index=len(out), container=container,
                                               namespace=namespace, pod=pod))
        return out

    def _pair_const(self, p: Pair) -> _PairConst:
        model, version = p
        u = _uniforms(f"{self.spec.seed}|model|{model}", 8)
        w = _uniforms(f"{self.spec.seed}|pair|{model}|{version}", 8)
        canary = version != "1"
        ipr_choices = (32.0, 16.0, 8.0) if model < len(NAMED_MODELS) else (1.0, 2.0, 4.0, 8.0, 16.0)
        ipr = ipr_choices[model] if model < len(NAMED_MODELS) else ipr_choices[int(u[0] * 5)]
        fail = tuple(
            (1e-5 + 2e-3 * w[1 + i] ** 2) if w[5 + i % 3] < 0.3 else 0.0
            for i in range(len(REASONS))
        )
        f100 = 0.99 + 0.009 * w[0]
        f500 = f100 + (1.0 - f100) * 0.9
        f2000 = f500 + (1.0 - f500) * 0.9
        f5000 = f2000 + (1.0 - f2000) * 0.9
        cache = model in self.spec.cache_models
        return _PairConst(
            model=self.models[model],
            version=version,
            cache=cache,
            ipr=ipr,
            rpb_max=1.0 + 3.0 * u[1],
            infer_us=800.0 + 5200.0 * u[2],
            in_us=50.0 + 350.0 * u[3],
            out_us=30.0 + 170.0 * u[4],
            q_us=200.0 + 1800.0 * u[5],
            overhead_us=20.0 + 80.0 * u[6],
            hit_us=20.0 + 60.0 * u[7],
            miss_us=10.0 + 30.0 * w[4],
            fail=fail,
            buckets=(f100, f500, f2000, f5000),
            load_secs=round(2.0 + 28.0 * w[2], 3),
            mem_mib=int(500 + 5000 * w[3]),
            tensor_frac=0.35 + 0.4 * u[0],
            dram_frac=0.25 + 0.35 * u[4],
            idle_p=0.35 if canary else 0.2,
            g_max=(0.45 if canary else 0.9) / self.max_pairs,
            bytes_in=2048.0 + 8192.0 * u[5],
            bytes_out=256.0 + 2048.0 * u[6],
        )

    # -- time ----------------------------------------------------------------------------------

    def epoch_of(self, t: float) -> int:
        """The epoch index k with start + k*E <= t < start + (k+1)*E."""
        spec = self.spec
        k = math.floor((t - spec.start) / spec.epoch_seconds)
        if spec.start + (k + 1) * spec.epoch_seconds <= t:
            k += 1
        elif spec.start + k * spec.epoch_seconds > t:
            k -= 1
        return k

    def epoch_start(self, k: int) -> float:
        return self.spec.start + k * self.spec.epoch_seconds

    def epoch_bounds(self, t: float) -> tuple[float, float]:
        """[start, end) of the epoch holding ``t``; windows inside it have a closed-form truth."""
        k = self.epoch_of(t)
        return self.epoch_start(k), self.epoch_start(k + 1)

    def _checked_epoch(self, t: float) -> int:
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, got {t}")
        k = self.epoch_of(t)
        if k < 0:
            raise ValueError(f"t={t} is before the fleet starts (spec.start={self.spec.start})")
        if k >= MAX_EPOCHS:
            raise ValueError(
                f"t={t} is {k} epochs after spec.start={self.spec.start}; the simulator keeps at "
                f"most {MAX_EPOCHS} epochs of history: set FleetSpec.start nearer"
            )
        return k

    # -- faults -> model ---------------------------------------------------------------------

    def _sync(self) -> None:
        """Fold new fault events into the model and forget history they invalidate."""
        events = self.faults.events(self._events_seen)
        if not events:
            return
        self._events_seen += len(events)
        for kind, pod, at, value in events:
            if kind == "restart":
                s = self._pod_index.get(pod)
                if s is None:
                    continue
                bisect.insort(self._restarts[s], at)
                if at >= self.spec.start:
                    # Bases of the epochs after the restart's epoch change.
                    self._hist[s].truncate(self.epoch_of(at) + 1)
            elif kind == "churn_boost":
                i = bisect.bisect_right(self._boost_at, at)
                self._boost_at.insert(i, at)
                self._boost_value.insert(i, value)
                first = max(math.ceil((at - self.spec.start) / self.spec.epoch_seconds), 1)
                for hist in self._hist:
                    hist.truncate(first)
                for energy in self._energy:
                    del energy[first:]

    def _churn_at(self, k: int) -> float:
        i = bisect.bisect_right(self._boost_at, self.epoch_start(k))
        boost = self._boost_value[i - 1] if i else 1.0
        return min(1.0, self.spec.churn * boost)

    def _last_restart(self, s: int, lo: float, hi: float, *, include_hi: bool) -> float | None:
        times = self._restarts[s]
        i = bisect.bisect_right(times, hi) if include_hi else bisect.bisect_left(times, hi)
        if i and times[i - 1] >= lo:
            return times[i - 1]
        return None

    # -- rates -------------------------------------------------------------------------------

    def _server_idle(self, s: int, k: int) -> bool:
        return _uniforms(f"{self.spec.seed}|idle|{s}|{k}", 1)[0] < 0.12

    def _rates(self, s: int, p: Pair, k: int) -> tuple[float, ...]:
        """Per-second rates of the primitives (and the GR share g last) of pair p on s in k."""
        key = (s, p, k)
        cached = self._rate_cache.get(key)
        if cached is not None:
            return cached
        c = self._const[p]
        u = _uniforms(f"{self.spec.seed}|rate|{s}|{p[0]}|{p[1]}|{k}", 8)
        if self._server_idle(s, k) or u[0] < c.idle_p:
            rates = _ZERO_RATES
        else:
            share = self._share[s]
            g = c.g_max * share * (0.05 + 0.95 * u[1] ** 2)
            infer = c.infer_us * (0.9 + 0.2 * u[2])
            rpb = 1.0 + (c.rpb_max - 1.0) * u[3]
            hit = (0.15 + 0.5 * u[4]) if c.cache else 0.0
            execs = g * 1e6 / infer
            misses = execs * rpb
            hits = misses * hit / (1.0 - hit)
            queue = c.q_us * (0.5 + 4.0 * g / (c.g_max * share)) * (0.9 + 0.2 * u[5])
            cin = c.in_us * (0.9 + 0.2 * u[6])
            cout = c.out_us * (0.9 + 0.2 * u[7])
            rates = (hits, misses, misses * c.ipr, execs, misses * queue, misses * cin,
                     misses * infer, misses * cout, g)
        if len(self._rate_cache) > 50_000:
            self._rate_cache.clear()
        self._rate_cache[key] = rates
        return rates

    def _unlabeled_rates(self, s: int) -> tuple[float, float]:
        """(success/s, inferences/s) of the model-less series the unlabeled_series fault adds.

        Constant per server and sized at 10-25% of a typical server's inference rate, like an
        ensemble scheduler's own count, so the drift it causes is plainly visible.
        """
        typical = sum(
            0.35 * c.g_max * 1e6 / c.infer_us * (1.0 + c.rpb_max) / 2.0 * c.ipr
            for c in self._const.values()
        ) / len(self._const) * self.spec.per_server
        u = _uniforms(f"{self.spec.seed}|unlabeled|{s}", 2)
        count = typical * (0.1 + 0.15 * u[0])
        return count / (2.0 + 6.0 * u[1]), count

    # -- history -----------------------------------------------------------------------------

    def _initial_slots(self, s: int) -> tuple[int, ...]:
        order = sorted(range(self.spec.models),
                       key=lambda m: _uniforms(f"{self.spec.seed}|init|{s}|{m}", 1)[0])
        return tuple(order[: self.spec.per_server])

    def _next_slots(self, s: int, k: int, prev: tuple[int, ...]) -> tuple[int, ...]:
        """Re-draw each slot with probability churn: a quarter of re-draws unload the slot's
        model (never the server's last one), the rest pick any model the other slots do not
        hold (possibly the same one). Slots hold a model index or -1 (empty)."""
        churn = self._churn_at(k)
        slots = list(prev)
        for i in range(len(slots)):
            u = _uniforms(f"{self.spec.seed}|churn|{s}|{k}|{i}", 2)
            if u[0] >= churn:
                continue
            others = [m for j, m in enumerate(slots) if j != i and m >= 0]
            if u[1] < 0.25 and others:
                slots[i] = -1
                continue
            choices = [m for m in range(self.spec.models) if m not in others]
            slots[i] = choices[min(int((u[1] - 0.25) / 0.75 * len(choices)), len(choices) - 1)]
        return tuple(slots)

    def _extend(self, k: int) -> None:
        """Make epochs 0..k of every server's history available."""
        for s in range(self.spec.servers):
            self._extend_server(s, k)

    def _extend_server(self, s: int, k: int) -> None:
        hist = self._hist[s]
        while len(hist.loaded) <= k:
            j = len(hist.loaded)
            if j == 0:
                slots = self._initial_slots(s)
                prev_loaded: tuple[Pair, ...] = ()
            else:
                slots = self._next_slots(s, j, hist.slots[j - 1])
                prev_loaded = hist.loaded[j - 1]
            loaded = tuple(sorted(
                ((m, v) for m in set(slots) if m >= 0 for v in self.spec.versions(m)),
                key=lambda p: (self.models[p[0]], p[1]),
            ))
            if loaded == prev_loaded:
                loaded = prev_loaded
            if j > 0 and slots == hist.slots[j - 1]:
                slots = hist.slots[j - 1]
            start_j = self.epoch_start(j)
            restart = (self._last_restart(s, self.epoch_start(j - 1), start_j, include_hi=False)
                       if j > 0 else None)
            hist.offset.append(len(hist.base))
            for p in loaded:
                if p in prev_loaded:
                    rates = self._rates(s, p, j - 1)
                    if restart is not None:
                        hist.base.extend(r * (start_j - restart) for r in rates[:_NPRIM])
                    else:
                        at = hist.offset[j - 1] + prev_loaded.index(p) * _NPRIM
                        prev_start = self.epoch_start(j - 1)
                        hist.base.extend(
                            hist.base[at + i] + rates[i] * (start_j - prev_start)
                            for i in range(_NPRIM)
                        )
                else:
                    hist.base.extend([0.0] * _NPRIM)
            hist.activity.extend(self._activity(j, ((s, loaded),)))
            hist.slots.append(slots)
            hist.loaded.append(loaded)

    def _activity(self, k: int,
                  servers: Sequence[tuple[int, tuple[Pair, ...]]]) -> tuple[float, ...]:
        """DCGM PROF values in epoch k of a slice running these (server, loaded pairs), 6
        decimals as dcgm-exporter prints them; the first server's draw sets the idle floor."""
        g_sum = tensor = dram = 0.0
        tx = rx = 0.0
        for s, loaded in servers:
            for p in loaded:
                rates = self._rates(s, p, k)
                c = self._const[p]
                g = rates[_NPRIM]
                g_sum += g
                tensor += g * c.tensor_frac
                dram += g * c.dram_frac
                rx += rates[_C] * c.bytes_in
                tx += rates[_C] * c.bytes_out
        u = _uniforms(f"{self.spec.seed}|act|{servers[0][0]}|{k}", 2)
        floor = 0.0005 + 0.004 * u[0]
        gr = round(min(0.99, g_sum + floor), 6)
        sm = round(min(1.0, 0.85 * g_sum + floor), 6)
        return (
            gr,
            round(min(0.99, tensor + 0.5 * floor), 6),
            round(min(0.99, dram + 0.8 * floor), 6),
            sm,
            round(sm * (0.3 + 0.2 * u[1]), 6),
            float(int(tx + 65536 * floor * 200)),
            float(int(rx + 65536 * floor * 400)),
        )

    def _pending(self, s: int, p: Pair, k: int) -> float:
        """The pending-request gauge of pair p on server s in epoch k: requests/s times the mean
        queue time (Little's law), in whole requests; constant within the epoch."""
        dr = _derive(self._const[p], self._rates(s, p, k)[:_NPRIM])
        queue_mean = dr.durations[1] / dr.misses if dr.misses > 0 else 0.0
        return float(round(dr.success * queue_mean / 1e6))

    def _loaded(self, s: int, k: int) -> tuple[Pair, ...]:
        self._extend_server(s, k)
        return self._hist[s].loaded[k]

    def _prims_at(self, s: int, p: Pair, k: int, t: float) -> tuple[float, ...] | None:
        """The integrated primitives of pair p on server s at time t (epoch k), None if unloaded."""
        hist = self._hist[s]
        loaded = hist.loaded[k]
        if p not in loaded:
            return None
        rates = self._rates(s, p, k)
        start_k = self.epoch_start(k)
        restart = self._last_restart(s, start_k, t, include_hi=True)
        if restart is not None:
            return tuple(r * (t - restart) for r in rates[:_NPRIM])
        at = hist.offset[k] + loaded.index(p) * _NPRIM
        return tuple(hist.base[at + i] + rates[i] * (t - start_k) for i in range(_NPRIM))

    def _slice_values(self, sl: MigSlice, k: int) -> tuple[float, ...]:
        servers = self._slice_servers[sl.index]
        if len(servers) == 1:
            s = servers[0]
            self._extend_server(s, k)
            return tuple(self._hist[s].activity[k * _NACT:(k + 1) * _NACT])
        if servers:
            return self._activity(k, [(s, self._loaded(s, k)) for s in servers])
        if sl.pod is not None:  # the other team's notebook: busy, not Triton
            u = _uniforms(f"{self.spec.seed}|notebook|{k}", 4)
            gr = 0.55 + 0.4 * u[0]
            sm = 0.9 * gr
            tx = 6291456.0 * (1.0 + u[3])
            return (round(gr, 6), round(gr * (0.5 + 0.3 * u[1]), 6),
                    round(gr * (0.3 + 0.3 * u[2]), 6), round(sm, 6), round(sm * 0.6, 6),
                    float(int(tx)), float(int(2 * tx)))
        return (0.0,) * _NACT

    def _gpu_power(self, gpu_index: int, k: int) -> tuple[float, float]:
        """(utilisation in whole-GPU units, power in W) of a GPU in epoch k."""
        util = sum(self._slice_values(sl, k)[_GR] * sl.size / 7.0
                   for sl in self._gpu_slices[gpu_index])
        u = _uniforms(f"{self.spec.seed}|power|{gpu_index}|{k}", 1)[0]
        return util, round(72.0 + 560.0 * util + 6.0 * u, 3)

    def _energy_at(self, gpu_index: int, k: int, t: float) -> float:
        """Whole-GPU energy since boot in mJ (an integer counter)."""
        prefix = self._energy[gpu_index]
        if not prefix:
            u = _uniforms(f"{self.spec.seed}|energy|{gpu_index}", 1)[0]
            prefix.append(float(int(1e10 * (1.0 + 4.0 * u))))
        while len(prefix) <= k:
            j = len(prefix) - 1
            prefix.append(prefix[j] + self._gpu_power(gpu_index, j)[1] * 1000.0
                          * self.spec.epoch_seconds)
        power = self._gpu_power(gpu_index, k)[1]
        return float(int(prefix[k] + power * 1000.0 * (t - self.epoch_start(k))))

    # -- public queries ----------------------------------------------------------------------

    def loaded_models(self, pod: str, t: float) -> list[tuple[str, str]]:
        """(model, version) pairs loaded on ``pod`` at ``t``."""
        s = self._server(pod)
        with self._lock:
            self._sync()
            k = self._checked_epoch(t)
            return [(self.models[m], v) for m, v in self._loaded(s, k)]

    def counter(self, pod: str, family: str, model: str, version: str, t: float,
                reason: str | None = None) -> float | None:
        """One Triton counter's value at t as exposed (None when the series does not exist)."""
        for name, labels, value in self._triton_samples(pod, t, family):
            d = dict(labels)
            if (name == family and d.get("model") == model and d.get("version") == version
                    and d.get("reason") == reason):
                return value
        return None

    def _triton_samples(self, pod: str, t: float, family: str) -> list[tuple[str, Labels, float]]:
        unlabeled = self.faults.switch_at("unlabeled_series", t)
        for fam in self._triton_families(self._server(pod), t, unlabeled):
            if fam.name == family:
                return fam.samples
        raise KeyError(family)

    def _server(self, pod: str) -> int:
        try:
            return self._pod_index[pod]
        except KeyError:
            raise KeyError(f"unknown pod {pod!r}") from None

    def triton_exposition(self, pod: str, t: float) -> str:
        """What Triton's ``/metrics`` on ``pod`` answers at ``t`` (text format 0.0.4)."""
        unlabeled = self.faults.switch_at("unlabeled_series", t)
        return _render(self._triton_families(self._server(pod), t, unlabeled))

    def dcgm_exposition(self, host: str, t: float) -> str:
        """What dcgm-exporter on ``host`` answers at ``t`` (text format 0.0.4, MIG slices)."""
        try:
            h = self._host_index[host]
        except KeyError:
            raise KeyError(f"unknown host {host!r}") from None
        return _render(self._dcgm_families(h, t))

    def _triton_families(self, s: int, t: float, unlabeled: bool) -> list[_Family]:
        with self._lock:
            self._sync()
            k = self._checked_epoch(t)
            self._extend_server(s, k)
            return self._build_triton(s, k, t, unlabeled)

    def _build_triton(self, s: int, k: int, t: float, unlabeled: bool) -> list[_Family]:
        fams = {name: _Family(name, kind, text) for name, kind, text in TRITON_FAMILIES}

        def add(family: str, labels: Labels, value: float, sample: str | None = None) -> None:
            fams[family].samples.append((sample or family, labels, value))

        loaded = self._hist[s].loaded[k]
        host = self.pod_slice[self.pods[s]].host_index
        for p in loaded:
            c = self._const[p]
            prims = self._prims_at(s, p, k, t)
            assert prims is not None
            rates = self._rates(s, p, k)
            d = _derive(c, prims)
            dr = _derive(c, rates[:_NPRIM])
            mv: Labels = (("model", c.model), ("version", c.version))
            add("nv_inference_request_success", mv, d.success)
            for reason, value in zip(REASONS, d.failures, strict=True):
                add("nv_inference_request_failure",
                    (("model", c.model), ("reason", reason), ("version", c.version)), value)
            add("nv_inference_count", mv, d.inferences)
            add("nv_inference_exec_count", mv, d.executions)
            for phase, value in zip(PHASES, d.durations, strict=True):
                add(f"nv_inference_{phase}_duration_us", mv, value)
            if c.cache:
                add("nv_cache_num_hits_per_model", mv, d.hits)
                add("nv_cache_hit_duration_per_model", mv, c.hit_us * d.hits)
                add("nv_cache_num_misses_per_model", mv, d.misses)
                add("nv_cache_miss_duration_per_model", mv, c.miss_us * d.misses)
            add("nv_inference_pending_request_count", mv, self._pending(s, p, k))
            add("nv_model_load_duration_secs", mv, c.load_secs)
            # Histogram and summary counts are whole numbers (OpenMetrics requires it);
            # flooring keeps them monotone and the buckets ordered by le.
            hist = "nv_inference_first_response_histogram_ms"
            add(hist, mv, float(math.floor(d.success)), f"{hist}_count")
            add(hist, mv, d.durations[0] / 1000.0, f"{hist}_sum")
            for le, frac in zip(_BUCKETS, c.buckets, strict=True):
                add(hist, (*mv, ("le", le)), float(math.floor(frac * d.success)),
                    f"{hist}_bucket")
            add(hist, (*mv, ("le", "+Inf")), float(math.floor(d.success)), f"{hist}_bucket")
            summaries: list[tuple[str, float, float, float, float]] = [
                ("nv_inference_request_summary_us", d.success, d.durations[0],
                 dr.success, dr.durations[0]),
                ("nv_inference_queue_summary_us", d.success, d.durations[1],
                 dr.success, dr.durations[1]),
                ("nv_inference_compute_input_summary_us", d.misses, d.durations[2],
                 dr.misses, dr.durations[2]),
                ("nv_inference_compute_infer_summary_us", d.misses, d.durations[3],
                 dr.misses, dr.durations[3]),
                ("nv_inference_compute_output_summary_us", d.misses, d.durations[4],
                 dr.misses, dr.durations[4]),
            ]
            if c.cache:
                summaries += [
                    ("nv_cache_hit_summary_per_model", d.hits, c.hit_us * d.hits,
                     dr.hits, c.hit_us * dr.hits),
                    ("nv_cache_miss_summary_per_model", d.misses, c.miss_us * d.misses,
                     dr.misses, c.miss_us * dr.misses),
                ]
            for name, count, total, rate_count, rate_total in summaries:
                add(name, mv, float(math.floor(count)), f"{name}_count")
                add(name, mv, total, f"{name}_sum")
                mean = rate_total / rate_count if rate_count > 0 else math.nan
                for q, factor in _QUANTILES:
                    add(name, (*mv, ("quantile", q)),
                        math.nan if math.isnan(mean) else float(round(mean * factor)))
        if unlabeled:
            success_rate, count_rate = self._unlabeled_rates(s)
            origin = self._last_restart(s, self.spec.start, t, include_hi=True)
            elapsed = t - (self.spec.start if origin is None else origin)
            add("nv_inference_request_success", (), success_rate * elapsed)
            add("nv_inference_count", (), count_rate * elapsed)
        u = _uniforms(f"{self.spec.seed}|cpu|{host}|{k}", 2)
        add("nv_pinned_memory_pool_total_bytes", (), 268435456.0)
        add("nv_pinned_memory_pool_used_bytes", (), 1048576.0 * (1 + len(loaded)))
        add("nv_cpu_utilization", (), round(0.05 + 0.3 * u[0], 4))
        add("nv_cpu_memory_total_bytes", (), 540917260288.0)
        add("nv_cpu_memory_used_bytes", (), float(int(540917260288 * (0.25 + 0.2 * u[1]))))
        return list(fams.values())

    def _dcgm_families(self, h: int, t: float) -> list[_Family]:
        with self._lock:
            self._sync()
            k = self._checked_epoch(t)
            fams = [_Family(name, kind, text, _format_double if double else _format_int)
                    for name, kind, text, double in DCGM_FAMILIES]
            for sl in self.slices:
                if sl.host_index != h:
                    continue
                values = self._dcgm_values(sl, k, t)
                labels = sl.labels()
                for fam in fams:
                    fam.samples.append((fam.name, labels, values[fam.name]))
            return fams

    def _dcgm_values(self, sl: MigSlice, k: int, t: float) -> dict[str, float]:
        act = self._slice_values(sl, k)
        util, power = self._gpu_power(sl.gpu_index, k)
        u = _uniforms(f"{self.spec.seed}|gpu|{sl.gpu_index}", 1)[0]
        total = _FB_TOTAL_MIB.get(sl.profile, 9728 * sl.size)
        servers = self._slice_servers[sl.index]
        if servers:
            used = min(total - 256, sum(512 + sum(self._const[p].mem_mib
                                                  for p in self._loaded(s, k))
                                        for s in servers))
        elif sl.pod is not None:
            used = int(total * 0.8)
        else:
            used = 0
        return {
            "DCGM_FI_DEV_SM_CLOCK": 1755.0 if util > 0.35 else 1980.0,
            "DCGM_FI_DEV_MEM_CLOCK": 2619.0,
            "DCGM_FI_DEV_MEMORY_TEMP": float(int(36 + 30 * util)),
            "DCGM_FI_DEV_GPU_TEMP": float(int(31 + 40 * util)),
            "DCGM_FI_DEV_POWER_USAGE": power,
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": self._energy_at(sl.gpu_index, k, t),
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 2.0 if u < 0.3 else 0.0,
            "DCGM_FI_DEV_XID_ERRORS": 0.0,
            "DCGM_FI_DEV_FB_FREE": float(total - used),
            "DCGM_FI_DEV_FB_USED": float(used),
            "DCGM_FI_DEV_FB_RESERVED": 0.0,
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 0.0,
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": 0.0,
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0.0,
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE": act[_GR],
            "DCGM_FI_PROF_SM_ACTIVE": act[_SM],
            "DCGM_FI_PROF_SM_OCCUPANCY": act[_OCC],
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": act[_TENSOR],
            "DCGM_FI_PROF_DRAM_ACTIVE": act[_DRAM],
            "DCGM_FI_PROF_PCIE_TX_BYTES": act[_TX],
            "DCGM_FI_PROF_PCIE_RX_BYTES": act[_RX],
        }

    # -- truth -------------------------------------------------------------------------------

    def truth(self, t: float, window: float, *, strict: bool = True) -> Truth:
        """The exact value of every contract series (README.md, "The contract") for the window
        (t - window, t].

        Defined for windows inside one epoch (``epoch_bounds``), where loaded sets, rates and
        gauges are constant: rates are then exactly (C(t) - C(t - window)) / window for counters
        that did not reset, and post-reset plus pre-reset gain for those that did. With
        ``strict=False`` a window spanning epochs is integrated epoch by epoch (a pair counts if
        it had a series at any time in the window; DCGM and pending-count averages are
        time-weighted over the time the series existed), which is what Prometheus approaches
        only with dense scrapes. The timed fault switches count with their state at t (flip
        them outside the window); restarts as they happened; ``failing`` and ``slow_seconds``
        do not change it. Triton figures name a server by ``server_ids`` (its instance in the
        plain scrape mode); a MIG slice shared by pods has a row per pod and counts once in
        the fleet sums.
        """
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a positive number of seconds, got {window}")
        lo = t - window
        with self._lock:
            self._sync()
            k1 = self._checked_epoch(t)
            if lo < self.spec.start:
                raise ValueError(f"window starts at {lo}, before spec.start={self.spec.start}")
            k0 = self.epoch_of(lo)
            if strict and k0 != k1:
                bounds = self.epoch_bounds(t)
                raise ValueError(
                    f"window ({lo}, {t}] spans epochs {k0}..{k1}; truth is exact for windows "
                    f"inside one epoch ({bounds[0]}..{bounds[1]}): pass strict=False to "
                    "integrate anyway"
                )
            self._extend(k1)
            spans = [
                (k, max(lo, self.epoch_start(k)), min(t, self.epoch_start(k + 1)))
                for k in range(k0, k1 + 1)
            ]
            increases: dict[tuple[int, Pair], list[float]] = {}
            # Pending-request gauge per pair: [value x seconds, seconds, last value].
            gauges: dict[tuple[int, Pair], list[float]] = {}
            for s in range(self.spec.servers):
                for k, a, b in spans:
                    for p in self._hist[s].loaded[k]:
                        acc = increases.setdefault((s, p), [0.0] * _NPRIM)
                        rates = self._rates(s, p, k)
                        for i in range(_NPRIM):
                            acc[i] += rates[i] * (b - a)
                        value = self._pending(s, p, k)
                        gauge = gauges.setdefault((s, p), [0.0, 0.0, 0.0])
                        gauge[0] += value * (b - a)
                        gauge[1] += b - a
                        gauge[2] = value
            pending = {key: (g[0] / g[1] if g[1] > 0 else g[2]) for key, g in gauges.items()}
            slice_values = {
                sl.index: [(self._slice_values(sl, k), b - a) for k, a, b in spans]
                for sl in self.slices if sl.triton
            }
        return self._assemble_truth(t, window, increases, pending, slice_values)

    def _assemble_truth(
        self,
        t: float,
        window: float,
        increases: Mapping[tuple[int, Pair], Sequence[float]],
        pending: Mapping[tuple[int, Pair], float],
        slice_values: Mapping[int, Sequence[tuple[tuple[float, ...], float]]],
    ) -> Truth:
        out: Truth = {}

        def put(name: str, key: Labels, value: float) -> None:
            out.setdefault(name, {})[key] = value

        def bump(acc: dict[Labels, list[float]], key: Labels, values: Sequence[float]) -> None:
            row = acc.setdefault(key, [0.0] * len(values))
            for i, v in enumerate(values):
                row[i] += v

        families = ("nv_inference_count", "nv_inference_request_success",
                    "nv_inference_request_failure")
        # per level: [count, success, failure, exec, hits, *durations, *failures by reason]
        by_mv: dict[Labels, list[float]] = {}
        by_pod: dict[Labels, list[float]] = {}
        fleet: list[float] = [0.0] * (5 + len(PHASES) + len(REASONS))
        servers_active: dict[Labels, int] = {}
        models_active: dict[Labels, int] = {}
        cached: set[Labels] = set()
        queue = "nv_inference_pending_request_count"
        queued_mv: dict[Labels, float] = {}
        queued_pod: dict[Labels, float] = {}
        for (s, p), inc in sorted(increases.items()):
            c = self._const[p]
            d = _derive(c, inc)
            pod = self.server_ids[s]
            row = [d.inferences, d.success, sum(d.failures), d.executions, d.hits, *d.durations,
                   *d.failures]
            mv = _key(model=c.model, version=c.version)
            pk = _key(pod=pod)
            mvp = _key(model=c.model, version=c.version, pod=pod)
            for fam, value in zip(families, row[:3], strict=True):
                put(f"model_version_pod:{fam}:rate", mvp, value / window)
            put(f"model_version_pod:{queue}:avg", mvp, pending[(s, p)])
            queued_mv[mv] = queued_mv.get(mv, 0.0) + pending[(s, p)]
            queued_pod[pk] = queued_pod.get(pk, 0.0) + pending[(s, p)]
            bump(by_mv, mv, row)
            bump(by_pod, pk, row)
            for i, v in enumerate(row):
                fleet[i] += v
            active = d.success > 0
            servers_active[mv] = servers_active.get(mv, 0) + int(active)
            models_active[pk] = models_active.get(pk, 0) + int(active)
            if c.cache:
                cached.add(mv)
        for level, table in (("model_version", by_mv), ("pod", by_pod)):
            for key, row in table.items():
                for fam, value in zip(families, row[:3], strict=True):
                    put(f"{level}:{fam}:rate", key, value / window)
        for fam, value in zip(families, fleet[:3], strict=True):
            put(f":{fam}:rate", (), value / window)

        def per_request(prefix: str, key: Labels, row: Sequence[float]) -> None:
            """Executed rate, phase means and failures by reason of one row."""
            success, hits = row[1], row[4]
            executed = success - hits  # cache hits skip the compute phases
            put(f"{prefix}:triton_requests_executed:rate", key, executed / window)
            durations = row[5:5 + len(PHASES)]
            for phase, total in zip(PHASES, durations, strict=True):
                per = success if phase in ("request", "queue") else executed
                if per > 0:
                    put(f"{prefix}:nv_inference_{phase}_duration:mean_seconds", key,
                        total / per / 1e6)
            for reason, value in zip(REASONS, row[5 + len(PHASES):], strict=True):
                put(f"{prefix}_reason:nv_inference_request_failure:rate" if prefix
                    else "reason:nv_inference_request_failure:rate",
                    _key(**dict(key), reason=reason), value / window)

        for key, row in by_mv.items():
            count, success, _, execs, hits = row[:5]
            if execs > 0:
                put("model_version:nv_inference_batch_size:mean", key, count / execs)
            if key in cached and success > 0:
                put("model_version:nv_cache_hit:ratio", key, hits / success)
            per_request("model_version", key, row)
            put(f"model_version:{queue}:avg", key, queued_mv[key])
        for key, value in queued_pod.items():
            put(f"pod:{queue}:avg", key, value)
        if increases:
            per_request("", (), fleet)
            put(f":{queue}:avg", (), sum(queued_pod.values()))
        # What a naive sum(rate(nv_inference_count[W])) sees.
        raw = fleet[0] / window
        if self.faults.switch_at("unlabeled_series", t):
            raw += sum(self._unlabeled_rates(s)[1] for s in range(self.spec.servers))
        if self.faults.switch_at("duplicate_replica", t):
            raw *= 2
        put(":nv_inference_count:rate_raw", (), raw)
        if raw > 0:
            put(":triton_inference_rate_drift:ratio", (), (fleet[0] / window) / raw)
        for key, n in servers_active.items():
            put("model_version:triton_servers_active:count", key, float(n))
        for key, n in models_active.items():
            put("pod:triton_models_active:count", key, float(n))
        busy = sum(1 for n in models_active.values() if n > 0)
        summed = sum(servers_active.values())
        put(":triton_servers_active:count", (), float(busy))
        put(":triton_model_servers_active:sum", (), float(summed))
        if busy > 0:
            put(":triton_model_concurrency:ratio", (), summed / busy)
        # DCGM, slices allocated to Triton only (the exporter's default selector): a row per
        # (slice, pod); the fleet figures count a slice shared by pods once.
        sums = {"tensor": 0.0, "dram": 0.0, "equiv": 0.0}
        idle = 0
        counted: set[int] = set()
        for sl in self.slices:
            if sl.index not in slice_values:
                continue
            parts = slice_values[sl.index]
            avg = [sum(v[i] * w for v, w in parts) / window for i in (_TENSOR, _DRAM, _GR)]
            key = sl.identity()
            put("gpu_instance:dcgm_tensor_active:avg", key, avg[0])
            put("gpu_instance:dcgm_dram_active:avg", key, avg[1])
            put("gpu_instance:dcgm_gr_engine_active:avg", key, avg[2])
            if sl.physical in counted:
                continue
            counted.add(sl.physical)
            sums["tensor"] += avg[0]
            sums["dram"] += avg[1]
            sums["equiv"] += avg[0] * sl.size / 7.0
            if max(v[_TENSOR] for v, _ in parts) < IDLE_THRESHOLD:
                idle += 1
        if slice_values:
            put(":dcgm_tensor_active:sum", (), sums["tensor"])
            put(":dcgm_dram_active:sum", (), sums["dram"])
            put(":dcgm_tensor_active:gpu_equivalents", (), sums["equiv"])
            put(":dcgm_mig_slices_idle:count", (), float(idle))
        return out

    # -- Prometheus ------------------------------------------------------------------------------

    def _targets(self) -> list[_Target]:
        out: list[_Target] = []
        for replica, prom in ((False, "prometheus-k8s-0"), (True, "prometheus-k8s-1")):
            prefix = "/replica/1" if replica else ""
            for s, pod in enumerate(self.pods):
                kubernetes = [("pod", pod), ("namespace", "triton"), ("container", "triton")]
                labels = [("job", "triton"),
                          *(kubernetes if self.spec.scrape_labels == "kubernetes" else []),
                          ("instance", f"{self.pod_ips[s]}:8002"), ("prometheus_replica", prom)]
                out.append(_Target("triton-replica-1" if replica else "triton", "triton", pod,
                                   replica, f"{prefix}/triton/{pod}/metrics", tuple(labels)))
            for h, host in enumerate(self.hosts):
                labels = [("job", "dcgm"), ("pod", self.dcgm_pods[h]),
                          ("namespace", "gpu-operator"), ("container", "nvidia-dcgm-exporter"),
                          ("instance", f"{self.host_ips[h]}:9400"), ("prometheus_replica", prom)]
                out.append(_Target("dcgm-replica-1" if replica else "dcgm", "dcgm", host,
                                   replica, f"{prefix}/dcgm/{host}/metrics", tuple(labels)))
        return out

    def prometheus_config(self, target: str, scrape_interval: float) -> dict[str, Any]:
        """A Prometheus config (YAML-ready) scraping this simulator at ``target`` (host:port).

        Stores the notebook's label set: Triton series get pod/namespace/container/instance
        target labels (only instance with ``scrape_labels="plain"``, as a static_configs job
        without Kubernetes SD gives); dcgm-exporter's own container/namespace/pod become
        exported_* (honor_labels false). The replica jobs stand for a second HA Prometheus:
        they set ``job`` to the main job's name so the copies differ only in
        ``prometheus_replica``, and their targets answer an empty body unless
        ``duplicate_replica`` is on.
        """
        interval = _format_duration(scrape_interval)
        jobs: dict[str, dict[str, Any]] = {}
        for tgt in self._targets():
            job = jobs.setdefault(tgt.job, {
                "job_name": tgt.job,
                "honor_labels": False,
                "metrics_path": "/metrics",
                "static_configs": [],
            })
            # The main jobs get `job` from job_name; the replicas override it with a static label.
            labels = {"__metrics_path__": tgt.path,
                      **{k: v for k, v in tgt.labels if k != "job" or tgt.replica}}
            job["static_configs"].append({"targets": [target], "labels": labels})
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": list(jobs.values()),
        }

    def write_openmetrics(self, path: str | Path, start: float, end: float, step: float) -> int:
        """Write the scrapes the generated config would make from start to end (every step).

        For ``promtool tsdb create-blocks-from openmetrics``: each family once, each series in
        time order (all samples of one histogram/summary point together), target labels merged
        as Prometheus merges them with honor_labels false, Triton and DCGM counters declared
        ``unknown`` so their names are stored as written, ``up`` per target, a final ``# EOF``.
        Timed switches and restarts apply as of each scrape time; ``failing`` (read once)
        makes every Triton target down. Returns the number of samples written.
        """
        if not (step > 0 and math.isfinite(step)):
            raise ValueError(f"step must be a positive number of seconds, got {step}")
        if end < start:
            raise ValueError(f"end ({end}) is before start ({start})")
        failing = self.faults.failing
        targets = self._targets()
        # family -> (om type, formatter, group -> (times, {series prefix: values}))
        buffer: dict[str, tuple[str, Callable[[float], str],
                                dict[str, tuple[array[float], dict[str, array[float]]]]]] = {}
        prefixes: dict[tuple[int, str, Labels], tuple[str, str]] = {}

        def merged(ti: int, name: str, labels: Labels) -> tuple[str, str]:
            cache_key = (ti, name, labels)
            hit = prefixes.get(cache_key)
            if hit is not None:
                return hit
            own = dict(labels)
            for tname, tvalue in targets[ti].labels:
                if tname in own:
                    moved = f"exported_{tname}"
                    while moved in own:
                        moved = f"exported_{moved}"
                    own[moved] = own.pop(tname)
                own[tname] = tvalue
            items = sorted((k, v) for k, v in own.items() if v != "")
            group = _format_labels(tuple((k, v) for k, v in items if k not in ("le", "quantile")))
            result = (f"{name}{_format_labels(tuple(items))}", group)
            prefixes[cache_key] = result
            return result

        def record(fam: _Family, ti: int, t: float) -> None:
            om_type = {"counter": "unknown"}.get(fam.kind, fam.kind)
            entry = buffer.setdefault(fam.name, (om_type, fam.fmt, {}))
            groups = entry[2]
            touched: set[str] = set()
            for name, labels, value in fam.samples:
                prefix, group = merged(ti, name, labels)
                times, series = groups.setdefault(group, (array("d"), {}))
                if group not in touched:
                    touched.add(group)
                    times.append(t)
                series.setdefault(prefix, array("d")).append(value)

        up = _Family("up", "gauge", "")
        i = 0
        while True:
            t = start + i * step
            if t > end + 1e-9:
                break
            i += 1
            duplicate = self.faults.switch_at("duplicate_replica", t)
            unlabeled = self.faults.switch_at("unlabeled_series", t)
            triton: dict[int, list[_Family]] = {}
            dcgm: dict[int, list[_Family]] = {}
            for ti, tgt in enumerate(targets):
                fams: list[_Family] | None
                if tgt.replica and not duplicate:
                    fams = []
                elif tgt.kind == "triton":
                    s = self._pod_index[tgt.name]
                    if failing:
                        fams = None
                    else:
                        if s not in triton:
                            triton[s] = self._triton_families(s, t, unlabeled)
                        fams = triton[s]
                else:
                    h = self._host_index[tgt.name]
                    if h not in dcgm:
                        dcgm[h] = self._dcgm_families(h, t)
                    fams = dcgm[h]
                up.samples = [("up", (), 0.0 if fams is None else 1.0)]
                record(up, ti, t)
                for fam in fams or []:
                    if fam.samples:
                        record(fam, ti, t)
        written = 0
        with open(path, "w", encoding="utf-8") as out:
            for fam_name, (om_type, fmt, groups) in buffer.items():
                out.write(f"# TYPE {fam_name} {om_type}\n")
                for times, series in groups.values():
                    for prefix, values in series.items():
                        if len(values) != len(times):
                            raise RuntimeError(f"series {prefix} lost its group alignment")
                    stamps = [_format_timestamp(x) for x in times]
                    for j, stamp in enumerate(stamps):
                        for prefix, values in series.items():
                            out.write(f"{prefix} {fmt(values[j])} {stamp}\n")
                            written += 1
            out.write("# EOF\n")
        return written

    # -- faults over HTTP --------------------------------------------------------------------

    def apply_faults(self, changes: Mapping[str, Any], now: float | None = None) -> None:
        """Validate then apply a JSON fault request (all or nothing)."""
        when = time.time() if now is None else now
        known = {"duplicate_replica", "unlabeled_series", "failing", "slow_seconds",
                 "churn_boost", "restart"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault switch(es): {', '.join(unknown)}")
        for name in ("duplicate_replica", "unlabeled_series", "failing"):
            if name in changes and not isinstance(changes[name], bool):
                raise ValueError(f"{name} must be true or false")
        for name in ("slow_seconds", "churn_boost"):
            if name in changes:
                value = changes[name]
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{name} must be a number >= 0")
        restart = changes.get("restart")
        pods: list[str] = []
        if restart is not None:
            pods = [restart] if isinstance(restart, str) else restart
            if not isinstance(pods, list) or not all(isinstance(p, str) for p in pods):
                raise ValueError("restart must be a pod name or a list of pod names")
            missing = [p for p in pods if p not in self._pod_index]
            if missing:
                raise ValueError(f"unknown pod(s): {', '.join(missing)}")
        if "duplicate_replica" in changes:
            self.faults.duplicate_replica = changes["duplicate_replica"]
        if "unlabeled_series" in changes:
            self.faults.unlabeled_series = changes["unlabeled_series"]
        if "failing" in changes:
            self.faults.failing = changes["failing"]
        if "slow_seconds" in changes:
            self.faults.slow_seconds = float(changes["slow_seconds"])
        if "churn_boost" in changes:
            self.faults.set_churn_boost(float(changes["churn_boost"]), when)
        for pod in pods:
            self.faults.restart(pod, when)


# --- HTTP --------------------------------------------------------------------------------------


def truth_to_json(truth: Truth) -> dict[str, list[dict[str, Any]]]:
    """Truth with label tuples as objects: {series: [{"labels": {...}, "value": v}, ...]}."""
    return {
        name: [{"labels": dict(key), "value": value} for key, value in sorted(rows.items())]
        for name, rows in sorted(truth.items())
    }


def _make_handler(fleet: Fleet) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "triton-fleet-simulator/1"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: Prometheus scrapes every few seconds."""

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _text(self, status: int, text: str,
                  content_type: str = "text/plain; charset=utf-8") -> None:
            self._send(status, text.encode(), content_type)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload, sort_keys=True).encode() + b"\n",
                       "application/json")

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            parts = [p for p in url.path.split("/") if p]
            try:
                if len(parts) >= 3 and parts[-1] == "metrics":
                    self._metrics(parts)
                elif url.path == "/-/healthy":
                    self._text(200, "Simulator is Healthy.\n")
                elif url.path == "/-/faults":
                    self._json(200, fleet.faults.snapshot())
                elif url.path == "/-/truth":
                    self._truth(parse_qs(url.query))
                elif url.path == "/":
                    self._text(200, self._index())
                else:
                    self._text(404, "not found\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self) -> None:
            if urlsplit(self.path).path != "/-/faults":
                self._text(404, "not found\n")
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                changes = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                fleet.apply_faults(changes)
            except ValueError as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, fleet.faults.snapshot())

        def _metrics(self, parts: list[str]) -> None:
            replica = parts[:2] == ["replica", "1"]
            rest = parts[2:] if replica else parts
            if len(rest) != 3 or rest[0] not in ("triton", "dcgm"):
                self._text(404, "not found\n")
                return
            kind, name = rest[0], rest[1]
            if (kind == "triton" and name not in fleet.pods) or (
                    kind == "dcgm" and name not in fleet.hosts):
                self._text(404, f"unknown {kind} target {name}\n")
                return
            faults = fleet.faults
            if replica and not faults.duplicate_replica:
                self._text(200, "", "text/plain; version=0.0.4; charset=utf-8")
                return
            slow = faults.slow_seconds
            if slow > 0:
                time.sleep(slow)
            if kind == "triton" and faults.failing:
                self._text(500, "simulated failure\n")
                return
            now = time.time()
            try:
                body = (fleet.triton_exposition(name, now) if kind == "triton"
                        else fleet.dcgm_exposition(name, now))
            except ValueError as exc:
                self._text(503, f"{exc}\n")
                return
            self._text(200, body, "text/plain; version=0.0.4; charset=utf-8")

        def _truth(self, query: dict[str, list[str]]) -> None:
            try:
                if "t" not in query or "window" not in query:
                    raise ValueError("both t (unix seconds) and window (seconds) are required")
                t = float(query["t"][0])
                window = float(query["window"][0])
                strict = query.get("strict", ["1"])[0].lower() not in ("0", "false", "no")
                truth = fleet.truth(t, window, strict=strict)
            except ValueError as exc:
                self._json(400, {"error": str(exc)})
                return
            self._json(200, {"t": t, "window": window, "series": truth_to_json(truth)})

        def _index(self) -> str:
            lines = ["triton-mig-exporter fleet simulator", ""]
            lines += [f"/triton/{pod}/metrics" for pod in fleet.pods]
            lines += [f"/dcgm/{host}/metrics" for host in fleet.hosts]
            lines += ["/replica/1/... (same, when duplicate_replica is on)",
                      "/-/faults (GET, POST JSON)", "/-/truth?t=UNIX&window=SECONDS",
                      "/-/healthy"]
            return "\n".join(lines) + "\n"

    return Handler


def serve(fleet: Fleet, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Serve the fleet over HTTP from a daemon thread; call ``shutdown()`` then ``server_close()``.

    Expositions are computed at the wall-clock time of each request.
    """
    server = ThreadingHTTPServer((host, port), _make_handler(fleet))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fleet-simulator", daemon=True)
    thread.start()
    return server


# --- CLI ---------------------------------------------------------------------------------------


def run(
    spec: FleetSpec,
    faults: Faults | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    config_out: Path | None = None,
    scrape_interval: float = 5.0,
    *,
    stop: threading.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); print ``simulator: http://HOST:PORT/``."""
    fleet = Fleet(spec, faults)
    server = serve(fleet, host, port)
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    shown = "127.0.0.1" if bound_host in ("0.0.0.0", "", "::") else bound_host
    shown = f"[{shown}]" if ":" in shown else shown
    done = stop if stop is not None else threading.Event()
    previous: dict[signal.Signals, Any] = {}
    try:
        if config_out is not None:
            config = fleet.prometheus_config(f"{shown}:{bound_port}", scrape_interval)
            Path(config_out).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        if threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: FrameType | None) -> None:
                done.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        print(f"simulator: http://{shown}:{bound_port}/", flush=True)
        while not done.wait(0.2):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
        server.server_close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the ``simulate`` subcommand."""
    d = FleetSpec()
    parser.add_argument("--servers", type=int, default=d.servers, help="Triton pods")
    parser.add_argument("--models", type=int, default=d.models, help="distinct models")
    parser.add_argument("--models-per-server", type=int, default=None,
                        help="models loaded per server (default min(models, 3))")
    parser.add_argument("--hosts", type=int, default=d.hosts, help="GPU nodes")
    parser.add_argument("--gpus-per-host", type=int, default=d.gpus_per_host,
                        help="H100 GPUs per node")
    parser.add_argument("--layout", choices=[*LAYOUTS, "mixed"], default=d.layout,
                        help="MIG layout of every GPU")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--epoch", type=_parse_seconds, default=d.epoch_seconds,
                        help="seconds during which rates and gauges stay constant")
    parser.add_argument("--churn", type=float, default=d.churn,
                        help="fraction of model assignments re-drawn each epoch")
    parser.add_argument("--start", type=float, default=None,
                        help="unix seconds where all counters start (default: now, aligned to "
                             "the epoch)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    parser.add_argument("--prometheus-config", type=Path, default=None, metavar="PATH",
                        help="write a Prometheus config scraping the simulator here")
    parser.add_argument("--scrape-interval", type=_parse_seconds, default=5.0,
                        help="scrape interval of that config, in seconds")
    parser.add_argument("--fault", action="append", default=[],
                        choices=["duplicate-replica", "unlabeled-series", "failing"],
                        help="start with this fault on (repeatable)")
    parser.add_argument("--slow", type=_parse_seconds, default=0.0, metavar="SECONDS",
                        help="delay every /metrics answer")
    parser.add_argument("--scrape-labels", choices=SCRAPE_LABELS, default=d.scrape_labels,
                        help="Triton target labels: Kubernetes SD's (pod, ...) or a plain "
                             "static scrape's (instance only)")
    parser.add_argument("--shared-slices", type=int, default=d.shared_slices,
                        help="MIG slices that each run two Triton servers (time-sliced)")
    parser.add_argument("--host-label", choices=HOST_LABELS, default=d.host_label,
                        help="dcgm-exporter's node label (hostname in releases after 4.5.3-4.8.2)")
    parser.add_argument("--profile-drift", action="store_true",
                        help="report 7g.80gb MIG slices as 7g.79gb, as some drivers do")


def spec_from_args(args: argparse.Namespace, now: float | None = None) -> tuple[FleetSpec, Faults]:
    """The FleetSpec and Faults the parsed flags describe."""
    epoch = float(args.epoch)
    if args.start is None:
        wall = time.time() if now is None else now
        start = math.floor(wall / epoch) * epoch if epoch > 0 else wall
    else:
        start = float(args.start)
    spec = FleetSpec(
        servers=args.servers, models=args.models, hosts=args.hosts,
        gpus_per_host=args.gpus_per_host, seed=args.seed, epoch_seconds=epoch,
        models_per_server=args.models_per_server, churn=args.churn, start=start,
        layout=args.layout, scrape_labels=args.scrape_labels, shared_slices=args.shared_slices,
        host_label=args.host_label, profile_drift=args.profile_drift,
    )
    faults = Faults(
        duplicate_replica="duplicate-replica" in args.fault,
        unlabeled_series="unlabeled-series" in args.fault,
        failing="failing" in args.fault,
        slow_seconds=float(args.slow),
    )
    return spec, faults


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main_from_args(args: argparse.Namespace) -> int:
    """Run the simulator from parsed ``simulate`` flags; usage errors return 2."""
    try:
        spec, faults = spec_from_args(args)
        host, port = _parse_listen(args.listen)
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    return run(spec, faults, host, port, args.prometheus_config, args.scrape_interval)

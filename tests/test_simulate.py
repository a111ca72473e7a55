"""Tests for the fleet simulator: exposition shape, counters, truth, faults, HTTP and backfill.

The truth is checked against differences of parsed expositions (what Prometheus would compute),
not against the simulator's own internals, so a wrong model or a wrong truth both fail here.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.lab import simulate
from exporter.lab.simulate import Faults, Fleet, FleetSpec

START = 1_700_000_000.0
Key = tuple[str, tuple[tuple[str, str], ...]]

# Copied from the reference expositions (name, type), in print order.
TRITON_FAMILIES = [
    ("nv_inference_request_success", "counter"),
    ("nv_inference_request_failure", "counter"),
    ("nv_inference_count", "counter"),
    ("nv_inference_exec_count", "counter"),
    ("nv_inference_request_duration_us", "counter"),
    ("nv_inference_queue_duration_us", "counter"),
    ("nv_inference_compute_input_duration_us", "counter"),
    ("nv_inference_compute_infer_duration_us", "counter"),
    ("nv_inference_compute_output_duration_us", "counter"),
    ("nv_cache_num_hits_per_model", "counter"),
    ("nv_cache_hit_duration_per_model", "counter"),
    ("nv_cache_num_misses_per_model", "counter"),
    ("nv_cache_miss_duration_per_model", "counter"),
    ("nv_energy_consumption", "counter"),
    ("nv_inference_pending_request_count", "gauge"),
    ("nv_model_load_duration_secs", "gauge"),
    ("nv_pinned_memory_pool_total_bytes", "gauge"),
    ("nv_pinned_memory_pool_used_bytes", "gauge"),
    ("nv_gpu_utilization", "gauge"),
    ("nv_gpu_memory_total_bytes", "gauge"),
    ("nv_gpu_memory_used_bytes", "gauge"),
    ("nv_gpu_power_usage", "gauge"),
    ("nv_gpu_power_limit", "gauge"),
    ("nv_cpu_utilization", "gauge"),
    ("nv_cpu_memory_total_bytes", "gauge"),
    ("nv_cpu_memory_used_bytes", "gauge"),
    ("nv_inference_first_response_histogram_ms", "histogram"),
    ("nv_inference_request_summary_us", "summary"),
    ("nv_inference_queue_summary_us", "summary"),
    ("nv_inference_compute_input_summary_us", "summary"),
    ("nv_inference_compute_infer_summary_us", "summary"),
    ("nv_inference_compute_output_summary_us", "summary"),
    ("nv_cache_hit_summary_per_model", "summary"),
    ("nv_cache_miss_summary_per_model", "summary"),
]
TRITON_HELP = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds "
    "(includes cached requests)",
}
DCGM_FAMILIES = [
    ("DCGM_FI_DEV_SM_CLOCK", "gauge"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter"),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge"),
    ("DCGM_FI_DEV_FB_FREE", "gauge"),
    ("DCGM_FI_DEV_FB_USED", "gauge"),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_SM_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_SM_OCCUPANCY", "gauge"),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge"),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge"),
]
DCGM_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID",
               "Hostname", "DCGM_FI_DRIVER_VERSION"]
WORKLOAD_LABELS = ["container", "namespace", "pod"]
COUNTER_FAMILIES = [name for name, kind in TRITON_FAMILIES if kind == "counter"]
RATE_FAMILIES = ("nv_inference_count", "nv_inference_request_success",
                 "nv_inference_request_failure")


def parse(text: str) -> dict[Key, float]:
    """Sample values by (name as printed, sorted labels); the parser's `_total` is undone."""
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = fam.name if fam.type == "counter" and s.name == fam.name + "_total" else s.name
            out[(name, tuple(sorted(s.labels.items())))] = s.value
    return out


def counter_sums(values: dict[Key, float], family: str) -> dict[tuple[str, str], float]:
    """A counter family summed over `reason`, keyed by (model, version); labelled series only."""
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in values.items():
        d = dict(labels)
        if name == family and "model" in d:
            key = (d["model"], d["version"])
            out[key] = out.get(key, 0.0) + value
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet(FleetSpec(start=START))


def in_epoch(fleet: Fleet, k: int, offset: float) -> float:
    return fleet.epoch_start(k) + offset


# --- identities and shape -----------------------------------------------------------------------


def test_names_hosts_and_mig_placement(fleet: Fleet) -> None:
    assert len(fleet.pods) == 6 and len(set(fleet.pods)) == 6
    k8s = "[bcdfghjklmnpqrstvwxz2456789]"  # the pod-template-hash alphabet
    for pod in fleet.pods:
        assert re.fullmatch(f"triton-{k8s}{{9}}-{k8s}{{5}}", pod), pod
    assert fleet.hosts == ["gpu-node-01", "gpu-node-02"]
    assert fleet.models[:3] == ["pn_demo", "svj_tch_gnn", "particlenet_aa"]
    assert fleet.models[3] == "model_003"
    assert len(fleet.slices) == 16
    per_gpu: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for sl in fleet.slices:
        per_gpu.setdefault((sl.host, sl.gpu), []).append((sl.profile, sl.gi_id))
    assert all(v == [("3g.40gb", 2), ("2g.20gb", 3), ("1g.10gb", 9), ("1g.10gb", 10)]
               for v in per_gpu.values())
    triton = [sl for sl in fleet.slices if sl.triton]
    assert sorted(sl.pod for sl in triton if sl.pod) == sorted(fleet.pods)
    notebook = [sl for sl in fleet.slices if sl.namespace == "ml-train"]
    assert len(notebook) == 1 and notebook[0].container == "notebook"
    assert sum(1 for sl in fleet.slices if sl.pod is None) == 16 - 6 - 1
    # Slice identity uses instance: it must differ between hosts.
    assert len({sl.instance for sl in fleet.slices}) == 2
    assert len({sl.identity() for sl in fleet.slices}) == 16
    assert fleet.epoch_bounds(START + 61.5) == (START + 60, START + 120)


def test_spec_rejects_more_servers_than_slices() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        FleetSpec(servers=5, hosts=1, gpus_per_host=1)
    assert len(Fleet(FleetSpec(servers=7, hosts=1, gpus_per_host=1,
                               layout="all-1g.10gb")).pods) == 7


def test_triton_exposition_matches_reference_shape(fleet: Fleet) -> None:
    text = fleet.triton_exposition(fleet.pods[0], in_epoch(fleet, 30, 20))
    families = list(text_string_to_metric_families(text))
    assert [(f.name, f.type) for f in families] == TRITON_FAMILIES
    for name, help_text in TRITON_HELP.items():
        assert f"# HELP {name} {help_text}\n" in text
    assert not re.search(r"^nv_inference_\w+_total[{ ]", text, re.M)  # counters as Triton prints
    by_name = {f.name: f for f in families}
    for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                 "nv_inference_queue_duration_us", "nv_inference_pending_request_count"):
        assert by_name[name].samples
        assert all(set(s.labels) == {"model", "version"} for s in by_name[name].samples)
    failures = by_name["nv_inference_request_failure"].samples
    assert all(set(s.labels) == {"model", "reason", "version"} for s in failures)
    assert {s.labels["reason"] for s in failures} == {"REJECTED", "CANCELED", "BACKEND", "OTHER"}
    # Label order as Triton prints it.
    assert re.search(r'^nv_inference_count\{model="[^"]+",version="[^"]+"\} ', text, re.M)
    assert re.search(r'^nv_inference_request_failure\{model="[^"]+",reason="OTHER",version="',
                     text, re.M)
    assert re.search(r'_bucket\{model="[^"]+",version="[^"]+",le="\+Inf"\} ', text)
    # Cache families: HELP/TYPE always, samples only for the cache model (svj_tch_gnn).
    for name in ("nv_cache_num_hits_per_model", "nv_cache_num_misses_per_model"):
        assert {s.labels["model"] for s in by_name[name].samples} <= {"svj_tch_gnn"}
    assert not by_name["nv_energy_consumption"].samples
    assert not by_name["nv_gpu_utilization"].samples


def test_cache_model_has_cache_series_and_others_do_not(fleet: Fleet) -> None:
    seen_cache = seen_plain = False
    for k in range(0, 40, 3):
        for pod in fleet.pods:
            text = fleet.triton_exposition(pod, in_epoch(fleet, k, 30))
            loaded = {m for m, _ in fleet.loaded_models(pod, in_epoch(fleet, k, 30))}
            has_hits = 'nv_cache_num_hits_per_model{model="svj_tch_gnn"' in text
            assert has_hits == ("svj_tch_gnn" in loaded)
            assert 'nv_cache_num_hits_per_model{model="pn_demo"' not in text
            seen_cache |= has_hits
            seen_plain |= not has_hits
    assert seen_cache and seen_plain


def test_multi_version_model_serves_two_versions(fleet: Fleet) -> None:
    versions = {v for k in range(20) for pod in fleet.pods
                for m, v in fleet.loaded_models(pod, in_epoch(fleet, k, 1)) if m == "pn_demo"}
    assert versions == {"1", "2"}


def test_dcgm_exposition_matches_reference_shape(fleet: Fleet) -> None:
    t = in_epoch(fleet, 12, 10)
    for host in fleet.hosts:
        text = fleet.dcgm_exposition(host, t)
        families = list(text_string_to_metric_families(text))
        assert [(f.name, f.type) for f in families] == DCGM_FAMILIES
        gpu_fields: dict[tuple[str, str], set[float]] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name, labels_text, value = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line).groups()  # type: ignore[union-attr]
            names = re.findall(r'(\w+)="', labels_text)
            assert names in (DCGM_LABELS, DCGM_LABELS + WORKLOAD_LABELS), line
            if name.startswith("DCGM_FI_PROF_") and not name.endswith("_BYTES"):
                assert re.fullmatch(r"\d\.\d{6}", value), line
                assert 0.0 <= float(value) <= 1.0
            if name == "DCGM_FI_DEV_POWER_USAGE":
                uuid = re.search(r'UUID="([^"]+)"', labels_text).group(1)  # type: ignore[union-attr]
                gpu_fields.setdefault((name, uuid), set()).add(float(value))
            if "pod=" not in labels_text and name.startswith("DCGM_FI_PROF_"):
                assert float(value) == 0.0
        # Whole-GPU values are repeated on every slice of a GPU.
        assert gpu_fields and all(len(v) == 1 for v in gpu_fields.values())
        assert f'Hostname="{host}"' in text
    texts = "".join(fleet.dcgm_exposition(h, t) for h in fleet.hosts)
    assert 'container="notebook",namespace="ml-train",pod="jupyter-alice-0"' in texts
    for pod in fleet.pods:
        assert f'container="triton",namespace="triton",pod="{pod}"' in texts


def test_label_values_are_escaped() -> None:
    assert simulate.escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert simulate.format_value(3.0) == "3"
    assert simulate.format_value(0.1234567) == "0.123457"
    assert simulate.format_value(math.nan) == "NaN"


# --- counters -----------------------------------------------------------------------------------


def test_counters_are_monotone_within_an_epoch(fleet: Fleet) -> None:
    for k in (3, 17):
        previous: dict[Key, float] = {}
        for offset in (0.0, 0.5, 7.0, 31.0, 59.9):
            values = parse(fleet.triton_exposition(fleet.pods[1], in_epoch(fleet, k, offset)))
            counters = {key: v for key, v in values.items()
                        if key[0] in COUNTER_FAMILIES or key[0].endswith(("_count", "_bucket"))}
            assert counters
            for key, value in counters.items():
                if key in previous:
                    assert value >= previous[key], key
            assert previous.keys() <= counters.keys() or not previous
            previous = counters


def _find_reload(fleet: Fleet) -> tuple[str, tuple[str, str], int]:
    for k in range(1, 400):
        for pod in fleet.pods:
            before = set(fleet.loaded_models(pod, in_epoch(fleet, k, 1)))
            gone = set(fleet.loaded_models(pod, in_epoch(fleet, k + 1, 1)))
            back = set(fleet.loaded_models(pod, in_epoch(fleet, k + 2, 1)))
            for pair in sorted(before - gone):
                if pair in back:
                    rate = fleet.truth(in_epoch(fleet, k, 50), 30)[
                        "model_version_pod:nv_inference_request_success:rate"
                    ][(("model", pair[0]), ("pod", pod), ("version", pair[1]))]
                    if rate > 0:
                        return pod, pair, k
    raise AssertionError("no unload/reload in 400 epochs")


def test_unload_removes_series_and_reload_restarts_from_zero() -> None:
    fleet = Fleet(FleetSpec(start=START, churn=0.5))
    pod, (model, version), k = _find_reload(fleet)
    labels = (("model", model), ("version", version))
    key = ("nv_inference_request_success", labels)
    loaded = parse(fleet.triton_exposition(pod, in_epoch(fleet, k, 59)))
    assert loaded[key] > 0
    unloaded = fleet.triton_exposition(pod, in_epoch(fleet, k + 1, 30))
    assert f'model="{model}",version="{version}"' not in unloaded
    t = in_epoch(fleet, k + 2, 40)
    reloaded = parse(fleet.triton_exposition(pod, t))
    rate = fleet.truth(t, 40)["model_version_pod:nv_inference_request_success:rate"][
        (("model", model), ("pod", pod), ("version", version))]
    # Since the reload at the epoch start: exactly 40 s of this epoch's rate.
    assert close(reloaded[key], rate * 40)
    assert reloaded[key] < loaded[key] or rate * 40 >= loaded[key]


def test_restart_resets_every_counter_of_the_pod() -> None:
    faults = Faults()
    fleet = Fleet(FleetSpec(start=START), faults)
    pod = fleet.pods[2]
    k = next(k for k in range(5, 200)
             if fleet.truth(in_epoch(fleet, k, 59), 59)["pod:nv_inference_count:rate"][
                 (("pod", pod),)] > 0)
    later = parse(fleet.triton_exposition(pod, in_epoch(fleet, k + 3, 10)))  # cached history
    before_window = fleet.truth(in_epoch(fleet, k, 45), 30)
    faults.restart(pod, in_epoch(fleet, k, 20))
    before = parse(fleet.triton_exposition(pod, in_epoch(fleet, k, 19.5)))
    after = parse(fleet.triton_exposition(pod, in_epoch(fleet, k, 25)))
    assert before.keys() == after.keys()
    counts = counter_sums(after, "nv_inference_count")
    rates = fleet.truth(in_epoch(fleet, k, 45), 30)
    for (model, version), value in counts.items():
        rate = rates["model_version_pod:nv_inference_count:rate"][
            (("model", model), ("pod", pod), ("version", version))]
        assert close(value, rate * 5)  # 5 s since the restart
    assert sum(counts.values()) < sum(counter_sums(before, "nv_inference_count").values())
    # The history computed before the restart was forgotten: later epochs start lower too.
    relater = parse(fleet.triton_exposition(pod, in_epoch(fleet, k + 3, 10)))
    assert sum(counter_sums(relater, "nv_inference_count").values()) < sum(
        counter_sums(later, "nv_inference_count").values())
    # rate() over a reset counts post-reset increase plus the gain before it: unchanged.
    assert rates == before_window
    assert faults.restarts() == {pod: [in_epoch(fleet, k, 20)]}


# --- truth --------------------------------------------------------------------------------------


def test_truth_hand_check_single_server() -> None:
    spec = FleetSpec(servers=1, models=1, hosts=1, gpus_per_host=1, versioned_models=(),
                     cache_models=(), start=START)
    fleet = Fleet(spec)
    pod = fleet.pods[0]
    k = next(k for k in range(50)
             if parse(fleet.triton_exposition(pod, in_epoch(fleet, k, 59)))[
                 ("nv_inference_count", (("model", "pn_demo"), ("version", "1")))]
             > parse(fleet.triton_exposition(pod, in_epoch(fleet, k, 1)))[
                 ("nv_inference_count", (("model", "pn_demo"), ("version", "1")))])
    t1, t2 = in_epoch(fleet, k, 12), in_epoch(fleet, k, 42)
    a = parse(fleet.triton_exposition(pod, t1))
    b = parse(fleet.triton_exposition(pod, t2))
    mv = (("model", "pn_demo"), ("version", "1"))

    def inc(name: str) -> float:
        return b[(name, mv)] - a[(name, mv)]

    failures = sum(b[key] - a[key] for key in b if key[0] == "nv_inference_request_failure")
    truth = fleet.truth(t2, 30)
    mvp = (("model", "pn_demo"), ("pod", pod), ("version", "1"))
    assert close(truth["model_version_pod:nv_inference_count:rate"][mvp],
                 inc("nv_inference_count") / 30)
    assert close(truth["model_version:nv_inference_request_success:rate"][mv],
                 inc("nv_inference_request_success") / 30)
    assert close(truth["pod:nv_inference_request_failure:rate"][(("pod", pod),)], failures / 30)
    assert close(truth[":nv_inference_count:rate"][()], inc("nv_inference_count") / 30)
    assert close(truth["model_version:nv_inference_batch_size:mean"][mv],
                 inc("nv_inference_count") / inc("nv_inference_exec_count"))
    assert truth["model_version:nv_inference_batch_size:mean"][mv] >= 1
    for phase in simulate.PHASES:
        expected = inc(f"nv_inference_{phase}_duration_us") / inc(
            "nv_inference_request_success") / 1e6
        assert close(truth[f"model_version:nv_inference_{phase}_duration:mean_seconds"][mv],
                     expected)
        assert close(truth[f":nv_inference_{phase}_duration:mean_seconds"][()], expected)
    parts = sum(truth[f"model_version:nv_inference_{p}_duration:mean_seconds"][mv]
                for p in simulate.PHASES[1:])
    assert truth["model_version:nv_inference_request_duration:mean_seconds"][mv] > parts
    assert truth["model_version:triton_servers_active:count"][mv] == 1
    assert truth["pod:triton_models_active:count"][(("pod", pod),)] == 1
    assert truth[":triton_servers_active:count"][()] == 1
    assert truth[":triton_model_concurrency:ratio"][()] == 1
    assert truth[":triton_inference_rate_drift:ratio"][()] == 1
    assert "model_version:nv_cache_hit:ratio" not in truth


def test_truth_equals_exposition_differences_for_every_series(fleet: Fleet) -> None:
    for k in (4, 9, 26):
        t1, t2 = in_epoch(fleet, k, 15), in_epoch(fleet, k, 55)
        truth = fleet.truth(t2, 40)
        expected: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for pod in fleet.pods:
            a = parse(fleet.triton_exposition(pod, t1))
            b = parse(fleet.triton_exposition(pod, t2))
            for family in RATE_FAMILIES:
                before, after = counter_sums(a, family), counter_sums(b, family)
                assert before.keys() == after.keys()
                for (model, version), value in after.items():
                    key = (("model", model), ("pod", pod), ("version", version))
                    expected.setdefault(family, {})[key] = (value - before[(model, version)]) / 40
        for family in RATE_FAMILIES:
            got = truth[f"model_version_pod:{family}:rate"]
            assert got.keys() == expected[family].keys()
            for key, value in expected[family].items():
                assert close(got[key], value), (family, key)
        # Cache hit ratio from the cache counters.
        for key, ratio in truth.get("model_version:nv_cache_hit:ratio", {}).items():
            assert dict(key)["model"] == "svj_tch_gnn"
            assert 0 < ratio < 1


def test_truth_dcgm_equals_exposed_gauges(fleet: Fleet) -> None:
    k = 21
    t = in_epoch(fleet, k, 50)
    truth = fleet.truth(t, 45)
    exposed: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    host_instance = {sl.host: sl.instance for sl in fleet.slices}
    for host in fleet.hosts:
        for (name, labels), value in parse(fleet.dcgm_exposition(host, t - 20)).items():
            d = dict(labels)
            if d.get("container") != "triton":
                continue
            key = tuple(sorted({"instance": host_instance[host], "device": d["device"],
                                "GPU_I_ID": d["GPU_I_ID"], "GPU_I_PROFILE": d["GPU_I_PROFILE"],
                                "pod": d["pod"]}.items()))
            exposed.setdefault(key, {})[name] = value
    assert len(exposed) == 6
    for series, field in (("gpu_instance:dcgm_tensor_active:avg", "PIPE_TENSOR_ACTIVE"),
                          ("gpu_instance:dcgm_dram_active:avg", "DRAM_ACTIVE"),
                          ("gpu_instance:dcgm_gr_engine_active:avg", "GR_ENGINE_ACTIVE")):
        assert truth[series].keys() == exposed.keys()
        for key, values in exposed.items():
            assert close(truth[series][key], values[f"DCGM_FI_PROF_{field}"])
    tensors = truth["gpu_instance:dcgm_tensor_active:avg"]
    assert close(truth[":dcgm_tensor_active:sum"][()], sum(tensors.values()))
    assert close(truth[":dcgm_dram_active:sum"][()],
                 sum(truth["gpu_instance:dcgm_dram_active:avg"].values()))
    equivalents = sum(v * int(dict(key)["GPU_I_PROFILE"][0]) / 7 for key, v in tensors.items())
    assert close(truth[":dcgm_tensor_active:gpu_equivalents"][()], equivalents)
    assert truth[":dcgm_mig_slices_idle:count"][()] == sum(1 for v in tensors.values() if v < 0.01)


def test_truth_invariants_over_many_epochs(fleet: Fleet) -> None:
    saw_idle_slice = saw_idle_model = False
    for k in range(1, 80):
        t = in_epoch(fleet, k, 59)
        truth = fleet.truth(t, 30)
        for family in RATE_FAMILIES:
            fleet_rate = truth[f":{family}:rate"][()]
            assert close(fleet_rate, sum(truth[f"model_version:{family}:rate"].values()))
            assert close(fleet_rate, sum(truth[f"pod:{family}:rate"].values()))
            assert close(fleet_rate, sum(truth[f"model_version_pod:{family}:rate"].values()))
        assert truth[":triton_inference_rate_drift:ratio"][()] == 1
        per_model = truth["model_version:triton_servers_active:count"]
        per_pod = truth["pod:triton_models_active:count"]
        loaded = {(m, v) for pod in fleet.pods for m, v in fleet.loaded_models(pod, t)}
        assert {(dict(key)["model"], dict(key)["version"]) for key in per_model} == loaded
        assert set(per_pod) == {(("pod", pod),) for pod in fleet.pods}
        assert sum(per_pod.values()) == truth[":triton_model_servers_active:sum"][()]
        assert sum(per_model.values()) == truth[":triton_model_servers_active:sum"][()]
        busy = truth[":triton_servers_active:count"][()]
        assert busy == sum(1 for v in per_pod.values() if v > 0)
        if busy:
            ratio = truth[":triton_model_concurrency:ratio"][()]
            assert 1 <= ratio <= fleet.max_pairs
        for key, n in per_model.items():
            success = truth["model_version:nv_inference_request_success:rate"][key]
            assert (n > 0) == (success > 0)
            saw_idle_model |= n == 0
        tensors = truth["gpu_instance:dcgm_tensor_active:avg"].values()
        idle = truth[":dcgm_mig_slices_idle:count"][()]
        assert idle == sum(1 for v in tensors if v < 0.01)  # the idle threshold is 0.01
        saw_idle_slice |= idle > 0
    assert saw_idle_slice and saw_idle_model


def test_faults_change_raw_rate_and_drift_but_not_deduplicated_rates() -> None:
    faults = Faults()
    fleet = Fleet(FleetSpec(start=START), faults)
    # Each state holds over the whole window of one epoch: 7 clean, 8 duplicated,
    # 9 unlabelled, 10 both, 11 clean again.
    times = {k: in_epoch(fleet, k, 50) for k in range(7, 12)}
    faults.set_switch("duplicate_replica", True, at=fleet.epoch_start(8))
    faults.set_switch("duplicate_replica", False, at=fleet.epoch_start(9))
    faults.set_switch("unlabeled_series", True, at=fleet.epoch_start(9))
    faults.set_switch("duplicate_replica", True, at=fleet.epoch_start(10))
    faults.set_switch("unlabeled_series", False, at=fleet.epoch_start(11))
    faults.set_switch("duplicate_replica", False, at=fleet.epoch_start(11))
    assert not faults.duplicate_replica and not faults.unlabeled_series  # the state now
    truths = {k: fleet.truth(t, 30) for k, t in times.items()}

    def drift(k: int) -> float:
        return truths[k][":triton_inference_rate_drift:ratio"][()]

    assert drift(7) == 1 and drift(11) == 1
    assert close(drift(8), 0.5)
    assert drift(9) < 1
    assert drift(10) < 0.5
    for k in (7, 11):
        assert truths[k][":nv_inference_count:rate_raw"] == truths[k][":nv_inference_count:rate"]
    # The extra raw rate is exactly the unlabeled series' rate in the expositions.
    t = times[9]
    extra = 0.0
    for pod in fleet.pods:
        a = parse(fleet.triton_exposition(pod, t - 30))[("nv_inference_count", ())]
        b = parse(fleet.triton_exposition(pod, t))[("nv_inference_count", ())]
        extra += (b - a) / 30
    assert extra > 0
    assert close(truths[9][":nv_inference_count:rate_raw"][()],
                 truths[9][":nv_inference_count:rate"][()] + extra)
    assert close(truths[10][":nv_inference_count:rate_raw"][()],
                 2 * (truths[10][":nv_inference_count:rate"][()] + extra))
    assert "model=" in fleet.triton_exposition(fleet.pods[0], times[11])
    assert not re.search(r"^nv_inference_count ", fleet.triton_exposition(fleet.pods[0],
                                                                         times[11]), re.M)
    # Deduplicated figures do not depend on the switches.
    plain = Fleet(FleetSpec(start=START))
    for k, t in times.items():
        expected = plain.truth(t, 30)
        for name, rows in expected.items():
            if name not in (":nv_inference_count:rate_raw", ":triton_inference_rate_drift:ratio"):
                assert truths[k][name] == rows, (k, name)


def test_truth_requires_a_window_inside_one_epoch(fleet: Fleet) -> None:
    t = in_epoch(fleet, 10, 20)
    with pytest.raises(ValueError, match="spans epochs"):
        fleet.truth(t, 30)
    with pytest.raises(ValueError):
        fleet.truth(START + 10, 30)  # before the fleet exists
    # strict=False integrates across the boundary: a pair loaded on both sides without reset
    # gains exactly C(t) - C(t - W).
    loose = fleet.truth(t, 30, strict=False)
    pod = fleet.pods[0]
    a = counter_sums(parse(fleet.triton_exposition(pod, t - 30)), "nv_inference_count")
    b = counter_sums(parse(fleet.triton_exposition(pod, t)), "nv_inference_count")
    both_sides = [pair for pair in b if pair in a]
    assert both_sides
    for model, version in both_sides:
        key = (("model", model), ("pod", pod), ("version", version))
        assert close(loose["model_version_pod:nv_inference_count:rate"][key],
                     (b[(model, version)] - a[(model, version)]) / 30)


def test_churn_boost_changes_only_later_epochs() -> None:
    faults = Faults()
    fleet = Fleet(FleetSpec(start=START, churn=0.05), faults)
    early = [fleet.loaded_models(pod, in_epoch(fleet, 5, 1)) for pod in fleet.pods]
    plain = [[fleet.loaded_models(pod, in_epoch(fleet, k, 1)) for pod in fleet.pods]
             for k in range(6, 40)]
    faults.set_churn_boost(20.0, at=in_epoch(fleet, 5, 30))
    assert [fleet.loaded_models(pod, in_epoch(fleet, 5, 1)) for pod in fleet.pods] == early
    boosted = [[fleet.loaded_models(pod, in_epoch(fleet, k, 1)) for pod in fleet.pods]
               for k in range(6, 40)]
    changes = sum(1 for a, b in itertools.pairwise(boosted) if a != b)
    plain_changes = sum(1 for a, b in itertools.pairwise(plain) if a != b)
    assert changes > plain_changes


# --- determinism --------------------------------------------------------------------------------


def test_same_seed_same_exposition_and_different_seed_differs() -> None:
    t = START + 3 * 3600 + 17.25
    a = Fleet(FleetSpec(start=START))
    b = Fleet(FleetSpec(start=START))
    c = Fleet(FleetSpec(start=START, seed=2))
    # Query b in another order: the cached history must not change any number.
    b.triton_exposition(b.pods[3], t + 7200)
    for pod_a, pod_b in zip(a.pods, b.pods, strict=True):
        assert a.triton_exposition(pod_a, t) == b.triton_exposition(pod_b, t)
    assert a.dcgm_exposition("gpu-node-01", t) == b.dcgm_exposition("gpu-node-01", t)
    assert a.pods != c.pods
    assert a.dcgm_exposition("gpu-node-01", t) != c.dcgm_exposition("gpu-node-01", t)
    assert a.truth(t, 10) == b.truth(t, 10)


def test_long_history_is_cheap() -> None:
    fleet = Fleet(FleetSpec(start=START, epoch_seconds=15.0))
    began = time.perf_counter()
    fleet.triton_exposition(fleet.pods[0], START + 15.0 * 10_000 + 3)
    first = time.perf_counter() - began
    began = time.perf_counter()
    for i in range(50):
        fleet.triton_exposition(fleet.pods[0], START + 15.0 * 10_000 + 3 + i * 0.1)
    again = (time.perf_counter() - began) / 50
    assert first < 5.0
    assert again < 0.05
    with pytest.raises(ValueError, match="epochs"):
        fleet.triton_exposition(fleet.pods[0], START + 15.0 * (simulate.MAX_EPOCHS + 1))


# --- HTTP ---------------------------------------------------------------------------------------


@pytest.fixture()
def served() -> Iterator[tuple[Fleet, str]]:
    start = math.floor(time.time() / 60) * 60 - 3600
    fleet = Fleet(FleetSpec(start=start))
    server = simulate.serve(fleet)
    host, port = server.server_address[:2]
    try:
        yield fleet, f"http://{host!s}:{port}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, body: dict[str, object] | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_http_routes_and_faults(served: tuple[Fleet, str]) -> None:
    fleet, base = served
    pod, host = fleet.pods[0], fleet.hosts[0]
    status, text = fetch(f"{base}/triton/{pod}/metrics")
    assert status == 200 and 'nv_inference_count{model="' in text
    status, text = fetch(f"{base}/dcgm/{host}/metrics")
    assert status == 200 and "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{" in text
    assert fetch(f"{base}/replica/1/triton/{pod}/metrics") == (200, "")
    assert fetch(f"{base}/replica/1/dcgm/{host}/metrics") == (200, "")
    assert fetch(f"{base}/-/healthy")[0] == 200
    assert fetch(f"{base}/nope")[0] == 404
    assert fetch(f"{base}/triton/no-such-pod/metrics")[0] == 404
    assert fetch(f"{base}/replica/2/triton/{pod}/metrics")[0] == 404

    status, text = fetch(f"{base}/-/faults", {"duplicate_replica": True})
    assert status == 200 and json.loads(text)["duplicate_replica"] is True
    status, text = fetch(f"{base}/replica/1/triton/{pod}/metrics")
    assert status == 200 and 'nv_inference_count{model="' in text
    assert "DCGM_FI_PROF_DRAM_ACTIVE{" in fetch(f"{base}/replica/1/dcgm/{host}/metrics")[1]

    assert fetch(f"{base}/-/faults", {"failing": True})[0] == 200
    assert fetch(f"{base}/triton/{pod}/metrics")[0] == 500
    assert fetch(f"{base}/dcgm/{host}/metrics")[0] == 200
    assert fetch(f"{base}/-/faults", {"failing": False, "slow_seconds": 0.2})[0] == 200
    began = time.perf_counter()
    assert fetch(f"{base}/triton/{pod}/metrics")[0] == 200
    assert time.perf_counter() - began >= 0.2
    status, text = fetch(f"{base}/-/faults", {"restart": pod, "slow_seconds": 0})
    assert status == 200 and pod in json.loads(text)["restarts"]
    assert fetch(f"{base}/-/faults", {"restart": "no-such-pod"})[0] == 400
    assert fetch(f"{base}/-/faults", {"bogus": 1})[0] == 400
    assert fetch(f"{base}/-/faults", {"failing": "yes"})[0] == 400
    faults = json.loads(fetch(f"{base}/-/faults")[1])
    assert faults["duplicate_replica"] is True and faults["failing"] is False

    t = fleet.epoch_start(5) + 50
    status, text = fetch(f"{base}/-/truth?t={t}&window=30")
    assert status == 200
    payload = json.loads(text)["series"]
    expected = fleet.truth(t, 30)
    assert set(payload) == set(expected)
    rows = payload["model_version_pod:nv_inference_count:rate"]
    assert {tuple(sorted(r["labels"].items())): r["value"] for r in rows} == expected[
        "model_version_pod:nv_inference_count:rate"]
    assert fetch(f"{base}/-/truth?t={t}&window=90")[0] == 400
    assert fetch(f"{base}/-/truth?t={t}")[0] == 400
    assert fetch(f"{base}/-/truth?t={t}&window=90&strict=0")[0] == 200


# --- Prometheus config and backfill -------------------------------------------------------------


def test_prometheus_config(fleet: Fleet) -> None:
    config = fleet.prometheus_config("127.0.0.1:9999", 2.5)
    assert yaml.safe_load(yaml.safe_dump(config)) == config
    assert config["global"]["scrape_interval"] == "2500ms"
    assert config["global"]["scrape_timeout"] == "2500ms"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"triton", "dcgm", "triton-replica-1", "dcgm-replica-1"}
    assert all(job["honor_labels"] is False for job in jobs.values())
    triton = [sc["labels"] for sc in jobs["triton"]["static_configs"]]
    assert [labels["pod"] for labels in triton] == fleet.pods
    for labels in triton:
        assert labels["__metrics_path__"] == f"/triton/{labels['pod']}/metrics"
        assert labels["namespace"] == "triton" and labels["container"] == "triton"
        assert labels["instance"].endswith(":8002")
        assert labels["prometheus_replica"] == "prometheus-k8s-0"
        assert "job" not in labels
    dcgm = [sc["labels"] for sc in jobs["dcgm"]["static_configs"]]
    assert len({labels["instance"] for labels in dcgm}) == len(fleet.hosts)
    assert all(labels["pod"].startswith("nvidia-dcgm-exporter-") for labels in dcgm)
    assert all(labels["namespace"] == "gpu-operator" for labels in dcgm)
    replica = [sc["labels"] for sc in jobs["triton-replica-1"]["static_configs"]]
    assert all(labels["__metrics_path__"].startswith("/replica/1/triton/") for labels in replica)
    assert all(labels["prometheus_replica"] == "prometheus-k8s-1" for labels in replica)
    assert all(labels["job"] == "triton" for labels in replica)
    assert all(sc["targets"] == ["127.0.0.1:9999"] for job in jobs.values()
               for sc in job["static_configs"])


def test_write_openmetrics(tmp_path: Path) -> None:
    faults = Faults(duplicate_replica=True, unlabeled_series=True)
    fleet = Fleet(FleetSpec(servers=3, hosts=1, start=START), faults)
    path = tmp_path / "history.om"
    written = fleet.write_openmetrics(path, START + 30, START + 210, 15)
    text = path.read_text()
    assert text.endswith("\n# EOF\n")
    lines = text.splitlines()
    samples = [line for line in lines if not line.startswith("#")]
    assert written == len(samples) > 0
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert "# TYPE nv_inference_count unknown" in lines
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION unknown" in lines
    assert "# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge" in lines
    # Families are contiguous; each series is in strictly increasing time order.
    family_of_line: list[str] = []
    current = ""
    last: dict[str, float] = {}
    for line in lines[:-1]:
        if line.startswith("# TYPE "):
            current = line.split()[2]
            continue
        series, _, stamp = line.rpartition(" ")
        series = series.rpartition(" ")[0]
        assert series.startswith(current)
        assert float(stamp) > last.get(series, -math.inf), line
        last[series] = float(stamp)
        family_of_line.append(current)
    stamps = {float(line.rpartition(" ")[2]) for line in samples}
    assert stamps == {START + 30 + 15 * i for i in range(13)}
    # Target labels merged as Prometheus does with honor_labels: false.
    dcgm = next(line for line in samples if line.startswith("DCGM_FI_PROF_GR_ENGINE_ACTIVE{")
                and 'exported_container="triton"' in line)
    assert 'container="nvidia-dcgm-exporter"' in dcgm and 'job="dcgm"' in dcgm
    assert re.search(r'exported_pod="triton-\w+-\w+"', dcgm)
    replicas = {m for line in samples for m in re.findall(r'prometheus_replica="([^"]+)"', line)}
    assert replicas == {"prometheus-k8s-0", "prometheus-k8s-1"}
    assert any(line.startswith("nv_inference_count{container=") and "model=" not in line
               for line in samples)
    assert 'up{container="triton",instance=' in text
    # One scrape's worth is valid OpenMetrics for the strict python parser too.
    single = tmp_path / "single.om"
    count = fleet.write_openmetrics(single, START + 100, START + 100, 15)
    parsed = list(openmetrics_families(single.read_text()))
    assert sum(len(f.samples) for f in parsed) == count


def test_write_openmetrics_failing_triton_is_down(tmp_path: Path) -> None:
    fleet = Fleet(FleetSpec(servers=2, hosts=1, gpus_per_host=1, start=START),
                  Faults(failing=True))
    path = tmp_path / "down.om"
    fleet.write_openmetrics(path, START, START + 30, 15)
    text = path.read_text()
    assert "nv_inference_count" not in text
    assert re.search(r'^up\{[^}]*job="triton"[^}]*\} 0 ', text, re.M)
    assert re.search(r'^up\{[^}]*job="dcgm"[^}]*prometheus-k8s-0"\} 1 ', text, re.M)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_flags_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    config_path = tmp_path / "prometheus.yml"
    args = parser.parse_args([
        "--servers", "3", "--models", "5", "--hosts", "1", "--seed", "7", "--epoch", "30s",
        "--churn", "0.3", "--start", "1700000000", "--prometheus-config", str(config_path),
        "--scrape-interval", "2", "--fault", "duplicate-replica", "--fault", "failing",
        "--slow", "0.5",
    ])
    spec, faults = simulate.spec_from_args(args)
    assert (spec.servers, spec.models, spec.hosts, spec.seed) == (3, 5, 1, 7)
    assert (spec.epoch_seconds, spec.churn, spec.start) == (30.0, 0.3, 1_700_000_000.0)
    assert faults.duplicate_replica and faults.failing and not faults.unlabeled_series
    assert faults.slow_seconds == 0.5
    default_spec, _ = simulate.spec_from_args(parser.parse_args([]), now=1_700_000_059.0)
    assert default_spec.start == 1_700_000_040.0  # now, aligned down to the epoch

    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(simulate.run(
        spec, faults, "127.0.0.1", 0, config_path, 2.0, stop=stop)))
    thread.start()
    deadline = time.monotonic() + 10
    while not config_path.exists():  # written before the line is printed and the wait begins
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert result == [0]
    out = capsys.readouterr().out
    match = re.search(r"^simulator: http://127\.0\.0\.1:(\d+)/$", out, re.M)
    assert match
    config = yaml.safe_load(config_path.read_text())
    target = config["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == f"127.0.0.1:{match.group(1)}"


# --- real Triton's exposition -------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "triton"
Shape = tuple[str, tuple[str, ...]]
"""A sample's name suffix after its family name, and its label names in print order."""


def triton_shapes(texts: list[str]) -> dict[str, tuple[str, str, set[Shape]]]:
    """Per family: TYPE, HELP and the shapes of its samples, from text expositions."""
    out: dict[str, tuple[str, str, set[Shape]]] = {}
    helps: dict[str, str] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                helps[name] = help_text
            elif line.startswith("# TYPE "):
                family, kind = line[7:].split(" ")
                out.setdefault(family, (kind, helps[family], set()))
                assert out[family][:2] == (kind, helps[family]), family
            elif line and not line.startswith("#"):
                sample = re.fullmatch(r"(\w+)(?:\{(.*)\})? \S+", line)
                assert sample and sample.group(1).startswith(family), line
                names = tuple(re.findall(r'(\w+)="(?:[^"\\]|\\.)*"', sample.group(2) or ""))
                out[family][2].add((sample.group(1)[len(family):], names))
    return out


def test_triton_families_print_like_real_triton_2_51(fleet: Fleet) -> None:
    real = triton_shapes([(FIXTURES / name).read_text()
                          for name in ("triton-2.51-default.prom",
                                       "triton-2.51-cache-summaries.prom")])
    texts = [fleet.triton_exposition(pod, in_epoch(fleet, k, 30))
             for k in range(0, 40, 3) for pod in fleet.pods]
    ours = triton_shapes(texts)
    both = sorted(set(real) & set(ours))
    # Everything but the histogram (opt-in, absent from both captures) and the families a
    # CPU-only 2.51 does not print (GPU, energy; load time is 2.52).
    assert set(ours) - set(real) == {
        "nv_inference_first_response_histogram_ms", "nv_energy_consumption", "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
        "nv_gpu_power_limit", "nv_model_load_duration_secs"}
    assert len(both) == 26
    for family in both:
        kind, help_text, shapes = real[family]
        assert ours[family][:2] == (kind, help_text), family
        # Label names per sample, `pod` aside (real Triton never prints it; the scrape adds it).
        mine = {(suffix, tuple(n for n in names if n != "pod"))
                for suffix, names in ours[family][2]}
        if shapes and mine:
            assert mine == shapes, family
    # The histogram as Triton documents it: model, version (and le on buckets).
    assert ours["nv_inference_first_response_histogram_ms"][2] == {
        ("_count", ("model", "version")), ("_sum", ("model", "version")),
        ("_bucket", ("model", "version", "le"))}


def test_no_triton_sample_carries_pod() -> None:
    fleet = Fleet(FleetSpec(start=START), Faults(unlabeled_series=True))
    for pod in fleet.pods:
        text = fleet.triton_exposition(pod, in_epoch(fleet, 3, 30))
        for line in text.splitlines():
            if not line.startswith("#"):
                assert not re.search(r'[{,]pod="', line), line


# --- truth: executed requests, failure reasons, queue depth -------------------------------------


def window_counters(fleet: Fleet, t1: float, t2: float,
                    families: tuple[str, ...]) -> dict[tuple[str, str], dict[str, float]]:
    """Increase of each family over (t1, t2], summed over servers (and reasons), by model
    version; families a pair does not print count 0."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for pod in fleet.pods:
        a = parse(fleet.triton_exposition(pod, t1))
        b = parse(fleet.triton_exposition(pod, t2))
        for pair in counter_sums(b, "nv_inference_request_success"):
            row = out.setdefault(pair, dict.fromkeys(families, 0.0))
            for family in families:
                after = counter_sums(b, family)
                if pair in after:
                    row[family] += after[pair] - counter_sums(a, family)[pair]
    return out


def test_truth_compute_means_are_per_executed_request(fleet: Fleet) -> None:
    """Triton's compute durations leave cache hits out: their means are per executed request
    (successes - cache hits); the request and queue means stay per successful request."""
    durations = tuple(f"nv_inference_{phase}_duration_us" for phase in simulate.PHASES)
    families = ("nv_inference_request_success", "nv_cache_num_hits_per_model", *durations)
    saw_hits = False
    for k in (4, 9, 26, 33, 47):
        t1, t2 = in_epoch(fleet, k, 15), in_epoch(fleet, k, 55)
        truth = fleet.truth(t2, 40)
        rows = window_counters(fleet, t1, t2, families)
        total = dict.fromkeys(families, 0.0)
        executed_rates: dict[tuple[tuple[str, str], ...], float] = {}
        for (model, version), row in rows.items():
            mv = (("model", model), ("version", version))
            success = row["nv_inference_request_success"]
            executed = success - row["nv_cache_num_hits_per_model"]
            saw_hits |= row["nv_cache_num_hits_per_model"] > 0 and executed > 0
            executed_rates[mv] = executed / 40
            for phase, family in zip(simulate.PHASES, durations, strict=True):
                means = truth.get(f"model_version:nv_inference_{phase}_duration:mean_seconds", {})
                per = success if phase in ("request", "queue") else executed
                if per > 0:
                    assert close(means[mv], row[family] / per / 1e6), (phase, mv)
                else:
                    assert mv not in means, (phase, mv)
            for family in families:
                total[family] += row[family]
        success = total["nv_inference_request_success"]
        executed = success - total["nv_cache_num_hits_per_model"]
        for phase, family in zip(simulate.PHASES, durations, strict=True):
            per = success if phase in ("request", "queue") else executed
            assert close(truth[f":nv_inference_{phase}_duration:mean_seconds"][()],
                         total[family] / per / 1e6)
        # The executed rate, wherever there is a success rate.
        got = truth["model_version:triton_requests_executed:rate"]
        assert got.keys() == truth["model_version:nv_inference_request_success:rate"].keys()
        assert got.keys() == executed_rates.keys()
        for mv, rate in executed_rates.items():
            assert close(got[mv], rate), mv
        assert close(truth[":triton_requests_executed:rate"][()], executed / 40)
    assert saw_hits, "the cache model should serve cache hits in one of these epochs"


def test_truth_failures_per_reason(fleet: Fleet) -> None:
    saw_zero = saw_failure = False
    for k in (4, 26, 47):
        t1, t2 = in_epoch(fleet, k, 15), in_epoch(fleet, k, 55)
        truth = fleet.truth(t2, 40)
        expected: dict[tuple[tuple[str, str], ...], float] = {}
        for pod in fleet.pods:
            a = parse(fleet.triton_exposition(pod, t1))
            for (name, labels), value in parse(fleet.triton_exposition(pod, t2)).items():
                if name == "nv_inference_request_failure":
                    expected[labels] = expected.get(labels, 0.0) + (value - a[(name, labels)]) / 40
        got = truth["model_version_reason:nv_inference_request_failure:rate"]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert close(got[key], value), key
        # Every model version has a row per reason, zero or not (Triton prints all four).
        for mv in truth["model_version:nv_inference_request_success:rate"]:
            rows = {dict(key)["reason"]: v for key, v in got.items()
                    if (("model", dict(key)["model"]), ("version", dict(key)["version"])) == mv}
            assert set(rows) == set(simulate.REASONS)
            assert close(sum(rows.values()),
                         truth["model_version:nv_inference_request_failure:rate"][mv])
        by_reason = truth["reason:nv_inference_request_failure:rate"]
        assert set(by_reason) == {(("reason", r),) for r in simulate.REASONS}
        for key, value in by_reason.items():
            reason = dict(key)["reason"]
            assert close(value, sum(v for g, v in got.items() if dict(g)["reason"] == reason))
        assert close(sum(by_reason.values()), truth[":nv_inference_request_failure:rate"][()])
        saw_zero |= any(v == 0 for v in got.values())
        saw_failure |= any(v > 0 for v in got.values())
    assert saw_zero and saw_failure


def test_truth_pending_request_count_is_the_gauge_averaged(fleet: Fleet) -> None:
    name = "nv_inference_pending_request_count"
    saw_queue = False
    for k in (4, 9, 26, 33, 47):
        truth = fleet.truth(in_epoch(fleet, k, 55), 40)
        expected: dict[tuple[tuple[str, str], ...], float] = {}
        for pod in fleet.pods:
            gauges = [counter_sums(parse(fleet.triton_exposition(pod, in_epoch(fleet, k, off))),
                                   name) for off in (15.5, 30, 55)]
            # Constant within an epoch: its average over a window inside one is that value.
            assert gauges[0] == gauges[1] == gauges[2]
            for (model, version), value in gauges[0].items():
                expected[(("model", model), ("pod", pod), ("version", version))] = value
        got = truth[f"model_version_pod:{name}:avg"]
        assert got == expected
        by_mv: dict[tuple[tuple[str, str], ...], float] = {}
        by_pod: dict[tuple[tuple[str, str], ...], float] = {}
        for key, value in expected.items():
            d = dict(key)
            mv = (("model", d["model"]), ("version", d["version"]))
            by_mv[mv] = by_mv.get(mv, 0.0) + value
            by_pod[(("pod", d["pod"]),)] = by_pod.get((("pod", d["pod"]),), 0.0) + value
        assert truth[f"model_version:{name}:avg"] == by_mv
        assert truth[f"pod:{name}:avg"] == by_pod
        assert truth[f":{name}:avg"] == {(): sum(expected.values())}
        saw_queue |= any(v > 0 for v in expected.values())
    assert saw_queue


# --- source shapes: plain scrapes, shared slices, label drift -----------------------------------


def test_plain_scrape_mode_names_servers_by_instance(tmp_path: Path) -> None:
    kube = Fleet(FleetSpec(start=START))
    fleet = Fleet(FleetSpec(start=START, scrape_labels="plain"))
    assert kube.server_ids == kube.pods
    assert fleet.pods == kube.pods
    jobs = {job["job_name"]: job
            for job in fleet.prometheus_config("127.0.0.1:9999", 5)["scrape_configs"]}
    kube_jobs = {job["job_name"]: job
                 for job in kube.prometheus_config("127.0.0.1:9999", 5)["scrape_configs"]}
    for name in ("triton", "triton-replica-1"):
        targets = [sc["labels"] for sc in jobs[name]["static_configs"]]
        # A static_configs scrape: instance (and the replica's labels), no Kubernetes labels.
        assert all(not {"pod", "namespace", "container"} & set(labels) for labels in targets)
        assert [labels["instance"] for labels in targets] == fleet.server_ids
    assert len(set(fleet.server_ids)) == len(fleet.pods)
    assert not set(fleet.server_ids) & set(fleet.pods)
    assert jobs["dcgm"] == kube_jobs["dcgm"]
    assert jobs["dcgm-replica-1"] == kube_jobs["dcgm-replica-1"]
    # Truth keys a server's Triton figures by its instance; everything else is unchanged.
    t = in_epoch(fleet, 9, 55)
    got, want = fleet.truth(t, 40), kube.truth(t, 40)
    rename = dict(zip(kube.pods, fleet.server_ids, strict=True))
    assert got.keys() == want.keys()
    for name, rows in want.items():
        if name.startswith(("model_version_pod:", "pod:")):
            rows = {tuple(sorted((k, rename[v] if k == "pod" else v) for k, v in key)): value
                    for key, value in rows.items()}
        assert got[name] == rows, name
    # The backfill labels Triton samples the same way.
    path = tmp_path / "plain.om"
    fleet.write_openmetrics(path, START + 30, START + 60, 15)
    lines = [line for line in path.read_text().splitlines()
             if line.startswith("nv_inference_count{")]
    assert lines and not [line for line in lines if re.search(r"[{,]pod=", line)]
    assert {re.search(r'instance="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            for line in lines} == set(fleet.server_ids)


def _slice_key(sl: simulate.MigSlice) -> tuple[str, int, int]:
    return sl.host, sl.gpu, sl.gi_id


def test_shared_slice_is_a_row_per_pod_and_counted_once() -> None:
    fleet = Fleet(FleetSpec(start=START, shared_slices=1))
    plain = Fleet(FleetSpec(start=START))
    rows = [sl for sl in fleet.slices if sl.triton]
    assert sorted(sl.pod for sl in rows if sl.pod) == sorted(fleet.pods)
    physical = {_slice_key(sl) for sl in rows}
    assert len(rows) == 6 and len(physical) == 5
    a, b = (sl for sl in rows if sum(_slice_key(o) == _slice_key(sl) for o in rows) == 2)
    assert a.identity() != b.identity()
    # The two servers share the slice's time: each runs at half the rate it would alone.
    t = in_epoch(fleet, 9, 55)
    success = fleet.truth(t, 40)["pod:nv_inference_request_success:rate"]
    alone = plain.truth(t, 40)["pod:nv_inference_request_success:rate"]
    for pod in fleet.pods:
        share = 0.5 if pod in (a.pod, b.pod) else 1.0
        assert close(success[(("pod", pod),)], share * alone[(("pod", pod),)])
    # dcgm-exporter prints the slice once per pod, identical but for the pod label; the
    # slice's activity is driven by both servers.
    driven = set()
    for k in range(1, 200):
        t = in_epoch(fleet, k, 50)
        shared_lines: dict[str, list[str]] = {}
        for line in fleet.dcgm_exposition(a.host, t).splitlines():
            if (f'gpu="{a.gpu}",' in line and f'GPU_I_ID="{a.gi_id}",' in line
                    and not line.startswith("#")):
                pod = re.search(r',pod="([^"]+)"', line).group(1)  # type: ignore[union-attr]
                shared_lines.setdefault(pod, []).append(line.replace(f'pod="{pod}"', 'pod=""'))
        assert set(shared_lines) == {a.pod, b.pod}
        assert shared_lines[a.pod] == shared_lines[b.pod]
        assert len(shared_lines[a.pod]) == len(simulate.DCGM_FAMILIES)
        truth = fleet.truth(t, 45)
        tensors = truth["gpu_instance:dcgm_tensor_active:avg"]
        assert len(tensors) == 6
        assert tensors[a.identity()] == tensors[b.identity()]
        once = {_slice_key(sl): sl for sl in rows}.values()
        for series, total in (("gpu_instance:dcgm_tensor_active:avg", ":dcgm_tensor_active:sum"),
                              ("gpu_instance:dcgm_dram_active:avg", ":dcgm_dram_active:sum")):
            assert close(truth[total][()], sum(truth[series][sl.identity()] for sl in once))
        assert close(truth[":dcgm_tensor_active:gpu_equivalents"][()],
                     sum(tensors[sl.identity()] * sl.size / 7 for sl in once))
        assert truth[":dcgm_mig_slices_idle:count"][()] == sum(
            1 for sl in once if tensors[sl.identity()] < 0.01)
        rates = truth["pod:nv_inference_request_success:rate"]
        busy = {pod for pod in (a.pod, b.pod) if rates[(("pod", pod),)] > 0}
        if len(busy) == 1 and tensors[a.identity()] >= 0.01:
            driven |= busy
        if driven == {a.pod, b.pod} and k > 20:
            break
    assert driven == {a.pod, b.pod}, "each server alone keeps the shared slice busy sometimes"


def test_spec_counts_shared_slices_as_room_for_two() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        FleetSpec(servers=5, hosts=1, gpus_per_host=1)
    assert len(Fleet(FleetSpec(servers=5, hosts=1, gpus_per_host=1, shared_slices=1)).pods) == 5
    with pytest.raises(ValueError, match="shared_slices"):
        FleetSpec(servers=3, shared_slices=2)
    with pytest.raises(ValueError, match="scrape_labels"):
        FleetSpec(scrape_labels="consul")
    with pytest.raises(ValueError, match="host_label"):
        FleetSpec(host_label="node")


def test_dcgm_label_drift_hostname_and_7g_profile() -> None:
    spec = FleetSpec(start=START, servers=3, layout="all-7g.80gb")
    drifted = Fleet(dataclasses.replace(spec, host_label="hostname", profile_drift=True))
    steady = Fleet(spec)
    k = next(k for k in range(1, 100)
             if steady.truth(in_epoch(steady, k, 50), 45)[
                 ":dcgm_tensor_active:gpu_equivalents"][()] > 0.05)
    t = in_epoch(steady, k, 50)
    for host in drifted.hosts:
        text = drifted.dcgm_exposition(host, t)
        before = steady.dcgm_exposition(host, t)
        assert f'hostname="{host}"' in text and "Hostname=" not in text
        assert set(re.findall(r'GPU_I_PROFILE="([^"]+)"', text)) == {"7g.79gb"}
        assert set(re.findall(r'GPU_I_PROFILE="([^"]+)"', before)) == {"7g.80gb"}
        assert text == before.replace("Hostname=", "hostname=").replace("7g.80gb", "7g.79gb")
        # MIG rows carry the parent GPU's UUID: one per GPU, not per instance.
        uuids: dict[str, set[str]] = {}
        for gpu, uuid in re.findall(r'gpu="(\d+)",UUID="([^"]+)"', text):
            uuids.setdefault(gpu, set()).add(uuid)
        assert all(len(u) == 1 and next(iter(u)).startswith("GPU-") for u in uuids.values())
        assert re.search(r'GPU_I_PROFILE="7g\.79gb",GPU_I_ID="0",hostname=', text)
    truth, want = drifted.truth(t, 45), steady.truth(t, 45)
    tensors = truth["gpu_instance:dcgm_tensor_active:avg"]
    assert {dict(key)["GPU_I_PROFILE"] for key in tensors} == {"7g.79gb"}
    # A 7g slice is the whole GPU whatever the name says.
    assert close(truth[":dcgm_tensor_active:gpu_equivalents"][()], sum(tensors.values()))
    assert truth[":dcgm_tensor_active:gpu_equivalents"] == want[
        ":dcgm_tensor_active:gpu_equivalents"]


def test_cli_flags_for_source_shapes() -> None:
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    spec, _ = simulate.spec_from_args(parser.parse_args([
        "--servers", "3", "--start", "0", "--layout", "all-7g.80gb", "--scrape-labels", "plain",
        "--shared-slices", "1", "--host-label", "hostname", "--profile-drift"]))
    assert (spec.scrape_labels, spec.shared_slices, spec.host_label, spec.profile_drift,
            spec.layout) == ("plain", 1, "hostname", True, "all-7g.80gb")
    default, _ = simulate.spec_from_args(parser.parse_args(["--start", "0"]))
    assert (default.scrape_labels, default.shared_slices, default.host_label,
            default.profile_drift) == ("kubernetes", 0, "Hostname", False)

"""The seed notebook's query pattern, as instant queries at one pinned instant.

``get_all_queries`` in the seed notebook issues its base queries, learns the (model, version)
pairs from ``inf_rate`` and the MIG slices from ``gpu_tensor_util``, then issues two queries per
pair and two per slice. Here the same PromQL is sent the way prometheus-api-client sends it (GET
``/api/v1/query`` over one requests.Session), evaluated at the exporter's instant; answers are
JSON-decoded but not turned into DataFrames or joined, so its wall time is a lower bound for the
notebook. The seed lists 20 base queries (its comments say 19; ``inf_cache_hits`` is commented
out): all 20 are sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import requests

#: The notebook's DCGM label filter (dcgm-exporter's pod labels arrive as exported_*).
DCGM_FILTER = (
    "exported_container='triton',exported_namespace='triton',"
    "prometheus_replica='prometheus-k8s-0'"
)


def base_queries(w: str) -> dict[str, str]:
    """The seed's first dict of queries, with its window ``step`` = ``w``."""
    per_request = (
        "delta(nv_inference_{phase}_duration_us[" + w + "])"
        "/(1+1000000*delta(nv_inference_request_success[" + w + "]))"
    )
    out = {
        "num_instances": f"count((sum by(pod) (delta(nv_inference_request_success[{w}]))) > 0)",
        "inf_rate_net": f"sum (rate(nv_inference_count[{w}]))",
        "inf_rate_bypod": f"sum by(pod) (rate(nv_inference_count[{w}]))",
        "inf_rate": f"sum by(model, version, pod) (rate(nv_inference_count[{w}]))",
        "inf_cache_hit_rate":
            f"sum by(model, version, pod) (rate(nv_cache_num_hits_per_model[{w}]))",
        "inf_reqs_net": f"sum(rate(nv_inference_request_success[{w}]))",
        "inf_reqs_bypod": f"sum by(pod) (rate(nv_inference_request_success[{w}]))",
        "inf_reqs": f"sum by(model, version, pod) (rate(nv_inference_request_success[{w}]))",
    }
    short = {"request": "req", "queue": "que", "compute_input": "inp",
             "compute_infer": "inf", "compute_output": "out"}
    for phase, name in short.items():
        out[f"inf_{name}_dur_net"] = "avg (" + per_request.format(phase=phase) + ")"
    for phase, name in short.items():
        out[f"inf_{name}_dur"] = "avg by(model, version, pod) (" + per_request.format(
            phase=phase) + ")"
    out["gpu_tensor_util"] = (
        "sum by(device,GPU_I_ID,instance) (avg_over_time (DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{"
        + DCGM_FILTER + "}[" + w + "]))"
    )
    out["gpu_dram_util"] = (
        "sum by(device,GPU_I_ID,instance) (avg_over_time (DCGM_FI_PROF_DRAM_ACTIVE{"
        + DCGM_FILTER + "}[" + w + "]))"
    )
    return out


def model_queries(pairs: list[tuple[str, str]], w: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for model, version in pairs:
        sel = f"model='{model}',version='{version}'"
        out[f"num_instances_{model}/{version}"] = (
            f"count((sum by(pod) (delta(nv_inference_request_success{{{sel}}}[{w}]))) > 0)"
        )
    for model, version in pairs:
        sel = f"model='{model}',version='{version}'"
        out[f"inf_rate_{model}/{version}"] = f"sum (rate(nv_inference_count{{{sel}}}[{w}]))"
    return out


def slice_queries(slices: list[tuple[str, str, str]], w: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, (device, gi, instance) in enumerate(slices):
        sel = f"{DCGM_FILTER},device='{device}',GPU_I_ID='{gi}',instance='{instance}'"
        out[f"gpu_tensor_util_{i}"] = (
            f"sum (avg_over_time(DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{sel}}}[{w}]))"
        )
    for i, (device, gi, instance) in enumerate(slices):
        sel = f"{DCGM_FILTER},device='{device}',GPU_I_ID='{gi}',instance='{instance}'"
        out[f"gpu_dram_util_{i}"] = f"avg (avg_over_time(DCGM_FI_PROF_DRAM_ACTIVE{{{sel}}}[{w}]))"
    return out


@dataclass
class NotebookRun:
    queries: int
    wall: float
    #: Sum over requests of send -> response headers (requests' ``elapsed``).
    http_seconds: float
    pairs: int
    slices: int
    empty: int


class _Client:
    def __init__(self, session: requests.Session, url: str, at: float) -> None:
        self.session = session
        self.url = url.rstrip("/") + "/api/v1/query"
        self.at = f"{at:.3f}"
        self.count = 0
        self.http = 0.0
        self.empty = 0

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = self.session.get(self.url, params={"query": promql, "time": self.at},
                                    timeout=300)
        self.count += 1
        self.http += response.elapsed.total_seconds()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"notebook query {promql!r} failed: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        if not result:
            self.empty += 1
        return result


def run(session: requests.Session, url: str, at: float, window: str) -> NotebookRun:
    """One pass of the notebook's queries at ``at``; pairs and slices learned as it does."""
    client = _Client(session, url, at)
    started = time.perf_counter()
    pairs: set[tuple[str, str]] | None = None
    slices: set[tuple[str, str, str]] | None = None
    for _name, promql in base_queries(window).items():
        result = client.query(promql)
        labels = [item["metric"] for item in result]
        if pairs is None and labels and all("model" in m and "version" in m for m in labels):
            pairs = {(m["model"], m["version"]) for m in labels}
        if slices is None and labels and all("GPU_I_ID" in m for m in labels):
            slices = {(m["device"], m["GPU_I_ID"], m["instance"]) for m in labels}
    pair_list = sorted(pairs or ())
    slice_list = sorted(slices or ())
    for promql in model_queries(pair_list, window).values():
        client.query(promql)
    for promql in slice_queries(slice_list, window).values():
        client.query(promql)
    wall = time.perf_counter() - started
    return NotebookRun(client.count, wall, client.http, len(pair_list), len(slice_list),
                       client.empty)

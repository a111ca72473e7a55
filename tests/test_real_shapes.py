"""The exporter against a fleet shaped as real sources are: a plain scrape (no pod label on any
Triton series), a MIG slice shared by two Triton servers, dcgm-exporter's ``hostname`` label
and a 7g slice that reports its profile as ``7g.79gb``. Every family against the ground truth."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Stack, simulated_stack
from test_integration import assert_matches, run_once, truth

from exporter import catalog
from exporter.lab import promserver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_stack(prometheus_binaries: promserver.PrometheusBinaries,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with simulated_stack(prometheus_binaries, tmp_path_factory.mktemp("prometheus"), scrape=1.0,
                         window=5.0, lead=12, servers=5, models=3, hosts=2, gpus_per_host=2,
                         seed=7, epoch_seconds=20.0, churn=0.3, layout="all-7g.80gb",
                         scrape_labels="plain", shared_slices=1, host_label="hostname",
                         profile_drift=True) as st:
        yield st


def test_once_equals_the_ground_truth_on_real_shapes(real_stack: Stack, tmp_path: Path) -> None:
    at = real_stack.instant()
    got = run_once(real_stack, tmp_path, at)
    want = truth(real_stack, at)
    assert {s.name for s in catalog.SERIES} == {n for n, v in want.items() if v}
    assert_matches(got, want)
    # Servers are named by their instance, and told apart: five of them.
    servers = {dict(labels)["pod"] for labels in got["pod:nv_inference_count:rate"]}
    assert servers == set(real_stack.fleet.server_ids)
    assert all(server.endswith(":8002") for server in servers)
    # The shared slice: a row per pod with equal values, counted once in the fleet sum.
    rows = got["gpu_instance:dcgm_tensor_active:avg"]
    per_slice: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for labels, value in rows.items():
        per_slice.setdefault(tuple(kv for kv in labels if kv[0] != "pod"), []).append(value)
    (shared,) = [values for values in per_slice.values() if len(values) == 2]
    assert shared[0] == shared[1]
    assert got[":dcgm_tensor_active:sum"][()] == pytest.approx(
        sum(values[0] for values in per_slice.values()), rel=1e-12)
    assert all(dict(key)["GPU_I_PROFILE"] == "7g.79gb" for key in per_slice)
    assert got[":dcgm_tensor_active:gpu_equivalents"][()] == pytest.approx(
        got[":dcgm_tensor_active:sum"][()], rel=1e-12)  # every slice is a whole GPU

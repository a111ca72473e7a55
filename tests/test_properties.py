"""Property tests (hypothesis): the upstream response parser and the derive functions.

``make test`` runs each with HYPOTHESIS_EXAMPLES examples (default 200); ``make fuzz`` with
10,000. The parser must turn any JSON (and any body) into a frame or an ``UpstreamError``, and
give back exactly what a valid answer holds. The derive functions, over random fleets, must
never raise, never produce NaN or Inf, keep the concurrency between 1 and the number of
(model, version) pairs, show a drift of exactly 1 (1/k with k identical HA replicas), and add
up across levels.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from exporter import catalog, config, derive, publish
from exporter.catalog import Selectors
from exporter.upstream import (
    PrometheusClient,
    QueryResult,
    UpstreamError,
    decode_json,
    parse_matrix,
    parse_vector,
)

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "200"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the tree; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEL = Selectors.from_config(config.load(None, environ={}))

# --- the parser ------------------------------------------------------------------------------

#: Any text, lone surrogates included (JSON can escape them; no exposition can encode them).
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | any_text
                | st.sampled_from(["NaN", "+Inf", "-Inf", "1", "1e400", "-0", "0x10"]))
any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=25,
)
samples = st.lists(any_json, max_size=3) | st.tuples(
    st.integers() | st.floats(), st.sampled_from(["1", "2.5", "NaN", "+Inf", "-Inf", "x"]))
series_like = st.fixed_dictionaries(
    {"metric": st.dictionaries(any_text, any_text | any_json, max_size=4) | any_json},
    optional={"value": samples | any_json, "values": st.lists(samples, max_size=3) | any_json,
              "histogram": any_json})
near_valid = st.fixed_dictionaries(
    {"status": st.sampled_from(["success", "error"]) | any_json},
    optional={
        "data": st.fixed_dictionaries(
            {"resultType": st.sampled_from(["vector", "matrix", "scalar", "string"]) | any_json,
             "result": st.lists(series_like, max_size=4) | samples | any_json}),
        "warnings": st.lists(any_text, max_size=2) | any_json,
        "errorType": any_json,
        "error": any_json,
    },
)


def parsed_or_refused(parse: Any, document: Any) -> QueryResult | None:
    try:
        result = parse(document, "q")
    except UpstreamError as error:
        assert error.reason in ("bad_response", "api_error")
        assert "\n" not in str(error)
        return None
    assert isinstance(result, QueryResult)
    frame = result.frame
    assert frame["value"].dtype == "float64"
    for column in frame.columns:
        if column not in ("value", "timestamp"):
            assert all(isinstance(v, str) for v in frame[column])
    return result


@PROPERTY
@given(any_json | near_valid)
def test_the_parser_gives_a_frame_or_an_upstream_error_for_any_json(document: Any) -> None:
    parsed_or_refused(parse_vector, document)
    parsed_or_refused(parse_matrix, document)


def decoded(decode: Any, text: str) -> str:
    """What ``decode`` makes of ``text``, or the error it raises, as comparable text."""
    try:
        return json.dumps(decode(text))
    except (ValueError, RecursionError) as error:
        return f"{type(error).__name__}: {error}"


@PROPERTY
@given(near_valid | any_json, st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 1}]),
       st.integers(1, 64), st.integers(0, 10_000), st.sampled_from(["", "x", "}", ",", " "]))
def test_decoding_in_pieces_is_json_loads_for_any_text(
    document: Any, dumps: dict[str, Any], piece: int, at: int, edit: str
) -> None:
    text = json.dumps(document, **dumps)
    for variant in (text, text[:at] + edit + text[at + 1:]):
        assert decoded(lambda t: decode_json(t, piece), variant) == decoded(json.loads, variant)


class _Body(BaseAdapter):
    """A transport answering one status and body (no sockets)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.status, self.body = status, body

    def send(self, request: requests.PreparedRequest, *args: Any,
             **kwargs: Any) -> requests.Response:
        response = requests.Response()
        response.status_code = self.status
        response.headers = CaseInsensitiveDict({"Content-Length": str(len(self.body))})
        response.raw = io.BytesIO(self.body)
        response.request = request
        return response

    def close(self) -> None:
        pass


@PROPERTY
@given(st.sampled_from([200, 200, 200, 204, 302, 400, 422, 429, 500, 503]),
       st.binary(max_size=200) | any_json.map(lambda d: json.dumps(d).encode())
       | near_valid.map(lambda d: json.dumps(d).encode()))
def test_the_client_gives_a_frame_or_an_upstream_error_for_any_body(
    status: int, body: bytes
) -> None:
    cfg = config.UpstreamConfig(url="http://upstream.test", retries=0, bearer_token="tok-123")
    with PrometheusClient(cfg) as client:
        client.session.mount("http://", _Body(status, body))
        try:
            client.instant("up", 1.0)
        except UpstreamError as error:
            assert "tok-123" not in str(error)


label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in ("value", "timestamp"))
label_sets = st.lists(st.dictionaries(label_names, st.text(max_size=8), max_size=4),
                      max_size=8, unique_by=lambda d: tuple(sorted(d.items())))
sample_values = st.floats(allow_nan=True, allow_infinity=True)
timestamps = st.floats(min_value=0, max_value=4e9, allow_nan=False)


def prometheus_value(value: float) -> str:
    """As Prometheus writes a sample value."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@PROPERTY
@given(label_sets.flatmap(lambda sets: st.tuples(
    st.just(sets), st.lists(sample_values, min_size=len(sets), max_size=len(sets)),
    timestamps)))
def test_a_valid_vector_round_trips(case: tuple[list[dict[str, str]], list[float], float]) -> None:
    sets, values, t = case
    result = [{"metric": m, "value": [t, prometheus_value(v)]} for m, v in zip(sets, values,
                                                                              strict=True)]
    frame = parse_vector({"status": "success",
                          "data": {"resultType": "vector", "result": result}}).frame
    names = sorted({n for m in sets for n in m})
    assert list(frame.columns) == [*names, "value"]
    assert len(frame) == len(sets)
    for i, (m, v) in enumerate(zip(sets, values, strict=True)):
        assert {n: frame[n].iloc[i] for n in names} == {n: m.get(n, "") for n in names}
        assert same(float(frame["value"].iloc[i]), v)


@PROPERTY
@given(label_sets.flatmap(lambda sets: st.tuples(st.just(sets), st.lists(
    st.lists(st.tuples(timestamps, sample_values), max_size=4),
    min_size=len(sets), max_size=len(sets)))))
def test_a_valid_matrix_round_trips(
    case: tuple[list[dict[str, str]], list[list[tuple[float, float]]]]
) -> None:
    sets, series = case
    result = [{"metric": m, "values": [[t, prometheus_value(v)] for t, v in points]}
              for m, points in zip(sets, series, strict=True)]
    frame = parse_matrix({"status": "success",
                          "data": {"resultType": "matrix", "result": result}}).frame
    names = sorted({n for m in sets for n in m})
    assert list(frame.columns) == [*names, "timestamp", "value"]
    rows = [(m, t, v) for m, points in zip(sets, series, strict=True) for t, v in points]
    assert len(frame) == len(rows)
    for i, (m, t, v) in enumerate(rows):
        assert {n: frame[n].iloc[i] for n in names} == {n: m.get(n, "") for n in names}
        assert frame["timestamp"].iloc[i] == t
        assert same(float(frame["value"].iloc[i]), v)


# --- derive over random fleets ---------------------------------------------------------------

PROFILES = ["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb", "", "bogus"]
TRITON = [q.name for q in catalog.BASE_QUERIES if q.source is catalog.Source.TRITON]
DCGM = [q.name for q in catalog.BASE_QUERIES if q.source is catalog.Source.DCGM]
#: Rates from 0 to 1e6/s, subnormal ones included: a tiny denominator overflows a ratio to +Inf,
#: which derive drops (see test_a_ratio_never_overflows_to_inf).
rates = st.just(0.0) | st.floats(min_value=0.0, max_value=1e6)


@st.composite
def fleets(draw: st.DrawFn) -> dict[str, Any]:
    pairs = [(f"m{i}", str(draw(st.integers(1, 2)))) for i in range(draw(st.integers(1, 5)))]
    pairs = list(dict.fromkeys(pairs))
    pods = [f"p{i}" for i in range(draw(st.integers(1, 5)))]
    cells = draw(st.lists(st.tuples(st.sampled_from(pods), st.sampled_from(pairs)),
                          min_size=1, max_size=len(pods) * len(pairs), unique=True))
    per_query = {name: [draw(rates) for _ in cells] for name in TRITON}
    slices = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 7),
                                     st.sampled_from(PROFILES), st.sampled_from(["", *pods])),
                           max_size=6, unique_by=lambda s: s[:2]))
    activity = {name: [draw(st.floats(0, 1)) for _ in slices] for name in DCGM}
    return {
        "pairs": pairs, "pods": pods, "cells": cells, "per_query": per_query,
        "slices": slices, "activity": activity,
        "replicas": draw(st.integers(1, 3)),
        "unlabeled": [draw(st.floats(min_value=0.001, max_value=1e3))
                      for _ in range(draw(st.integers(0, 2)))],
    }


def frames_of(fleet: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The base query answers for ``fleet``: every series repeated on each identical replica."""
    replicas = [f"prom-{r}" for r in range(fleet["replicas"])]
    frames = {}
    for name in TRITON:
        rows = [{"model": m, "version": v, "pod": pod, "prometheus_replica": r, "value": value}
                for r in replicas
                for (pod, (m, v)), value in zip(fleet["cells"], fleet["per_query"][name],
                                               strict=True)]
        rows += [{"model": "", "version": "", "pod": fleet["pods"][0], "prometheus_replica": r,
                  "value": value} for r in replicas for value in fleet["unlabeled"]]
        frames[name] = pd.DataFrame(rows)
    for name in DCGM:
        rows = [{"instance": f"10.0.0.{gpu}:9400", "device": f"nvidia{gpu}", "GPU_I_ID": str(gi),
                 "GPU_I_PROFILE": profile, "exported_pod": pod, "prometheus_replica": r,
                 "value": value}
                for r in replicas
                for (gpu, gi, profile, pod), value in zip(fleet["slices"],
                                                          fleet["activity"][name], strict=True)]
        frames[name] = (pd.DataFrame(rows) if rows else pd.DataFrame({"value": []}))
    return frames


def total(table: pd.DataFrame) -> float:
    return float(table["value"].sum())


def scalar(table: pd.DataFrame) -> float | None:
    return float(table["value"].iloc[0]) if len(table) else None


@PROPERTY
@given(fleets())
def test_derive_over_random_fleets(fleet: dict[str, Any]) -> None:
    out = derive.derive_all(frames_of(fleet), SEL)
    errors = {k: v for k, v in out.items() if isinstance(v, derive.DeriveError)}
    assert not errors
    tables = {k: v for k, v in out.items() if isinstance(v, pd.DataFrame)}
    for name, table in tables.items():
        assert table["value"].map(math.isfinite).all(), name

    # Levels add up: sum over pods = sum over models = the fleet figure.
    for metric in ("nv_inference_count", "nv_inference_request_success",
                   "nv_inference_request_failure"):
        fleet_rate = scalar(tables[f":{metric}:rate"])
        per_pod = tables[f"pod:{metric}:rate"]
        per_model = tables[f"model_version:{metric}:rate"]
        cells = tables[f"model_version_pod:{metric}:rate"]
        assert fleet_rate is not None  # every cell is a series, zero rates included
        for level in (per_pod, per_model, cells):
            assert total(level) == pytest.approx(fleet_rate, rel=1e-9, abs=1e-9)

    # Dedup of identical replicas is exact; the drift is 1/k, lower with unlabeled series.
    count = fleet["per_query"]["count"]
    cells = tables["model_version_pod:nv_inference_count:rate"]
    assert sorted(cells["value"]) == pytest.approx(sorted(count))
    drift = scalar(tables[":triton_inference_rate_drift:ratio"])
    k, unlabeled = fleet["replicas"], sum(fleet["unlabeled"])
    raw = k * (sum(count) + unlabeled)
    assert scalar(tables[":nv_inference_count:rate_raw"]) == pytest.approx(raw, rel=1e-9)
    if raw > 0:
        assert drift == pytest.approx(sum(count) / raw, rel=1e-9)
        if not unlabeled:
            assert drift == pytest.approx(1 / k, rel=1e-12)
        else:
            assert drift < 1 / k
    else:
        assert drift is None  # 0/0 is absent, never NaN

    # Concurrency: between 1 and the number of (model, version) pairs.
    concurrency = scalar(tables[":triton_model_concurrency:ratio"])
    servers = scalar(tables[":triton_servers_active:count"])
    success = dict(zip(fleet["cells"], fleet["per_query"]["success"], strict=True))
    busy_pods = {pod for (pod, _), rate in success.items() if rate > 0}
    assert servers == len(busy_pods)
    if busy_pods:
        assert concurrency is not None
        assert 1 - 1e-12 <= concurrency <= len(fleet["pairs"]) + 1e-12
        assert total(tables["pod:triton_models_active:count"]) == total(
            tables["model_version:triton_servers_active:count"]) == scalar(
            tables[":triton_model_servers_active:sum"])
    else:
        assert concurrency is None

    # Slices: GPU-equivalents never exceed the summed activity; idle slices are slices.
    slices = tables["gpu_instance:dcgm_tensor_active:avg"]
    if len(slices):
        equivalents = scalar(tables[":dcgm_tensor_active:gpu_equivalents"]) or 0.0
        assert equivalents <= total(slices) + 1e-9
        assert 0 <= (scalar(tables[":dcgm_mig_slices_idle:count"]) or 0) <= len(slices)

    # And what would be published renders and parses, with nothing non-finite.
    publisher = publish.Publisher(60)
    publisher.publish(out, {s.name: s.labels(SEL) for s in catalog.SERIES}, 0.0, True)
    for family in text_string_to_metric_families(publisher.derived_body().decode()):
        for sample in family.samples:
            assert math.isfinite(sample.value)


def test_a_ratio_never_overflows_to_inf() -> None:
    """Found by test_derive_over_random_fleets: 1.0 / 2.2e-309 / 1e6 is +Inf."""
    fleet = {
        "pairs": [("m0", "1")], "pods": ["p0"], "cells": [("p0", ("m0", "1"))],
        "per_query": {name: [1.0] for name in TRITON} | {"success": [2.2e-309]},
        "slices": [], "activity": {name: [] for name in DCGM}, "replicas": 1, "unlabeled": [],
    }
    out = derive.derive_all(frames_of(fleet), SEL)
    table = out["model_version:nv_inference_compute_infer_duration:mean_seconds"]
    assert isinstance(table, pd.DataFrame)
    assert table["value"].map(math.isfinite).all()

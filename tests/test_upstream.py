"""Unit tests for exporter.upstream.

Three seams: the pure parse functions; a fake transport adapter mounted on the client's session
(no sockets); and a scripted ThreadingHTTPServer on 127.0.0.1 for what only a real socket shows
(urllib3 retries, Retry-After, timeouts, refused connections, TLS, headers on the wire).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest
import requests
from pydantic import SecretStr
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import InsecureRequestWarning

from exporter import upstream
from exporter.config import ConfigError, UpstreamConfig
from exporter.upstream import (
    OUTCOMES,
    REASONS,
    PrometheusClient,
    Querier,
    QueryResult,
    ResponseBudget,
    UpstreamError,
    parse_envelope,
    parse_matrix,
    parse_vector,
)

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
TOKEN = "s3cr3t-T0ken-do-not-leak"
PASSWORD = "hunter2-correct-horse"


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def vector(*series: tuple[dict[str, str], str]) -> dict[str, Any]:
    result = [{"metric": m, "value": [1700000000.0, v]} for m, v in series]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def make_cfg(url: str, **overrides: Any) -> UpstreamConfig:
    base: dict[str, Any] = {"url": url, "timeout": 2.0, "retries": 2, "backoff": 0.001}
    base.update(overrides)
    return UpstreamConfig.model_validate(base)


# --- scripted HTTP server -----------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: bytes = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    #: True: the real length; an int: that (false) length; None: no header (close-delimited).
    content_length: bool | int | None = True
    #: FakeTransport only: the body as a readable object instead of ``body`` (see HeldBody).
    raw: Any = None


@dataclass
class Seen:
    method: str
    path: str
    params: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names


Script = Answer | Callable[[Seen], Answer]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    script: list[Script]
    seen: list[Seen]
    release: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on a slow answer are expected here


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else ""
        parts = urlsplit(self.path)
        seen = Seen(
            method=self.command,
            path=parts.path,
            params=parse_qs(parts.query),
            form=parse_qs(raw),
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        server = self.server
        server.seen.append(seen)
        script = server.script.pop(0) if len(server.script) > 1 else server.script[0]
        answer = script(seen) if callable(script) else script
        if answer.delay:
            server.release.wait(answer.delay)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        if answer.content_length is True:
            self.send_header("Content-Length", str(len(answer.body)))
        elif answer.content_length is not None and answer.content_length is not False:
            self.send_header("Content-Length", str(answer.content_length))
        self.end_headers()
        with contextlib.suppress(OSError):  # the client may have given up already
            self.wfile.write(answer.body)


class ScriptedServer:
    """Replays ``script`` (the last entry repeats) and records every request in ``seen``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.script = [Answer()]
        self.httpd.seen = []
        self.httpd.release = threading.Event()
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, *script: Script) -> None:
        self.httpd.script = list(script)

    @property
    def seen(self) -> list[Seen]:
        return self.httpd.seen

    def stop(self) -> None:
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.stop()


ClientFactory = Callable[..., PrometheusClient]


@pytest.fixture
def client_for() -> Iterator[ClientFactory]:
    made: list[PrometheusClient] = []

    def make(
        url: str, on_request: Callable[[str, float], None] | None = None, **overrides: Any
    ) -> PrometheusClient:
        client = PrometheusClient(make_cfg(url, **overrides), on_request=on_request)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# --- fake transport -----------------------------------------------------------------------------


class FakeTransport(BaseAdapter):
    """A requests transport that answers from a script and keeps what it was sent."""

    def __init__(self, *script: Answer | Exception) -> None:
        super().__init__()
        self.script = list(script)
        self.sent: list[requests.PreparedRequest] = []
        self.options: list[dict[str, Any]] = []

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        self.sent.append(request)
        self.options.append({"stream": stream, "timeout": timeout, "verify": verify})
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        response = requests.Response()
        response.status_code = step.status
        headers = dict(step.headers)
        if step.content_length is True:
            headers["Content-Length"] = str(len(step.body))
        elif isinstance(step.content_length, int) and step.content_length is not False:
            headers["Content-Length"] = str(step.content_length)
        response.headers = CaseInsensitiveDict(headers)
        response.raw = step.raw if step.raw is not None else io.BytesIO(step.body)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


FAKE_URL = "http://upstream.test:9009/prometheus"


@pytest.fixture
def fake_for() -> Iterator[Callable[..., tuple[PrometheusClient, FakeTransport]]]:
    made: list[PrometheusClient] = []

    def make(
        *script: Answer | Exception,
        on_request: Callable[[str, float], None] | None = None,
        **overrides: Any,
    ) -> tuple[PrometheusClient, FakeTransport]:
        client = PrometheusClient(make_cfg(FAKE_URL, **overrides), on_request=on_request)
        transport = FakeTransport(*script)
        client.session.mount("http://", transport)
        made.append(client)
        return client, transport

    yield make
    for client in made:
        client.close()


def form_of(request: requests.PreparedRequest) -> dict[str, list[str]]:
    body = request.body
    text = body.decode() if isinstance(body, bytes) else (body or "")
    return parse_qs(text)


# === pure parsing ===============================================================================


def test_vector_fixture_frame_contract() -> None:
    result = parse_vector(fixture("vector_triton.json"), "q")
    frame = result.frame
    assert list(frame.columns) == ["__name__", "model", "pod", "version", "value"]
    assert frame["value"].dtype == np.float64
    for name in ("__name__", "model", "pod", "version"):
        assert pd.api.types.is_string_dtype(frame[name].dtype), name
    assert frame["model"].tolist() == [
        "particlenet_aa",
        "pn_demo",
        "svj_tch_gnn",
        "svj_tch_gnn",
        "pn_demo",
    ]
    # a series lacking a label gets "" (never NaN/None)
    assert frame["version"].tolist() == ["1", "1", "", "2", "1"]
    assert frame["__name__"].tolist() == ["", "", "", "nv_inference_count", ""]
    values = frame["value"].tolist()
    assert values[0] == 12.5
    assert math.isnan(values[1])
    assert values[2] == math.inf
    assert values[3] == -math.inf
    assert values[4] == pytest.approx(0.000123)
    assert len(result.warnings) == 1
    assert "might not be a counter" in result.warnings[0]


def test_vector_columns_are_sorted_union_of_labels() -> None:
    frame = parse_vector(vector(({"b": "1", "a": "x"}, "1"), ({"c": "z"}, "2"))).frame
    assert list(frame.columns) == ["a", "b", "c", "value"]
    assert frame.to_dict("list") == {
        "a": ["x", ""],
        "b": ["1", ""],
        "c": ["", "z"],
        "value": [1.0, 2.0],
    }


def test_vector_irregular_input_takes_the_checked_path_with_same_result() -> None:
    regular = vector(({"a": "x"}, "1.5"), ({"a": "y"}, "NaN"), ({}, "+Inf"), ({}, "-Inf"))
    # JSON numbers instead of strings, and read-only mappings: valid, but not the bulk path's shape
    irregular = {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [
                {"metric": types.MappingProxyType({"a": "x"}), "value": [1700000000, 1.5]},
                {"metric": {"a": "y"}, "value": [1700000000.0, "NaN"]},
                {"metric": {}, "value": [1700000000.0, "+Inf"]},
                {"metric": {}, "value": [1700000000.0, "-Inf"]},
            ],
        },
    }
    frame = parse_vector(irregular).frame
    pd.testing.assert_frame_equal(parse_vector(regular).frame, frame)
    assert frame["value"].tolist()[2:] == [math.inf, -math.inf]


def answer_text(count: int, **dumps: Any) -> str:
    """An instant answer of ``count`` series whose label values look like JSON syntax."""
    tricky = ['},{"metric":', '"result":[', "]}}", "\\", '\\"', "{", "ü \u2028", "a"]
    result = [{"metric": {"pod": f"p{i}", "odd": tricky[i % len(tricky)]},
               "value": [1700000000.5, str(i)]} for i in range(count)]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result},
                       "warnings": ["w"]}, **dumps)


@pytest.mark.parametrize("dumps", [
    {"separators": (",", ":")}, {}, {"indent": 1}, {"ensure_ascii": False}],
    ids=["compact", "spaced", "indented", "unicode"])
def test_a_long_answer_is_decoded_in_pieces_to_what_json_loads_gives(
    dumps: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = answer_text(200, **dumps)
    expected = json.loads(text)
    decoded: list[int] = []
    loads = json.loads

    def recording(piece: str) -> Any:
        decoded.append(len(piece))
        return loads(piece)

    monkeypatch.setattr(upstream.json, "loads", recording)
    assert upstream.decode_json(text, piece=500) == expected
    # Series a few at a time, and the envelope without them: never the whole text at once.
    assert len(decoded) > 10
    assert max(decoded) < 1000


@pytest.mark.parametrize("text", [
    answer_text(0), answer_text(1), answer_text(200).replace('"w"', '"result"'),
    answer_text(200).replace('"pod"', '"result"'), json.dumps(list(range(2000))),
    json.dumps({"data": {"result": list(range(2000))}}),
    json.dumps({"status": "success", "data": [{"metric": {}, "x": 1}] * 200, "result": []}),
])
def test_any_other_json_decodes_as_json_loads_decodes_it(text: str) -> None:
    assert upstream.decode_json(text, piece=100) == json.loads(text)


def _cuts(text: str) -> Iterator[str]:
    for at in range(0, len(text), 97):
        yield text[:at]
        yield text[:at] + "x" + text[at:]
        yield text[:at] + text[at + 1:]
    yield text + "x"
    yield text.replace(",", "\u00a0,", 5)
    yield text.replace("},{", "}\u00a0,{")


def test_invalid_json_fails_as_json_loads_fails() -> None:
    for text in _cuts(answer_text(40)):
        try:
            expected: Any = json.loads(text)
        except (ValueError, RecursionError) as error:
            with pytest.raises(type(error)) as caught:
                upstream.decode_json(text, piece=100)
            assert str(caught.value) == str(error)
        else:
            assert upstream.decode_json(text, piece=100) == expected


def test_long_columns_are_converted_a_slice_at_a_time_to_the_same_arrays() -> None:
    count = 2 * upstream.SLICE + 3
    texts = [["1.5", "NaN", "+Inf", "-Inf", "1e300"][i % 5] for i in range(count)]
    np.testing.assert_array_equal(upstream._floats(texts), np.array(texts, dtype=np.float64))
    labels = [f"pod-{i % 7}" for i in range(count)]
    converted = upstream._labels(labels)
    assert converted.dtype == pd.Series(["x"]).dtype
    assert converted.tolist() == labels
    frame = parse_vector(vector(*(({"pod": p}, t) for p, t in zip(labels, texts, strict=True))))
    assert frame.frame["pod"].tolist() == labels


def test_release_frees_the_series_of_a_decoded_answer_in_place() -> None:
    payload = vector(*(({"pod": str(i)}, "1") for i in range(upstream.SLICE + 5)))
    series = payload["data"]["result"]
    upstream.release(payload)
    assert series == [] and payload["data"]["result"] is series
    for other in (None, [], {"data": []}, {"data": {"result": "x"}}):
        upstream.release(other)  # anything else is left as it is


def test_answers_are_decoded_and_parsed_holding_the_cpu_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = threading.Lock()
    held: list[bool] = []
    decode, parse = upstream.decode_json, upstream.parse_vector

    def decoding(text: str) -> Any:
        held.append(cpu.locked())
        return decode(text)

    def parsing(payload: Any, query: str | None = None) -> QueryResult:
        held.append(cpu.locked())
        return parse(payload, query)

    monkeypatch.setattr(upstream, "decode_json", decoding)
    monkeypatch.setattr(upstream, "parse_vector", parsing)
    with PrometheusClient(make_cfg(FAKE_URL), cpu=cpu) as client:
        client.session.mount("http://", FakeTransport(
            Answer(body=fixture_bytes("vector_triton.json"))))
        assert len(client.instant("up", 1.0).frame) == 5
    assert held == [True, True] and not cpu.locked()


def test_a_scalar_answer_where_a_vector_is_expected_is_bad_response_naming_the_query() -> None:
    # Accepted, it became one row without labels: a phantom MIG slice published as healthy.
    with pytest.raises(UpstreamError) as caught:
        parse_vector(fixture("scalar.json"), "scalar(1)")
    assert caught.value.reason == "bad_response"
    assert str(caught.value) == ("upstream query 'scalar(1)' failed (bad_response): resultType "
                                 "is 'scalar', expected 'vector'")


def test_a_one_row_vector_without_labels_is_one_row_without_label_columns() -> None:
    result = parse_vector(fixture("vector_42.json"), "sum(up)")
    assert list(result.frame.columns) == ["value"]
    assert result.frame["value"].tolist() == [42.0]
    assert result.frame["value"].dtype == np.float64
    assert result.warnings == ()


def test_matrix_fixture_long_frame() -> None:
    frame = parse_matrix(fixture("matrix_dcgm.json"), "q").frame
    assert list(frame.columns) == [
        "GPU_I_ID",
        "GPU_I_PROFILE",
        "device",
        "exported_pod",
        "instance",
        "timestamp",
        "value",
    ]
    assert len(frame) == 5
    assert frame["timestamp"].dtype == np.float64
    assert frame["value"].dtype == np.float64
    assert frame["GPU_I_ID"].tolist() == ["2", "2", "2", "9", "9"]
    assert frame["GPU_I_PROFILE"].tolist() == ["3g.40gb"] * 3 + ["", ""]
    assert frame["timestamp"].tolist() == [
        1763990400.0,
        1763990430.0,
        1763990460.0,
        1763990400.0,
        1763990430.25,
    ]
    values = frame["value"].tolist()
    assert values[:2] == [0.31, 0.35]
    assert math.isnan(values[2])
    assert values[3:] == [0.0, 0.001]


def test_matrix_series_without_samples_adds_no_rows() -> None:
    payload = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [
                {"metric": {"a": "x"}, "values": []},
                {"metric": {"a": "y"}, "values": [[10, "+Inf"], [20, "-Inf"]]},
            ],
        },
    }
    frame = parse_matrix(payload).frame
    assert frame["a"].tolist() == ["y", "y"]
    assert frame["value"].tolist() == [math.inf, -math.inf]


def test_matrix_bulk_and_checked_paths_agree() -> None:
    regular = fixture("matrix_dcgm.json")
    irregular = json.loads(json.dumps(regular))
    irregular["data"]["result"][1]["values"][0][1] = 0  # a bare number: checked path
    pd.testing.assert_frame_equal(parse_matrix(regular).frame, parse_matrix(irregular).frame)


@pytest.mark.parametrize(
    ("parse", "result_type", "columns"),
    [(parse_vector, "vector", ["value"]), (parse_matrix, "matrix", ["timestamp", "value"])],
)
def test_empty_result_has_only_value_columns(
    parse: Callable[[Mapping[str, Any], str | None], QueryResult],
    result_type: str,
    columns: list[str],
) -> None:
    payload = {"status": "success", "data": {"resultType": result_type, "result": []}}
    frame = parse(payload, "absent_metric").frame
    assert list(frame.columns) == columns
    assert len(frame) == 0
    assert all(frame[c].dtype == np.float64 for c in columns)


def test_status_error_is_api_error_naming_type_and_text() -> None:
    payload = {"status": "error", "errorType": "execution", "error": "too many samples"}
    with pytest.raises(UpstreamError) as caught:
        parse_vector(payload, "sum(rate(x[5m]))")
    error = caught.value
    assert error.reason == "api_error"
    assert error.error_type == "execution"
    assert error.query == "sum(rate(x[5m]))"
    assert error.status is None
    assert "execution: too many samples" in str(error)
    assert "sum(rate(x[5m]))" in str(error)


def _ok(data: Any) -> dict[str, Any]:
    return {"status": "success", "data": data}


MALFORMED: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "not an object"),
    ("no status", {"data": {}}, "status is None"),
    ("no data", {"status": "success"}, "no 'data'"),
    ("data not object", _ok([1]), "'data' is not an object"),
    ("no resultType", _ok({"result": []}), "no 'resultType'"),
    ("no result", _ok({"resultType": "vector"}), "no 'result'"),
    ("result not list", _ok({"resultType": "vector", "result": {}}), "not a list"),
    ("item not object", _ok({"resultType": "vector", "result": [1]}), "result[0] is not an"),
    (
        "metric not object",
        _ok({"resultType": "vector", "result": [{"metric": [], "value": [1, "1"]}]}),
        "result[0].metric is not an object",
    ),
    (
        "value not a pair",
        _ok({"resultType": "vector", "result": [{"metric": {}, "value": "1"}]}),
        "result[0].value is not a [timestamp",
    ),
    (
        "value of three",
        _ok({"resultType": "vector", "result": [{"metric": {}, "value": [1, "2", "3"]}]}),
        "is not a [timestamp",
    ),
    (
        "value not numeric",
        _ok(
            {
                "resultType": "vector",
                "result": [
                    {"metric": {}, "value": [1, "1"]},
                    {"metric": {}, "value": [1, "twelve"]},
                ],
            }
        ),
        "result[1].value: could not convert string to float: 'twelve'",
    ),
    (
        "timestamp not numeric",
        _ok({"resultType": "vector", "result": [{"metric": {}, "value": ["now", "1"]}]}),
        "timestamp is not a number",
    ),
    (
        "value null",
        _ok({"resultType": "vector", "result": [{"metric": {}, "value": [1, None]}]}),
        "not a number: None",
    ),
    (
        "label value not string",
        _ok({"resultType": "vector", "result": [{"metric": {"gpu": 0}, "value": [1, "1"]}]}),
        "label 'gpu' has a value that is not a string",
    ),
    (
        "native histogram",
        _ok({"resultType": "vector", "result": [{"metric": {}, "histogram": [1, {}]}]}),
        "native histogram",
    ),
    (
        "label clashes with value column",
        _ok({"resultType": "vector", "result": [{"metric": {"value": "x"}, "value": [1, "1"]}]}),
        "clash",
    ),
    ("warnings not list", {**_ok({"resultType": "vector", "result": []}), "warnings": "w"}, "warn"),
    ("string result", _ok({"resultType": "string", "result": [1, "x"]}), "'string'"),
    ("matrix for instant", _ok({"resultType": "matrix", "result": []}), "expected 'vector'"),
]


@pytest.mark.parametrize(
    ("payload", "fragment"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_vector_is_bad_response(payload: Any, fragment: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_vector(payload, "up")
    assert caught.value.reason == "bad_response"
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("result", "fragment"),
    [
        ([{"metric": {}, "values": "x"}], "result[0].values is not a list"),
        (
            [{"metric": {}, "values": [[1, "1"]]}, {"metric": {}, "values": [[1, "1"], [2, "x"]]}],
            "result[1].values[1]",
        ),
        ([{"metric": {}, "values": [[1, "1", 3]]}], "result[0].values[0] is not a [timestamp"),
        ([{"metric": {}, "histograms": [[1, {}]]}], "native histogram"),
        ([{"metric": {"timestamp": "t"}, "values": [[1, "1"]]}], "clash"),
    ],
)
def test_malformed_matrix_is_bad_response(result: Any, fragment: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_matrix(_ok({"resultType": "matrix", "result": result}), "up[1m]")
    assert caught.value.reason == "bad_response"
    assert fragment in str(caught.value)


def test_vector_answer_to_range_parse_is_bad_response() -> None:
    with pytest.raises(UpstreamError, match="expected 'matrix'") as caught:
        parse_matrix(vector(({}, "1")), "up")
    assert caught.value.reason == "bad_response"


def test_warnings_are_returned_and_logged_once_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    payload = {**vector(({}, "1")), "warnings": ["w-one", "w-two"]}
    with caplog.at_level(logging.DEBUG, logger="exporter.upstream"):
        result = parse_vector(payload, "up")
    assert result.warnings == ("w-one", "w-two")
    records = [r for r in caplog.records if "w-one" in r.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG


def test_parse_envelope_returns_data_and_warnings() -> None:
    data, found = parse_envelope({"status": "success", "data": ["a"], "warnings": ["w"]})
    assert data == ["a"]
    assert found == ("w",)


def test_error_text_is_one_line_with_truncated_query() -> None:
    query = 'sum by (model) (\n  rate(nv_inference_count{namespace="triton"}[2m])\n)' + " + 1" * 80
    error = UpstreamError("http_4xx", "HTTP 400:\nbad_data: parse error", query=query, status=400)
    text = str(error)
    assert "\n" not in text
    assert "(http_4xx)" in text
    assert "bad_data: parse error" in text
    assert "sum by (model) ( rate(nv_inference_count" in text
    shown = text.split("query ", 1)[1].split(" failed", 1)[0]
    assert len(shown) <= 125  # 120 characters and the quotes
    assert shown.endswith("...'")


def test_reasons_are_the_fixed_label_set() -> None:
    assert set(REASONS) == {
        "connection",
        "timeout",
        "http_4xx",
        "http_5xx",
        "api_error",
        "bad_response",
        "too_large",
        "over_budget",
    }
    assert ("ok", *REASONS) == OUTCOMES


def test_parse_100k_series() -> None:
    result = [
        {
            "metric": {
                "__name__": "nv_inference_count",
                "model": f"m{i % 50}",
                "pod": f"triton-{i}",
                "instance": f"10.0.{i % 250}.{i % 7}:8002",
                "version": "1",
            },
            "value": [1700000000.0, str(i)],
        }
        for i in range(100_000)
    ]
    payload = {"status": "success", "data": {"resultType": "vector", "result": result}}
    frame = parse_vector(payload, "q").frame
    assert frame.shape == (100_000, 6)
    assert frame["value"].iloc[-1] == 99_999.0
    assert frame["pod"].iloc[12_345] == "triton-12345" and frame["model"].nunique() == 50


# === client over a fake transport ===============================================================


def test_instant_posts_form_to_prefixed_endpoint(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, transport = fake_for(Answer(body=fixture_bytes("vector_triton.json")), timeout=10)
    querier: Querier = client
    result = querier.instant(
        'sum by (model) (rate(nv_inference_count{a="b"}[2m]))', 1700000000.1234
    )
    assert len(result.frame) == 5
    (sent,) = transport.sent
    assert sent.method == "POST"
    assert sent.url == f"{FAKE_URL}/api/v1/query"
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form_of(sent) == {
        "query": ['sum by (model) (rate(nv_inference_count{a="b"}[2m]))'],
        "time": ["1700000000.123"],
        "timeout": ["10s"],
    }
    assert sent.headers["User-Agent"].startswith("triton-mig-exporter/")
    assert transport.options[0]["stream"] is True
    assert transport.options[0]["timeout"] == (10.0, 10.0)


def test_range_posts_start_end_step(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, transport = fake_for(Answer(body=fixture_bytes("matrix_dcgm.json")))
    result = client.range("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1763990400, 1763990460.5, 30)
    assert list(result.frame.columns)[-2:] == ["timestamp", "value"]
    (sent,) = transport.sent
    assert sent.url == f"{FAKE_URL}/api/v1/query_range"
    assert form_of(sent) == {
        "query": ["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"],
        "start": ["1763990400.000"],
        "end": ["1763990460.500"],
        "step": ["30.000"],
        "timeout": ["2s"],
    }


def test_instant_rejects_a_matrix_answer(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(Answer(body=fixture_bytes("matrix_dcgm.json")))
    with pytest.raises(UpstreamError, match="expected 'vector'") as caught:
        client.instant("x[1m]", 1.0)
    assert caught.value.reason == "bad_response"


def test_metadata_endpoints(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, transport = fake_for(
        Answer(body=fixture_bytes("labels.json")),
        Answer(body=fixture_bytes("label_values.json")),
        Answer(body=fixture_bytes("series.json")),
        Answer(body=fixture_bytes("buildinfo_prometheus.json")),
        Answer(body=fixture_bytes("buildinfo_mimir.json")),
    )
    assert "GPU_I_PROFILE" in client.label_names()
    assert client.label_values("model", match=['{job="triton"}']) == [
        "particlenet_aa",
        "pn_demo",
        "svj_tch_gnn",
    ]
    series = client.series(["nv_inference_count"], 100.0, 200.0)
    assert series[1]["model"] == "svj_tch_gnn"
    assert client.build_info()["version"] == "2.42.0+ds"
    mimir = client.build_info()
    assert mimir["application"] == "Grafana Mimir"
    assert mimir["features.query_sharding"] == "false"

    labels, values, series_req, info, _ = transport.sent
    assert (labels.method, labels.url) == ("GET", f"{FAKE_URL}/api/v1/labels")
    assert values.method == "GET"
    assert urlsplit(str(values.url)).path == "/prometheus/api/v1/label/model/values"
    assert parse_qs(urlsplit(str(values.url)).query) == {"match[]": ['{job="triton"}']}
    assert (series_req.method, series_req.url) == ("POST", f"{FAKE_URL}/api/v1/series")
    assert form_of(series_req) == {
        "match[]": ["nv_inference_count"],
        "start": ["100.000"],
        "end": ["200.000"],
    }
    assert info.url == f"{FAKE_URL}/api/v1/status/buildinfo"


def test_label_values_escapes_the_name(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, transport = fake_for(Answer(body=fixture_bytes("label_values.json")))
    client.label_values("../admin?x")
    assert (
        urlsplit(str(transport.sent[0].url)).path
        == "/prometheus/api/v1/label/..%2Fadmin%3Fx/values"
    )


def test_metadata_with_wrong_shape_is_bad_response(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(Answer(body=b'{"status":"success","data":[1,2]}'))
    with pytest.raises(UpstreamError, match="list of strings") as caught:
        client.label_names()
    assert caught.value.reason == "bad_response"
    assert caught.value.query is None
    assert "GET /api/v1/labels" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"<html>hello</html>", "not valid JSON"),
        (b'{"status":"success","data":{"resultType":"vec', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
    ids=["html", "truncated-json", "empty", "binary"],
)
def test_unparseable_body_is_bad_response(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]], body: bytes, fragment: str
) -> None:
    client, _ = fake_for(Answer(body=body))
    with pytest.raises(UpstreamError, match=fragment) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "bad_response"
    assert caught.value.status == 200


@pytest.mark.parametrize("body, fragment", [
    (b"7", "answer is a JSON int"), (b"{}", "answer status is None"), (b"[]", "JSON list")])
def test_answers_of_a_few_bytes_are_decoded_as_utf8(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]], body: bytes, fragment: str
) -> None:
    client, _ = fake_for(Answer(body=body, content_length=None))
    with pytest.raises(UpstreamError, match=fragment) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "bad_response"


def test_a_body_that_is_not_utf8_shows_its_start_without_the_token(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    body = b"\xff denied: Bearer " + TOKEN.encode() + b" " * 200
    client, _ = fake_for(Answer(body=body), bearer_token=TOKEN)
    with pytest.raises(UpstreamError, match="not valid JSON") as caught:
        client.instant("up", 1.0)
    assert "denied: Bearer <redacted>" in str(caught.value)
    assert TOKEN not in str(caught.value) and TOKEN[:20] not in str(caught.value)


def test_redirect_is_not_followed(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, transport = fake_for(
        Answer(status=302, body=b"", headers={"Location": "https://other.test/api/v1/query"})
    )
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "bad_response"
    assert caught.value.status == 302
    assert "https://other.test/api/v1/query" in str(caught.value)
    assert len(transport.sent) == 1


def test_html_gateway_error_is_http_5xx_with_snippet(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(Answer(status=502, body=b"<html>\n<h1>502 Bad Gateway</h1>\n</html>"))
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "http_5xx"
    assert caught.value.status == 502
    assert "HTTP 502: <html> <h1>502 Bad Gateway</h1> </html>" in str(caught.value)


@pytest.mark.parametrize("declared", [True, None], ids=["content-length", "streamed"])
def test_body_over_the_bound_is_too_large(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]], declared: bool | None
) -> None:
    body = json.dumps(vector(*[({"i": str(i)}, "1") for i in range(200)])).encode()
    client, _ = fake_for(
        Answer(body=body, content_length=declared), max_response_bytes=len(body) - 1
    )
    with pytest.raises(UpstreamError, match="max_response_bytes") as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "too_large"


def test_body_at_the_bound_is_accepted(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    body = json.dumps(vector(({"i": "1"}, "1"))).encode()
    client, _ = fake_for(Answer(body=body, content_length=None), max_response_bytes=len(body))
    assert client.instant("up", 1.0).frame["value"].tolist() == [1.0]


# --- the budget the answers in flight share (upstream.max_cycle_response_bytes) ---


def padded(size: int) -> bytes:
    """A valid vector answer of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    body = json.dumps(vector(({"pod": "p"}, "7"))).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


class HeldBody:
    """A response body that gives its first ``head`` bytes, then waits for ``go`` for the rest:
    an answer still being read while other calls run."""

    def __init__(self, data: bytes, head: int, go: threading.Event) -> None:
        self.data, self.head, self.go, self.pos = data, head, go, 0

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.head:
            self.go.wait(10)  # then b"" (a cut answer) if the test never says go
        end = len(self.data) if self.go.is_set() else self.head
        size = end - self.pos if size < 0 else min(size, end - self.pos)
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass


def test_response_budget_takes_what_fits_and_nothing_else() -> None:
    budget = ResponseBudget(100)
    assert budget.take(60) and budget.held == 60
    assert not budget.take(41) and budget.held == 60  # refused whole, nothing taken
    assert budget.take(40) and budget.held == 100
    budget.give(100)
    assert budget.held == 0 and budget.take(100)
    with pytest.raises(ValueError):
        ResponseBudget(0)


def test_the_cycle_budget_defaults_to_two_answers(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(Answer(), max_response_bytes=1000)
    assert client.budget.limit == 2000
    client, _ = fake_for(Answer(), max_response_bytes=1000, max_cycle_response_bytes=1500)
    assert client.budget.limit == 1500


@pytest.mark.parametrize("declared", [True, None], ids=["content-length", "streamed"])
def test_an_answer_that_does_not_fit_in_what_is_left_is_over_budget(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]], declared: bool | None
) -> None:
    calls: list[str] = []
    client, _ = fake_for(
        Answer(body=padded(150_000), content_length=declared),
        max_response_bytes=200_000,
        max_cycle_response_bytes=200_000,
        on_request=lambda outcome, seconds: calls.append(outcome),
    )
    assert client.budget.take(100_000)  # another query of the cycle holds half of it
    with pytest.raises(UpstreamError, match="max_cycle_response_bytes=200000") as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "over_budget"
    assert "query 'up'" in str(caught.value)
    assert client.budget.held == 100_000  # the refused answer gave back what it had read
    client.budget.give(100_000)  # the other query is done: the same answer now fits
    assert client.instant("up", 1.0).frame["value"].tolist() == [7.0]
    assert client.budget.held == 0
    assert calls == ["over_budget", "ok"]


def test_one_call_after_another_each_gets_the_whole_budget(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(Answer(body=padded(90_000), content_length=None),
                         max_response_bytes=100_000, max_cycle_response_bytes=100_000)
    for _ in range(5):  # 450 kB in all, one at a time: the budget bounds what is held at once
        assert client.instant("up", 1.0).frame["value"].tolist() == [7.0]
        assert client.budget.held == 0


def test_failed_calls_give_their_share_back(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(
        Answer(body=b"{" + b" " * 50_000),  # read whole, then not JSON
        Answer(body=padded(150_000), content_length=None),  # over max_response_bytes
        Answer(status=500, body=b"x" * 50_000),
        max_response_bytes=100_000, retries=0,
    )
    for reason in ("bad_response", "too_large", "http_5xx"):
        with pytest.raises(UpstreamError) as caught:
            client.instant("up", 1.0)
        assert caught.value.reason == reason
        assert client.budget.held == 0


@pytest.mark.parametrize("declared", [True, None], ids=["content-length", "streamed"])
def test_concurrent_answers_share_the_budget(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]], declared: bool | None
) -> None:
    """One answer is still being read (70 kB in) when a second of 140 kB arrives: together
    they would hold 210 kB of a 200 kB budget, so the second fails and the first completes."""
    go = threading.Event()
    first = padded(120_000)
    client, transport = fake_for(
        Answer(raw=HeldBody(first, 70_000, go), content_length=None),
        Answer(body=padded(140_000), content_length=declared),
        max_response_bytes=150_000,
        max_cycle_response_bytes=200_000,
    )
    answers: list[QueryResult | BaseException] = []

    def slow() -> None:
        try:
            answers.append(client.instant("slow", 1.0))
        except BaseException as error:  # reported by the assertions below
            answers.append(error)

    reader = threading.Thread(target=slow)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while client.budget.held < 70_000 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert client.budget.held == 70_000
        with pytest.raises(UpstreamError) as caught:
            client.instant("fast", 1.0)
        assert caught.value.reason == "over_budget" and caught.value.query == "fast"
        assert client.budget.held == 70_000
    finally:
        go.set()
        reader.join(10)
    [result] = answers
    assert isinstance(result, QueryResult), result
    assert result.frame["value"].tolist() == [7.0]
    assert client.budget.held == 0
    assert [form_of(r)["query"] for r in transport.sent] == [["slow"], ["fast"]]


def test_on_request_reports_each_call_once(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    calls: list[tuple[str, float]] = []
    client, _ = fake_for(
        Answer(body=fixture_bytes("vector_triton.json")),
        Answer(status=400, body=fixture_bytes("error_bad_data.json")),
        Answer(body=b"{"),
        Answer(body=fixture_bytes("labels.json")),
        on_request=lambda outcome, seconds: calls.append((outcome, seconds)),
    )
    client.instant("up", 1.0)
    for _ in range(2):
        with pytest.raises(UpstreamError):
            client.instant("up", 1.0)
    client.label_names()
    assert [outcome for outcome, _ in calls] == ["ok", "http_4xx", "bad_response", "ok"]
    assert all(seconds >= 0 for _, seconds in calls)


def test_on_request_failure_does_not_break_the_query(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(outcome: str, seconds: float) -> None:
        raise RuntimeError("metrics are broken")

    client, _ = fake_for(Answer(body=fixture_bytes("vector_42.json")), on_request=broken)
    assert client.instant("1", 1.0).frame["value"].tolist() == [42.0]
    assert "on_request callback failed" in caplog.text


def test_transport_exception_is_connection(
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
) -> None:
    client, _ = fake_for(requests.exceptions.ConnectionError("boom"))
    with pytest.raises(UpstreamError, match="boom") as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "connection"


def test_tls_verify_default_ca_file_and_insecure(
    tmp_path: Path,
    fake_for: Callable[..., tuple[PrometheusClient, FakeTransport]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests lets REQUESTS_CA_BUNDLE override session.verify unless verify is passed per request
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "env-bundle.pem"))
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    answer = Answer(body=fixture_bytes("vector_42.json"))
    default, default_t = fake_for(answer)
    with_ca, with_ca_t = fake_for(answer, tls={"ca_file": str(bundle)})
    insecure, insecure_t = fake_for(answer, tls={"insecure_skip_verify": True})
    assert default.session.verify is True
    assert with_ca.session.verify == str(bundle)
    assert insecure.session.verify is False
    for client in (default, with_ca, insecure):
        client.instant("1", 1.0)
    assert with_ca_t.options[0]["verify"] == str(bundle)
    assert insecure_t.options[0]["verify"] is False
    assert default_t.options[0]["verify"] in (True, str(tmp_path / "env-bundle.pem"))


def test_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        PrometheusClient(make_cfg(FAKE_URL, tls={"ca_file": str(tmp_path / "nope.pem")}))


@pytest.mark.parametrize("content", [None, "\n"], ids=["missing", "empty"])
def test_unusable_token_file_is_a_config_error(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        PrometheusClient(make_cfg(FAKE_URL, bearer_token_file=str(path)))


def test_context_manager_closes_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[bool] = []
    with PrometheusClient(make_cfg(FAKE_URL)) as client:
        monkeypatch.setattr(client.session, "close", lambda: closed.append(True))
    assert closed == [True]


# === client over a real socket ==================================================================


def test_path_prefix_is_kept(server: ScriptedServer, client_for: ClientFactory) -> None:
    client = client_for(server.url + "/prometheus/")
    client.instant("up", 1.5)
    (seen,) = server.seen
    assert (seen.method, seen.path) == ("POST", "/prometheus/api/v1/query")
    assert seen.form == {"query": ["up"], "time": ["1.500"], "timeout": ["2s"]}
    assert seen.headers["user-agent"].startswith("triton-mig-exporter/")
    assert "authorization" not in seen.headers


def test_bad_query_400_is_not_retried(server: ScriptedServer, client_for: ClientFactory) -> None:
    server.answer(Answer(status=400, body=fixture_bytes("error_bad_data.json")))
    client = client_for(server.url, retries=3)
    with pytest.raises(UpstreamError) as caught:
        client.instant("sum(rate(x[5m])))", 1.0)
    error = caught.value
    assert len(server.seen) == 1
    assert (error.reason, error.status, error.error_type) == ("http_4xx", 400, "bad_data")
    assert "unexpected right parenthesis" in str(error)
    assert "sum(rate(x[5m])))" in str(error)


@pytest.mark.parametrize("status", [413, 422])
def test_other_4xx_are_not_retried_even_with_retry_after(
    server: ScriptedServer, client_for: ClientFactory, status: int
) -> None:
    server.answer(Answer(status=status, body=b"no", headers={"Retry-After": "0"}))
    client = client_for(server.url, retries=3)
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "http_4xx"
    assert len(server.seen) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_retried_up_to_the_bound_then_raised(
    server: ScriptedServer, client_for: ClientFactory, status: int
) -> None:
    server.answer(Answer(status=status, body=fixture_bytes("error_timeout.json")))
    calls: list[str] = []
    client = client_for(server.url, retries=2, on_request=lambda o, s: calls.append(o))
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert len(server.seen) == 3  # first try + 2 retries
    assert (caught.value.reason, caught.value.status) == ("http_5xx", status)
    assert "timeout: query timed out in expression evaluation" in str(caught.value)
    assert calls == ["http_5xx"]


def test_5xx_then_success(server: ScriptedServer, client_for: ClientFactory) -> None:
    server.answer(
        Answer(status=503, body=b"busy"), Answer(body=fixture_bytes("vector_triton.json"))
    )
    client = client_for(server.url, retries=1)
    assert len(client.instant("up", 1.0).frame) == 5
    assert len(server.seen) == 2
    assert server.seen[0].form == server.seen[1].form  # the POST body is resent


def test_no_retries_configured_means_one_request(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    server.answer(Answer(status=503, body=b"busy"))
    client = client_for(server.url, retries=0)
    with pytest.raises(UpstreamError, match="HTTP 503: busy"):
        client.instant("up", 1.0)
    assert len(server.seen) == 1


def test_429_with_retry_after_zero_is_retried(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    server.answer(
        Answer(status=429, body=b"slow down", headers={"Retry-After": "0"}),
        Answer(body=fixture_bytes("vector_42.json")),
    )
    client = client_for(server.url, retries=2, backoff=0)
    assert client.instant("1", 1.0).frame["value"].tolist() == [42.0]
    assert len(server.seen) == 2


def test_429_exhausted_is_http_4xx(server: ScriptedServer, client_for: ClientFactory) -> None:
    server.answer(Answer(status=429, body=b"slow down", headers={"Retry-After": "0"}))
    client = client_for(server.url, retries=2)
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert (caught.value.reason, caught.value.status) == ("http_4xx", 429)
    assert len(server.seen) == 3


def test_get_endpoints_are_retried_too(server: ScriptedServer, client_for: ClientFactory) -> None:
    server.answer(Answer(status=502, body=b""), Answer(body=fixture_bytes("labels.json")))
    client = client_for(server.url, retries=1)
    assert "model" in client.label_names()
    assert [s.method for s in server.seen] == ["GET", "GET"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_connection_refused(client_for: ClientFactory) -> None:
    calls: list[str] = []
    client = client_for(
        f"http://127.0.0.1:{_free_port()}/prometheus",
        retries=1,
        on_request=lambda o, s: calls.append(o),
    )
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "connection"
    assert caught.value.status is None
    assert f"cannot reach upstream {client.url}: connection refused" in str(caught.value)
    assert calls == ["connection"]


def test_slow_server_is_timeout(server: ScriptedServer, client_for: ClientFactory) -> None:
    server.answer(Answer(delay=1.5))
    client = client_for(server.url, timeout=0.25, retries=1)
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout"
    # The second attempt's read timeout and the call's deadline come together; the deadline,
    # which bounds the call, is what it says.
    assert "within 0.5s, the request deadline" in str(caught.value)
    assert len(server.seen) == 2  # a read timeout is retried like any idempotent query
    assert elapsed < 1.2


def test_real_body_over_the_bound_is_too_large(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    body = json.dumps(vector(*[({"pod": f"p{i}"}, "1") for i in range(5000)])).encode()
    server.answer(Answer(body=body, content_length=None))
    client = client_for(server.url, max_response_bytes=100_000)
    assert len(body) > 100_000
    with pytest.raises(UpstreamError, match="max_response_bytes=100000") as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "too_large"


def test_cut_transfer_is_connection(server: ScriptedServer, client_for: ClientFactory) -> None:
    server.answer(Answer(body=b'{"status":"success","da', content_length=4000))
    client = client_for(server.url, retries=0)
    with pytest.raises(UpstreamError, match="reading the answer") as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "connection"


def test_bearer_token_inline_and_extra_headers(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    server.answer(Answer(), Answer(body=fixture_bytes("label_values.json")))
    client = client_for(
        server.url, bearer_token=TOKEN, headers={"X-Scope-OrgID": "tenant-a|tenant-b"}
    )
    client.instant("up", 1.0)
    client.label_values("model")
    assert len(server.seen) == 2
    for seen in server.seen:
        assert seen.headers["authorization"] == f"Bearer {TOKEN}"
        assert seen.headers["x-scope-orgid"] == "tenant-a|tenant-b"


def test_bearer_token_file_rotation_is_picked_up(
    tmp_path: Path, server: ScriptedServer, client_for: ClientFactory
) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    client = client_for(server.url, bearer_token_file=str(path))
    client.instant("up", 1.0)
    path.write_text("second-token-longer\n")
    client.instant("up", 1.0)
    # a Kubernetes-style swap: a new file renamed over the old one, same size
    swapped = tmp_path / "token.new"
    swapped.write_text("third--token-longer\n")
    os.replace(swapped, path)
    client.instant("up", 1.0)
    path.unlink()  # mid-rotation gap: keep using the last good token
    client.instant("up", 1.0)
    assert [s.headers["authorization"] for s in server.seen] == [
        "Bearer first-token",
        "Bearer second-token-longer",
        "Bearer third--token-longer",
        "Bearer third--token-longer",
    ]


def test_basic_auth_with_password_file(
    tmp_path: Path, server: ScriptedServer, client_for: ClientFactory
) -> None:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    client = client_for(server.url, basic_auth={"username": "exporter", "password_file": str(path)})
    client.build_info()
    expected = base64.b64encode(f"exporter:{PASSWORD}".encode()).decode()
    assert server.seen[0].headers["authorization"] == f"Basic {expected}"


def test_basic_auth_inline(server: ScriptedServer, client_for: ClientFactory) -> None:
    client = client_for(server.url, basic_auth={"username": "u", "password": "p@ss:word"})
    client.instant("up", 1.0)
    expected = base64.b64encode(b"u:p@ss:word").decode()
    assert server.seen[0].headers["authorization"] == f"Basic {expected}"


@pytest.mark.parametrize(
    ("auth", "secrets"),
    [
        ({"bearer_token": TOKEN}, [TOKEN]),
        (
            {"basic_auth": {"username": "u", "password": PASSWORD}},
            [PASSWORD, base64.b64encode(f"u:{PASSWORD}".encode()).decode()],
        ),
        ({"headers": {"X-Api-Key": TOKEN}}, [TOKEN]),
    ],
    ids=["bearer", "basic", "api-key-header"],
)
def test_credentials_never_in_errors_or_logs(
    server: ScriptedServer,
    client_for: ClientFactory,
    caplog: pytest.LogCaptureFixture,
    auth: dict[str, Any],
    secrets: list[str],
) -> None:
    def echo_credentials(seen: Seen) -> Answer:
        sent = [seen.headers.get("authorization"), seen.headers.get("x-api-key")]
        error = f"invalid credentials: {sent}"
        body = json.dumps({"status": "error", "errorType": "unauthorized", "error": error})
        return Answer(status=401, body=body.encode())

    server.answer(echo_credentials)
    caplog.set_level(logging.DEBUG)
    client = client_for(server.url, **auth)
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    error = caught.value
    assert error.reason == "http_4xx"
    assert "<redacted>" in str(error)
    # a failure that is not from the server: also clean
    refused = client_for(f"http://127.0.0.1:{_free_port()}", retries=0, **auth)
    with pytest.raises(UpstreamError) as refused_error:
        refused.instant("up", 1.0)
    logging.getLogger("test").error("failed: %s / %r", error, refused_error.value)
    for secret in secrets:
        assert secret not in str(error)
        assert secret not in repr(error)
        assert secret not in str(refused_error.value)
        assert secret not in caplog.text
    assert caplog.text  # debug logging really was captured


# --- TLS over a real socket ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = (
        f"{openssl} req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
        f" -keyout {key} -out {cert} -days 2 -subj /CN=127.0.0.1"
        " -addext subjectAltName=IP:127.0.0.1"
    )
    subprocess.run(command.split(), check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[ScriptedServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    srv = ScriptedServer(tls=context)
    srv.answer(Answer(body=fixture_bytes("vector_42.json")))
    yield srv
    srv.stop()


def test_tls_verified_by_default(tls_server: ScriptedServer, client_for: ClientFactory) -> None:
    client = client_for(tls_server.url, retries=0)
    with pytest.raises(UpstreamError) as caught:
        client.instant("1", 1.0)
    assert caught.value.reason == "connection"
    assert "TLS with upstream" in str(caught.value)


def test_tls_with_ca_file(
    tls_server: ScriptedServer, client_for: ClientFactory, certificate: tuple[Path, Path]
) -> None:
    client = client_for(tls_server.url, tls={"ca_file": str(certificate[0])})
    assert client.instant("1", 1.0).frame["value"].tolist() == [42.0]


def test_tls_insecure_skip_verify_silences_warning_only_inside(
    tls_server: ScriptedServer, client_for: ClientFactory
) -> None:
    client = client_for(tls_server.url, tls={"insecure_skip_verify": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert client.instant("1", 1.0).frame["value"].tolist() == [42.0]
        assert not [w for w in caught if issubclass(w.category, InsecureRequestWarning)]
        # the filter was scoped to the request: the same warning outside still shows
        warnings.warn("outside", InsecureRequestWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["outside"]


# === compression ================================================================================


@pytest.mark.parametrize(
    ("url", "compression", "asks_gzip"),
    [
        ("http://127.0.0.1:9090", "auto", False),
        ("http://127.3.4.5:9090", "auto", False),
        ("http://localhost:9090", "auto", False),
        ("http://[::1]:9090/prometheus", "auto", False),
        ("http://10.0.0.5:9090", "auto", True),
        ("https://prometheus.monitoring.svc:9090", "auto", True),
        ("http://127.0.0.1:9090", "gzip", True),
        ("https://prometheus.example.org", "none", False),
    ],
)
def test_compression_resolves_for_the_upstream_host(url: str, compression: str,
                                                     asks_gzip: bool) -> None:
    assert make_cfg(url, compression=compression).gzip is asks_gzip


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="compression"):
        make_cfg(FAKE_URL, compression="brotli")


@pytest.mark.parametrize(("compression", "sent"),
                         [("auto", "identity"), ("gzip", "gzip"), ("none", "identity")])
def test_accept_encoding_follows_compression(
    server: ScriptedServer, client_for: ClientFactory, compression: str, sent: str
) -> None:
    client_for(server.url, compression=compression).instant("up", 1.0)
    (seen,) = server.seen
    assert seen.headers["accept-encoding"] == sent


def test_a_gzip_answer_is_decoded_and_bounded_by_its_decoded_size(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    document = vector(({"model": "m"}, "2.5"))
    body = json.dumps(document).encode() + b" " * 4096  # JSON allows trailing blanks
    packed = gzip.compress(body)
    zipped = Answer(body=packed, headers={"Content-Encoding": "gzip"})
    server.answer(zipped)
    client = client_for(server.url, compression="gzip")
    frame = client.instant("up", 1.0).frame
    assert frame["value"].tolist() == [2.5] and frame["model"].tolist() == ["m"]
    # The bound counts the JSON as decoded, not the bytes on the wire.
    server.answer(zipped)
    small = client_for(server.url, compression="gzip", max_response_bytes=len(packed) + 100)
    with pytest.raises(UpstreamError) as caught:
        small.instant("up", 1.0)
    assert caught.value.reason == "too_large"


# === round two: errors a user reads, deadlines, what the upstream may echo =====================


def _status_answer(status: int, body: bytes) -> Answer:
    return Answer(status=status, body=body)


UNAUTHORIZED = json.dumps(
    {"status": "error", "errorType": "unauthorized", "error": "bad token"}).encode()


@pytest.mark.parametrize(
    ("status", "auth", "key", "problem", "advice"),
    [
        (401, {"bearer_token": TOKEN}, "upstream.bearer_token",
         "upstream {url} refused the credentials: HTTP 401: unauthorized: bad token", ""),
        (401, {"bearer_token_file": "{token_file}"}, "upstream.bearer_token_file",
         "upstream {url} refused the credentials: HTTP 401: unauthorized: bad token", ""),
        (403, {"basic_auth": {"username": "u", "password": PASSWORD}},
         "upstream.basic_auth.password",
         "upstream {url} refused the credentials: HTTP 403: unauthorized: bad token", ""),
        (403, {"basic_auth": {"username": "u", "password_file": "{token_file}"}},
         "upstream.basic_auth.password_file",
         "upstream {url} refused the credentials: HTTP 403: unauthorized: bad token", ""),
        (401, {}, "upstream.bearer_token",
         "upstream {url} asks for credentials: HTTP 401: unauthorized: bad token",
         "none is set (bearer_token, bearer_token_file or basic_auth)"),
    ],
    ids=["401 bearer_token", "401 bearer_token_file", "403 basic_auth.password",
         "403 basic_auth.password_file", "401 no credential"],
)
def test_a_refused_credential_names_the_key_to_check(
    server: ScriptedServer, client_for: ClientFactory, tmp_path: Path, status: int,
    auth: dict[str, Any], key: str, problem: str, advice: str,
) -> None:
    token_file = tmp_path / "secret"
    token_file.write_text(TOKEN + "\n")
    auth = json.loads(json.dumps(auth).replace("{token_file}", str(token_file)))
    server.answer(_status_answer(status, UNAUTHORIZED))
    client = client_for(server.url, **auth)
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    hint = caught.value.hint
    assert hint is not None
    assert (hint.problem, hint.key, hint.advice) == (problem.format(url=server.url), key, advice)
    assert len(server.seen) == 1  # a refused credential is not retried


def test_a_missing_tenant_names_the_headers(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    server.answer(_status_answer(401, b"no org id\n"))  # Mimir and Cortex, without X-Scope-OrgID
    with pytest.raises(UpstreamError) as caught:
        client_for(server.url, bearer_token=TOKEN).instant("up", 1.0)
    assert caught.value.hint == upstream.Hint(
        f"upstream {server.url} asks for a tenant: HTTP 401: no org id", "upstream.headers",
        "set X-Scope-OrgID, as Mimir and Cortex need")


@pytest.mark.parametrize(
    ("path", "advice"),
    [("", "a Mimir or Cortex URL ends in /prometheus: {url}/prometheus"),
     ("/prometheus", "Prometheus itself has no prefix: {url}")],
    ids=["no prefix", "a prefix the upstream does not have"],
)
def test_a_404_names_the_url_and_suggests_the_prefix(
    server: ScriptedServer, client_for: ClientFactory, path: str, advice: str
) -> None:
    server.answer(_status_answer(404, b"404 page not found\n"))
    client = client_for(server.url + path)
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "http_4xx"
    hint = caught.value.hint
    assert hint is not None and hint.key == "upstream.url"
    assert hint.problem == (f"upstream {server.url}{path} has no Prometheus API: POST "
                            "/api/v1/query answered HTTP 404: 404 page not found")
    assert hint.advice == advice.format(url=server.url)


def test_unreachable_and_slow_upstreams_name_the_key_to_check(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    refused = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(UpstreamError) as caught:
        client_for(refused, retries=0).instant("up", 1.0)
    assert caught.value.hint == upstream.Hint(
        f"cannot reach upstream {refused}: connection refused", "upstream.url")
    server.answer(Answer(delay=1.0))
    with pytest.raises(UpstreamError) as caught:
        client_for(server.url, timeout=0.2, retries=0).instant("up", 1.0)
    assert caught.value.hint == upstream.Hint(
        f"no complete answer from {server.url} within 0.2s, the request deadline "
        "((retries + 1) x timeout)", "upstream.timeout")
    # A refusal of one query is that query's: no hint, the caller names the query.
    server.answer(Answer(status=400, body=fixture_bytes("error_bad_data.json")))
    with pytest.raises(UpstreamError) as caught:
        client_for(server.url).instant("up", 1.0)
    assert caught.value.hint is None


def test_an_untrusted_certificate_names_the_ca_file(
    tls_server: ScriptedServer, client_for: ClientFactory
) -> None:
    with pytest.raises(UpstreamError) as caught:
        client_for(tls_server.url, retries=0).instant("1", 1.0)
    hint = caught.value.hint
    assert hint is not None and hint.key == "upstream.tls.ca_file"
    assert hint.problem.startswith(f"TLS with upstream {tls_server.url} failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in hint.problem


class _Drip(socketserver.BaseRequestHandler):
    """Reads one request, then answers a byte every 0.1 s: the status line and a header that
    never ends (``head``), or a body of an announced 100 kB. Each byte comes well within any
    read timeout; the whole answer never does (the server gives up after 5 s)."""

    server: _DripServer

    def handle(self) -> None:
        self.server.arrived.append(time.monotonic())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        found = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        while found is not None and len(body) < int(found.group(1)):
            body += self.request.recv(65536)
        if self.server.head:
            start, byte = b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"
        else:
            start, byte = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100000\r\n\r\n"), b" "
        with contextlib.suppress(OSError):
            self.request.sendall(start)
            end = time.monotonic() + 5
            while time.monotonic() < end and not self.server.stopping.wait(0.1):
                self.request.sendall(byte)


class _DripServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    head = False
    arrived: list[float]
    stopping: threading.Event


@contextlib.contextmanager
def dripping(head: bool = False) -> Iterator[tuple[str, list[float]]]:
    """A dripping upstream on 127.0.0.1: its URL, and when each request arrived."""
    srv = _DripServer(("127.0.0.1", 0), _Drip)
    srv.head, srv.arrived, srv.stopping = head, [], threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv.arrived
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.mark.parametrize("head", [False, True], ids=["body", "headers"])
def test_a_dripping_upstream_is_cut_at_the_request_deadline(
    client_for: ClientFactory, head: bool
) -> None:
    outcomes: list[str] = []
    with dripping(head) as (url, arrived):
        client = client_for(url, timeout=0.5, retries=1,
                            on_request=lambda outcome, seconds: outcomes.append(outcome))
        assert client.request_deadline == 1.0  # (retries + 1) x timeout
        started = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            client.instant("up", 1.0)
        elapsed = time.monotonic() - started
    assert caught.value.reason == "timeout"
    assert caught.value.detail == (f"no complete answer from {url} within 1s, the request "
                                   "deadline ((retries + 1) x timeout)")
    assert caught.value.hint is not None and caught.value.hint.key == "upstream.timeout"
    assert elapsed <= 1.0 + 0.5, elapsed  # the bound, and slack for a busy machine
    assert outcomes == ["timeout"]
    assert 1 <= len(arrived) <= 2


def test_a_call_ends_by_the_deadline_of_its_cycle(client_for: ClientFactory) -> None:
    with dripping() as (url, arrived):
        client = client_for(url, timeout=0.5, retries=3)  # a request deadline of 2 s
        started = time.monotonic()
        with (upstream.deadline(started + 0.5, "the test's deadline"),
              pytest.raises(UpstreamError) as caught):
            client.instant("up", 1.0)
        assert time.monotonic() - started <= 0.5 + 0.5
        assert caught.value.reason == "timeout"
        assert caught.value.detail == f"no complete answer from {url} by the test's deadline"
        # Once it has passed, nothing more is sent.
        with upstream.deadline(time.monotonic()), pytest.raises(UpstreamError) as caught:
            client.instant("up", 1.0)
        assert caught.value.reason == "timeout" and len(arrived) == 1


def test_an_unparseable_retry_after_is_ignored_and_the_503_stays_a_server_error(
    server: ScriptedServer, client_for: ClientFactory
) -> None:
    server.answer(Answer(status=503, body=b"maintenance", headers={"Retry-After": "soon"}))
    client = client_for(server.url, retries=1)
    with pytest.raises(UpstreamError) as caught:
        client.instant("up", 1.0)
    assert caught.value.reason == "http_5xx" and caught.value.status == 503
    assert "HTTP 503: maintenance" in str(caught.value)
    assert len(server.seen) == 2  # retried with the backoff instead


#: What Go's encoding/json makes of & < and > (HTML-safe escapes); any character may be
#: written as \uXXXX, in either case of hex digits.
ODD_TOKEN = "tok&en<SECRET>/5"


def go_escaped(text: str) -> str:
    return text.replace("&", "\\u0026").replace("<", "\\u003C").replace(">", "\\u003e")


def test_credentials_echoed_with_json_unicode_escapes_are_redacted(
    server: ScriptedServer, client_for: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def echo(seen: Seen) -> Answer:
        header = go_escaped(seen.headers["authorization"])
        if seen.form.get("query") == ["ok"]:
            series = ('{"metric":{"auth":"' + header + '","other":"a\\u0026b",'
                      '"literal":"\\\\u0026"},"value":[1,"1"]}')
            body = ('{"status":"success","warnings":["saw ' + header + '"],"data":{'
                    '"resultType":"vector","result":[' + series + ']}}')
            return Answer(body=body.encode())
        return Answer(status=401, body=('{"status":"error","errorType":"unauthorized",'
                                        '"error":"bad ' + header + '"}').encode())

    server.answer(echo)
    caplog.set_level(logging.DEBUG)
    client = client_for(server.url, bearer_token=ODD_TOKEN)
    result = client.instant("ok", 1.0)
    [row] = result.frame.to_dict("records")
    assert row["auth"] == "Bearer <redacted>"
    assert row["other"] == "a&b" and row["literal"] == "\\u0026"  # the rest as JSON says
    assert result.warnings == ("saw Bearer <redacted>",)
    with pytest.raises(UpstreamError) as caught:
        client.instant("refused", 1.0)
    assert "<redacted>" in str(caught.value)
    for text in (str(caught.value), caplog.text):
        assert "SECRET" not in text


@pytest.mark.parametrize(
    "update",
    [{"bearer_token": SecretStr(TOKEN + "\n")}, {"headers": {"X-Api-Key": TOKEN + "\r\nX: y"}}],
    ids=["token with a line end", "header value with a line break"],
)
def test_a_header_http_refuses_fails_the_call_without_showing_it(
    server: ScriptedServer, update: dict[str, Any]
) -> None:
    # Refused at load since; a configuration built in code skips that check.
    cfg = make_cfg(server.url, retries=0).model_copy(update=update)
    outcomes: list[str] = []
    with (PrometheusClient(cfg, on_request=lambda o, s: outcomes.append(o)) as client,
          pytest.raises(UpstreamError) as caught):
        client.instant("up", 1.0)
    error = caught.value
    assert outcomes == [error.reason] and error.reason == "connection"
    assert "a request header (a credential or upstream.headers) holds a character" in str(error)
    printed = "".join(traceback.format_exception(error))
    assert TOKEN not in printed and TOKEN not in repr(error)
    assert server.seen == []


def test_a_token_file_with_a_line_break_inside_is_refused_and_never_shown(
    tmp_path: Path, server: ScriptedServer, client_for: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "token"
    path.write_text("first-SECRET\nsecond-SECRET\n")
    with pytest.raises(ConfigError) as caught:
        client_for(server.url, bearer_token_file=str(path))
    assert str(caught.value) == (f"{path}: bearer token file holds a line break or another "
                                 "control character")
    path.write_text("good-token\n")
    client = client_for(server.url, bearer_token_file=str(path))
    client.instant("up", 1.0)
    path.write_text("bad\rtoken-SECRET\n")  # a rotation gone wrong: the last good one is kept
    client.instant("up", 1.0)
    assert [s.headers["authorization"] for s in server.seen] == ["Bearer good-token"] * 2
    assert "keeping the previous bearer token" in caplog.text
    assert "SECRET" not in caplog.text


def test_a_deadline_cuts_only_the_sockets_its_call_used_last() -> None:
    # A call's connection back in the pool may be another call's by the time the first call's
    # deadline passes: that one must not lose it.
    mine, theirs = socket.socketpair()
    with mine, theirs:
        connection = types.SimpleNamespace(sock=mine)
        first = upstream._Deadline(0.05, None)
        first.watch(connection)
        second = upstream._Deadline(60, None)
        second.watch(connection)  # taken from the pool by another call
        time.sleep(0.2)
        assert first.expired and not second.expired
        theirs.sendall(b"x")
        assert mine.recv(1) == b"x"  # not shut down
        second.stop()
        alone = upstream._Deadline(0.05, None)
        alone.watch(connection)
        time.sleep(0.2)
        assert mine.recv(1) == b""  # shut down: a blocked read returns at once

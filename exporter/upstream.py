"""Client for the upstream Prometheus HTTP API (Prometheus, Mimir, Cortex, Thanos, VictoriaMetrics).

The rest of the code depends only on :class:`Querier` (``instant(query, at)``) and the frame
contract below; :class:`PrometheusClient` is the HTTP implementation. It knows nothing of Triton.

Frame contract (:class:`QueryResult.frame`):

* one string column per label name, the union over all series, sorted by name; a series that
  lacks a label has ``""`` there; ``__name__`` is kept when the upstream returns it;
* a float64 ``value`` column; for range queries also a float64 ``timestamp`` column (seconds),
  long format: one row per sample;
* an empty result is a frame with only ``value`` (and ``timestamp``) and no rows;
* ``NaN``, ``+Inf`` and ``-Inf`` samples are kept as float nan/inf: the caller decides what to drop.

Errors are :class:`UpstreamError` with a ``reason`` from :data:`REASONS`, meant as a metric label.
Their text names the query and the cause and never contains a credential. An error that every
query would meet alike (the upstream unreachable, a refused credential, a wrong path) carries a
:class:`Hint`: what failed, in words for the user, and the configuration key to check.

Every call ends by a deadline: ``(retries + 1) x timeout`` from its start, or the deadline of
the cycle it belongs to (:func:`deadline`), whichever comes first. The timeout alone bounds
each read, and an upstream sending a byte at a time never lets a read time out.
"""

from __future__ import annotations

import base64
import heapq
import importlib
import importlib.metadata
import inspect
import itertools
import json
import logging
import math
import mmap
import os
import re
import reprlib
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self, cast, get_args
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
import pandas as pd
import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    InsecureRequestWarning,
    InvalidHeader,
    MaxRetryError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from exporter.config import (
    ConfigError,
    UpstreamConfig,
    format_duration,
    read_secret,
    unsendable,
)

__all__ = [
    "NOT_SENT",
    "OUTCOMES",
    "REASONS",
    "Hint",
    "PrometheusClient",
    "Querier",
    "QueryResult",
    "Reason",
    "UpstreamError",
    "deadline",
    "decode_json",
    "parse_envelope",
    "parse_matrix",
    "parse_vector",
]

log = logging.getLogger(__name__)

Reason = Literal[
    "connection",
    "timeout",
    "http_4xx",
    "http_5xx",
    "api_error",
    "bad_response",
    "too_large",
    "over_budget",
]
#: Every value ``UpstreamError.reason`` can take, for creating self-metric labels at start-up.
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)
#: Every outcome passed to ``on_request``: ``ok`` or a reason.
OUTCOMES: Final[tuple[str, ...]] = ("ok", *REASONS)

_QUERY_SHOWN = 120
_DETAIL_SHOWN = 300
_ERROR_BODY_BYTES = 64 * 1024
_CHUNK = 64 * 1024
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_SPECIAL_VALUES: Final[dict[str, float]] = {
    "NaN": math.nan,
    "+Inf": math.inf,
    "-Inf": -math.inf,
    "Inf": math.inf,
}
_SPACES = re.compile(r"\s+")
#: Label columns use the dtype pandas gives strings by default (``str`` in pandas 3).
_LABEL_DTYPE = pd.Series(["label"]).dtype


#: Rows converted per call where one call over a whole answer would hold the interpreter lock
#: for milliseconds (strings to floats or to a pandas string array, freeing decoded series):
#: other threads, one serving a scrape among them, get it back between two such calls.
SLICE = 8192


def _slices(count: int) -> list[slice]:
    return [slice(start, start + SLICE) for start in range(0, count, SLICE)]


def _labels(values: Sequence[str] | np.ndarray) -> Any:
    """A label column as a pandas array of the default string dtype (no copy into a Series),
    converted a slice at a time."""
    array = cast(Callable[..., Any], pd.array)
    if len(values) <= SLICE:
        return array(values, dtype=_LABEL_DTYPE)
    parts = [pd.Series(array(values[part], dtype=_LABEL_DTYPE), copy=False)
             for part in _slices(len(values))]
    return pd.concat(parts, ignore_index=True).array


def _floats(texts: list[str]) -> np.ndarray:
    """Sample values as float64, a slice at a time; numpy parses "NaN", "+Inf" and "-Inf"
    like float() does."""
    if len(texts) <= SLICE:
        return np.array(texts, dtype=np.float64)
    return np.concatenate([np.array(texts[part], dtype=np.float64)
                           for part in _slices(len(texts))])


def release(payload: Any) -> None:
    """Free the series of a decoded answer (``data.result``) a slice at a time, as dropping
    the answer would free them all in one go."""
    data = payload.get("data") if isinstance(payload, dict) else None
    result = data.get("result") if isinstance(data, dict) else None
    if isinstance(result, list):
        while result:
            del result[-SLICE:]


def _one_line(text: str, limit: int) -> str:
    text = _SPACES.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: What a query that was never sent says: the deadline of its cycle had passed.
NOT_SENT = "not sent: the cycle's deadline had passed"


@dataclass(frozen=True)
class Hint:
    """What an error that fails every query alike means: ``problem``, a sentence naming the
    upstream, and the configuration ``key`` to check; ``advice`` when there is more to say."""

    problem: str
    key: str
    advice: str = ""


class UpstreamError(Exception):
    """A failed call to the upstream API.

    ``reason`` is one of :data:`REASONS`; ``query`` is the PromQL (``None`` for the metadata
    endpoints); ``status`` is the HTTP status when one was received; ``error_type`` is the API's
    ``errorType`` when it sent one; ``hint`` says what to check when the cause is not the query.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str,
        *,
        query: str | None = None,
        status: int | None = None,
        endpoint: str | None = None,
        error_type: str | None = None,
        hint: Hint | None = None,
    ) -> None:
        self.reason: Reason = reason
        self.detail = _one_line(detail, _DETAIL_SHOWN)
        self.query = query
        self.status = status
        self.endpoint = endpoint
        self.error_type = error_type
        self.hint = hint
        super().__init__(str(self))

    def for_query(self, query: str) -> UpstreamError:
        """The same failure, for another query (one not sent because of this one)."""
        return UpstreamError(self.reason, self.detail, query=query, status=self.status,
                             endpoint=self.endpoint, error_type=self.error_type,
                             hint=self.hint)

    def __str__(self) -> str:
        if self.query is not None:
            what = f"query {_one_line(self.query, _QUERY_SHOWN)!r}"
        else:
            what = self.endpoint or "request"
        return f"upstream {what} failed ({self.reason}): {self.detail}"


class ResponseBudget:
    """Answer bytes that the calls sharing it may hold at once (the queries of one cycle).

    A call takes bytes as it reads its answer and gives them all back once it is done with the
    answer (parsed, or failed); a call that cannot take what it needs fails as ``over_budget``
    instead of waiting, so a cycle never stalls on its own answers. Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes taken and not yet given back."""
        return self._held

    def take(self, size: int) -> bool:
        """Take ``size`` more bytes if they fit; False (and nothing taken) if not."""
        with self._lock:
            if self._held + size > self.limit:
                return False
            self._held += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self._held -= size


class _Share:
    """One call's part of a :class:`ResponseBudget`, given back when the call is done."""

    def __init__(self, budget: ResponseBudget) -> None:
        self.budget = budget
        self.taken = 0

    def cover(self, size: int) -> bool:
        """Hold at least ``size`` bytes in all: take the difference, if it fits."""
        if size <= self.taken:
            return True
        if not self.budget.take(size - self.taken):
            return False
        self.taken = size
        return True

    def release(self) -> None:
        self.budget.give(self.taken)
        self.taken = 0


@dataclass(frozen=True, eq=False)
class QueryResult:
    """A parsed query answer: the frame (see the module contract) and the API's warnings."""

    frame: pd.DataFrame
    warnings: tuple[str, ...] = ()


class Querier(Protocol):
    """What the rest of the exporter needs from the upstream."""

    def instant(self, query: str, at: float) -> QueryResult: ...


# --- parsing (pure) -----------------------------------------------------------------------------

#: An answer's series are decoded this many characters at a time (under a millisecond of
#: json.loads): json.loads holds the interpreter lock for the whole of one call, about 35 ms for
#: an answer of 30k series (4 MB), and meanwhile no other thread runs, /metrics' included.
JSON_PIECE = 64 * 1024
_RESULT = '"result"'
_RESULT_LIST = re.compile(r'"result"\s*:\s*\[')
#: Between two series of a result list. Never inside a string: there every ``"`` is escaped.
_NEXT_SERIES = re.compile(r'\}[ \t\n\r]*,[ \t\n\r]*(\{)\s*"metric"\s*:')
_DECODER = json.JSONDecoder()


def decode_json(text: str, piece: int = JSON_PIECE) -> Any:
    """``json.loads(text)``, with the ``data.result`` list of a long answer decoded a piece of
    about ``piece`` characters at a time, so other threads get the interpreter in between.

    Same value, same errors: an answer that does not decode that way for any reason (several
    ``"result"`` strings in it, other JSON than an API answer, invalid JSON) is decoded in one
    call.
    """
    if len(text) > 2 * piece and text.count(_RESULT) == 1:
        try:
            return _decode_in_pieces(text, piece)
        except (ValueError, RecursionError, _Irregular):
            pass  # json.loads says what is wrong, or copes
    return json.loads(text)


def _decode_in_pieces(text: str, piece: int) -> Any:
    """The pieces are whole series (JSON values of their own), cut where one series ends and
    the next begins; the envelope is decoded with the result list empty, then given the series.
    The only ``"result"`` in the text is the key whose list is cut (a label value, a warning
    or another key of that name makes :func:`decode_json` decode in one call)."""
    found = _RESULT_LIST.search(text)
    if found is None:
        raise _Irregular
    start = position = found.end()  # just after the list's "["
    series: list[Any] = []
    while (cut := _NEXT_SERIES.search(text, position + piece)) is not None:
        series += json.loads("[" + text[position : cut.start() + 1] + "]")
        position = cut.start(1)
    # The last series and what follows the list: raw_decode stops at the list's "]".
    last, end = _DECODER.raw_decode("[" + text[position:])
    series += last
    close = position + end - 2  # the list's "]" in text
    payload = json.loads(text[:start] + text[close:])
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict) or data.get("result") != []:
        raise _Irregular
    data["result"] = series
    return payload


def _bad(detail: str, query: str | None) -> UpstreamError:
    return UpstreamError("bad_response", detail, query=query)


def parse_envelope(payload: object, query: str | None = None) -> tuple[Any, tuple[str, ...]]:
    """``(data, warnings)`` from a decoded API answer.

    ``status: "error"`` raises ``api_error`` naming ``errorType`` and ``error``; anything that is
    not a ``{"status": "success", "data": ...}`` object raises ``bad_response``.
    """
    if not isinstance(payload, Mapping):
        raise _bad(f"answer is a JSON {type(payload).__name__}, not an object", query)
    status = payload.get("status")
    if status == "error":
        error_type = str(payload.get("errorType") or "unknown")
        error = str(payload.get("error") or "no error message")
        raise UpstreamError(
            "api_error", f"{error_type}: {error}", query=query, error_type=error_type
        )
    if status != "success":
        raise _bad(f"answer status is {status!r}, expected 'success'", query)
    if "data" not in payload:
        raise _bad("answer has no 'data'", query)
    raw_warnings = payload.get("warnings") or []
    if not isinstance(raw_warnings, list):
        raise _bad("answer 'warnings' is not a list", query)
    found = tuple(str(w) for w in raw_warnings)
    if found:
        log.debug("upstream warnings for %s: %s", _one_line(query or "", _QUERY_SHOWN), found)
    infos = payload.get("infos")
    if infos:
        log.debug("upstream infos for %s: %s", _one_line(query or "", _QUERY_SHOWN), infos)
    return payload["data"], found


def _result(data: object, query: str | None) -> tuple[str, Any]:
    if not isinstance(data, Mapping):
        raise _bad("'data' is not an object", query)
    if "resultType" not in data:
        raise _bad("'data' has no 'resultType'", query)
    if "result" not in data:
        raise _bad("'data' has no 'result'", query)
    return str(data["resultType"]), data["result"]


def _float(raw: object) -> float:
    """A sample value: Prometheus sends strings; ``NaN``/``+Inf``/``-Inf`` are mapped explicitly."""
    if type(raw) is str:
        special = _SPECIAL_VALUES.get(raw)
        if special is not None:
            return special
        return float(raw)  # ValueError for anything non-numeric
    if type(raw) is float or type(raw) is int:  # tolerated: a bare JSON number
        return float(raw)
    raise ValueError(f"not a number: {raw!r}")


def _timestamp(raw: object) -> float:
    if type(raw) is float or type(raw) is int:
        return float(raw)
    raise ValueError(f"timestamp is not a number: {raw!r}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40


def _sample(raw: object, where: str, query: str | None) -> tuple[float, float]:
    if type(raw) is not list or len(raw) != 2:
        shown = _one_line(_SHORT.repr(raw), 60)  # bounded, whatever the nesting
        raise _bad(f'{where} is not a [timestamp, "value"] pair: {shown}', query)
    try:
        return _timestamp(raw[0]), _float(raw[1])
    except (ValueError, TypeError, OverflowError) as error:  # Overflow: a 400-digit integer
        raise _bad(f"{where}: {str(error)[:_DETAIL_SHOWN]}", query) from None


def _series_metric(item: object, index: int, query: str | None) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise _bad(f"result[{index}] is not an object", query)
    metric = item.get("metric", {})
    if not isinstance(metric, Mapping):
        raise _bad(f"result[{index}].metric is not an object", query)
    return metric


def _types_within(items: list[Any], allowed: frozenset[type]) -> bool:
    return set(map(type, items)) <= allowed


_DICT = frozenset({dict})
_LIST = frozenset({list})
_STR = frozenset({str})
_NUMBER = frozenset({int, float})


class _Irregular(Exception):
    """The bulk path met something unusual; the item-by-item path says what (or copes)."""


def _bulk_series(result: list[Any], key: str) -> tuple[list[dict[str, Any]], list[Any]]:
    try:
        metrics = [item["metric"] for item in result]
        payloads = [item[key] for item in result]
    except (KeyError, TypeError, IndexError):
        raise _Irregular from None
    if not (_types_within(metrics, _DICT) and _types_within(payloads, _LIST)):
        raise _Irregular
    return metrics, payloads


def _bulk_samples(samples: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    if not (_types_within(samples, _LIST) and set(map(len, samples)) <= {2}):
        raise _Irregular
    stamps = [sample[0] for sample in samples]
    raw = [sample[1] for sample in samples]
    if not (_types_within(stamps, _NUMBER) and _types_within(raw, _STR)):
        raise _Irregular
    try:
        return np.array(stamps, dtype=np.float64), _floats(raw)
    except (ValueError, OverflowError):
        raise _Irregular from None


def _label_columns(
    metrics: Sequence[Mapping[str, Any]], reserved: tuple[str, ...], query: str | None
) -> dict[str, list[str]]:
    names: set[str] = set()
    names = names.union(*metrics)
    clash = names.intersection(reserved)
    if clash:
        raise _bad(
            f"series carry label(s) {sorted(clash)} that clash with the frame's own columns; "
            "aggregate or label_replace them away in the query",
            query,
        )
    columns: dict[str, list[str]] = {}
    for name in sorted(names):
        column = [m.get(name, "") for m in metrics]
        if not _types_within(column, _STR):
            raise _bad(f"label {name!r} has a value that is not a string", query)
        try:
            # JSON can escape a lone surrogate (\ud800) that UTF-8 cannot encode: pandas'
            # string arrays (and the exposition) would raise on it and crash the whole cycle.
            "".join(column).encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"label {name!r} has a value that is not valid Unicode", query) from None
        columns[name] = column
    return columns


def _histogram_hint(item: Mapping[str, Any], key: str) -> str:
    return " (native histogram samples are not supported)" if key in item else ""


def _checked_vector(
    result: list[Any], query: str | None
) -> tuple[list[Mapping[str, Any]], np.ndarray]:
    metrics: list[Mapping[str, Any]] = []
    values: list[float] = []
    for index, item in enumerate(result):
        metrics.append(_series_metric(item, index, query))
        raw = item.get("value")
        if raw is None:
            hint = _histogram_hint(item, "histogram")
            raise _bad(f"result[{index}] has no 'value'{hint}", query)
        values.append(_sample(raw, f"result[{index}].value", query)[1])
    return metrics, np.array(values, dtype=np.float64)


def _checked_matrix(
    result: list[Any], query: str | None
) -> tuple[list[Mapping[str, Any]], list[int], np.ndarray, np.ndarray]:
    metrics: list[Mapping[str, Any]] = []
    counts: list[int] = []
    stamps: list[float] = []
    values: list[float] = []
    for index, item in enumerate(result):
        metrics.append(_series_metric(item, index, query))
        samples = item.get("values")
        if samples is None:
            if "histograms" in item:
                hint = _histogram_hint(item, "histograms")
                raise _bad(f"result[{index}] has no 'values'{hint}", query)
            samples = []
        if not isinstance(samples, list):
            raise _bad(f"result[{index}].values is not a list", query)
        for position, raw in enumerate(samples):
            stamp, value = _sample(raw, f"result[{index}].values[{position}]", query)
            stamps.append(stamp)
            values.append(value)
        counts.append(len(samples))
    return metrics, counts, np.array(stamps, dtype=np.float64), np.array(values, dtype=np.float64)


def parse_vector(payload: Mapping[str, Any], query: str | None = None) -> QueryResult:
    """Parse an instant-query answer: a ``vector``, one row per series. Any other
    ``resultType`` raises ``bad_response``: a ``scalar`` taken as one row without labels would
    be published as a series (a MIG slice without identity)."""
    data, found = parse_envelope(payload, query)
    result_type, result = _result(data, query)
    if result_type != "vector":
        raise _bad(f"resultType is {result_type!r}, expected 'vector'", query)
    if not isinstance(result, list):
        raise _bad("vector result is not a list", query)
    metrics: Sequence[Mapping[str, Any]]
    try:
        metrics, samples = _bulk_series(result, "value")
        _, values = _bulk_samples(samples)
    except _Irregular:
        metrics, values = _checked_vector(result, query)
    columns = _label_columns(metrics, ("value",), query)
    frame = pd.DataFrame(
        {name: _labels(column) for name, column in columns.items()} | {"value": values},
        copy=False,
    )
    return QueryResult(frame, found)


def parse_matrix(payload: Mapping[str, Any], query: str | None = None) -> QueryResult:
    """Parse a range-query answer (``matrix``) into the long frame: one row per sample."""
    data, found = parse_envelope(payload, query)
    result_type, result = _result(data, query)
    if result_type != "matrix":
        raise _bad(f"resultType is {result_type!r}, expected 'matrix'", query)
    if not isinstance(result, list):
        raise _bad("matrix result is not a list", query)
    metrics: Sequence[Mapping[str, Any]]
    try:
        metrics, per_series = _bulk_series(result, "values")
        counts = list(map(len, per_series))
        stamps, values = _bulk_samples(list(chain.from_iterable(per_series)))
    except _Irregular:
        metrics, counts, stamps, values = _checked_matrix(result, query)
    columns = _label_columns(metrics, ("value", "timestamp"), query)
    rows = np.repeat(np.arange(len(metrics)), counts)
    frame = pd.DataFrame(
        # One string per series, repeated per sample by the array's own take (no Python
        # string per row: a range answer has hundreds of rows per series).
        {name: _labels(column).take(rows) for name, column in columns.items()}
        | {"timestamp": stamps, "value": values},
        copy=False,
    )
    return QueryResult(frame, found)


def _string_list(data: object) -> list[str]:
    if not isinstance(data, list) or not all(type(v) is str for v in data):
        raise _bad("'data' is not a list of strings", None)
    return cast(list[str], data)


# --- HTTP ---------------------------------------------------------------------------------------


def _version() -> str:
    package = importlib.import_module("exporter")
    version = getattr(package, "__version__", None)
    if isinstance(version, str) and version:
        return version
    try:
        return importlib.metadata.version("triton-mig-exporter")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# --- deadlines ----------------------------------------------------------------------------------

#: Per thread: the deadline of the cycle its calls belong to (``until``, monotonic seconds) and
#: the call in progress (``call``), which the connections it uses register with.
_local = threading.local()


@contextmanager
def deadline(until: float | None, what: str = "the cycle's deadline") -> Iterator[None]:
    """Calls made by this thread inside end by ``until`` (``time.monotonic()`` seconds) at the
    latest: the deadline of the cycle they belong to, ``what`` in the error of a call it cuts.
    None: no deadline besides each call's."""
    before = getattr(_local, "until", None), getattr(_local, "what", None)
    _local.until, _local.what = until, what
    try:
        yield
    finally:
        _local.until, _local.what = before


class _Deadline:
    """One call's deadline. When it passes, the sockets the call uses are shut down: a read
    blocked on an upstream that sends a byte at a time returns at once, and the retries that
    follow fail without connecting (see :class:`_Connection`).

    Sockets, not connections: http.client hands the socket of an answer that ends when the
    upstream closes over to the answer, and the connection forgets it. A socket is cut only by
    the call that used it last: one back in the pool may be another call's already."""

    def __init__(self, seconds: float, cycle: str | None) -> None:
        self.seconds = seconds
        #: What the deadline is when it is the cycle's, not the call's own.
        self.cycle = cycle
        self.expired = False
        self.at = time.monotonic() + seconds
        self._stopped = False
        self._sockets: list[socket.socket] = []
        _WATCHDOG.add(self)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def watch(self, connection: object) -> None:
        """Cut the socket of ``connection``, if it has one, when the deadline passes (now, if
        it has)."""
        sock = getattr(connection, "sock", None)
        if not isinstance(sock, socket.socket):
            return
        with _SOCKETS:
            _USERS[sock] = self
            self._sockets.append(sock)
            if self.expired:
                _cut(sock)

    def stop(self) -> None:
        """The call is over: its connections go back to the pool, uncut."""
        with _SOCKETS:
            self._stopped = True
            self._sockets.clear()

    def expire(self) -> None:
        with _SOCKETS:
            if self._stopped:
                return
            self.expired = True
            for sock in self._sockets:
                if _USERS.get(sock) is self:
                    _cut(sock)


#: The call that used each socket last (see :class:`_Deadline`), and the lock over it.
_USERS: weakref.WeakKeyDictionary[socket.socket, _Deadline] = weakref.WeakKeyDictionary()
_SOCKETS = threading.Lock()


def _cut(sock: socket.socket) -> None:
    with suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread for every call's deadline (a thread per call cost 0.2 ms to start): it sleeps
    until the earliest is due and expires it. A call that ends first leaves its entry to expire
    as a no-op."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Deadline]] = []
        self._count = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: _Deadline) -> None:
        with self._wake:
            heapq.heappush(self._due, (deadline.at, next(self._count), deadline))
            if self._thread is None or not self._thread.is_alive():  # first, or after a fork
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        with self._wake:
            while True:
                now = time.monotonic()
                while self._due and self._due[0][0] <= now:
                    heapq.heappop(self._due)[2].expire()
                self._wake.wait(self._due[0][0] - now if self._due else None)


_WATCHDOG = _Watchdog()


def _call_deadline() -> _Deadline | None:
    found: _Deadline | None = getattr(_local, "call", None)
    return found


def _connect(connection: HTTPConnection, connect: Callable[[], None]) -> None:
    call = _call_deadline()
    if call is not None and call.expired:
        raise ConnectTimeoutError(connection, "the call's deadline has passed")
    connect()
    if call is not None:
        call.watch(connection)  # connected after the deadline passed: cut at once


class _Connection(HTTPConnection):
    def connect(self) -> None:
        _connect(self, super().connect)


class _TLSConnection(HTTPSConnection):
    def connect(self) -> None:
        _connect(self, super().connect)


def _watched(connection: Any) -> Any:
    """``connection``, watched by the current call's deadline: a pooled one, already connected
    (a new one is watched at connect)."""
    call = _call_deadline()
    if call is not None:
        call.watch(connection)
    return connection


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _watched(super()._get_conn(timeout))


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _watched(super()._get_conn(timeout))


_POOLS: Final[dict[str, type[HTTPConnectionPool]]] = {"http": _Pool, "https": _TLSPool}


class _Adapter(HTTPAdapter):
    """requests' adapter, with connections that a call's deadline can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, ProxyManager):  # not a SOCKS one: its pools are its own
            manager.pool_classes_by_scheme = _POOLS
        return manager


def _within_call(seconds: float) -> float:
    """A wait between attempts, cut to what is left of the call's deadline."""
    call = _call_deadline()
    return seconds if call is None else min(seconds, call.remaining())


class _Retry(Retry):
    #: Retry-After is honoured on the statuses we retry anyway; never on 413 or other 4xx.
    RETRY_AFTER_STATUS_CODES = frozenset({429, 503})

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        try:
            seconds = super().get_retry_after(response)
        except InvalidHeader:
            return None  # neither seconds nor a date ("soon"): ignored, the backoff applies
        return None if seconds is None else _within_call(seconds)

    def get_backoff_time(self) -> float:
        return _within_call(super().get_backoff_time())


def _retry(cfg: UpstreamConfig) -> Retry:
    extra: dict[str, Any] = {}
    if "retry_after_max" in inspect.signature(Retry.__init__).parameters:
        # A Retry-After of hours would stall the evaluation loop; wait at most one timeout.
        extra["retry_after_max"] = max(1, math.ceil(cfg.timeout))
    return _Retry(
        total=cfg.retries,
        backoff_factor=cfg.backoff,
        backoff_max=max(cfg.backoff, cfg.timeout),
        status_forcelist=_RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "POST"}),
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
        **extra,
    )


class _Secret:
    """A secret given inline or in a file; the file is re-read whenever its stat changes, so a
    rotated secret (a Kubernetes projected volume swaps a symlink) is used from the next request.
    """

    def __init__(self, value: str | None, path: Path | None, what: str, header: bool) -> None:
        self._path = path
        self._what = what
        #: Sent as it is in a header (a token), not base64-encoded (a password).
        self._header = header
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._problem: str | None = None
        self._value = value or ""
        if path is not None:
            self._value = self._read_file(path)  # ConfigError at start-up

    def _read_file(self, path: Path) -> str:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise ConfigError(
                f"{path}: cannot read {self._what} file: {error.strerror or error}"
            ) from None
        value = read_secret(path)
        if not value:
            raise ConfigError(f"{path}: {self._what} file is empty")
        problem = unsendable(value, self._header)
        if problem is not None:
            raise ConfigError(f"{path}: {self._what} file {problem}")
        self._stamp = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
        return value

    def get(self) -> str:
        path = self._path
        if path is None:
            return self._value
        with self._lock:
            try:
                stat = os.stat(path)
                if (stat.st_mtime_ns, stat.st_ino, stat.st_size) != self._stamp:
                    self._value = self._read_file(path)
                    log.info("re-read the %s from %s", self._what, path)
                self._problem = None
            except (OSError, ConfigError) as error:
                # Mid-rotation the file can be briefly absent or empty: keep the last good one.
                problem = str(error)
                if problem != self._problem:
                    log.warning("keeping the previous %s: %s", self._what, problem)
                self._problem = problem
            return self._value


class _Auth(requests.auth.AuthBase):
    """Sets Authorization on every request (so a rotated secret file is picked up)."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self._bearer: _Secret | None = None
        self._basic: tuple[str, _Secret] | None = None
        if cfg.bearer_token is not None or cfg.bearer_token_file is not None:
            token = cfg.bearer_token.get_secret_value() if cfg.bearer_token else None
            self._bearer = _Secret(token, cfg.bearer_token_file, "bearer token", True)
        elif cfg.basic_auth is not None:
            basic = cfg.basic_auth
            inline = basic.password.get_secret_value() if basic.password else None
            password = _Secret(inline, basic.password_file, "basic auth password", False)
            self._basic = (basic.username, password)

    def header(self) -> str | None:
        if self._bearer is not None:
            return f"Bearer {self._bearer.get()}"
        if self._basic is not None:
            username, password = self._basic
            raw = f"{username}:{password.get()}".encode()
            return f"Basic {base64.b64encode(raw).decode('ascii')}"
        return None

    def secrets(self) -> list[str]:
        found: list[str] = []
        if self._bearer is not None:
            found.append(self._bearer.get())
        if self._basic is not None:
            found.append(self._basic[1].get())
        header = self.header()
        if header is not None:
            found.append(header.split(" ", 1)[1])
        return found

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        header = self.header()
        if header is not None:
            request.headers["Authorization"] = header
        return request


_SECRET_HEADER = re.compile(r"auth|token|key|secret|passw|cookie", re.IGNORECASE)


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _describe(error: BaseException) -> str:
    text = str(error)
    marker = "Failed to establish a new connection: "
    if marker in text:
        text = text.split(marker, 1)[1]
    return text


def _system_reason(error: BaseException) -> str | None:
    """What the system said of a failed connection ("connection refused"), if it said it."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror[:1].lower() + seen.strerror[1:]
        seen = seen.__cause__ or seen.__context__
    return None


#: JSON escapes an upstream may use for any character (Go's encoder writes & < > as \u0026
#: \u003c \u003e), a surrogate pair first; or an escaped backslash, which is skipped whole.
_ESCAPE = r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|\\)"
_ESCAPES = re.compile(_ESCAPE)
_BYTE_ESCAPES = re.compile(_ESCAPE.encode())
#: Any \uXXXX, a backslash before it or not: what decides whether to look closer.
_CODES = re.compile(r"\\u([0-9a-fA-F]{4})")
_BYTE_CODES = re.compile(rb"\\u([0-9a-fA-F]{4})")


def _may_escape(codes: set[str] | set[bytes], chars: frozenset[str]) -> bool:
    """Whether escapes of these hex ``codes`` may spell a character of ``chars`` (half of a
    surrogate pair may, when one of them lies beyond the Basic Multilingual Plane)."""
    wide = any(ord(char) > 0xFFFF for char in chars)
    for code in codes:
        number = int(code, 16)
        if chr(number) in chars or (wide and 0xD800 <= number <= 0xDFFF):
            return True
    return False


def _plain(char: str | None, chars: frozenset[str]) -> str | None:
    """How an escaped character of a secret is written instead: itself, or the short escape
    JSON has for a quote or a backslash (which must stay escaped)."""
    if char is None or char not in chars or char < " ":
        return None
    return "\\" + char if char in "\"\\" else char


def _escaped(match: re.Match[str] | re.Match[bytes]) -> str | None:
    """The character a ``\\uXXXX`` escape (or a surrogate pair of them) stands for."""
    high, low, single = match.groups()
    if single is not None:
        code = int(single, 16)
        return None if 0xD800 <= code <= 0xDFFF else chr(code)
    if high is not None and low is not None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    return None  # an escaped backslash


def _unescape(text: str, chars: frozenset[str]) -> str:
    """``text`` (JSON) with the escapes of ``chars`` written as the characters themselves: the
    same JSON, in which a secret can be found whichever characters of it were escaped."""
    if "\\u" not in text or not _may_escape(set(_CODES.findall(text)), chars):
        return text

    def plain(match: re.Match[str]) -> str:
        return _plain(_escaped(match), chars) or match.group(0)

    return _ESCAPES.sub(plain, text)


def _unescape_bytes(body: bytearray, chars: frozenset[str]) -> bytearray:
    if b"\\u" not in body or not _may_escape(set(_BYTE_CODES.findall(body)), chars):
        return body

    def plain(match: re.Match[bytes]) -> bytes:
        char = _plain(_escaped(match), chars)
        return char.encode() if char is not None else match.group(0)

    return bytearray(_BYTE_ESCAPES.sub(plain, body))


class PrometheusClient:
    """The Prometheus HTTP API over one :class:`requests.Session`.

    Queries are POSTed as forms (long PromQL never meets URL limits). Connection failures, read
    timeouts, 429 and 5xx answers are retried ``cfg.retries`` times with exponential backoff
    (Retry-After honoured on 429/503, capped at one timeout; one that is neither seconds nor a
    date is ignored); other 4xx never. Redirects are not followed (a 301/302 would turn the POST
    into a GET): they fail as ``bad_response`` naming the target. A call, retries and waits
    included, ends by :attr:`request_deadline` (``(retries + 1) * timeout``) as a ``timeout``.

    ``on_request(outcome, seconds)`` is called once per API call (all retries included), with
    ``ok`` or the :class:`UpstreamError` reason.

    Every answer is bounded by ``cfg.max_response_bytes``, and the answers of the calls in
    flight at once together by ``cfg.cycle_response_bytes`` (:class:`ResponseBudget`; an
    answer held from its first byte until it is parsed): the worker runs one cycle at a time,
    so the calls in flight are the queries of one cycle.

    Answers are decoded and parsed one at a time, holding ``cpu`` (by default a lock of this
    client's): that work runs under the interpreter lock, so answers decoded at once would only
    take turns on it, and each thread doing so is one more that every other thread (one serving
    a scrape) waits behind for its turn. Given the lock that other CPU work holds (the worker's
    derivation), the two take turns the same way.
    """

    def __init__(
        self,
        cfg: UpstreamConfig,
        *,
        on_request: Callable[[str, float], None] | None = None,
        cpu: AbstractContextManager[Any] | None = None,
    ) -> None:
        self._cfg = cfg
        self._cpu = cpu if cpu is not None else threading.Lock()
        self._budget = ResponseBudget(cfg.cycle_response_bytes)
        self._base = cfg.url.rstrip("/")
        self._on_request = on_request
        self._auth = _Auth(cfg)  # reads secret files now: ConfigError at start-up, not later
        self._insecure = cfg.tls.insecure_skip_verify
        self._verify: bool | str
        if self._insecure:
            log.warning(
                "upstream.tls.insecure_skip_verify is on: the certificate of %s is not verified",
                _safe_url(self._base),
            )
            self._verify = False
        elif cfg.tls.ca_file is not None:
            if not cfg.tls.ca_file.is_file():
                raise ConfigError(f"{cfg.tls.ca_file}: tls.ca_file is not a readable file")
            self._verify = str(cfg.tls.ca_file)
        else:
            self._verify = True
        self._timeout = (cfg.timeout, cfg.timeout)
        self._query_timeout = format_duration(cfg.timeout)
        session = requests.Session()
        adapter = _Adapter(max_retries=_retry(cfg))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.verify = self._verify
        session.auth = self._auth
        session.headers["User-Agent"] = f"triton-mig-exporter/{_version()}"
        session.headers["Accept"] = "application/json"
        session.headers["Accept-Encoding"] = "gzip" if cfg.gzip else "identity"
        session.headers.update(cfg.headers)
        self._session = session
        self._redact_values = [
            v for k, v in cfg.headers.items() if _SECRET_HEADER.search(k) and len(v) >= 3
        ]

    # -- public API --

    @property
    def session(self) -> requests.Session:
        """The underlying session (tests mount fake transports on it)."""
        return self._session

    @property
    def url(self) -> str:
        """The base URL, without any user:password."""
        return _safe_url(self._base)

    @property
    def budget(self) -> ResponseBudget:
        """The answer bytes the calls in flight share (one cycle's queries)."""
        return self._budget

    @property
    def request_deadline(self) -> float:
        """Seconds a call may take, retries and the waits between them included."""
        return (self._cfg.retries + 1) * self._cfg.timeout

    def instant(self, query: str, at: float) -> QueryResult:
        """Evaluate ``query`` at ``at`` (Unix seconds): a ``vector`` answer."""
        form = {"query": query, "time": _time(at), "timeout": self._query_timeout}
        with self._observe(), self._share() as share:
            result: QueryResult = self._call(
                "POST", "/api/v1/query", form, query, share, lambda p: parse_vector(p, query)
            )
            return result

    def range(self, query: str, start: float, end: float, step: float) -> QueryResult:
        """Evaluate ``query`` over ``[start, end]`` every ``step`` seconds: a ``matrix`` answer."""
        if step <= 0 or end < start:
            raise ValueError(f"bad range: start={start} end={end} step={step}")
        form = {
            "query": query,
            "start": _time(start),
            "end": _time(end),
            "step": f"{step:.3f}",
            "timeout": self._query_timeout,
        }
        with self._observe(), self._share() as share:
            result: QueryResult = self._call(
                "POST", "/api/v1/query_range", form, query, share, lambda p: parse_matrix(p, query)
            )
            return result

    def label_names(self) -> list[str]:
        with self._observe("GET /api/v1/labels"), self._share() as share:
            data, _ = parse_envelope(self._call("GET", "/api/v1/labels", None, None, share))
            return _string_list(data)

    def label_values(self, name: str, match: list[str] | None = None) -> list[str]:
        path = f"/api/v1/label/{quote(name, safe='')}/values"
        params = {"match[]": list(match)} if match else None
        with self._observe(f"GET {path}"), self._share() as share:
            data, _ = parse_envelope(self._call("GET", path, params, None, share))
            return _string_list(data)

    def series(self, match: list[str], start: float, end: float) -> list[dict[str, str]]:
        if not match:
            raise ValueError("series() needs at least one match[] selector")
        form = {"match[]": list(match), "start": _time(start), "end": _time(end)}
        with self._observe("POST /api/v1/series"), self._share() as share:
            data, _ = parse_envelope(self._call("POST", "/api/v1/series", form, None, share))
            if not isinstance(data, list) or not all(
                isinstance(s, Mapping) and all(type(v) is str for v in s.values()) for s in data
            ):
                raise _bad("'data' is not a list of label sets", None)
            return [dict(s) for s in data]

    def build_info(self) -> dict[str, str]:
        """``/api/v1/status/buildinfo`` flattened to strings (Mimir's ``features.*`` included)."""
        with self._observe("GET /api/v1/status/buildinfo"), self._share() as share:
            data, _ = parse_envelope(
                self._call("GET", "/api/v1/status/buildinfo", None, None, share)
            )
            if not isinstance(data, Mapping):
                raise _bad("'data' is not an object", None)
            return _flatten(data)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --

    @contextmanager
    def _observe(self, endpoint: str | None = None) -> Iterator[None]:
        """Time one API call and report it to ``on_request``; name ``endpoint`` in errors."""
        started = time.monotonic()
        outcome = "ok"
        try:
            yield
        except UpstreamError as error:
            outcome = error.reason
            detail = self._redact(error.detail)
            named = endpoint is not None and error.query is None and error.endpoint is None
            if named or detail != error.detail:
                raise UpstreamError(
                    error.reason,
                    detail,
                    query=error.query,
                    status=error.status,
                    endpoint=endpoint if named else error.endpoint,
                    error_type=error.error_type and self._redact(error.error_type),
                ) from None
            raise
        finally:
            if self._on_request is not None:
                try:
                    self._on_request(outcome, time.monotonic() - started)
                except Exception:
                    log.exception("on_request callback failed")

    @contextmanager
    def _share(self) -> Iterator[_Share]:
        """This call's part of the budget, given back when the answer is parsed or failed."""
        share = _Share(self._budget)
        try:
            yield share
        finally:
            share.release()

    def _secrets(self) -> list[str]:
        return [s for s in [*self._auth.secrets(), *self._redact_values] if len(s) >= 3]

    def _redact(self, text: str) -> str:
        for secret in self._secrets():
            text = text.replace(secret, "<redacted>")
        return text

    def _redact_body(self, body: bytearray) -> bytearray:
        secrets = self._secrets()
        if not secrets:
            return body
        body = _unescape_bytes(body, frozenset("".join(secrets)))
        for secret in secrets:
            for form in _json_forms(secret):
                encoded = form.encode()
                if encoded in body:
                    body = body.replace(encoded, b"<redacted>")
        return body

    def _redact_text(self, text: str) -> str:
        secrets = self._secrets()
        if not secrets:
            return text
        text = _unescape(text, frozenset("".join(secrets)))
        for secret in secrets:
            for form in _json_forms(secret):
                if form in text:
                    text = text.replace(form, "<redacted>")
        return text

    def _longest_secret(self) -> int:
        # Every character escaped: six bytes each, twelve beyond the Basic Multilingual Plane.
        return max((12 * len(s) for s in self._secrets()), default=0)

    def _error(
        self,
        reason: Reason,
        detail: str,
        *,
        query: str | None,
        endpoint: str,
        status: int | None = None,
        error_type: str | None = None,
        key: str | None = None,
        problem: str | None = None,
        advice: str = "",
    ) -> UpstreamError:
        """The error; with ``key``, a :class:`Hint` of ``problem`` (default: the detail)."""
        detail = self._redact(detail)
        hint = None
        if key is not None:
            shown = _one_line(self._redact(problem), 2 * _DETAIL_SHOWN) if problem else detail
            hint = Hint(shown, key, advice)
        return UpstreamError(
            reason,
            detail,
            query=query,
            status=status,
            endpoint=endpoint,
            error_type=error_type,
            hint=hint,
        )

    def _call(
        self,
        method: str,
        path: str,
        fields: Mapping[str, Any] | None,
        query: str | None,
        share: _Share,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Send one request (retries included) and return the decoded JSON of a 2xx answer, or
        what ``parse`` makes of it (decoded and parsed holding the ``cpu`` lock)."""
        endpoint = f"{method} {path}"
        started = time.monotonic()
        watch = self._deadline(query, endpoint)
        failure: UpstreamError | None = None
        before, _local.call = getattr(_local, "call", None), watch
        try:
            status, answer, size, location = self._exchange(
                method, path, fields, query, share, endpoint)
        except UpstreamError as error:
            failure = error
        finally:
            _local.call = before
            watch.stop()
        if watch.expired:
            # Whatever cutting the connection made of the answer (a broken read, a body cut
            # short), the deadline is why it failed.
            failure = self._late(watch, query, endpoint)
        if failure is not None:
            raise failure
        log.debug(
            "%s %s -> %d, %d bytes in %.3fs",
            method,
            path,
            status,
            size,
            time.monotonic() - started,
        )
        if isinstance(answer, str):
            with self._cpu:
                try:
                    payload = decode_json(answer)
                except (ValueError, RecursionError) as error:
                    failure = self._not_json(
                        error, answer[:80], query=query, path=endpoint, status=status)
                if failure is not None:
                    # Raised outside the handler: the decoder's error holds the whole answer
                    # (JSONDecodeError.doc), which must not ride along as its __context__.
                    raise failure
                if parse is None:
                    return payload
                try:
                    return parse(payload)
                finally:
                    release(payload)
        if 400 <= status < 600:
            reason: Reason = "http_4xx" if status < 500 else "http_5xx"
            text, error_type = _error_text(answer)
            detail = f"HTTP {status}: {text}"
            key, problem, advice = self._status_hint(status, detail, endpoint)
            raise self._error(
                reason,
                detail,
                query=query,
                endpoint=endpoint,
                status=status,
                error_type=error_type,
                key=key,
                problem=problem,
                advice=advice,
            )
        where = f" to {_safe_url(location)!r}" if location else ""
        raise self._error(
            "bad_response",
            f"unexpected HTTP {status}{where}; point upstream.url at the final address",
            query=query,
            endpoint=endpoint,
            status=status,
        )

    def _exchange(
        self,
        method: str,
        path: str,
        fields: Mapping[str, Any] | None,
        query: str | None,
        share: _Share,
        endpoint: str,
    ) -> tuple[int, str | bytearray, int, str | None]:
        """The request sent and its answer read: status, the text of a 2xx answer or the start
        of another's body (credentials redacted), the bytes read, the Location header."""
        response = self._send(method, path, fields, query)
        if isinstance(response, UpstreamError):
            raise response
        status = response.status_code
        location = response.headers.get("Location")
        if 200 <= status < 300:
            try:
                text, size = self._read_answer(response, share, query=query, path=endpoint)
            finally:
                response.close()
            return status, text, size, location
        try:  # an error's body: its start is enough, and 64 KiB needs no budget
            body = self._read(response, _ERROR_BODY_BYTES)
        except UpstreamError as error:
            raise self._error(error.reason, error.detail, query=query, endpoint=endpoint) from None
        finally:
            response.close()
        # An upstream (or a proxy) may echo the request's credentials into its answer: errors,
        # warnings, anything later shown or logged. Remove them before the body is looked at.
        return status, self._redact_body(body), len(body), location

    def _deadline(self, query: str | None, endpoint: str) -> _Deadline:
        """This call's deadline: its own, or what is left of its cycle's if that comes first
        (a timeout error when nothing is)."""
        seconds = self.request_deadline
        until: float | None = getattr(_local, "until", None)
        if until is None or until - time.monotonic() >= seconds:
            return _Deadline(seconds, None)
        seconds = until - time.monotonic()
        if seconds <= 0:
            raise self._error("timeout", NOT_SENT, query=query, endpoint=endpoint)
        return _Deadline(seconds, str(getattr(_local, "what", None) or "the cycle's deadline"))

    def _late(self, watch: _Deadline, query: str | None, endpoint: str) -> UpstreamError:
        if watch.cycle is not None:
            return self._error(
                "timeout", f"no complete answer from {self.url} by {watch.cycle}",
                query=query, endpoint=endpoint, key="upstream.timeout")
        return self._error(
            "timeout",
            f"no complete answer from {self.url} within {watch.seconds:g}s, the request "
            "deadline ((retries + 1) x timeout)",
            query=query, endpoint=endpoint, key="upstream.timeout")

    def _status_hint(
        self, status: int, detail: str, endpoint: str
    ) -> tuple[str | None, str | None, str]:
        """For a status every query would get alike: the key to check, the problem, advice."""
        if status == 401 and "no org id" in detail.lower():  # Mimir's and Cortex's words
            return ("upstream.headers", f"upstream {self.url} asks for a tenant: {detail}",
                    "set X-Scope-OrgID, as Mimir and Cortex need")
        if status in (401, 403):
            key, advice = self._credential_key()
            verb = "asks for credentials" if advice else "refused the credentials"
            return key, f"upstream {self.url} {verb}: {detail}", advice
        if status == 404 and endpoint.endswith(("/api/v1/query", "/api/v1/query_range")):
            prefix = "/prometheus"
            if self.url.endswith(prefix):
                advice = f"Prometheus itself has no prefix: {self.url.removesuffix(prefix)}"
            else:
                advice = f"a Mimir or Cortex URL ends in {prefix}: {self.url}{prefix}"
            problem = f"upstream {self.url} has no Prometheus API: {endpoint} answered {detail}"
            return "upstream.url", problem, advice
        return None, None, ""

    def _credential_key(self) -> tuple[str, str]:
        """The configuration key of the credential sent, and advice when none is."""
        cfg = self._cfg
        if cfg.bearer_token is not None:
            return "upstream.bearer_token", ""
        if cfg.bearer_token_file is not None:
            return "upstream.bearer_token_file", ""
        if cfg.basic_auth is not None:
            if cfg.basic_auth.password_file is not None:
                return "upstream.basic_auth.password_file", ""
            return "upstream.basic_auth.password", ""
        return ("upstream.bearer_token",
                "none is set (bearer_token, bearer_token_file or basic_auth)")

    def _send(
        self, method: str, path: str, fields: Mapping[str, Any] | None, query: str | None
    ) -> requests.Response | UpstreamError:
        """The response (headers read, body not yet), or the error to raise.

        The error is returned, not raised: raised here, inside the handler, it would carry the
        requests exception as its context (``from None`` only hides it from printing), and with
        it the frames of requests, urllib3 and http.client, whose locals hold the request's
        headers: the Authorization header among them. Returned, it carries nothing, and those
        frames are freed when the handler ends.
        """
        silence = warnings.catch_warnings() if self._insecure else nullcontext()
        try:
            with silence:
                if self._insecure:
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                return self._session.request(
                    method,
                    self._base + path,
                    data=fields if method == "POST" else None,
                    params=fields if method != "POST" else None,
                    timeout=self._timeout,
                    verify=self._verify,
                    stream=True,
                    allow_redirects=False,
                )
        except requests.exceptions.InvalidHeader:
            return self._unsendable(query, f"{method} {path}")
        except requests.RequestException as error:
            failure, detail, key = self._classify(error)
            return self._error(failure, detail, query=query, endpoint=f"{method} {path}", key=key)
        except ValueError:  # http.client refuses a header value, or cannot encode it
            return self._unsendable(query, f"{method} {path}")

    def _unsendable(self, query: str | None, endpoint: str) -> UpstreamError:
        # Never the exception's text: it quotes the header, the Authorization one among them.
        return self._error(
            "connection",
            "the request could not be sent: a request header (a credential or upstream.headers) "
            "holds a character HTTP does not allow",
            query=query,
            endpoint=endpoint,
        )

    def _not_json(
        self, error: Exception, start: str, *, query: str | None, path: str, status: int
    ) -> UpstreamError:
        return self._error(
            "bad_response",
            f"HTTP {status} with a body that is not valid JSON ({error}); "
            f"body starts {_one_line(start, 80)!r}",
            query=query,
            endpoint=path,
            status=status,
        )

    def _read(self, response: requests.Response, limit: int) -> bytearray:
        """An error's body, truncated at ``limit`` bytes."""
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                body += chunk[: limit - len(body)]
                if len(body) >= limit:
                    break
        except requests.RequestException as error:
            reason, detail, _ = self._classify(error)
            raise UpstreamError(reason, f"reading the answer: {detail}") from None
        return body

    def _read_answer(
        self, response: requests.Response, share: _Share, *, query: str | None, path: str
    ) -> tuple[str, int]:
        """A 2xx answer as text (credentials redacted) and its size in bytes.

        Refused as too_large beyond ``max_response_bytes``, and as over_budget as soon as the
        budget cannot hold what is read (or what the Content-Length announces: then before a
        byte is read).

        The bytes go to an anonymous memory map, not a growing bytearray: its pages become
        resident as they are written and all go back to the system when it is closed. A
        bytearray grown by realloc lands on malloc's heap once glibc has raised its mmap
        threshold (it does after freeing a large block): four answers read at once then peaked
        at twice the bytes they held. The text is decoded straight from the map, as
        ``json.loads`` would decode bytes (the same one copy).
        """
        limit = self._cfg.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit():
            if int(declared) > limit:
                raise self._error(
                    "too_large",
                    f"answer of {int(declared)} bytes exceeds max_response_bytes={limit}",
                    query=query,
                    endpoint=path,
                    status=response.status_code,
                )
            # Announced: held in full before reading, or refused without reading a byte.
            if not share.cover(int(declared)):
                raise self._over_budget(response, query, path)
        buffer: mmap.mmap | bytearray
        try:
            buffer = mmap.mmap(-1, limit)
        except (OSError, OverflowError):  # no address space for the bound: grow as needed
            buffer = bytearray()
        try:
            size = 0
            try:
                for chunk in response.iter_content(_CHUNK):
                    if len(chunk) > limit - size:
                        raise self._error(
                            "too_large",
                            f"answer exceeds max_response_bytes={limit}",
                            query=query,
                            endpoint=path,
                            status=response.status_code,
                        )
                    if not share.cover(size + len(chunk)):
                        raise self._over_budget(response, query, path)
                    buffer[size : size + len(chunk)] = chunk
                    size += len(chunk)
            except requests.RequestException as error:
                reason, detail, _ = self._classify(error)
                raise self._error(
                    reason, f"reading the answer: {detail}", query=query, endpoint=path
                ) from None
            encoding = json.detect_encoding(bytes(buffer[: min(4, size)]))
            failure = None
            try:
                with memoryview(buffer) as view, view[:size] as body:
                    text = str(body, encoding, "surrogatepass")
            except UnicodeDecodeError as error:
                # Redacted before it is shown: a window wide enough for a whole credential.
                head = self._redact_body(bytearray(buffer[: 80 + self._longest_secret()]))
                start = bytes(head[:80]).decode("utf-8", "replace")
                failure = self._not_json(
                    error, start, query=query, path=path, status=response.status_code)
            if failure is not None:
                # Raised outside the handler: UnicodeDecodeError.object is the whole answer,
                # unredacted, and must not ride along as its __context__; nor may a local of
                # this frame hold any of it (error trackers capture locals).
                chunk = b""
                if isinstance(buffer, bytearray):
                    del buffer[:]
                raise failure
        finally:
            if isinstance(buffer, mmap.mmap):
                buffer.close()
        # An upstream (or a proxy) may echo the request's credentials into its answer: errors,
        # warnings, anything later shown or logged. Remove them before the text is looked at.
        return self._redact_text(text), size

    def _over_budget(
        self, response: requests.Response, query: str | None, path: str
    ) -> UpstreamError:
        # The same text every time (no byte counts that differ by cycle): the log says a state
        # once, not once per cycle.
        return self._error(
            "over_budget",
            "the answers held at once by the queries of this cycle would exceed "
            f"max_cycle_response_bytes={self._budget.limit}; raise it or lower "
            "upstream.concurrency",
            query=query,
            endpoint=path,
            status=response.status_code,
        )

    def _classify(self, error: requests.RequestException) -> tuple[Reason, str, str | None]:
        """The reason, the detail and the configuration key to check (None: nothing in it)."""
        cause: BaseException | None = error.args[0] if error.args else None
        if isinstance(cause, MaxRetryError) and cause.reason is not None:
            cause = cause.reason
        target = self.url
        if isinstance(cause, NewConnectionError):
            why = _system_reason(cause) or _describe(cause)
            return "connection", f"cannot reach upstream {target}: {why}", "upstream.url"
        if isinstance(cause, ConnectTimeoutError) or isinstance(error, requests.ConnectTimeout):
            return ("timeout", f"no connection to {target} within {self._cfg.timeout:g}s",
                    "upstream.timeout")
        if isinstance(cause, ReadTimeoutError) or isinstance(error, requests.Timeout):
            return ("timeout", f"no answer from {target} within {self._cfg.timeout:g}s",
                    "upstream.timeout")
        if isinstance(error, requests.exceptions.SSLError):
            return ("connection", f"TLS with upstream {target} failed: "
                    f"{_describe(cause or error)}", "upstream.tls.ca_file")
        return (
            "connection",
            f"{type(error).__name__} talking to {target}: {_describe(cause or error)}",
            None,
        )


def _json_forms(secret: str) -> set[str]:
    """The ways ``secret`` can be spelled inside a JSON (or plain) body."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1].replace("/", "\\/"),
    }


def _time(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"time must be finite, got {value!r}")
    return f"{value:.3f}"


def _error_text(body: bytes | bytearray) -> tuple[str, str | None]:
    """The API's ``errorType: error`` from an error body, or the start of a non-JSON body."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if isinstance(payload, Mapping) and payload.get("status") == "error":
        error_type = str(payload.get("errorType") or "unknown")
        return f"{error_type}: {payload.get('error') or 'no error message'}", error_type
    text = _one_line(body[:200].decode("utf-8", "replace"), 200)
    return (text or "empty body"), None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, bool):
            flat[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            flat[name] = str(value)
        elif value is not None:
            flat[name] = json.dumps(value)
    return flat

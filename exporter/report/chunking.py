"""The step grid of a report and its split into range-query chunks.

Everything is computed in whole milliseconds (the resolution of the Prometheus API), so a grid
point is the same number whether it comes from here or from an API answer.

Prometheus evaluates a range query at ``start + k*step`` with *both* ends included, so two
chunks ``(a, b)`` and ``(b, c)`` return ``b`` twice (the notebook's consecutive tuples did). Our
chunks are ``(a, b)`` and ``(b + step, c)``: every step of the range lies in exactly one chunk.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_POINTS", "chunks", "extent", "step_grid", "to_millis"]

#: Prometheus refuses a range query with more than 11,000 points per series.
MAX_POINTS = 11_000


def _millis(seconds: float, what: str) -> int:
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be finite, got {seconds!r}")
    return round(seconds * 1000)


def _grid_ms(start: float, end: float, step: float) -> tuple[int, int, int]:
    """(first, last, step) in ms: first = start rounded up to the step, last = end rounded down.

    Steps are aligned to multiples of ``step`` since the epoch, so the same step always lands on
    the same instants (and the same windows) whatever start was typed.
    """
    step_ms = _millis(step, "step")
    if step_ms <= 0:
        raise ValueError(f"step must be at least 1ms, got {step!r}")
    start_ms, end_ms = _millis(start, "start"), _millis(end, "end")
    if end_ms < start_ms:
        raise ValueError(f"end ({end}) is before start ({start})")
    first = -(-start_ms // step_ms) * step_ms
    last = end_ms // step_ms * step_ms
    return first, last, step_ms


def extent(start: float, end: float, step: float, chunk: float) -> tuple[int, int]:
    """(steps, chunks) of a range: what :func:`step_grid` and :func:`chunks` would give, counted
    without building either (a range can hold billions of steps)."""
    first, last, step_ms = _grid_ms(start, end, step)
    if last < first:
        return 0, 0
    steps = (last - first) // step_ms + 1
    return steps, -(-steps // _points(chunk, step_ms))


def _points(chunk: float, step_ms: int) -> int:
    chunk_ms = _millis(chunk, "chunk")
    if chunk_ms <= 0:
        raise ValueError(f"chunk must be positive, got {chunk!r}")
    return max(1, min(MAX_POINTS, chunk_ms // step_ms + 1))


def step_grid(start: float, end: float, step: float) -> np.ndarray:
    """Every aligned step in [start, end], as float unix seconds (empty if there is none)."""
    first, last, step_ms = _grid_ms(start, end, step)
    if last < first:
        return np.array([], dtype=np.float64)
    return np.arange(first, last + 1, step_ms, dtype=np.int64) / 1000.0


def to_millis(seconds: np.ndarray | list[float]) -> np.ndarray:
    """Unix seconds as int64 milliseconds: the join key between grids and API timestamps."""
    return np.round(np.asarray(seconds, dtype=np.float64) * 1000.0).astype(np.int64)


def chunks(start: float, end: float, step: float, chunk: float) -> list[tuple[float, float]]:
    """Consecutive range-query spans ``(first, last)`` covering every aligned step once.

    Each span has at most ``MAX_POINTS`` points and lasts at most ``chunk`` seconds
    (``last - first <= chunk``); the next span starts one step after the previous one ends.
    Empty when no aligned step lies in [start, end].
    """
    first, last, step_ms = _grid_ms(start, end, step)
    points = _points(chunk, step_ms)
    spans: list[tuple[float, float]] = []
    at = first
    while at <= last:
        stop = min(at + (points - 1) * step_ms, last)
        spans.append((at / 1000.0, stop / 1000.0))
        at = stop + step_ms
    return spans

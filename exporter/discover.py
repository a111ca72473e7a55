"""``discover``: which source series the upstream holds, and which families they allow.

The notebook listed every metric name and grepped it by eye; this names the Triton and DCGM
series present, counts how many carry the labels the contract needs, and says which derived
families can be computed and why not where they cannot.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from exporter import catalog
from exporter.catalog import BaseQuery, Selectors, Source
from exporter.config import Config, ConfigError
from exporter.upstream import PrometheusClient, Querier, UpstreamError


@dataclass(frozen=True)
class SourceStatus:
    query: BaseQuery
    series: int
    usable: int
    missing_labels: tuple[str, ...]
    #: Model series that carry none of the server labels (Triton only).
    unidentified: int = 0

    @property
    def ok(self) -> bool:
        return self.usable > 0


def _count(querier: Querier, selector: str, at: float) -> int:
    frame = querier.instant(f"count({selector})", at).frame
    return int(frame["value"].iloc[0]) if len(frame) else 0


def _selector(metric: str, *matchers: str) -> str:
    return metric + "{" + ", ".join(m for m in matchers if m) + "}"


def inspect(querier: Querier, sel: Selectors, at: float) -> list[SourceStatus]:
    """One status per distinct source metric of the base queries."""
    statuses: list[SourceStatus] = []
    seen: set[str] = set()
    for query in catalog.BASE_QUERIES:
        if query.metric in seen:
            continue
        seen.add(query.metric)
        if query.source is Source.TRITON:
            base, required = sel.triton, [sel.model, sel.version, *sel.servers]
        else:
            base, required = sel.dcgm, list(sel.slice_labels)
        total = _count(querier, _selector(query.metric, base), at)
        missing = tuple(
            label
            for label in required
            if total and not _count(querier, _selector(query.metric, base, f'{label}!=""'), at)
        )
        usable, unidentified = total, 0
        if query.source is Source.TRITON and total:
            usable = _count(querier, _selector(query.metric, sel.triton_model_filter), at)
            nameless = [f'{label}=""' for label in sel.servers]
            unidentified = _count(
                querier, _selector(query.metric, sel.triton_model_filter, *nameless), at)
        statuses.append(SourceStatus(query, total, usable, missing, unidentified))
    return statuses


def report(
    statuses: list[SourceStatus], names: list[str], out: TextIO
) -> tuple[list[str], list[str]]:
    """Print the findings; return (computable, not computable) family names."""
    by_metric = {s.query.metric: s for s in statuses}
    out.write("source series (matching the configured selectors):\n")
    for status in statuses:
        note = ""
        if status.query.source is Source.TRITON and status.series:
            note = f", {status.usable} with a model label"
        if status.missing_labels:
            note += f", label(s) never set: {', '.join(status.missing_labels)}"
        if status.unidentified:
            note += f", {status.unidentified} with none of the server labels"
        out.write(f"  {status.query.metric:<44} {status.series:>7} series{note}\n")
    related = [n for n in names if n.startswith(("nv_", "DCGM_"))]
    out.write(f"\nall Triton and DCGM metric names on the upstream ({len(related)}):\n")
    for name in related:
        out.write(f"  {name}\n")
    ok: list[str] = []
    missing: list[str] = []
    out.write("\nderived families:\n")
    nameless = by_metric["nv_inference_request_success"].unidentified
    for series in catalog.SERIES:
        needed = [catalog.BASE_BY_NAME[n].metric for n in series.inputs]
        absent = [m for m in needed if not by_metric[m].ok]
        if absent:
            missing.append(series.name)
            out.write(f"  no  {series.name}  (needs {', '.join(sorted(set(absent)))})\n")
        elif nameless and series.name in catalog.COUNTS_SERVERS:
            missing.append(series.name)
            out.write(f"  no  {series.name}  (servers cannot be told apart: {nameless} "
                      "nv_inference_request_success series carry none of the server labels; "
                      "set triton.server_labels)\n")
        else:
            ok.append(series.name)
            out.write(f"  yes {series.name}\n")
    out.write(f"\n{len(ok)} of {len(catalog.SERIES)} families can be computed.\n")
    return ok, missing


def run(cfg: Config, out: TextIO = sys.stdout) -> int:
    sel = Selectors.from_config(cfg)
    try:
        with PrometheusClient(cfg.upstream) as client:
            at = time.time() - cfg.evaluation.eval_delay
            names = client.label_values("__name__")
            statuses = inspect(client, sel, at)
    except (UpstreamError, ConfigError) as error:
        print(f"error: upstream {cfg.upstream.url}: {error}", file=sys.stderr)
        return 1
    out.write(f"upstream: {cfg.upstream.url}\n")
    report(statuses, names, out)
    return 0

"""The catalog: every derived series, defined once.

Pure data. Each :class:`Series` carries its public name, help, unit, labels and its PromQL
definition (the recording-rule expression, which may read series recorded before it). The
exporter does not run those expressions one by one: it issues the fixed set of grouped
:class:`BaseQuery` and computes the same figures with pandas (``exporter.derive``). The rules
generated from :func:`series` and the exporter are two implementations of one definition.

PromQL templates use ``{placeholders}`` filled from the configuration by :class:`Selectors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from exporter.config import Config, format_duration

#: Published label names (the contract). Source label names are configuration.
MODEL, VERSION, POD, REASON = "model", "version", "pod", "reason"

PHASES = ("request", "queue", "compute_input", "compute_infer", "compute_output")

#: The MIG compute-slice counts a GPU instance profile can have (``<n>g.<mem>gb``).
MIG_SLICES_PER_GPU = 7


class Source(StrEnum):
    TRITON = "triton"
    DCGM = "dcgm"


@dataclass(frozen=True)
class BaseQuery:
    """One grouped upstream query; its result frame feeds several derived series."""

    name: str
    source: Source
    metric: str
    #: rate for Triton counters; avg_over_time / max_over_time for gauges.
    function: str
    #: Source labels kept besides the identity ones (failures: their reason).
    extra: tuple[str, ...] = ()

    def promql(self, sel: Selectors) -> str:
        if self.source is Source.TRITON:
            # No model filter here: series without a model label are needed for the raw rate.
            by = sel.join(sel.triton_labels + sel.replicas + list(self.extra))
            return f"sum by ({by}) ({self.function}({self.metric}{{{sel.triton}}}[{sel.window}]))"
        by = sel.join([*sel.slice_labels, sel.dcgm_pod, *sel.replicas])
        return f"max by ({by}) ({self.function}({self.metric}{{{sel.dcgm}}}[{sel.window}]))"


def _triton_counter(name: str, metric: str, extra: tuple[str, ...] = ()) -> BaseQuery:
    return BaseQuery(name, Source.TRITON, metric, "rate", extra)


def _dcgm_gauge(name: str, metric: str, function: str = "avg_over_time") -> BaseQuery:
    return BaseQuery(name, Source.DCGM, metric, function)


BASE_QUERIES: tuple[BaseQuery, ...] = (
    _triton_counter("count", "nv_inference_count"),
    _triton_counter("success", "nv_inference_request_success"),
    _triton_counter("failure", "nv_inference_request_failure", (REASON,)),
    _triton_counter("exec", "nv_inference_exec_count"),
    _triton_counter("cache_hits", "nv_cache_num_hits_per_model"),
    *(_triton_counter(f"{phase}_us", f"nv_inference_{phase}_duration_us") for phase in PHASES),
    BaseQuery("pending", Source.TRITON, "nv_inference_pending_request_count", "avg_over_time"),
    _dcgm_gauge("tensor", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"),
    _dcgm_gauge("dram", "DCGM_FI_PROF_DRAM_ACTIVE"),
    _dcgm_gauge("gr_engine", "DCGM_FI_PROF_GR_ENGINE_ACTIVE"),
    _dcgm_gauge("tensor_max", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "max_over_time"),
)
BASE_BY_NAME = {query.name: query for query in BASE_QUERIES}


@dataclass(frozen=True)
class Selectors:
    """The configuration as the PromQL templates see it."""

    window: str
    triton: str
    triton_model_filter: str
    dcgm: str
    replicas: list[str]
    triton_labels: list[str]
    model: str
    version: str
    #: Source labels naming a server, first non-empty wins (published as pod).
    servers: list[str]
    slice_labels: list[str]
    dcgm_pod: str
    profile: str
    idle_threshold: float

    @staticmethod
    def from_config(cfg: Config) -> Selectors:
        t, d = cfg.triton, cfg.dcgm
        model_filter = ", ".join(m for m in (f'{t.model_label}!=""', t.selector.strip()) if m)
        return Selectors(
            window=format_duration(cfg.evaluation.window),
            triton=t.selector.strip(),
            triton_model_filter=model_filter,
            dcgm=d.selector.strip(),
            replicas=list(cfg.replica_labels),
            triton_labels=[t.model_label, t.version_label, *t.server_labels],
            model=t.model_label,
            version=t.version_label,
            servers=list(t.server_labels),
            slice_labels=list(d.slice_labels),
            dcgm_pod=d.pod_label,
            profile=d.profile_label,
            idle_threshold=d.idle_threshold,
        )

    @staticmethod
    def join(labels: list[str]) -> str:
        return ", ".join(labels)


class Level(StrEnum):
    MODEL_VERSION_POD = "model_version_pod"
    MODEL_VERSION = "model_version"
    POD = "pod"
    FLEET = ""
    MODEL_VERSION_REASON = "model_version_reason"
    REASON = "reason"
    GPU_INSTANCE = "gpu_instance"


LEVEL_LABELS: dict[Level, tuple[str, ...]] = {
    Level.MODEL_VERSION_POD: (MODEL, VERSION, POD),
    Level.MODEL_VERSION: (MODEL, VERSION),
    Level.POD: (POD,),
    Level.FLEET: (),
    Level.MODEL_VERSION_REASON: (MODEL, VERSION, REASON),
    Level.REASON: (REASON,),
}


@dataclass(frozen=True)
class Series:
    """One public derived series: the contract."""

    name: str
    help: str
    unit: str
    level: Level
    #: The recording-rule expression (a template; see :meth:`expr`).
    promql: str
    #: Base queries the exporter needs to compute it.
    inputs: tuple[str, ...]

    def labels(self, sel: Selectors) -> tuple[str, ...]:
        if self.level is Level.GPU_INSTANCE:
            return (*sel.slice_labels, POD)
        return LEVEL_LABELS[self.level]

    def expr(self, sel: Selectors) -> str:
        return self.promql.format(**_template_values(sel))


#: The server is the first non-empty of the server labels: joined with ";" (never part of a pod
#: name or an instance address), the leading empty parts skipped. derive.server_identity agrees.
SERVER_PATTERN = ";*([^;]*).*"


def _template_values(sel: Selectors) -> dict[str, str]:
    r = sel.replicas
    triton_group = sel.join(sel.triton_labels + r)
    slice_group = sel.join(sel.slice_labels)
    rename = []
    # Published labels are model/version/pod whatever the source calls them.
    for source, public in ((sel.model, MODEL), (sel.version, VERSION)):
        if source != public:
            rename.append((public, source))
    server_open, server_close = "", ""
    if sel.servers == [POD]:
        pass
    elif len(sel.servers) == 1:
        server_open = "label_replace("
        server_close = f', "{POD}", "$1", "{sel.servers[0]}", "(.*)")'
    else:
        sources = ", ".join(f'"{label}"' for label in sel.servers)
        server_open = "label_replace(label_join("
        server_close = (f', "{POD}", ";", {sources}), "{POD}", "$1", "{POD}", '
                        f'"{SERVER_PATTERN}")')
    return {
        "W": sel.window,
        "T": sel.triton,
        "TM": sel.triton_model_filter,
        "D": sel.dcgm,
        "TG": triton_group,
        "SG": slice_group,
        "SGR": sel.join([*sel.slice_labels, sel.dcgm_pod, *r]),
        "DPOD": sel.dcgm_pod,
        "PROFILE": sel.profile,
        "IDLE": repr(sel.idle_threshold),
        "RENAME_OPEN": server_open + "".join("label_replace(" for _ in rename),
        "RENAME_CLOSE": "".join(f', "{pub}", "$1", "{src}", "(.*)")' for pub, src in rename)
        + server_close,
    }


def _dedup_counter(metric: str, function: str = "rate", extra: tuple[str, ...] = ()) -> str:
    """Per model, version and server (published as pod): summed within one replica, the
    highest replica taken. ``extra`` source labels (a failure's reason) are kept."""
    kept = "".join(f", {label}" for label in extra)
    return (
        f"max by (model, version, pod{kept}) ({{RENAME_OPEN}}sum by ({{TG}}{kept}) ({function}("
        + metric
        + "{{{TM}}}[{W}])){RENAME_CLOSE})"
    )


#: Appended to the figures that count servers: with a model-labelled series that carries none
#: of the server labels, servers cannot be told apart and those figures are absent.
UNIDENTIFIED = ' unless on() model_version_pod:nv_inference_request_success:rate{{pod=""}}'


def _per_server_family(
    short: str, metric: str, what: str, unit: str, operation: str = "rate",
    function: str = "rate", per_second: str = " per second",
) -> list[Series]:
    base = f"model_version_pod:{metric}:{operation}"
    per_pod_inputs = (short,)
    return [
        Series(
            base,
            f"{what}{per_second} per model, version and Triton server, deduplicated across HA "
            "replicas; only series with a model label. The server is the first of "
            "triton.server_labels a series carries (pod, else instance).",
            unit,
            Level.MODEL_VERSION_POD,
            _dedup_counter(metric, function),
            per_pod_inputs,
        ),
        Series(
            f"model_version:{metric}:{operation}",
            f"{what}{per_second} per model and version, summed over servers.",
            unit,
            Level.MODEL_VERSION,
            f"sum by (model, version) ({base})",
            per_pod_inputs,
        ),
        Series(
            f"pod:{metric}:{operation}",
            f"{what}{per_second} per Triton server, summed over models.",
            unit,
            Level.POD,
            f"sum by (pod) ({base})",
            per_pod_inputs,
        ),
        Series(
            f":{metric}:{operation}",
            f"{what}{per_second} for the fleet: the sum of the per-model figures.",
            unit,
            Level.FLEET,
            f"sum({base})",
            per_pod_inputs,
        ),
    ]


def _sum_by_model_version(metric: str) -> str:
    return "sum by (model, version) (" + _dedup_counter(metric) + ")"


def _sum_fleet(metric: str) -> str:
    return "sum(" + _dedup_counter(metric) + ")"


def _executed(level: Level) -> str:
    """Successes less response-cache hits (0 where the cache is off) at ``level``."""
    success = f"{level.value}:nv_inference_request_success:rate"
    hits = (_sum_by_model_version if level is Level.MODEL_VERSION else _sum_fleet)(
        "nv_cache_num_hits_per_model"
    )
    return f"{success} - ({hits} or {success} * 0)"


def _build() -> tuple[Series, ...]:
    out: list[Series] = []
    out += _per_server_family(
        "count", "nv_inference_count",
        "Inferences (batch items; response-cache hits are not inferences)", "inferences/s",
    )
    out += _per_server_family(
        "success", "nv_inference_request_success",
        "Successful requests (response-cache hits included)", "requests/s",
    )
    out += _per_server_family(
        "failure", "nv_inference_request_failure", "Failed requests (all reasons)", "requests/s"
    )
    by_reason = "model_version_reason:nv_inference_request_failure:rate"
    out += [
        Series(
            by_reason,
            "Failed requests per second per model, version and reason (REJECTED, CANCELED, "
            "BACKEND, OTHER; none before Triton 24.07), summed over servers.",
            "requests/s",
            Level.MODEL_VERSION_REASON,
            "sum by (model, version, reason) ("
            + _dedup_counter("nv_inference_request_failure", extra=(REASON,)) + ")",
            ("failure",),
        ),
        Series(
            "reason:nv_inference_request_failure:rate",
            "Failed requests per second per reason for the fleet.",
            "requests/s",
            Level.REASON,
            f"sum by (reason) ({by_reason})",
            ("failure",),
        ),
    ]
    out += _per_server_family(
        "pending", "nv_inference_pending_request_count",
        "Requests waiting in the scheduler's queue, averaged over the window", "requests",
        operation="avg", function="avg_over_time", per_second="",
    )
    out.append(
        Series(
            ":nv_inference_count:rate_raw",
            "sum(rate(nv_inference_count[W])) over every matching series with no deduplication "
            "and no model filter: what a naive panel shows.",
            "inferences/s",
            Level.FLEET,
            "sum(rate(nv_inference_count{{{T}}}[{W}]))",
            ("count",),
        )
    )
    out.append(
        Series(
            ":triton_inference_rate_drift:ratio",
            "Deduplicated fleet inference rate over the raw rate: 1 when healthy; below 1 when "
            "the upstream double counts (HA replicas) or holds series no model is credited with.",
            "ratio",
            Level.FLEET,
            ":nv_inference_count:rate / (:nv_inference_count:rate_raw > 0)",
            ("count",),
        )
    )
    out.append(
        Series(
            "model_version:nv_inference_batch_size:mean",
            "Mean inferences per model execution (nv_inference_count / nv_inference_exec_count); "
            "a failed execution counts as an execution without inferences and lowers it.",
            "inferences/execution",
            Level.MODEL_VERSION,
            "model_version:nv_inference_count:rate / ("
            + _sum_by_model_version("nv_inference_exec_count")
            + " > 0)",
            ("count", "exec"),
        )
    )
    out.append(
        Series(
            "model_version:nv_cache_hit:ratio",
            "Response-cache hits per successful request (present only where the cache is on).",
            "ratio",
            Level.MODEL_VERSION,
            _sum_by_model_version("nv_cache_num_hits_per_model")
            + " / (model_version:nv_inference_request_success:rate > 0)",
            ("cache_hits", "success"),
        )
    )
    out += [
        Series(
            "model_version:triton_requests_executed:rate",
            "Successful requests per second that ran the model: successes less response-cache "
            "hits (nv_inference_request_success - nv_cache_num_hits_per_model).",
            "requests/s",
            Level.MODEL_VERSION,
            _executed(Level.MODEL_VERSION),
            ("success", "cache_hits"),
        ),
        Series(
            ":triton_requests_executed:rate",
            "Successful requests per second that ran the model, over the fleet.",
            "requests/s",
            Level.FLEET,
            _executed(Level.FLEET),
            ("success", "cache_hits"),
        ),
    ]
    for phase in PHASES:
        metric = f"nv_inference_{phase}_duration_us"
        what = phase.replace("_", " ")
        # Triton charges compute time only to requests that ran the model, never to cache hits.
        compute = phase.startswith("compute")
        per, mv_den, fleet_den, den_input = (
            ("executed request (successes less cache hits)",
             "model_version:triton_requests_executed:rate",
             ":triton_requests_executed:rate", ("success", "cache_hits"))
            if compute else
            ("successful request (cache hits included)",
             "model_version:nv_inference_request_success:rate",
             ":nv_inference_request_success:rate", ("success",))
        )
        out.append(
            Series(
                f"model_version:nv_inference_{phase}_duration:mean_seconds",
                f"Mean {what} time per {per}, in seconds "
                f"(increase of {metric} / increase of requests / 1e6).",
                "seconds",
                Level.MODEL_VERSION,
                _sum_by_model_version(metric) + f" / ({mv_den} > 0) / 1e6",
                (f"{phase}_us", *den_input),
            )
        )
        out.append(
            Series(
                f":nv_inference_{phase}_duration:mean_seconds",
                f"Mean {what} time per {per} over the fleet, in seconds.",
                "seconds",
                Level.FLEET,
                _sum_fleet(metric) + f" / ({fleet_den} > 0) / 1e6",
                (f"{phase}_us", *den_input),
            )
        )
    out += [
        Series(
            "model_version:triton_servers_active:count",
            "Triton servers with at least one successful request for the model in the window.",
            "servers",
            Level.MODEL_VERSION,
            "sum by (model, version) "
            "(model_version_pod:nv_inference_request_success:rate > bool 0)" + UNIDENTIFIED,
            ("success",),
        ),
        Series(
            "pod:triton_models_active:count",
            "Models (model, version) with at least one successful request on the server in the "
            "window.",
            "models",
            Level.POD,
            "sum by (pod) (model_version_pod:nv_inference_request_success:rate > bool 0)"
            + UNIDENTIFIED,
            ("success",),
        ),
        Series(
            ":triton_servers_active:count",
            "Triton servers with any successful request in the window.",
            "servers",
            Level.FLEET,
            "sum(pod:nv_inference_request_success:rate > bool 0)" + UNIDENTIFIED,
            ("success",),
        ),
        Series(
            ":triton_model_servers_active:sum",
            "Sum over models of the servers active for each.",
            "servers",
            Level.FLEET,
            "sum(model_version:triton_servers_active:count)",
            ("success",),
        ),
        Series(
            ":triton_model_concurrency:ratio",
            "Summed servers active per model over servers active: the mean number of models a "
            "busy server serves.",
            "models/server",
            Level.FLEET,
            ":triton_model_servers_active:sum / (:triton_servers_active:count > 0)",
            ("success",),
        ),
    ]
    dcgm = (
        ("tensor", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "tensor-pipe"),
        ("dram", "DCGM_FI_PROF_DRAM_ACTIVE", "DRAM"),
        ("gr_engine", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "graphics-engine"),
    )
    for short, metric, what in dcgm:
        out.append(
            Series(
                f"gpu_instance:dcgm_{short}_active:avg",
                f"Mean {what} activity (0..1) of the MIG slice over the window, deduplicated "
                "across HA replicas; pod is the workload on the slice when known.",
                "ratio",
                Level.GPU_INSTANCE,
                _slice_expr(metric, "avg_over_time"),
                (short,),
            )
        )
    for short in ("tensor", "dram"):
        out.append(
            Series(
                f":dcgm_{short}_active:sum",
                f"{short.capitalize()} activity summed over the selected MIG slices, each slice "
                "once (a slice shared by several pods has a row per pod).",
                "slices",
                Level.FLEET,
                f"sum(max by ({{SG}}) (gpu_instance:dcgm_{short}_active:avg))",
                (short,),
            )
        )
    weighted = " or ".join(
        f'gpu_instance:dcgm_tensor_active:avg{{{{{{PROFILE}}=~"{n}g\\\\..*"}}}} * {n} / '
        f"{MIG_SLICES_PER_GPU}"
        for n in range(1, MIG_SLICES_PER_GPU + 1)
    )
    out += [
        Series(
            ":dcgm_tensor_active:gpu_equivalents",
            "Tensor activity weighted by each slice's share of its GPU (a 3g slice counts 3/7, a "
            "whole GPU 1), each slice once: busy GPUs' worth of tensor work.",
            "GPUs",
            Level.FLEET,
            "sum(max by ({SG}) (" + weighted
            + ' or gpu_instance:dcgm_tensor_active:avg{{{PROFILE}=""}}))',
            ("tensor",),
        ),
        Series(
            ":dcgm_mig_slices_idle:count",
            "Selected MIG slices whose tensor activity stayed under the idle threshold for the "
            "whole window, each slice once.",
            "slices",
            Level.FLEET,
            "sum(max by ({SG}) ("
            + _slice_expr("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "max_over_time")
            + ") < bool {IDLE})",
            ("tensor_max",),
        ),
    ]
    return tuple(out)


def _slice_expr(metric: str, function: str) -> str:
    return (
        "max by ({SG}, pod) (label_replace(max by ({SGR}) ("
        + function
        + "("
        + metric
        + '{{{D}}}[{W}])), "pod", "$1", "{DPOD}", "(.*)"))'
    )


SERIES: tuple[Series, ...] = _build()
SERIES_BY_NAME = {s.name: s for s in SERIES}
#: The figures that count servers: absent while servers cannot be told apart (UNIDENTIFIED).
COUNTS_SERVERS = frozenset({
    "model_version:triton_servers_active:count",
    "pod:triton_models_active:count",
    ":triton_servers_active:count",
    ":triton_model_servers_active:sum",
    ":triton_model_concurrency:ratio",
})


def series() -> tuple[Series, ...]:
    return SERIES

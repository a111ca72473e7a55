"""Configuration: the YAML file, validated into typed objects.

Every error names the file and the key. Environment variables override the file for containers:
``TRITON_MIG_EXPORTER_<SECTION>__<KEY>`` (double underscore between levels, case-insensitive),
e.g. ``TRITON_MIG_EXPORTER_UPSTREAM__URL=http://mimir:9009/prometheus``. Their values are parsed
as YAML, so ``false``, ``30s`` and ``[a, b]`` mean what they look like.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "TRITON_MIG_EXPORTER_"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming file and key."""


def parse_duration(value: object) -> float:
    """Seconds from a Prometheus-style duration (``90s``, ``2m``, ``1h30m``) or a number."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 2m, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"expected a duration such as 30s, 2m or 1h30m, got {value!r}")
    else:
        raise ValueError(f"expected a duration such as 30s or 2m, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be a finite non-negative number, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """A PromQL range duration for ``seconds`` (whole milliseconds)."""
    millis = round(seconds * 1000)
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


Duration = Annotated[float, BeforeValidator(parse_duration)]
_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
LabelName = Annotated[str, Field(pattern=_LABEL_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BasicAuth(_Strict):
    username: str
    password: str | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one_password(self) -> BasicAuth:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        return self


class TLS(_Strict):
    #: Verify the upstream's certificate (on by default; turn off only with insecure_skip_verify).
    insecure_skip_verify: bool = False
    ca_file: Path | None = None


class UpstreamConfig(_Strict):
    url: str = "http://127.0.0.1:9090"
    bearer_token: str | None = None
    bearer_token_file: Path | None = None
    basic_auth: BasicAuth | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    tls: TLS = Field(default_factory=TLS)
    timeout: Duration = 10.0
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    backoff: Duration = 0.5
    max_response_bytes: Annotated[int, Field(gt=0)] = 64 * 1024 * 1024
    #: Base queries of one cycle in flight at once: with round-trip latency the cycle then
    #: takes about its slowest query, not the sum.
    concurrency: Annotated[int, Field(ge=1, le=32)] = 4

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @model_validator(mode="after")
    def _one_token(self) -> UpstreamConfig:
        if self.bearer_token is not None and self.bearer_token_file is not None:
            raise ValueError("set bearer_token or bearer_token_file, not both")
        if (self.bearer_token or self.bearer_token_file) and self.basic_auth:
            raise ValueError("set a bearer token or basic_auth, not both")
        return self


class EvaluationConfig(_Strict):
    interval: Duration = 30.0
    window: Duration = 120.0
    #: Evaluate at now - eval_delay: remote upstreams (Mimir, Cortex, Thanos) ingest with a lag.
    eval_delay: Duration = 0.0
    #: Derived series are withdrawn when the last good cycle is older than this (default: 3
    #: intervals).
    staleness: Duration | None = None
    #: The upstream's scrape interval, when known: the window must be at least 4x it.
    scrape_interval: Duration | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationConfig:
        if self.interval <= 0:
            raise ValueError("interval: must be greater than 0")
        if self.window <= 0:
            raise ValueError("window: must be greater than 0")
        if self.scrape_interval is not None and self.window < 4 * self.scrape_interval:
            raise ValueError(
                f"window: {format_duration(self.window)} is under 4x the scrape_interval "
                f"{format_duration(self.scrape_interval)}; rate() needs several samples"
            )
        if self.staleness is not None and self.staleness < self.interval:
            raise ValueError("staleness: must be at least one interval")
        return self

    @property
    def staleness_bound(self) -> float:
        return self.staleness if self.staleness is not None else 3 * self.interval


class WebConfig(_Strict):
    listen_address: str = ":9410"

    @field_validator("listen_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        _, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be HOST:PORT or :PORT, got {value!r}")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen_address.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


class TritonConfig(_Strict):
    #: Extra label matchers for every Triton series, e.g. 'namespace="triton"'.
    selector: str = ""
    model_label: LabelName = "model"
    version_label: LabelName = "version"
    pod_label: LabelName = "pod"


class DCGMConfig(_Strict):
    selector: str = 'exported_container="triton", exported_namespace="triton"'
    slice_labels: list[LabelName] = Field(
        default_factory=lambda: ["instance", "device", "GPU_I_ID", "GPU_I_PROFILE"]
    )
    #: The label carrying the workload pod on a slice (exported_pod with honor_labels: false).
    pod_label: LabelName = "exported_pod"
    profile_label: LabelName = "GPU_I_PROFILE"
    #: A slice whose tensor activity stays under this for the whole window counts as idle.
    idle_threshold: Annotated[float, Field(ge=0, le=1)] = 0.01

    @field_validator("slice_labels")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one label")
        if len(set(value)) != len(value):
            raise ValueError("labels must be unique")
        return value


class Config(_Strict):
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    #: Labels that tell HA Prometheus replicas apart; figures are deduplicated across them.
    replica_labels: list[LabelName] = Field(default_factory=lambda: ["prometheus_replica"])
    triton: TritonConfig = Field(default_factory=TritonConfig)
    dcgm: DCGMConfig = Field(default_factory=DCGMConfig)

    @model_validator(mode="after")
    def _labels_distinct(self) -> Config:
        triton = {self.triton.model_label, self.triton.version_label, self.triton.pod_label}
        if len(triton) != 3:
            raise ValueError("triton: model_label, version_label and pod_label must differ")
        clash = set(self.replica_labels) & (triton | set(self.dcgm.slice_labels))
        if clash:
            raise ValueError(f"replica_labels: {sorted(clash)} also name a source identity label")
        return self


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Config.model_fields:
            continue  # other variables of ours (e.g. the cache folder) are not config keys
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment: {name}: conflicts with another variable")
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else None
    return overrides


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(source: str, error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{source}: {key}: {message}{suffix}"


def from_mapping(
    data: Mapping[str, Any],
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate a mapping (parsed YAML); environment, then ``overrides`` (flags), win over it."""
    merged = _merge(dict(data), _env_overrides(os.environ if environ is None else environ))
    merged = _merge(merged, overrides or {})
    try:
        return Config.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_format_error(source, error)) from None


def load(
    path: str | Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the YAML file at ``path`` (``None``: built-in defaults)."""
    if path is None:
        return from_mapping({}, "<defaults>", environ, overrides)
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of keys")
    return from_mapping(data, source, environ, overrides)


def read_secret(path: Path) -> str:
    """The content of a secret file, stripped of the trailing newline editors add."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read secret file: {error.strerror or error}") from None

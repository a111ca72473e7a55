"""Configuration: the YAML file, validated into typed objects.

Every error names the file and the key. Environment variables override the file for containers:
``TRITON_MIG_EXPORTER_<SECTION>__<KEY>`` (double underscore between levels, case-insensitive),
e.g. ``TRITON_MIG_EXPORTER_UPSTREAM__URL=http://mimir:9009/prometheus``. Their values are parsed
as YAML, so ``false``, ``30s`` and ``[a, b]`` mean what they look like. A variable with the prefix
that names no key is an error naming it (a misspelling would otherwise be ignored), and so is a
bad value (the variable, not the file, is named).

The file must be a regular file of at most 1 MiB holding a YAML mapping; a key given twice in
one mapping is an error naming the line (PyYAML would keep the last silently).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit

import promql_parser
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from exporter.web import BCRYPT_HASH, bcrypt_cost

ENV_PREFIX = "TRITON_MIG_EXPORTER_"
#: Variables with the prefix that are not configuration keys (promserver.CACHE_ENV); any other
#: is a key, and one that names no key is an error.
OTHER_VARIABLES = frozenset({"TRITON_MIG_EXPORTER_CACHE"})
#: A configuration file larger than this is refused unread: no configuration comes near it.
MAX_FILE_BYTES = 1 << 20
#: Validation context key: also check that the files the configuration names can be used
#: (secrets readable and not empty, certificates loadable). :func:`load` and
#: :func:`from_mapping` set it, so ``check-config`` and ``serve`` agree; models built in code
#: without it do not touch the disk.
CHECK_FILES = "check_files"

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


#: The instants a command takes (``once --at``, ``report --start``/``--end``): from the epoch to
#: the end of year 9999, what RFC 3339 can write and Python's datetime can hold.
FIRST_INSTANT = 0.0
LAST_INSTANT = 253402300799.0


def check_instant(seconds: float, text: str) -> float:
    """``seconds`` (read from ``text``) if it is an instant between 1970 and 9999, else
    ValueError saying so."""
    if not FIRST_INSTANT <= seconds <= LAST_INSTANT:  # NaN too
        raise ValueError(f"{text!r} is not an instant between 1970-01-01T00:00:00Z and "
                         "9999-12-31T23:59:59Z (unix seconds 0 to 253402300799)")
    return seconds


def worst_case_seconds(timeout: float, retries: int, backoff: float) -> float:
    """How long one upstream call can take before it gives up (the client of
    exporter/upstream.py): ``retries + 1`` attempts of up to ``timeout`` each, and before each
    retry the longer of urllib3's backoff (none before the first retry, then ``backoff x
    2^(n-1)``, at most ``max(backoff, timeout)``) and a ``Retry-After``, which the client caps
    at ``max(1 s, timeout)``.

    The queries of a cycle run concurrently and, once the upstream proves unreachable, the
    ones not yet sent give up at once, so a cycle takes about this long at worst.
    """
    retry_after = max(1.0, float(math.ceil(timeout)))
    longest = max(backoff, timeout)
    waits = sum(
        max(0.0 if n == 1 else min(longest, backoff * 2 ** (n - 1)), retry_after)
        for n in range(1, retries + 1)
    )
    return (retries + 1) * timeout + waits


Duration = Annotated[float, BeforeValidator(parse_duration)]
_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
LabelName = Annotated[str, Field(pattern=_LABEL_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _checking_files(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(CHECK_FILES))


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return _one_line(str(error)) or type(error).__name__


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _check_secret_file(key: str, path: Path, header: bool = False) -> None:
    """The secret file can be read, is not empty and holds what a request can carry (``header``:
    sent as it is in an HTTP header); its content is not kept or shown."""
    try:
        _refuse_special(path)
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{key}: cannot read {path}: {_why(error)}") from None
    except ConfigError as error:
        raise ValueError(f"{key}: {error}") from None
    if not value:
        raise ValueError(f"{key}: {path} is empty")
    problem = unsendable(value, header)
    if problem is not None:
        raise ValueError(f"{key}: {path} {problem}")


#: Control characters (tab aside): a line break would end an HTTP header early, and none of
#: them belongs in a credential or a header value.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: An HTTP header name (RFC 9110's token).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def unsendable(value: str, header: bool = True) -> str | None:
    """Why ``value`` cannot be sent as a credential (``header``: as it is, in an HTTP header),
    without quoting it; None when it can."""
    if _CONTROL.search(value):
        return "holds a line break or another control character"
    if header and not value.isascii():
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return "holds a character outside Latin-1, which an HTTP header cannot carry"
    return None


def _sendable_secret(value: SecretStr | None, header: bool, strip: str | None) -> SecretStr | None:
    """``value`` stripped of ``strip`` at both ends (None: whitespace), or ValueError saying
    why it cannot be sent, never what it is. Only a token (``header``) may not be empty."""
    if value is None:
        return None
    text = value.get_secret_value().strip(strip)
    if header and not text:
        raise ValueError("is empty")
    problem = unsendable(text, header)
    if problem is not None:
        raise ValueError(problem)
    return SecretStr(text)


def _check_ca_file(key: str, path: Path) -> None:
    """The CA bundle is a readable file holding at least one PEM certificate."""
    if not path.is_file():
        raise ValueError(f"{key}: {path} is not a readable file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"{key}: cannot load {path} as a PEM CA bundle: {_why(error)}") from None


def _no_key_password() -> bytes:
    return b""  # an encrypted key fails to load instead of prompting on the terminal


def _check_cert_and_key(
    cert: Path, key: Path, names: tuple[str, str] = ("tls_cert_file", "tls_key_file")
) -> None:
    for name, path in zip(names, (cert, key), strict=True):
        if not path.is_file():
            raise ValueError(f"{name}: {path} is not a readable file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(key), password=_no_key_password)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(
            f"{names[0]}: cannot load {cert} with key {key} (PEM, key not encrypted, "
            f"matching the certificate): {_why(error)}"
        ) from None


def check_selector(value: str) -> str:
    """``value`` if it is PromQL label matchers (``a="b", c=~"d.*"``), else ValueError.

    Parsed with promql-parser as the matchers of ``x{...}``: anything that makes that more
    than one plain vector selector (a closing brace, an operator, a modifier) is refused, so a
    selector can never turn a base query into another query.
    """
    try:
        expr = promql_parser.parse(f"x{{{value}}}")
    except ValueError as error:
        raise ValueError(f"not valid PromQL label matchers ({_one_line(str(error))})") from None
    if (
        not isinstance(expr, promql_parser.VectorSelector)
        or expr.name != "x"
        or expr.offset is not None
        or expr.at is not None
    ):
        raise ValueError('must be label matchers only, such as namespace="triton"')
    return value


class BasicAuth(_Strict):
    username: str
    password: SecretStr | None = None
    password_file: Path | None = None

    @field_validator("username")
    @classmethod
    def _usable_username(cls, value: str) -> str:
        # A YAML block scalar (|) ends in a line break; RFC 7617 takes no ':' in a user name.
        value = value.strip("\r\n")
        if ":" in value or _CONTROL.search(value):
            raise ValueError("must not hold ':' or a control character")
        return value

    @field_validator("password")
    @classmethod
    def _usable_password(cls, value: SecretStr | None) -> SecretStr | None:
        # Only the line end goes: spaces at either end may be part of the password. It is sent
        # base64-encoded, so any other character can be.
        return _sendable_secret(value, header=False, strip="\r\n")

    @model_validator(mode="after")
    def _one_password(self, info: ValidationInfo) -> BasicAuth:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.password_file is not None and _checking_files(info):
            _check_secret_file("password_file", self.password_file)
        return self


class TLS(_Strict):
    #: Verify the upstream's certificate (on by default; turn off only with insecure_skip_verify).
    insecure_skip_verify: bool = False
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _usable_ca_file(self, info: ValidationInfo) -> TLS:
        if self.ca_file is not None and _checking_files(info):
            _check_ca_file("ca_file", self.ca_file)
        return self


class UpstreamConfig(_Strict):
    url: str = "http://127.0.0.1:9090"
    bearer_token: SecretStr | None = None
    bearer_token_file: Path | None = None
    basic_auth: BasicAuth | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    tls: TLS = Field(default_factory=TLS)
    timeout: Duration = 10.0
    # Integers are strict: YAML's true would otherwise be taken for 1.
    retries: Annotated[int, Field(ge=0, le=10, strict=True)] = 2
    backoff: Duration = 0.5
    max_response_bytes: Annotated[int, Field(gt=0, strict=True)] = 64 * 1024 * 1024
    #: Answer bytes the queries of one cycle may hold at once, shared by the ``concurrency``
    #: queries in flight (None: 2 x max_response_bytes, see :attr:`cycle_response_bytes`).
    max_cycle_response_bytes: Annotated[int, Field(gt=0, strict=True)] | None = None
    #: Base queries of one cycle in flight at once: with round-trip latency the cycle then
    #: takes about its slowest query, not the sum.
    concurrency: Annotated[int, Field(ge=1, le=32, strict=True)] = 4
    #: Ask for gzip-compressed answers (see :attr:`gzip`): auto asks unless the upstream is on
    #: this host, where compressing costs the upstream CPU and saves no network.
    compression: Literal["auto", "gzip", "none"] = "auto"

    @property
    def gzip(self) -> bool:
        """Whether answers are asked for gzip-compressed: ``compression`` resolved for ``url``.

        Prometheus compresses JSON at about 30 MB/s per core: a day of range of a large fleet
        (40 MB of answers) costs it more CPU to compress than to evaluate. Across a network that
        buys a tenth of the bytes; to a loopback address it buys nothing.
        """
        if self.compression != "auto":
            return self.compression == "gzip"
        host = urlsplit(self.url).hostname or ""
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:  # a name: could be anywhere
            return True

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        # Credentials first, and never echoed: the URL would be logged and shown in errors.
        if "@" in urlsplit(value.strip()).netloc:
            raise ValueError(
                "must not carry credentials (user:password@host); use basic_auth or a bearer token"
            )
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("bearer_token")
    @classmethod
    def _usable_token(cls, value: SecretStr | None) -> SecretStr | None:
        # A YAML block scalar (|) ends in a line break, which no header can carry; a token
        # never holds whitespace at its ends.
        return _sendable_secret(value, header=True, strip=None)

    @field_validator("headers")
    @classmethod
    def _usable_headers(cls, value: dict[str, str]) -> dict[str, str]:
        usable = {}
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            # The value is never shown: X-Api-Key and the like are credentials.
            text = text.strip()
            problem = unsendable(text)
            if problem is not None:
                raise ValueError(f"the value of {name} {problem}")
            usable[name] = text
        return usable

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @property
    def worst_case_seconds(self) -> float:
        """How long one call can take before it gives up (:func:`worst_case_seconds`)."""
        return worst_case_seconds(self.timeout, self.retries, self.backoff)

    @property
    def cycle_response_bytes(self) -> int:
        """The cycle's budget: ``max_cycle_response_bytes``, by default two maximal answers.

        Two, not ``concurrency``: one answer at the per-answer bound still gets through while
        others are read, but four at once (4 x 64 MiB by default) do not.
        """
        if self.max_cycle_response_bytes is not None:
            return self.max_cycle_response_bytes
        return 2 * self.max_response_bytes

    @model_validator(mode="after")
    def _budget_holds_an_answer(self) -> UpstreamConfig:
        budget = self.max_cycle_response_bytes
        if budget is not None and budget < self.max_response_bytes:
            raise ValueError(
                f"max_cycle_response_bytes: {budget} is under max_response_bytes "
                f"{self.max_response_bytes}; an answer the per-answer bound allows could "
                "never be read"
            )
        return self

    @model_validator(mode="after")
    def _one_token(self, info: ValidationInfo) -> UpstreamConfig:
        if self.bearer_token is not None and self.bearer_token_file is not None:
            raise ValueError("set bearer_token or bearer_token_file, not both")
        if (self.bearer_token or self.bearer_token_file) and self.basic_auth:
            raise ValueError("set a bearer token or basic_auth, not both")
        if self.bearer_token_file is not None and _checking_files(info):
            _check_secret_file("bearer_token_file", self.bearer_token_file, header=True)
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


def is_password_hash(text: str) -> bool:
    return bool(BCRYPT_HASH.match(text))


def _check_users(users: dict[str, str]) -> dict[str, str]:
    for user, hashed in users.items():
        if not user or ":" in user:
            raise ValueError(f"user name {user!r} must be non-empty and without ':'")
        if hashed.startswith("$pbkdf2-sha256$"):
            raise ValueError(
                f"the value for user {user!r} is a pbkdf2-sha256 hash, which is no longer "
                "accepted: re-hash the password with bcrypt (triton-mig-exporter hash-password)"
            )
        if not is_password_hash(hashed):
            # The value is not shown: it may be a password pasted where its hash belongs.
            raise ValueError(
                f"the value for user {user!r} is not a bcrypt ($2y$, $2b$, $2a$) password hash "
                "(make one with triton-mig-exporter hash-password)"
            )
    return users


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    # Digits and dots only is meant as an IPv4 address, and this one is not.
    return not re.fullmatch(r"[0-9.]+", host) and bool(_HOSTNAME.match(host))


#: Validation context key: the folder of the web configuration file, which relative file names
#: in it are resolved against (as exporter-toolkit does).
WEB_DIR = "web_config_dir"
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
#: exporter-toolkit's client_auth_type values Python's ssl module can enforce. It cannot ask for
#: a client certificate without verifying it (RequestClientCert, RequireAnyClientCert).
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
#: exporter-toolkit keys this exporter does not implement: refused, never silently ignored.
_UNSUPPORTED = {
    "tls_server_config": ("cert", "key", "client_ca", "cipher_suites", "curve_preferences",
                          "prefer_server_cipher_suites", "client_allowed_sans"),
    "(top level)": ("http_server_config", "rate_limit"),
}


def _refuse_unsupported(where: str, data: Any) -> Any:
    if isinstance(data, dict):
        found = [key for key in _UNSUPPORTED[where] if key in data]
        if found:
            raise ValueError(
                f"{found[0]}: an exporter-toolkit setting triton-mig-exporter does not support"
            )
    return data


def _in_web_dir(value: Path | None, info: ValidationInfo) -> Path | None:
    directory = info.context.get(WEB_DIR) if info.context else None
    if value is None or directory is None or value.is_absolute():
        return value
    return Path(directory) / value


class TLSServerConfig(_Strict):
    """exporter-toolkit's ``tls_server_config``: the server's certificate and key, and
    optionally client certificates verified against a CA."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: Path | None = None
    min_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS12"
    max_version: Literal["TLS10", "TLS11", "TLS12", "TLS13"] = "TLS13"

    _unsupported = model_validator(mode="before")(
        lambda data: _refuse_unsupported("tls_server_config", data))
    _relative = field_validator("cert_file", "key_file", "client_ca_file")(_in_web_dir)

    @field_validator("client_auth_type")
    @classmethod
    def _client_auth(cls, value: str) -> str:
        if value in ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert"):
            raise ValueError(
                f"{value} is not supported: Python's ssl module cannot ask for a client "
                "certificate without verifying it; use VerifyClientCertIfGiven or "
                "RequireAndVerifyClientCert with client_ca_file"
            )
        if value not in CLIENT_AUTH:
            raise ValueError(f"{value!r} is not one of {', '.join(CLIENT_AUTH)}")
        return value

    @model_validator(mode="after")
    def _complete(self, info: ValidationInfo) -> TLSServerConfig:
        if self.cert_file is None or self.key_file is None:
            raise ValueError(f"missing {'cert_file' if self.cert_file is None else 'key_file'}")
        if self.client_ca_file is not None and self.client_auth_type == "NoClientCert":
            raise ValueError("client_ca_file is set but client_auth_type is NoClientCert")
        if self.client_ca_file is None and self.client_auth_type != "NoClientCert":
            raise ValueError(f"client_auth_type {self.client_auth_type} needs client_ca_file")
        if TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            raise ValueError(f"min_version {self.min_version} is above max_version "
                             f"{self.max_version}")
        if _checking_files(info):
            _check_cert_and_key(self.cert_file, self.key_file, ("cert_file", "key_file"))
            if self.client_ca_file is not None:
                _check_ca_file("client_ca_file", self.client_ca_file)
        return self

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        return CLIENT_AUTH[self.client_auth_type]


class WebConfigFile(_Strict):
    """An exporter-toolkit web configuration file (``--web.config.file``), the parts this
    exporter implements; others are refused by name."""

    tls_server_config: TLSServerConfig | None = None
    #: username -> bcrypt hash. /healthz and /readyz stay open.
    basic_auth_users: dict[str, str] = Field(default_factory=dict)

    _unsupported = model_validator(mode="before")(
        lambda data: _refuse_unsupported("(top level)", data))
    _password_hashes = field_validator("basic_auth_users")(_check_users)


def load_web_config(path: str | Path) -> WebConfigFile:
    """Load and check an exporter-toolkit web configuration file; ConfigError names the file
    and the key. Relative file names in it are relative to its folder."""
    source = str(path)
    data = _read_mapping(Path(path), "(without --web.config.file /metrics is plain HTTP)")
    try:
        return WebConfigFile.model_validate(
            data, context={CHECK_FILES: True, WEB_DIR: Path(path).parent})
    except ValidationError as error:
        raise ConfigError(_format_error(source, error)) from None


class WebConfig(_Strict):
    listen_address: str = ":9410"
    #: Serve over HTTPS with this certificate (PEM, chain included) and its key; both or neither.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: HTTP basic auth on /metrics and the landing page: username -> bcrypt hash. /healthz and
    #: /readyz stay open for probes.
    basic_auth_users: dict[str, str] = Field(default_factory=dict)

    @field_validator("listen_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be HOST:PORT or :PORT, got {value!r}")
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if bare and not _valid_host(bare):
            raise ValueError(f"{host!r} is not an IP address or host name (HOST:PORT or :PORT)")
        return value

    #: An exporter-toolkit web configuration file (``--web.config.file``): TLS, client
    #: certificates and basic auth, instead of the three keys above.
    config_file: Path | None = None
    #: Answer scrapes from a process of their own, which runs no cycles (see
    #: exporter/scrape_process.py): a scrape then never waits behind a cycle's CPU work for
    #: the interpreter lock. auto: once a cycle publishes more than 10,000 series (below that
    #: one process serves scrapes within a few milliseconds, and the second would cost about
    #: 25 MiB); true: from the start; false: never.
    scrape_process: Literal["auto"] | bool = "auto"

    @field_validator("scrape_process", mode="before")
    @classmethod
    def _scrape_mode(cls, value: object) -> object:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError(f"must be auto, true or false, got {value!r}")

    _password_hashes = field_validator("basic_auth_users")(_check_users)

    @model_validator(mode="after")
    def _tls_pair(self, info: ValidationInfo) -> WebConfig:
        cert, key = self.tls_cert_file, self.tls_key_file
        if (cert is None) != (key is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        if self.config_file is not None and (cert is not None or self.basic_auth_users):
            raise ValueError(
                "set config_file (--web.config.file) or tls_cert_file, tls_key_file and "
                "basic_auth_users, not both"
            )
        if cert is not None and key is not None and _checking_files(info):
            _check_cert_and_key(cert, key)
        if self.config_file is not None and _checking_files(info):
            load_web_config(self.config_file)  # ConfigError naming that file and its key
        return self

    def served(self) -> WebConfigFile:
        """How /metrics is served: read from ``config_file`` when set (ConfigError if it went
        bad since the configuration was checked), else from the keys of this section."""
        if self.config_file is not None:
            return load_web_config(self.config_file)
        tls = None
        if self.tls_cert_file is not None and self.tls_key_file is not None:
            tls = TLSServerConfig(cert_file=self.tls_cert_file, key_file=self.tls_key_file)
        return WebConfigFile(tls_server_config=tls, basic_auth_users=self.basic_auth_users)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen_address.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


#: PromQL label matchers, checked with :func:`check_selector`.
Selector = Annotated[str, AfterValidator(check_selector)]


class TritonConfig(_Strict):
    #: Extra label matchers for every Triton series, e.g. 'namespace="triton"'.
    selector: Selector = ""
    model_label: LabelName = "model"
    version_label: LabelName = "version"
    #: The labels that name a Triton server, in order: the first a series carries (non-empty) is
    #: published as ``pod``. Triton itself sets none: Kubernetes discovery adds ``pod``, every
    #: scrape adds ``instance``.
    server_labels: list[LabelName] = Field(default_factory=lambda: ["pod", "instance"])
    #: Older spelling of a one-label server identity: ``pod_label: x`` is
    #: ``server_labels: [x, instance]``.
    pod_label: LabelName | None = None

    @field_validator("server_labels")
    @classmethod
    def _servers_named(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one label")
        if len(set(value)) != len(value):
            raise ValueError("labels must be unique")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_server_identity(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or data.get("pod_label") is None:
            return data
        if "server_labels" in data:
            raise ValueError("set server_labels or pod_label, not both")
        pod = data["pod_label"]
        labels = [pod, *(["instance"] if pod != "instance" else [])]
        return {**data, "server_labels": labels, "pod_label": None}


class DCGMConfig(_Strict):
    selector: Selector = 'exported_container="triton", exported_namespace="triton"'
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


_RESERVED_ALERT_LABELS = frozenset({"alertname", "severity"})


class RulesConfig(_Strict):
    """Settings of the rule files ``triton-mig-exporter rules`` renders (``exporter.rules``)."""

    #: How often Prometheus (or a ruler) evaluates the generated rule groups.
    group_interval: Duration = 30.0
    #: The scrape job of the exporter: the exporter alerts select ``up`` and its self-metrics.
    exporter_job: Annotated[str, Field(min_length=1)] = "triton-mig-exporter"
    #: Where docs/runbook.md is served; alerts link to ``<runbook_url>#<alertname lowercased>``.
    runbook_url: Annotated[str, Field(min_length=1)] = "docs/runbook.md"
    #: Extra labels on every alert (routing, team); alertname and severity are the rules' own.
    alert_labels: dict[LabelName, str] = Field(default_factory=dict)
    #: TritonInferenceRateMismatch: the drift ratio is off 1 by more than this ...
    drift_tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.05
    #: ... for this long, while the fleet serves traffic.
    mismatch_for: Duration = 600.0
    #: TritonMigExporterUpstreamDown: upstream_up == 0 for this long.
    upstream_down_for: Duration = 300.0
    #: TritonMigExporterStale: no successful cycle for more than this.
    stale_for: Duration = 900.0
    #: TritonMigExporterAbsent: no exporter target up for this long.
    absent_for: Duration = 300.0
    #: TritonMigSlicesIdle / TritonMigSliceIdle: slices idle for this long.
    idle_for: Duration = 3600.0
    #: TritonModelQueueTimeHigh: queue time over this share of request time ...
    queue_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: ... for this long.
    queue_for: Duration = 900.0

    @field_validator("group_interval", "stale_for")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("alert_labels")
    @classmethod
    def _not_reserved(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if k in _RESERVED_ALERT_LABELS or k.startswith("__"))
        if reserved:
            raise ValueError(f"{reserved} are set by the rules themselves")
        return value


class Config(_Strict):
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    web: WebConfig = Field(default_factory=WebConfig)
    #: Labels that tell HA Prometheus replicas apart; figures are deduplicated across them.
    replica_labels: list[LabelName] = Field(default_factory=lambda: ["prometheus_replica"])
    triton: TritonConfig = Field(default_factory=TritonConfig)
    dcgm: DCGMConfig = Field(default_factory=DCGMConfig)
    rules: RulesConfig = Field(default_factory=RulesConfig)

    @model_validator(mode="after")
    def _labels_distinct(self) -> Config:
        t = self.triton
        triton = {t.model_label, t.version_label, *t.server_labels}
        if len(triton) != 2 + len(t.server_labels):
            raise ValueError("triton: model_label, version_label and server_labels must differ")
        published = sorted({"model", "version"} & set(t.server_labels))
        if published:
            raise ValueError(f"triton: server_labels: {published} are published label names")
        clash = set(self.replica_labels) & (triton | set(self.dcgm.slice_labels))
        if clash:
            raise ValueError(f"replica_labels: {sorted(clash)} also name a source identity label")
        return self

    def warnings(self) -> list[str]:
        """Settings that work but are likely wrong, one line each: ``check-config`` prints
        them and ``serve`` logs them at start."""
        found = []
        up, ev = self.upstream, self.evaluation
        worst = up.worst_case_seconds
        # A family that answers is renewed at the end of each cycle; a slow cycle ends up to
        # its worst case after the next tick, which comes up to one interval after the last end.
        if worst + ev.interval > ev.staleness_bound:
            found.append(
                f"upstream: a cycle can take up to {worst:g}s ((retries + 1) x timeout and the "
                f"waits between tries), so with evaluation.interval {ev.interval:g}s the figures "
                f"of the queries that did answer can be {worst + ev.interval:g}s old before a "
                f"cycle renews them, over evaluation.staleness {ev.staleness_bound:g}s: while "
                "the upstream is slow they would be withdrawn between cycles; lower "
                "upstream.timeout or upstream.retries, or raise evaluation.staleness"
            )
        try:
            users = self.web.served().basic_auth_users
        except ConfigError:
            users = {}
        costs = {bcrypt_cost(hashed) for hashed in users.values() if is_password_hash(hashed)}
        if len(costs) > 1:
            found.append(
                f"web: basic_auth_users: the bcrypt hashes have different costs "
                f"({', '.join(map(str, sorted(costs)))}): unknown user names take as long as the "
                "costliest, so users with a cheaper hash can be told apart by timing; hash every "
                "password with the same cost"
            )
        return found


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The configuration section behind a field's annotation (``X | None`` included)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_mapping(annotation: Any) -> bool:
    return any(get_origin(a) is dict for a in (annotation, *get_args(annotation)))


def _env_path(name: str) -> tuple[str, ...]:
    """The configuration path a variable names (ConfigError naming it when it names none)."""
    path = tuple(name[len(ENV_PREFIX):].lower().split("__"))
    if not all(path):
        raise ConfigError(f"environment: {name}: an empty key (levels are separated by a double "
                          "underscore: TRITON_MIG_EXPORTER_UPSTREAM__URL)")
    model: type[BaseModel] = Config
    where = ""
    for depth, key in enumerate(path):
        fields = model.model_fields
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            what = "a configuration section" if model is Config else f"a key of {where}"
            raise ConfigError(f"environment: {name}: {key!r} is not {what}{hint}")
        where = f"{where}.{key}" if where else key
        annotation = fields[key].annotation
        section = _model_of(annotation)
        if depth + 1 == len(path):
            return path  # a key, or a whole section given as a YAML mapping
        if section is None:
            if _is_mapping(annotation):
                return path  # a mapping's own keys (headers, alert labels) are free
            raise ConfigError(f"environment: {name}: {where} has no keys")
        model = section
    return path


def _env_overrides(
    environ: Mapping[str, str],
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The overrides the environment makes, and the variable behind each path set."""
    overrides: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in OTHER_VARIABLES:
            continue
        path = _env_path(name)
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment: {name}: conflicts with another variable")
        node[path[-1]] = _yaml_value(raw, f"environment: {name}") if raw != "" else None
        origins[path] = name
    return overrides, origins


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(source: str, error: ValidationError,
                  origins: Mapping[tuple[str, ...], str] | None = None) -> str:
    """One line: the file and the key; the variable instead of the file when the value came
    from the environment, and beside it when a check across keys involved one."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = _one_line(first["msg"].removeprefix("Value error, "))
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    loc = tuple(str(part) for part in first["loc"])
    for path, name in (origins or {}).items():
        if loc[:len(path)] == path:
            return f"environment: {name}: {key}: {message}{suffix}"
    involved = [name for path, name in (origins or {}).items() if path[:len(loc)] == loc]
    if involved:
        suffix += f" (with {', '.join(involved)} from the environment)"
    return f"{source}: {key}: {message}{suffix}"


def from_mapping(
    data: Mapping[str, Any],
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate a mapping (parsed YAML); environment, then ``overrides`` (flags), win over it."""
    env, origins = _env_overrides(os.environ if environ is None else environ)
    merged = _merge(_merge(dict(data), env), overrides or {})
    try:
        return Config.model_validate(merged, context={CHECK_FILES: True})
    except ValidationError as error:
        raise ConfigError(_format_error(source, error, origins)) from None


def load(
    path: str | Path | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load and validate the YAML file at ``path`` (``None``: built-in defaults)."""
    if path is None:
        return from_mapping({}, "<defaults>", environ, overrides)
    data = _read_mapping(Path(path), "(without --config.file the built-in defaults apply)")
    return from_mapping(data, str(path), environ, overrides)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(f"line {line}: duplicate key {str(key)!r} (the last one would "
                         "silently win)")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently). Keys merged in with ``<<`` may be given again: that is what merging is for."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[object] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    again = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: refused below
                    continue
                if again:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)  # type: ignore[arg-type]
        return mapping


def _yaml_value(text: str, source: str) -> Any:
    """``text`` parsed as YAML; ConfigError starting with ``source`` when it is not YAML, gives
    a key twice, or nests deeper than the parser's recursion allows."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects
    except _DuplicateKey as error:
        raise ConfigError(f"{source}: {error}") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None


def _read_text(path: Path) -> str:
    """The text of a regular file of at most :data:`MAX_FILE_BYTES`; ConfigError naming it for
    anything else (a FIFO would block ``check-config`` until something writes to it)."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{source}: not a regular file")
        try:
            raw = handle.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise ConfigError(f"{source}: cannot read: {error.strerror or error}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: larger than 1 MiB; not a configuration file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a UTF-8 text file") from None


def _read_mapping(path: Path, without: str) -> dict[str, Any]:
    """The YAML mapping in ``path``; ConfigError naming the file when it is anything else."""
    source = str(path)
    data = _yaml_value(_read_text(path), source)
    if data is None:
        # Nothing but comments (or nothing at all): most likely a mount or template that went
        # wrong, so not taken to mean the defaults (``without`` says how to get those).
        raise ConfigError(f"{source}: (top level): empty configuration file {without}")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of keys")
    return data


def _refuse_special(path: Path) -> None:
    """ConfigError when ``path`` is a FIFO, a device or a socket: reading one can block for
    ever. A missing file is left to the read, which says so."""
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        raise ConfigError(f"{path}: not a regular file")


def read_secret(path: Path) -> str:
    """The content of a secret file, stripped of the trailing newline editors add. A FIFO or
    other special file is refused, never waited on (opening a FIFO blocks for a writer)."""
    try:
        _refuse_special(path)
        return path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read secret file: {error.strerror or error}") from None

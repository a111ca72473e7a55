"""Secrets and TLS, end to end (issue 6, security).

The upstream's credentials never show in the config's repr, the logs (at debug level), errors
or /metrics, even when the upstream echoes them back; a rotated token file is used without a
restart; the upstream's certificate is verified by default, against a CA bundle when given,
and not at all only with a warning; /metrics can be served over TLS behind basic auth.

Certificates are made for each run with ``openssl`` (a CA and a server certificate for
127.0.0.1 signed by it). The fake upstream and the ``serve`` wrapper come from ``fakes``, shared
with test_hardening.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fakes import (
    DERIVED,
    FLEET_RATE,
    PREFIX,
    FakeUpstream,
    Reply,
    Seen,
    derived,
    encode,
    exporter_config,
    finish,
    payload,
    start_fake,
    start_serve,
    value,
)

from exporter import config, web
from exporter.config import Config, ConfigError
from exporter.lab.promserver import free_port, wait_for
from exporter.service import QUIET_LOGGERS, Service
from exporter.upstream import PrometheusClient, UpstreamError
from exporter.web import bcrypt_hash, verify_password

pytestmark = pytest.mark.integration

TOKEN = "tok-3f9a-SECRET-one"
ROTATED = "tok-77c1-SECRET-two"
PASSWORD = "pw/+=\"SECRET\\three"
SCRAPE_PASSWORD = "scrape-SECRET-four"


# --- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: Path
    cert: Path
    key: Path
    #: A client certificate signed by the CA, and one signed by nobody the server knows.
    client: tuple[str, str]
    stranger: tuple[str, str]

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make the test certificates")
    folder = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=triton-mig-exporter test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
        "-set_serial", "2", "-days", "2", "-out", "cert.pem", "-extfile", "server.ext")
    client_ext = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    (folder / "client.ext").write_text("basicConstraints=CA:FALSE\n" + client_ext)
    run("req", *ec, "-keyout", "client-key.pem", "-out", "client.csr", "-subj", "/CN=prometheus")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
        "-set_serial", "3", "-days", "2", "-out", "client.pem", "-extfile", "client.ext")
    run("req", "-x509", *ec, "-keyout", "stranger-key.pem", "-out", "stranger.pem", "-days", "2",
        "-subj", "/CN=prometheus", "-addext", "extendedKeyUsage=clientAuth")
    return PKI(folder / "ca.pem", folder / "cert.pem", folder / "key.pem",
               (str(folder / "client.pem"), str(folder / "client-key.pem")),
               (str(folder / "stranger.pem"), str(folder / "stranger-key.pem")))


@pytest.fixture
def cleanup() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


# --- the configuration ------------------------------------------------------------------------


def test_the_config_never_shows_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    for upstream in ({"bearer_token": TOKEN},
                     {"basic_auth": {"username": "exporter", "password": PASSWORD}}):
        path.write_text(yaml.safe_dump({"upstream": upstream}))
        cfg = config.load(path, environ={})
        for text in (repr(cfg), str(cfg), cfg.model_dump_json(), repr(cfg.upstream),
                     repr(cfg.model_dump())):
            assert TOKEN not in text and PASSWORD not in text
        auth = cfg.upstream.basic_auth
        secret = cfg.upstream.bearer_token or (auth.password if auth else None)
        assert secret is not None and secret.get_secret_value() in (TOKEN, PASSWORD)
    # From the environment too.
    cfg = config.load(None, environ={"TRITON_MIG_EXPORTER_UPSTREAM__BEARER_TOKEN": TOKEN})
    assert TOKEN not in repr(cfg)


# --- serve at debug level, against an upstream that echoes the credentials --------------------


def echo_credentials(fake: FakeUpstream, seen: Seen) -> Reply:
    """Every kind of answer the client reads, each carrying the Authorization header."""
    header = seen.headers.get("authorization", "")
    if seen.name == "count":
        return Reply(401, encode({"status": "error", "errorType": "unauthorized",
                                  "error": f"bad credentials: {header}"}))
    if seen.name == "success":
        return Reply(500, f"<html>upstream rejected {header}</html>".encode())
    if seen.name == "failure":  # warnings and infos are logged at debug level
        return Reply(body=encode({**payload([]), "warnings": [f"got {header}"],
                                  "infos": [header]}))
    if seen.name == "exec":
        return Reply(body=encode({"status": "error", "errorType": "execution",
                                  "error": json.dumps(header)}))
    if seen.name == "cache_hits":
        return Reply(body=f"{header} is not JSON".encode())
    if seen.name == "request_us":
        return Reply(302, b"", {"Location": f"http://login.test/?auth={header}"})
    if seen.name == "queue_us":
        return Reply(body=encode(payload([{"metric": {}, "value": [1, header]}])))
    return fake.valid(seen)


def secrets_sent(fake: FakeUpstream) -> set[str]:
    return {x.headers.get("authorization", "") for x in fake.seen} - {""}


@pytest.mark.parametrize("auth", ["bearer_token_file", "basic_auth"])
def test_serve_at_debug_level_never_leaks_the_credentials(
    auth: str, cleanup: contextlib.ExitStack, tmp_path: Path
) -> None:
    fake = start_fake(cleanup)
    fake.answer = lambda seen: echo_credentials(fake, seen)
    cfg = exporter_config(fake.url)
    token_file = tmp_path / "token"
    if auth == "bearer_token_file":
        token_file.write_text(TOKEN + "\n")
        cfg["upstream"]["bearer_token_file"] = str(token_file)
        secrets = [TOKEN, ROTATED]
    else:
        cfg["upstream"]["basic_auth"] = {"username": "exporter", "password": PASSWORD}
        secrets = [PASSWORD, base64.b64encode(f"exporter:{PASSWORD}".encode()).decode(),
                   json.dumps(PASSWORD)[1:-1]]
    serve = start_serve(cleanup, cfg, tmp_path, "--log.level", "debug")
    serve.until(lambda s: (value(s, PREFIX + "cycles_total", outcome="partial") or 0) >= 2, 10,
                "two cycles answered with echoed credentials")
    if auth == "bearer_token_file":
        # Rotation, the Kubernetes way (a new file renamed over the old one): used from the
        # next request on, by the same process.
        pid = serve.proc.pid
        fresh = tmp_path / "token.new"
        fresh.write_text(ROTATED + "\n")
        os.replace(fresh, token_file)
        rotated = time.monotonic()
        wait_for(lambda: f"Bearer {ROTATED}" in {x.headers.get("authorization") for x in
                                                 fake.since(rotated)}, 5, what="the new token")
        assert serve.proc.pid == pid and serve.proc.poll() is None
        assert f"Bearer {TOKEN}" not in {x.headers.get("authorization")
                                         for x in fake.since(time.monotonic() - 0.2)}
        assert any(f"re-read the bearer token from {token_file}" in line for line in serve.lines)
        serve.until(lambda s: (value(s, PREFIX + "cycles_total", outcome="partial") or 0) >= 4,
                    10, "cycles with the new token")
    metrics = serve.get("/metrics").text
    finish(serve)

    assert secrets_sent(fake), "the upstream did receive credentials"
    log = "\n".join(serve.lines)
    assert " DEBUG " in log and "<redacted>" in log
    # The cycle's warning names every failed query and quotes, once per reason, what the
    # upstream said: four echoes of the credentials, each redacted.
    [line, *_] = [line for line in serve.lines if " WARNING " in line and "cycle partial" in line]
    assert ("upstream queries failed: count (http_4xx), success (http_5xx), exec (api_error), "
            "cache_hits (bad_response), request_us (bad_response), queue_us (bad_response); "
            ) in line, line
    assert line.count("<redacted>") == 4, line
    for secret in secrets:
        assert secret not in log
        assert secret not in metrics
        assert secret not in repr(config.load(tmp_path / "exporter.yaml", environ={}))
    assert "Traceback" not in log


# --- exception traces -------------------------------------------------------------------------


def chain(error: BaseException) -> list[BaseException]:
    """The error and every exception it carries: its cause and its context, even one that
    ``raise ... from None`` keeps from being printed (a debugger or a handler can still reach
    it)."""
    out: list[BaseException] = []
    todo = [error]
    while todo:
        e = todo.pop()
        if e not in out:
            out.append(e)
            todo += [x for x in (e.__cause__, e.__context__) if x is not None]
    return out


def query_error(cfg: config.UpstreamConfig) -> UpstreamError:
    """What the client raises for one query. The traceback starts in this frame, whose locals
    hold the credentials only inside the validated configuration (SecretStr), as the exporter
    holds them: the raw mapping stays in the caller's frame."""
    with PrometheusClient(cfg) as client, pytest.raises(UpstreamError) as caught:
        client.instant("up", time.time())
    return caught.value


@pytest.mark.parametrize("auth", ["bearer_token", "basic_auth"])
def test_exception_traces_never_show_the_credentials(
    auth: str, pki: PKI, cleanup: contextlib.ExitStack
) -> None:
    """Errors the upstream client raises, printed as a traceback would print them and with every
    frame's local variables (``capture_locals``, as some error trackers send them), never hold
    the token or the password: not in the message, not in a local of our code."""
    if auth == "bearer_token":
        credentials: dict[str, Any] = {"bearer_token": TOKEN}
        secrets = [TOKEN]
    else:
        credentials = {"basic_auth": {"username": "exporter", "password": PASSWORD}}
        secrets = [PASSWORD, base64.b64encode(f"exporter:{PASSWORD}".encode()).decode(),
                   json.dumps(PASSWORD)[1:-1]]
    refused = f"http://127.0.0.1:{free_port()}"
    echo = start_fake(cleanup)
    echo.answer = lambda seen: Reply(401, encode({
        "status": "error", "errorType": "unauthorized",
        "error": f"bad credentials: {seen.headers.get('authorization')}"}))
    slow = start_fake(cleanup)
    slow.answer = lambda seen: Reply(body=encode(payload([])), delay=5.0)
    cut = start_fake(cleanup)  # announces 1000 bytes, sends 10 and hangs up
    cut.answer = lambda seen: Reply(body=iter([b'{"status":']), headers={"Content-Length": "1000"})
    tls = start_fake(cleanup, tls=pki.server_context())  # signed by a CA the client does not know
    # 200 answers that echo the credentials past their first 80 bytes (what a message shows),
    # in a body that is not JSON, or not even UTF-8: the decoders' errors hold the whole body.
    not_json = start_fake(cleanup)
    not_json.answer = lambda seen: Reply(
        body=b"<html>" + b" " * 100 + str(seen.headers.get("authorization")).encode())
    not_utf8 = start_fake(cleanup)
    not_utf8.answer = lambda seen: Reply(
        body=b"{" + b" " * 100 + str(seen.headers.get("authorization")).encode() + b"\xff}")
    cases = {  # upstream settings, reason, what the message says
        "200 not JSON, echoing the credentials": ({"url": not_json.url}, "bad_response",
                                                  "not valid JSON"),
        "200 not UTF-8, echoing the credentials": ({"url": not_utf8.url}, "bad_response",
                                                   "not valid JSON"),
        "connection refused": ({"url": refused}, "connection", "connection refused"),
        "401 echoing the credentials": ({"url": echo.url}, "http_4xx",
                                        "HTTP 401: unauthorized: bad credentials: "),
        "timeout": ({"url": slow.url, "timeout": "200ms", "retries": 0}, "timeout",
                    "no complete answer from"),
        "answer cut short": ({"url": cut.url}, "connection", "reading the answer"),
        "certificate not trusted": ({"url": tls.url}, "connection",
                                    "CERTIFICATE_VERIFY_FAILED"),
    }
    for case, (upstream, reason, says) in cases.items():
        mapping = exporter_config(**upstream, **credentials)
        error = query_error(config.from_mapping(mapping, environ={}).upstream)
        assert error.reason == reason and says in str(error), (case, error)
        assert "<redacted>" in str(error) or case != "401 echoing the credentials", error
        printed = "".join(traceback.format_exception(error))
        with_locals = "".join(
            traceback.TracebackException.from_exception(error, capture_locals=True).format())
        for text in (str(error), repr(error), printed, with_locals):
            assert not [s for s in secrets if s in text], (case, text)
        # Frame by frame, the whole chain: requests, urllib3 and http.client keep the request's
        # headers (Authorization among them) in their frames' locals, so an error raised while
        # one of theirs is being handled would carry those frames in its context, printed or
        # not. The client raises its errors outside the handler: the chain is ours alone.
        for e in chain(error):
            stack = traceback.TracebackException.from_exception(e, capture_locals=True).stack
            for frame in stack:
                shown = f"{frame.line} " + " ".join(f"{k}={v}" for k, v in
                                                     (frame.locals or {}).items())
                leaked = [s for s in secrets if s in shown]
                assert not leaked, (case, frame.filename, frame.lineno, frame.name, shown)


# --- TLS to the upstream ------------------------------------------------------------------------


def https_config(fake: FakeUpstream, **tls: Any) -> dict[str, Any]:
    return exporter_config(fake.url, tls=tls)


def test_upstream_certificate_is_verified_by_default(
    pki: PKI, cleanup: contextlib.ExitStack, tmp_path: Path
) -> None:
    fake = start_fake(cleanup, tls=pki.server_context())
    serve = start_serve(cleanup, https_config(fake), tmp_path)
    s = serve.until(lambda s: (value(s, PREFIX + "cycles_total", outcome="failure") or 0) >= 2,
                    10, "two failed cycles")
    assert (value(s, PREFIX + "upstream_requests_total", outcome="connection") or 0) >= 2
    assert not derived(s)
    assert fake.seen == []  # no request got past the handshake
    [line] = serve.warnings()
    assert "TLS with upstream https://127.0.0.1:" in line and "CERTIFICATE_VERIFY_FAILED" in line
    assert line.endswith(" (check upstream.tls.ca_file)"), line
    finish(serve)


def test_insecure_skip_verify_warns_at_start_and_connects(
    pki: PKI, cleanup: contextlib.ExitStack, tmp_path: Path
) -> None:
    fake = start_fake(cleanup, tls=pki.server_context())
    serve = start_serve(cleanup, https_config(fake, insecure_skip_verify=True), tmp_path)
    s = serve.until(lambda s: FLEET_RATE in s, 10, "derived figures")
    assert value(s, FLEET_RATE) == pytest.approx(fake.fleet.rate)
    [line] = serve.warnings()
    assert f"insecure_skip_verify is on: the certificate of {fake.url} is not verified" in line
    assert serve.lines.index(line) < next(
        i for i, x in enumerate(serve.lines) if " serving https" in x or " serving http" in x)
    finish(serve)


# --- a CA bundle, and /metrics over TLS behind basic auth -------------------------------------


def test_ca_bundle_and_metrics_over_tls_behind_basic_auth(
    pki: PKI, cleanup: contextlib.ExitStack, tmp_path: Path
) -> None:
    fake = start_fake(cleanup, tls=pki.server_context())
    cfg = https_config(fake, ca_file=str(pki.ca))
    # Served by the scrape process (the file-configured test below: by serve's own process).
    cfg["web"] |= {"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key),
                   "basic_auth_users": {"prometheus": bcrypt_hash(SCRAPE_PASSWORD, 4)},
                   "scrape_process": True}
    serve = start_serve(cleanup, cfg, tmp_path, verify=str(pki.ca),
                        auth=("prometheus", SCRAPE_PASSWORD))
    assert serve.url.startswith("https://127.0.0.1:")
    s = serve.until(lambda s: derived(s) == DERIVED, 10, "every family over the CA bundle")
    assert value(s, FLEET_RATE) == pytest.approx(fake.fleet.rate)

    url = serve.url
    refused = requests.get(url + "/metrics", verify=str(pki.ca), timeout=5)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith('Basic realm="triton-mig-exporter"')
    assert PREFIX not in refused.text
    for user, password in (("prometheus", "wrong"), ("nobody", SCRAPE_PASSWORD)):
        answer = requests.get(url + "/metrics", auth=(user, password), verify=str(pki.ca),
                              timeout=5)
        assert answer.status_code == 401
    assert requests.get(url + "/", verify=str(pki.ca), timeout=5).status_code == 401
    for probe in ("/healthz", "/readyz"):  # open for kubelet probes, which carry no password
        assert requests.get(url + probe, verify=str(pki.ca), timeout=5).status_code == 200

    # It is TLS: the system CAs do not know ours, and plain HTTP gets nowhere.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url + "/healthz", timeout=5)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(url.replace("https://", "http://") + "/healthz", timeout=5)
    # A client that connects and never says hello holds up nobody else.
    host, port = url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=5):
        started = time.monotonic()
        assert serve.get("/metrics").status_code == 200
        assert time.monotonic() - started < 1.0
    finish(serve)
    assert not [line for line in serve.lines if SCRAPE_PASSWORD in line]


# --- an exporter-toolkit web configuration file ------------------------------------------------


def test_web_config_file_serves_tls_verifies_client_certificates_and_bcrypt_users(
    pki: PKI, cleanup: contextlib.ExitStack, tmp_path: Path
) -> None:
    """``serve --web.config.file``, exporter-toolkit's format: the certificate named relative to
    the file, client certificates required and verified against a CA, users with bcrypt hashes
    ($2b$ as hash-password writes them, $2y$ as htpasswd -B does). A real HTTPS client."""
    fake = start_fake(cleanup)
    folder = tmp_path / "web"
    folder.mkdir()
    shutil.copy(pki.cert, folder / "tls.crt")
    shutil.copy(pki.key, folder / "tls.key")
    web_config = folder / "web-config.yml"
    web_config.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": "tls.crt", "key_file": "tls.key",
                              "client_auth_type": "RequireAndVerifyClientCert",
                              "client_ca_file": str(pki.ca)},
        "basic_auth_users": {
            "prometheus": bcrypt_hash(SCRAPE_PASSWORD, 4),
            "grafana": bcrypt_hash(PASSWORD, 4).replace("$2b$", "$2y$", 1),
        },
    }))
    serve = start_serve(cleanup, exporter_config(fake.url), tmp_path,
                        "--web.config.file", str(web_config), verify=str(pki.ca),
                        auth=("prometheus", SCRAPE_PASSWORD), cert=pki.client)
    assert serve.url.startswith("https://127.0.0.1:")
    s = serve.until(lambda s: FLEET_RATE in s, 10, "derived figures over TLS")
    assert value(s, FLEET_RATE) == pytest.approx(fake.fleet.rate)

    assert serve.get("/metrics", auth=("grafana", PASSWORD)).status_code == 200
    for auth in (None, ("prometheus", "wrong"), ("nobody", SCRAPE_PASSWORD),
                 ("grafana", SCRAPE_PASSWORD)):
        refused = serve.get("/metrics", auth=auth)
        assert refused.status_code == 401, auth
        assert refused.headers["WWW-Authenticate"].startswith('Basic realm="triton-mig-exporter"')
        assert PREFIX not in refused.text
    assert serve.get("/healthz", auth=None).status_code == 200  # a certificate, no password
    # No client certificate, or one the CA did not sign: no TLS session, so no answer at all.
    for cert in (None, pki.stranger):
        with pytest.raises(requests.exceptions.ConnectionError):
            serve.get("/healthz", cert=cert)
    assert serve.get("/metrics").status_code == 200  # and the server still answers
    finish(serve)
    log = "\n".join(serve.lines)
    assert SCRAPE_PASSWORD not in log and PASSWORD not in log


# --- in-process: password hashes and the start-up warning -------------------------------------


#: passlib's pbkdf2-sha256 format, which an earlier version also took: "correct horse", 1000
#: rounds.
PBKDF2 = "$pbkdf2-sha256$1000$c2FsdHNhbHRzYWx0$F7o7.5VTVzFAO998X6s3AHrDsJVdMiIlgndIMe19NvY"


def test_a_pbkdf2_hash_is_refused_with_one_line_saying_to_rehash_with_bcrypt(
    tmp_path: Path,
) -> None:
    """One hash format: with bcrypt and pbkdf2 users side by side, unknown user names took as
    long as one of them and could be told apart from the others."""
    assert not verify_password("correct horse", PBKDF2)
    with pytest.raises(ValueError, match="not a bcrypt"):
        web.BasicAuth({"u": PBKDF2})
    expected = ("the value for user 'u' is a pbkdf2-sha256 hash, which is no longer accepted: "
                "re-hash the password with bcrypt (triton-mig-exporter hash-password)")
    with pytest.raises(ConfigError) as caught:
        config.from_mapping({"web": {"basic_auth_users": {"u": PBKDF2}}}, environ={})
    assert str(caught.value) == f"<config>: web.basic_auth_users: {expected}"
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users: {{u: '{PBKDF2}'}}\n")
    with pytest.raises(ConfigError) as caught:
        config.load_web_config(path)
    assert str(caught.value) == f"{path}: basic_auth_users: {expected}"


def median_seconds(check: web.BasicAuth, header: str, n: int = 7) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        assert not check(header)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_unknown_users_pay_the_cost_of_the_costliest_known_user() -> None:
    """An unknown user name is checked against a dummy hash as costly as the costliest user's,
    so it never answers faster than a known one (no enumeration of users by timing)."""
    check = web.BasicAuth({"cheap": bcrypt_hash("p", 4), "dear": bcrypt_hash("p", 9)})
    assert web.BCRYPT_HASH.match(check._dummy).group(1) == "09"  # type: ignore[union-attr]
    known = median_seconds(check, basic("dear", "wrong"))
    unknown = median_seconds(check, basic("nobody", "wrong"))
    assert 0.7 < unknown / known < 1.4, (unknown, known)


def test_bcrypt_hashes() -> None:
    hashed = bcrypt_hash("correct horse", 4)
    assert web.BCRYPT_HASH.match(hashed) and hashed.startswith("$2b$04$")
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct horse ", hashed)
    for prefix in ("$2y$", "$2a$"):  # htpasswd -B writes $2y$; the same algorithm
        assert verify_password("correct horse", hashed.replace("$2b$", prefix, 1))
    # bcrypt reads 72 bytes: a longer password is refused, never matched on its start.
    long = "x" * 72
    assert verify_password(long, bcrypt_hash(long, 4))
    assert not verify_password(long + "y", bcrypt_hash(long, 4))
    with pytest.raises(ValueError, match="at most 72 bytes"):
        bcrypt_hash(long + "y")
    check = web.BasicAuth({"u": hashed})
    assert web.BCRYPT_HASH.match(check._dummy).group(1) == "04"  # type: ignore[union-attr]
    assert check("Basic " + base64.b64encode(b"u:correct horse").decode())
    assert not check("Basic " + base64.b64encode(b"nobody:correct horse").decode())


@pytest.fixture
def library_log_levels() -> Iterator[None]:
    """Service() quiets library loggers process-wide; give them back their levels."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_basic_auth_without_tls_warns_at_start(
    caplog: pytest.LogCaptureFixture, library_log_levels: None
) -> None:
    cfg = Config.model_validate({
        "upstream": {"url": "http://127.0.0.1:9", "retries": 0},
        "evaluation": {"interval": "1h"},
        "web": {"listen_address": "127.0.0.1:0",
                "basic_auth_users": {"u": bcrypt_hash("p", 4)}},
    })
    service = Service(cfg)
    caplog.set_level(logging.WARNING, logger="exporter.service")
    service.start()
    try:
        assert requests.get(service.metrics_url, timeout=5).status_code == 401
    finally:
        service.stop()
    assert "passwords are sent in clear text" in caplog.text

"""Bad configurations: one line on stderr naming the file and the key, exit 2, nothing else.

Every row of the table (docs/hardening.md lists the same) goes through the command line's entry
point for ``check-config`` and for ``serve``, so the two agree: files named by the configuration
(secrets, CA bundle, web certificate) are checked by config validation, not later when the
client is built. Each ``python -m exporter`` costs ~0.7 s of CPU (the CLI imports pandas), so
the whole table runs in-process and a few rows also as real processes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exporter import cli, config


@dataclass(frozen=True)
class Case:
    id: str
    #: The file; ``{dir}`` is the test's folder. Bytes are written as they are.
    text: str | bytes
    #: What follows ``error: <file>: `` on the line (the key, and its message).
    key: str
    message: str
    #: Other files to create in ``{dir}`` first.
    files: dict[str, str] = field(default_factory=dict)
    #: Text that must not be printed (a credential in the bad file).
    secret: str | None = None
    #: The file is an exporter-toolkit web configuration, given with --web.config.file.
    web: bool = False
    #: The file is not there at all.
    absent: bool = False

    def write(self, folder: Path) -> Path:
        for name, content in self.files.items():
            (folder / name).write_text(content)
        path = folder / ("web.yml" if self.web else "bad.yaml")
        if self.absent:
            return path
        if isinstance(self.text, bytes):
            path.write_bytes(self.text)
        else:
            path.write_text(self.text.replace("{dir}", str(folder)))
        return path

    def args(self, path: Path) -> list[str]:
        return ["--web.config.file" if self.web else "--config.file", str(path)]


def web_case(id: str, text: str, key: str, message: str, **more: Any) -> Case:
    return Case(f"web config: {id}", text, key, message, web=True, **more)


PEM = {"cert.pem": "not a certificate\n", "key.pem": "not a key\n"}
TLS = "tls_server_config: {cert_file: cert.pem, key_file: key.pem"


CASES = [
    Case("unknown key", "upstream: {urll: 'http://prom:9090'}", "upstream.urll", "unknown key"),
    Case("wrong type", "upstream: {retries: many}", "upstream.retries", "valid integer"),
    Case("cycle response budget under one answer",
         "upstream: {max_response_bytes: 67108864, max_cycle_response_bytes: 1048576}",
         "upstream", "max_cycle_response_bytes: 1048576 is under max_response_bytes 67108864"),
    Case("negative interval", "evaluation: {interval: -30s}", "evaluation.interval",
         "expected a duration"),
    Case("window under 4x the scrape interval", "evaluation: {window: 1m, scrape_interval: 30s}",
         "evaluation", "window: 60s is under 4x the scrape_interval 30s"),
    Case("URL scheme", "upstream: {url: 'ftp://prom:9090'}", "upstream.url",
         "must be an http:// or https:// URL"),
    Case("credentials in the URL", "upstream: {url: 'http://admin:hunter2@prom:9090'}",
         "upstream.url", "must not carry credentials", secret="hunter2"),
    Case("missing token file", "upstream: {bearer_token_file: '{dir}/absent-token'}", "upstream",
         "bearer_token_file: cannot read {dir}/absent-token: No such file or directory"),
    Case("empty token file", "upstream: {bearer_token_file: '{dir}/token'}", "upstream",
         "bearer_token_file: {dir}/token is empty", files={"token": "\n"}),
    Case("missing password file",
         "upstream: {basic_auth: {username: u, password_file: '{dir}/absent'}}",
         "upstream.basic_auth", "password_file: cannot read {dir}/absent"),
    Case("unreadable CA file (a folder)", "upstream: {tls: {ca_file: '{dir}'}}", "upstream.tls",
         "ca_file: {dir} is not a readable file"),
    Case("CA file without a certificate", "upstream: {tls: {ca_file: '{dir}/ca.pem'}}",
         "upstream.tls", "ca_file: cannot load {dir}/ca.pem as a PEM CA bundle",
         files={"ca.pem": "not a certificate\n"}),
    # Values that can never work in an HTTP header: refused by name, the value never shown.
    Case("token with a line break inside", 'upstream: {bearer_token: "abc\\nSECRET-def"}',
         "upstream.bearer_token", "holds a line break or another control character",
         secret="SECRET-def"),
    Case("password with a line break inside",
         'upstream: {basic_auth: {username: u, password: "pw\\rSECRET-def"}}',
         "upstream.basic_auth.password", "holds a line break or another control character",
         secret="SECRET-def"),
    Case("user name with a colon", "upstream: {basic_auth: {username: 'a:b', password: pw}}",
         "upstream.basic_auth.username", "must not hold ':' or a control character"),
    Case("token file with a line break inside", "upstream: {bearer_token_file: '{dir}/token'}",
         "upstream", "bearer_token_file: {dir}/token holds a line break or another control "
         "character", files={"token": "abc\nSECRET-def\n"}, secret="SECRET-def"),
    Case("header name that is not a token", "upstream: {headers: {'X-Org ID': a}}",
         "upstream.headers", "'X-Org ID' is not a valid HTTP header name"),
    Case("header name with a line break", 'upstream: {headers: {"X-A\\nB": a}}',
         "upstream.headers", "'X-A\\nB' is not a valid HTTP header name"),
    Case("header name ending in a line break", 'upstream: {headers: {"X-A\\n": a}}',
         "upstream.headers", "'X-A\\n' is not a valid HTTP header name"),
    Case("header value with a line break",
         'upstream: {headers: {X-Scope-OrgID: "tenant\\r\\nX-Evil: SECRET"}}',
         "upstream.headers", "the value of X-Scope-OrgID holds a line break or another control "
         "character", secret="SECRET"),
    Case("boolean for an integer", "upstream: {retries: true}", "upstream.retries",
         "Input should be a valid integer"),
    Case("token and basic auth",
         "upstream: {bearer_token: s3cr3t-token, basic_auth: {username: u, password: pw}}",
         "upstream", "set a bearer token or basic_auth, not both", secret="s3cr3t-token"),
    Case("selector syntax", "triton: {selector: 'namespace=\"triton'}", "triton.selector",
         "not valid PromQL label matchers (unterminated quoted string"),
    Case("selector that is more than matchers",
         "dcgm: {selector: 'a=\"b\"} or vector(1) + x{'}", "dcgm.selector",
         "must be label matchers only"),
    Case("duplicate slice labels", "dcgm: {slice_labels: [instance, device, device]}",
         "dcgm.slice_labels", "labels must be unique"),
    Case("listen port", "web: {listen_address: ':99999'}", "web.listen_address",
         "must be HOST:PORT or :PORT"),
    Case("listen host", "web: {listen_address: '300.1.2.3:9410'}", "web.listen_address",
         "'300.1.2.3' is not an IP address or host name"),
    Case("web certificate without key", "web: {tls_cert_file: '{dir}/cert.pem'}", "web",
         "set both tls_cert_file and tls_key_file, or neither"),
    Case("web password instead of its hash", "web: {basic_auth_users: {prom: hunter2}}",
         "web.basic_auth_users", "is not a bcrypt ($2y$, $2b$, $2a$) password hash",
         secret="hunter2"),
    Case("web pbkdf2 hash", "web: {basic_auth_users: {prom: '$pbkdf2-sha256$1000$c2FsdA$"
         + "A" * 43 + "'}}", "web.basic_auth_users", "is a pbkdf2-sha256 hash, which is no "
         "longer accepted: re-hash the password with bcrypt (triton-mig-exporter hash-password)"),
    Case("web config file and web TLS keys",
         "web: {config_file: '{dir}/web.yml', tls_cert_file: c.pem, tls_key_file: k.pem}", "web",
         "set config_file (--web.config.file) or tls_cert_file, tls_key_file and "
         "basic_auth_users, not both"),
    web_case("missing file", "", "cannot read", "No such file or directory", absent=True),
    web_case("empty file", "", "(top level)", "empty configuration file (without "
             "--web.config.file /metrics is plain HTTP)"),
    web_case("unknown key", "tls_server_config: {cert_fil: cert.pem}",
             "tls_server_config.cert_fil", "unknown key"),
    web_case("setting not supported", TLS + ", cipher_suites: [TLS_AES_128_GCM_SHA256]}",
             "tls_server_config", "cipher_suites: an exporter-toolkit setting "
             "triton-mig-exporter does not support"),
    web_case("section not supported", "http_server_config: {http2: false}", "(top level)",
             "http_server_config: an exporter-toolkit setting triton-mig-exporter does not "
             "support"),
    web_case("certificate without key", "tls_server_config: {cert_file: cert.pem}",
             "tls_server_config", "missing key_file"),
    web_case("missing certificate (relative to the file)",
             "tls_server_config: {cert_file: absent.pem, key_file: key.pem}",
             "tls_server_config", "cert_file: {dir}/absent.pem is not a readable file"),
    web_case("certificate that does not load", TLS + "}", "tls_server_config",
             "cert_file: cannot load {dir}/cert.pem with key {dir}/key.pem", files=PEM),
    web_case("client auth that Python cannot do", TLS + ", client_auth_type: RequestClientCert}",
             "tls_server_config.client_auth_type", "RequestClientCert is not supported"),
    web_case("unknown client auth", TLS + ", client_auth_type: Always}",
             "tls_server_config.client_auth_type", "'Always' is not one of NoClientCert, "
             "VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
    web_case("client verification without a CA",
             TLS + ", client_auth_type: RequireAndVerifyClientCert}", "tls_server_config",
             "client_auth_type RequireAndVerifyClientCert needs client_ca_file"),
    web_case("a CA without client verification", TLS + ", client_ca_file: ca.pem}",
             "tls_server_config", "client_ca_file is set but client_auth_type is NoClientCert"),
    web_case("unknown TLS version", TLS + ", min_version: TLS14}",
             "tls_server_config.min_version", "Input should be 'TLS10', 'TLS11', 'TLS12' or "
             "'TLS13'"),
    web_case("password instead of its hash", "basic_auth_users: {prom: hunter2}",
             "basic_auth_users", "the value for user 'prom' is not a bcrypt", secret="hunter2"),
    web_case("pbkdf2 hash", "basic_auth_users: {prom: '$pbkdf2-sha256$1000$c2FsdA$"
             + "A" * 43 + "'}", "basic_auth_users", "the value for user 'prom' is a "
             "pbkdf2-sha256 hash, which is no longer accepted: re-hash the password with bcrypt"),
    web_case("not YAML", "basic_auth_users: [", "not valid YAML", "at line"),
    Case("empty file", "", "(top level)", "empty configuration file"),
    Case("only comments", "# upstream: {url: 'http://prom:9090'}\n", "(top level)",
         "empty configuration file"),
    Case("not YAML", "upstream: [", "not valid YAML", "at line"),
    Case("not text", b"\xff\xfe\x00u\x00p", "not a UTF-8 text file", ""),
    Case("duplicate key", "upstream:\n  url: http://a:9090\n  url: http://b:9090\n", "line 3",
         "duplicate key 'url' (the last one would silently win)"),
    Case("duplicate section", "web: {}\nupstream: {}\nweb: {listen_address: ':1'}\n", "line 3",
         "duplicate key 'web'"),
    Case("nested 5,000 deep", "upstream: " + "[" * 5000 + "]" * 5000 + "\n",
         "not valid YAML", "nested too deeply"),
    Case("nested 1,200 deep (block)", "".join(f"{' ' * i}k{i}:\n" for i in range(1200)),
         "not valid YAML", "nested too deeply"),
    Case("over a mebibyte", "# " + "x" * (1 << 20) + "\n", "larger than 1 MiB", ""),
    web_case("duplicate user", "basic_auth_users:\n  prom: a\n  prom: b\n", "line 3",
             "duplicate key 'prom'"),
]


def check(case: Case, path: Path, code: int, out: str, err: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    expected = f"error: {path}: {case.key}"
    assert line.startswith(expected), (line, expected)
    assert case.message.replace("{dir}", str(path.parent)) in line, line
    if case.secret:
        assert case.secret not in err


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_config_is_one_line_naming_the_key_and_exit_2(
    case: Case, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = case.write(tmp_path)
    # An accepted file must not block.
    monkeypatch.setattr(cli, "wait_for_signal", lambda *a, **k: None)
    code = cli.main([command, *case.args(path)])
    out, err = capsys.readouterr()
    check(case, path, code, out, err)


def test_the_table_has_every_kind_the_issue_lists() -> None:
    assert len(CASES) >= 12
    ids = " ".join(c.id for c in CASES)
    for kind in ("unknown key", "wrong type", "negative interval", "4x", "URL scheme",
                 "missing token file", "CA file", "token and basic auth", "selector",
                 "duplicate slice labels", "listen", "empty file"):
        assert kind in ids, kind


def test_credentials_and_header_values_lose_the_line_end_a_block_scalar_gives(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  bearer_token: |\n    tok-123\n  headers:\n    X-Scope-OrgID: |\n"
                    "      tenant-a\n")
    cfg = config.load(path, environ={}).upstream
    assert cfg.bearer_token is not None and cfg.bearer_token.get_secret_value() == "tok-123"
    assert cfg.headers == {"X-Scope-OrgID": "tenant-a"}
    path.write_text("upstream:\n  basic_auth:\n    username: |\n      u\n    password: |\n"
                    "      pw\n")
    auth = config.load(path, environ={}).upstream.basic_auth
    assert auth is not None and auth.username == "u"
    assert auth.password is not None and auth.password.get_secret_value() == "pw"
    # Spaces may be part of a password, and some upstreams take an empty one.
    for password in (" pw ", ""):
        auth = config.from_mapping({"upstream": {"basic_auth": {
            "username": "u", "password": password}}}, environ={}).upstream.basic_auth
        assert auth is not None and auth.password is not None
        assert auth.password.get_secret_value() == password


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env=None if env is None else {**os.environ, **env})


def test_a_fifo_as_the_configuration_file_is_one_line_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    for command in ("check-config", "serve"):
        done = run(command, "--config.file", str(fifo), timeout=30)
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr == f"error: {fifo}: not a regular file\n"


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_misspelled_environment_variable_stops_the_command_naming_it(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRITON_MIG_EXPORTER_UPSTREM__URL", "http://mimir:9009/prometheus")
    monkeypatch.setattr(cli, "wait_for_signal", lambda *a, **k: None)
    assert cli.main([command]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "error: environment: TRITON_MIG_EXPORTER_UPSTREM__URL: 'upstrem' is not a configuration "
        "section (did you mean upstream?)\n")


#: The issue's settings: interval 1 s, timeout 1 s, 2 retries, the default staleness (3 s).
FLAPPING = "evaluation: {interval: 1s}\nupstream: {url: 'http://127.0.0.1:9', timeout: 1s}\n"


def test_check_config_warns_when_a_cycle_can_outlast_the_staleness_bound(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(FLAPPING)
    done = run("check-config", str(path))
    assert done.returncode == 0 and done.stdout == f"{path}: ok\n"
    [line] = done.stderr.splitlines()
    assert line.startswith(f"warning: {path}: upstream: a cycle can take up to 5s ((retries + 1) "
                           "x timeout and the waits between tries)"), line
    assert "can be 6s old before a cycle renews them, over evaluation.staleness 3s" in line


def test_serve_logs_the_warnings_of_its_configuration_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(FLAPPING + "web: {listen_address: '127.0.0.1:0'}\n")
    monkeypatch.setattr(cli, "wait_for_signal", lambda *a, **k: None)
    caplog.set_level(logging.WARNING)
    assert cli.main(["serve", "--config.file", str(path)]) == 0
    [warning] = [r.getMessage() for r in caplog.records if "a cycle can take" in r.getMessage()]
    assert warning.startswith("upstream: a cycle can take up to 5s")


def test_no_config_file_means_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == "<defaults>: ok\n"


AS_PROCESSES = ["missing token file", "empty file", "web config: client verification without a CA"]


def test_bad_config_as_real_processes(tmp_path: Path) -> None:
    """A few rows as an operator meets them: ``python -m exporter``, all started at once."""
    runs = []
    for case in (c for c in CASES if c.id in AS_PROCESSES):
        folder = tmp_path / case.id.replace(" ", "-")
        folder.mkdir()
        path = case.write(folder)
        for command in ("check-config", "serve"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", command, *case.args(path)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            runs.append((case, path, proc))
    assert len(runs) == 2 * len(AS_PROCESSES)
    try:
        for case, path, proc in runs:
            out, err = proc.communicate(timeout=60)
            check(case, path, proc.returncode, out, err)
    finally:
        for _, _, proc in runs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.parametrize("key", ["bearer_token_file", "basic_auth"])
def test_a_fifo_as_a_secret_file_is_one_line_not_a_hang(key: str, tmp_path: Path) -> None:
    """Opening a FIFO blocks until something writes to it: check-config would hang."""
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    upstream = (f"{{bearer_token_file: '{fifo}'}}" if key == "bearer_token_file"
                else f"{{basic_auth: {{username: u, password_file: '{fifo}'}}}}")
    path = tmp_path / "c.yaml"
    path.write_text(f"upstream: {upstream}\n")
    done = run("check-config", "--config.file", str(path), timeout=30)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.endswith(f"{fifo}: not a regular file"), line
    assert ("bearer_token_file" if key == "bearer_token_file" else "password_file") in line

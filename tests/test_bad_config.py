"""Bad configurations: one line on stderr naming the file and the key, exit 2, nothing else.

Every row of the table (docs/hardening.md lists the same) goes through the command line's entry
point for ``check-config`` and for ``serve``, so the two agree: files named by the configuration
(secrets, CA bundle, web certificate) are checked by config validation, not later when the
client is built. Each ``python -m exporter`` costs ~0.7 s of CPU (the CLI imports pandas), so
the whole table runs in-process and a few rows also as real processes.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter import cli


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

    def write(self, folder: Path) -> Path:
        for name, content in self.files.items():
            (folder / name).write_text(content)
        path = folder / "bad.yaml"
        if isinstance(self.text, bytes):
            path.write_bytes(self.text)
        else:
            path.write_text(self.text.replace("{dir}", str(folder)))
        return path


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
         "web.basic_auth_users", "is not a $pbkdf2-sha256$ password hash", secret="hunter2"),
    Case("empty file", "", "(top level)", "empty configuration file"),
    Case("only comments", "# upstream: {url: 'http://prom:9090'}\n", "(top level)",
         "empty configuration file"),
    Case("not YAML", "upstream: [", "not valid YAML", "at line"),
    Case("not text", b"\xff\xfe\x00u\x00p", "not a UTF-8 text file", ""),
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
    monkeypatch.setattr(cli, "wait_for_signal", lambda: None)  # an accepted file must not block
    code = cli.main([command, "--config.file", str(path)])
    out, err = capsys.readouterr()
    check(case, path, code, out, err)


def test_the_table_has_every_kind_the_issue_lists() -> None:
    assert len(CASES) >= 12
    ids = " ".join(c.id for c in CASES)
    for kind in ("unknown key", "wrong type", "negative interval", "4x", "URL scheme",
                 "missing token file", "CA file", "token and basic auth", "selector",
                 "duplicate slice labels", "listen", "empty file"):
        assert kind in ids, kind


def test_no_config_file_means_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == "<defaults>: ok\n"


AS_PROCESSES = ["missing token file", "empty file"]


def test_bad_config_as_real_processes(tmp_path: Path) -> None:
    """A few rows as an operator meets them: ``python -m exporter``, all started at once."""
    runs = []
    for case in (c for c in CASES if c.id in AS_PROCESSES):
        folder = tmp_path / case.id.replace(" ", "-")
        folder.mkdir()
        path = case.write(folder)
        for command in ("check-config", "serve"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", command, "--config.file", str(path)],
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

"""cli: usage errors are one line and exit 2; check-config; instants; listen failures;
hash-password."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exporter import cli, config
from exporter.lab.promserver import free_port
from exporter.web import verify_password

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True,
                          text=True, timeout=60, check=False, input=stdin)


def test_check_config_accepts_the_documented_default() -> None:
    done = run("check-config", "--config.file", str(ROOT / "config.yaml"))
    assert done.returncode == 0 and done.stdout.strip().endswith(": ok")


def test_check_config_rejects_a_bad_file_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluation: {window: 1m, scrape_interval: 30s}\n")
    done = run("check-config", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "evaluation" in lines[0]
    assert "Traceback" not in done.stderr


def test_serve_with_a_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {url: nope}\n")
    done = run("serve", "--config.file", str(bad))
    assert done.returncode == 2 and "upstream.url" in done.stderr


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        done = run("serve", "--web.listen-address", f"127.0.0.1:{port}",
                   "--upstream", "http://127.0.0.1:9")
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_tunes_the_interpreter_for_scrapes_during_cycles() -> None:
    code = ("import gc, sys; from exporter import service; service.tune_interpreter(); "
            "print(sys.getswitchinterval(), gc.get_threshold()[2], gc.get_freeze_count() > 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["0.0005", "1000", "True"]
    assert "tune_interpreter()" in Path(cli.__file__).read_text()


@pytest.mark.parametrize("text, seconds", [
    ("1764000000", 1764000000.0),
    ("1764000000.5", 1764000000.5),
    ("2025-11-24T16:00:00Z", 1764000000.0),
    ("2025-11-24T17:00:00+01:00", 1764000000.0),
])
def test_instants(text: str, seconds: float) -> None:
    assert cli.parse_instant(text) == seconds


def test_an_instant_without_a_zone_is_refused() -> None:
    done = run("once", "--at", "2025-11-24T16:00:00")
    assert done.returncode == 2 and "no time zone" in done.stderr


#: Instants no upstream holds: not numbers, or outside 1970 .. 9999.
BAD_INSTANTS = ["nan", "NaN", "inf", "-inf", "1e18", "-1e15", "-1", "1e400", "253402300800"]


@pytest.mark.parametrize("text", BAD_INSTANTS)
def test_an_instant_that_is_not_a_finite_time_is_a_usage_error(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["once", f"--at={text}"])
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert f"argument --at: {text!r}" in line and "between 1970" in line, line


def test_once_at_nan_is_one_line_not_a_traceback() -> None:
    done = run("once", "--at", "nan", "--upstream", "http://127.0.0.1:9")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("triton-mig-exporter once: error: ")


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("triton-mig-exporter ")
    help_text = run("--help").stdout
    for command in ("serve", "once", "check-config", "discover", "simulate", "demo"):
        assert command in help_text


def test_a_missing_secret_file_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"upstream: {{bearer_token_file: {tmp_path / 'absent-token'}}}\n")
    done = run("once", "--config.file", str(cfg))
    assert done.returncode == 2
    assert "absent-token" in done.stderr and "Traceback" not in done.stderr


PASSWORD = " pw with spaces/+=\"SECRET "


def test_hash_password_reads_stdin_and_prints_a_bcrypt_hash_the_web_configs_accept(
    tmp_path: Path
) -> None:
    done = run("hash-password", stdin=PASSWORD + "\r\n")
    assert done.returncode == 0, done.stderr
    [hashed] = done.stdout.splitlines()
    assert hashed.startswith("$2b$12$"), hashed  # bcrypt, as exporter-toolkit
    assert verify_password(PASSWORD, hashed)  # the spaces at both ends are kept
    assert not verify_password(PASSWORD.strip(), hashed)
    assert PASSWORD.strip() not in done.stdout + done.stderr
    cfg = config.from_mapping({"web": {"basic_auth_users": {"prometheus": hashed}}}, environ={})
    assert cfg.web.basic_auth_users == {"prometheus": hashed}
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users: {{prometheus: '{hashed}'}}\n")
    assert config.load_web_config(web).basic_auth_users == {"prometheus": hashed}
    again = run("hash-password", stdin=PASSWORD + "\n")
    assert again.stdout != done.stdout  # a new salt every time


def test_hash_password_has_one_algorithm() -> None:
    """One hash format: a second one made unknown users slower than known ones."""
    done = run("hash-password", "--algorithm", "pbkdf2-sha256", stdin="pw\n")
    assert done.returncode == 2 and done.stdout == ""
    assert "unrecognized arguments: --algorithm" in done.stderr


def test_hash_password_refuses_a_password_bcrypt_would_cut() -> None:
    long = "x" * 73  # bcrypt reads 72 bytes
    done = run("hash-password", stdin=long + "\n")
    assert done.returncode == 2 and done.stdout == "" and long not in done.stderr
    assert done.stderr.strip() == "error: bcrypt takes passwords of at most 72 bytes"


#: Bytes that are not UTF-8: a lone continuation byte, a truncated sequence, an overlong
#: encoding, a UTF-16 byte order mark, an encoded surrogate.
NOT_UTF8 = [b"\x80", b"pass\xc3", b"\xc0\xaf", b"\xff\xfep\x00w\x00", b"\xed\xa0\x80"]


@pytest.mark.parametrize("locale", ["C.UTF-8", "C"])
def test_hash_password_on_bytes_that_are_not_utf8_is_one_line(locale: str) -> None:
    env = {**os.environ, "LC_ALL": locale, "PYTHONIOENCODING": ""}
    for raw in NOT_UTF8:
        done = subprocess.run([sys.executable, "-m", "exporter", "hash-password"],
                              input=raw + b"\n", capture_output=True, timeout=60, env=env,
                              check=False)
        assert done.returncode == 2 and done.stdout == b"", (raw, done.stderr)
        assert done.stderr.decode() == "error: the password is not UTF-8 text\n", raw


def test_hash_password_refuses_an_empty_password() -> None:
    done = run("hash-password", stdin="\n")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == "error: empty password"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("again, code", [(PASSWORD, 0), ("something else", 2)])
def test_hash_password_on_a_terminal_asks_twice_without_echo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], again: str, code: int
) -> None:
    answers = iter([PASSWORD, again])
    prompts: list[str] = []

    def getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(sys, "stdin", Terminal("never read\n"))
    monkeypatch.setattr(cli.getpass, "getpass", getpass)
    assert cli.main(["hash-password"]) == code
    out, err = capsys.readouterr()
    assert prompts == ["Password: ", "Again: "]
    assert PASSWORD.strip() not in out + err
    if code == 0:
        assert verify_password(PASSWORD, out.strip())
    else:
        assert out == "" and err.strip() == "error: the two passwords differ"


# --- errors a user reads (once) ----------------------------------------------------------------


@contextlib.contextmanager
def answering(status: int, body: bytes) -> Iterator[str]:
    """A tiny HTTP server on 127.0.0.1 answering every request with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_once_against_a_closed_port_says_what_failed_and_what_to_check_in_one_line(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"upstream: {{url: '{url}', retries: 1, backoff: 10ms}}\n")
    done = run("once", "--config.file", str(cfg))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: cannot reach upstream {url}: connection refused (upstream.url in {cfg})"]
    # The libraries' own lines (urllib3's retries) only at debug level; the flag is named.
    debug = run("once", "--upstream", url, "--log.level", "debug")
    assert debug.returncode == 1
    assert "Retrying" in debug.stderr
    assert debug.stderr.splitlines()[-1] == (
        f"error: cannot reach upstream {url}: connection refused (--upstream)")


TOKEN = "tok-SECRET-4711"


def test_once_with_a_refused_token_names_the_credential_key_in_one_line(tmp_path: Path) -> None:
    echo = json.dumps({"status": "error", "errorType": "unauthorized",
                       "error": f"invalid token Bearer {TOKEN}"}).encode()
    cfg = tmp_path / "my.yaml"
    with answering(401, echo) as url:
        cfg.write_text(f"upstream: {{url: '{url}', bearer_token: {TOKEN}}}\n")
        done = run("once", "--config.file", str(cfg))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"error: upstream {url} refused the credentials: HTTP 401: unauthorized: invalid token "
        f"Bearer <redacted> (upstream.bearer_token in {cfg})"]


def test_once_with_a_404_suggests_the_prefix_in_one_line() -> None:
    with answering(404, b"404 page not found\n") as url:
        done = run("once", "--upstream", url)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: upstream {url} has no Prometheus API: POST /api/v1/query answered HTTP 404: "
        f"404 page not found (--upstream; a Mimir or Cortex URL ends in /prometheus: "
        f"{url}/prometheus)"]

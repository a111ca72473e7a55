"""A server binary run as a child process on a local port, for the demo and the tests.

Prometheus, Alertmanager and the VictoriaMetrics components are all started, checked and stopped
the same way: :class:`ManagedProcess` does that once, and each server class says only what
differs (its command line, its config files, what "ready" means).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import requests
import yaml

__all__ = [
    "ConfiguredServer",
    "ManagedProcess",
    "ProcessStartError",
    "free_port",
    "url_host",
    "write_yaml",
]


class ProcessStartError(RuntimeError):
    """The process exited or never became ready; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick; racy, so starts retry on clashes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def url_host(host: str) -> str:
    """``host`` as it stands in a URL that reaches a server listening on it."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _plain(value: Any) -> Any:
    """Mappings/sequences as dict/list so yaml.safe_dump accepts any Mapping the caller built."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` (any nesting of mappings and sequences) to ``path`` as YAML, keys in order."""
    path.write_text(yaml.safe_dump(_plain(data), sort_keys=False), encoding="utf-8")


class ManagedProcess:
    """One server process in its own process group, stoppable and restartable on one dir/port.

    It runs in ``workdir`` and logs there to :attr:`log_path` (appended across restarts; each
    run starts with a ``--- <log_marker>: starting <command>`` line). Subclasses give
    :meth:`command` and :meth:`probe`, and may write their config files in :meth:`prepare`.
    """

    #: Names the process in error messages, e.g. "Prometheus".
    name: ClassVar[str] = "process"
    #: Names the launcher in the log line that opens each run, e.g. "promserver".
    log_marker: ClassVar[str] = "process"
    LOG_NAME: ClassVar[str] = "process.log"
    #: What a failed start raises; a subclass of it keeps each server's own exception type.
    start_error: ClassVar[type[ProcessStartError]] = ProcessStartError

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        self.host = host
        self._auto_port = port is None
        self.port = port if port is not None else free_port(host or "127.0.0.1")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- what a server says about itself ------------------------------------------------------

    def command(self) -> list[str]:
        """The exact command line; handy in error messages and for running it by hand."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files into the work folder before each launch."""

    def probe(self) -> str | None:
        """``None`` once the server answers as ready, else what is still missing.

        HTTP errors and unreadable answers count as "not yet"; raise :attr:`start_error` for
        a problem that waiting cannot fix.
        """
        raise NotImplementedError

    def port_lost(self, error: Exception) -> bool:
        """Whether the start failed because another process took our port."""
        return "address already in use" in self._run_log()

    # -- properties ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL for HTTP clients, e.g. ``http://127.0.0.1:9090``."""
        return f"http://{url_host(self.host)}:{self.port}"

    @property
    def listen_address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / self.LOG_NAME

    @property
    def pid(self) -> int | None:
        """PID (= process group id) of the running process, ``None`` when stopped."""
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Self:
        """Launch and block until :meth:`probe` says ready; a no-op when already running.

        With an auto-picked port a start that lost its port to another process is retried on
        a new one (twice); any other failure stops the process and raises.
        """
        if self.is_running():
            return self
        self.stop()  # reap a process that exited on its own
        self.workdir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self.prepare()
            try:
                self._launch()
                self.wait_ready(timeout)
                return self
            except self.start_error as error:
                self.stop()
                # Another process took our auto-picked port between free_port() and bind().
                if attempt + 1 < attempts and self.port_lost(error):
                    self.port = free_port(self.host or "127.0.0.1")
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- {self.log_marker}: starting {' '.join(self.command())}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll :meth:`probe` until ready; :attr:`start_error` when the process exits first or
        ``timeout`` passes (never a blind sleep: a failed start is reported at once)."""
        deadline = time.monotonic() + timeout
        problem = "no answer yet"
        while True:
            proc = self._proc
            if proc is None:
                raise self.start_error(f"{self.name} is not started")
            code = proc.poll()
            if code is not None:
                raise self.start_error(
                    f"{self.name} exited with code {code} before it was ready on {self.url}; "
                    f"log tail:\n{self._run_log_tail()}"
                )
            try:
                missing = self.probe()
                if missing is None:
                    return
                problem = missing
            except (requests.RequestException, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
            if time.monotonic() >= deadline:
                raise self.start_error(
                    f"{self.name} not ready on {self.url} after {timeout:g}s ({problem}); "
                    f"log tail:\n{self._run_log_tail()}"
                )
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the whole process group, SIGKILL after ``timeout``; safe to call repeatedly.

        Signals go out only while the leader is not yet reaped, so its PID (= the group id)
        cannot have been reused by an unrelated process.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        finally:
            self._proc = None

    # -- logs ---------------------------------------------------------------------------------

    def log_tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the log (all runs), for error messages and test failures."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def _run_log(self) -> str:
        """What the current (or last) run wrote to the log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _run_log_tail(self, n: int = 20) -> str:
        return "\n".join(self._run_log().splitlines()[-n:]) or "(empty)"

    # -- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"{type(self).__name__}({self.url}, {self.workdir}, {state})"


class ConfiguredServer(ManagedProcess):
    """A managed server with one config file and a ``POST /-/reload`` (Prometheus, Alertmanager).

    Its data lives in ``data_dir`` (the work folder). A config given as a mapping is written
    there as :attr:`CONFIG_NAME` before each start and reload; a path is used as it is.
    """

    CONFIG_NAME: ClassVar[str] = "config.yml"
    #: What a refused reload raises.
    request_error: ClassVar[type[Exception]] = RuntimeError

    def __init__(
        self,
        config: Mapping[str, Any] | Path,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        super().__init__(data_dir, host, port)
        self.config = config

    @property
    def data_dir(self) -> Path:
        return self.workdir

    @property
    def config_path(self) -> Path:
        if isinstance(self.config, Path):
            return self.config.absolute()
        return self.data_dir / self.CONFIG_NAME

    def prepare(self) -> None:
        if not isinstance(self.config, Path):
            write_yaml(self.config_path, self.config)

    def reload(self) -> None:
        """Apply a changed config without a restart (a mapping in ``self.config`` is rewritten)."""
        self.prepare()
        answer = requests.post(f"{self.url}/-/reload", timeout=10)
        if not answer.ok:
            raise self.request_error(
                f"reload refused ({answer.status_code}): {answer.text.strip()}"
            )

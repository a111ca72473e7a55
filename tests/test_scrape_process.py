"""The scrape process's side of serve: its messages, its mirror of the snapshot, its imports.

The process itself (started by serve, answering while the cycling process is stopped, living
and dying with it) is tested against a real Prometheus in test_integration.py.
"""

from __future__ import annotations

import gzip
import io
import json
import ssl
import subprocess
import sys

import pytest

from exporter import catalog, scrape_process
from exporter.publish import InProcess
from exporter.scrape_process import Mirror, Settings, TLSSettings, encode_update, read_update
from tests.test_publish import make

FAMILIES = tuple(series.name for series in catalog.SERIES)


def written(*updates: list[bytes]) -> bytes:
    return b"".join(piece for update in updates for piece in update)


def test_an_update_reads_back_as_it_was_written() -> None:
    worker, upstream, publisher, metrics, _clock = make()
    upstream.failing = {"nv_inference_exec_count"}  # some families missing, some present
    worker.run_cycle()
    snapshot = publisher.snapshot
    assert 0 < len(snapshot.families) < len(FAMILIES)
    counters = metrics.counters_body()
    stream = io.BytesIO(written(encode_update(snapshot, counters), encode_update(None, b"x\n")))
    got = read_update(stream)
    assert got is not None
    assert got[1] == counters
    assert got[0] is not None and dict(got[0].families) == dict(snapshot.families)
    assert got[0] == snapshot
    assert read_update(stream) == (None, b"x\n")
    assert read_update(stream) is None


def test_a_stream_cut_anywhere_ends_before_the_cut_update() -> None:
    """A parent that dies mid-message leaves a half update: it is never applied."""
    worker, _, publisher, metrics, _ = make()
    worker.run_cycle()
    first = written(encode_update(None, b"first\n"))
    second = written(encode_update(publisher.snapshot, metrics.counters_body()))
    for cut in [*range(0, 40), *range(40, len(second), 97)]:
        stream = io.BytesIO(first + second[:cut])
        assert read_update(stream) == (None, b"first\n")
        assert read_update(stream) is None, cut


def test_the_mirror_serves_the_bytes_one_process_serves() -> None:
    worker, upstream, publisher, metrics, clock = make()
    worker.run_cycle()
    local = InProcess(publisher, metrics)
    mirror = Mirror(publisher.staleness, FAMILIES, clock)
    assert not mirror.ready()

    def same() -> None:
        mirror.receive(publisher.snapshot, metrics.counters_body())
        assert mirror.metrics_parts(False) == local.metrics_parts(False)
        mirrored, served = mirror.metrics_parts(True), local.metrics_parts(True)
        assert [gzip.decompress(p) for p in mirrored] == [gzip.decompress(p) for p in served]
        assert mirror.ready() == local.ready()

    same()
    assert mirror.ready()
    upstream.failing = {"*"}
    clock.now += 60  # a failed cycle: families kept until stale
    worker.run_cycle()
    same()
    clock.now += 3 * publisher.staleness  # now stale: withdrawn, upstream_up 0, not ready
    same()
    assert not mirror.ready()
    assert mirror.metrics_parts(False)[1:] == []
    assert b"triton_mig_exporter_upstream_up 0.0" in mirror.metrics_parts(False)[0]


def test_counters_alone_keep_the_snapshot() -> None:
    worker, _, publisher, _metrics, clock = make()
    worker.run_cycle()
    mirror = Mirror(publisher.staleness, FAMILIES, clock)
    mirror.receive(publisher.snapshot, b"")
    mirror.receive(None, b"# counters\n")
    assert mirror.holder.snapshot is publisher.snapshot
    assert mirror.metrics_parts(False)[0].startswith(b"# counters\n")


@pytest.mark.parametrize("tls", [None, TLSSettings("/c.pem", "/k.pem", "/ca.pem",
                                                   int(ssl.CERT_REQUIRED),
                                                   int(ssl.TLSVersion.TLSv1_2),
                                                   int(ssl.TLSVersion.TLSv1_3))])
def test_settings_read_back_as_written(tls: TLSSettings | None) -> None:
    settings = Settings(90.0, FAMILIES, 10, tls, {"prometheus": "$2b$04$" + "a" * 53})
    head = scrape_process.read_header(io.BytesIO(settings.encode()))
    assert head is not None
    assert Settings.decode(head) == settings


def test_the_scrape_process_imports_neither_pandas_nor_the_configuration() -> None:
    """What keeps the second process small (about 20 MiB)."""
    heavy = ["pandas", "numpy", "pydantic", "yaml", "requests", "apscheduler",
             "exporter.config", "exporter.publish"]
    code = ("import json, sys, exporter.scrape_process; "
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert json.loads(out.stdout) == []


def test_healthz_fails_once_the_parent_goes_silent() -> None:
    """The parent sends an update every second; silence past the limit is a stuck parent."""
    now = [100.0]
    mirror = Mirror(90.0, FAMILIES, monotonic=lambda: now[0])
    assert mirror.alive()
    now[0] += scrape_process.SILENCE_LIMIT
    assert mirror.alive()
    now[0] += 1
    assert not mirror.alive()
    mirror.receive(None, b"")
    assert mirror.alive()

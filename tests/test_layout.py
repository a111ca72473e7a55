"""The layout: the serving core imports nothing from the lab (simulator, fetchers, demo)."""

from __future__ import annotations

import subprocess
import sys

import pytest

#: What serve and once run on, and every command but the lab's.
SERVING = ["exporter.cli", "exporter.service", "exporter.worker", "exporter.derive",
           "exporter.upstream", "exporter.publish", "exporter.web", "exporter.scrape_process",
           "exporter.rules", "exporter.dashboard", "exporter.report", "exporter.discover"]


def imported_after(statement: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{statement}; import sys; print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("module", SERVING)
def test_the_serving_core_imports_no_lab_code(module: str) -> None:
    loaded = imported_after(f"import {module}")
    assert module in loaded
    assert not {name for name in loaded if name.startswith("exporter.lab")}, module


def test_the_cli_imports_the_lab_only_for_its_commands() -> None:
    serve = imported_after("from exporter import cli; cli.build_parser('serve')")
    assert not {name for name in serve if name.startswith("exporter.lab")}
    demo = imported_after("from exporter import cli; cli.build_parser('demo')")
    assert {"exporter.lab.demo", "exporter.lab.promserver"} <= demo

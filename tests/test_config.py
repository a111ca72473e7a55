"""config: the documented default file, bad input named by key and file, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter import config
from exporter.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_documented_config_file_equals_the_built_in_defaults() -> None:
    assert config.load(ROOT / "config.yaml", environ={}) == config.load(None, environ={})


def test_defaults_match_the_notebook_label_set() -> None:
    cfg = config.load(None, environ={})
    assert cfg.evaluation.interval == 30 and cfg.evaluation.window == 120
    assert cfg.evaluation.staleness_bound == 90
    assert cfg.replica_labels == ["prometheus_replica"]
    assert (cfg.triton.model_label, cfg.triton.version_label, cfg.triton.server_labels) == (
        "model", "version", ["pod", "instance"])
    assert cfg.dcgm.selector == 'exported_container="triton", exported_namespace="triton"'
    assert cfg.dcgm.slice_labels == ["instance", "device", "GPU_I_ID", "GPU_I_PROFILE"]
    assert cfg.web.host_port == ("0.0.0.0", 9410)
    assert cfg.upstream.tls.insecure_skip_verify is False


@pytest.mark.parametrize("text, key, message", [
    ("upstream: {urll: x}", "upstream.urll", "unknown key"),
    ("nope: 1", "nope", "unknown key"),
    ("upstream: {url: ftp://x}", "upstream.url", "http:// or https://"),
    ("upstream: {timeout: fast}", "upstream.timeout", "duration"),
    ("upstream: {timeout: 0s}", "upstream.timeout", "greater than 0"),
    ("upstream: {retries: -1}", "upstream.retries", "greater than or equal to 0"),
    ("upstream: {max_cycle_response_bytes: 0}", "upstream.max_cycle_response_bytes",
     "greater than 0"),
    ("upstream: {max_cycle_response_bytes: 1000, max_response_bytes: 1001}", "upstream",
     "max_cycle_response_bytes: 1000 is under max_response_bytes 1001"),
    ("upstream: {bearer_token: a, bearer_token_file: /b}", "upstream", "not both"),
    ("evaluation: {interval: -5s}", "evaluation.interval", "duration"),
    ("evaluation: {window: 1m, scrape_interval: 30s}", "evaluation", "under 4x"),
    ("evaluation: {interval: 30s, staleness: 10s}", "evaluation", "at least one interval"),
    ("web: {listen_address: 9410}", "web.listen_address", "string"),
    ("web: {listen_address: 'localhost'}", "web.listen_address", "HOST:PORT"),
    ("web: {scrape_process: sometimes}", "web.scrape_process",
     "must be auto, true or false, got 'sometimes'"),
    ("triton: {model_label: 'bad-label'}", "triton.model_label", "pattern"),
    ("dcgm: {slice_labels: []}", "dcgm.slice_labels", "at least one"),
    ("dcgm: {idle_threshold: 2}", "dcgm.idle_threshold", "less than or equal to 1"),
    ("replica_labels: [model]", "(top level)", "identity label"),
    ("- a\n- b", "(top level)", "mapping"),
    ("upstream: [", "", "not valid YAML"),
])
def test_bad_config_names_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ={})
    line = str(caught.value)
    assert line.startswith(f"{path}: "), line
    assert key in line and message in line, line
    assert "\n" not in line


@pytest.mark.parametrize("text, mode", [
    ("web: {}", "auto"), ("web: {scrape_process: auto}", "auto"),
    ("web: {scrape_process: true}", True), ("web: {scrape_process: false}", False),
])
def test_scrape_process_is_auto_true_or_false(tmp_path: Path, text: str, mode: object) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert config.load(path, environ={}).web.scrape_process == mode
    env = {"TRITON_MIG_EXPORTER_WEB__SCRAPE_PROCESS": "false"}
    assert config.load(path, environ=env).web.scrape_process is False


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.yaml", environ={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {url: http://a:9090, timeout: 5s}\n")
    env = {
        "TRITON_MIG_EXPORTER_UPSTREAM__URL": "http://mimir:9009/prometheus/",
        "TRITON_MIG_EXPORTER_UPSTREAM__HEADERS": "{X-Scope-OrgID: tenant-1}",
        "TRITON_MIG_EXPORTER_EVALUATION__WINDOW": "5m",
        "TRITON_MIG_EXPORTER_REPLICA_LABELS": "[prometheus_replica, __replica__]",
        "TRITON_MIG_EXPORTER_CACHE": "/not/a/config/key",
    }
    cfg = config.load(path, environ=env)
    assert cfg.upstream.url == "http://mimir:9009/prometheus"
    assert cfg.upstream.timeout == 5
    assert cfg.upstream.headers == {"X-Scope-OrgID": "tenant-1"}
    assert cfg.evaluation.window == 300
    assert cfg.replica_labels == ["prometheus_replica", "__replica__"]


def test_the_cycle_response_budget_defaults_to_two_answers_and_follows_overrides(
    tmp_path: Path,
) -> None:
    assert config.load(None, environ={}).upstream.cycle_response_bytes == 2 * 64 * 1024 * 1024
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {max_response_bytes: 1000}\n")
    assert config.load(path, environ={}).upstream.cycle_response_bytes == 2000
    path.write_text("upstream: {max_response_bytes: 1000, max_cycle_response_bytes: 1000}\n")
    assert config.load(path, environ={}).upstream.cycle_response_bytes == 1000
    env = {"TRITON_MIG_EXPORTER_UPSTREAM__MAX_CYCLE_RESPONSE_BYTES": "268435456"}
    assert config.load(path, environ=env).upstream.cycle_response_bytes == 268435456
    env = {"TRITON_MIG_EXPORTER_UPSTREAM__MAX_CYCLE_RESPONSE_BYTES": "999"}
    with pytest.raises(ConfigError, match="max_cycle_response_bytes: 999 is under"):
        config.load(path, environ=env)


def test_bad_environment_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"evaluation\.window"):
        config.load(None, environ={"TRITON_MIG_EXPORTER_EVALUATION__WINDOW": "soon"})


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("2m", 120), ("1h30m", 5400), ("500ms", 0.5), (15, 15), ("1d", 86400)])
def test_durations(text: object, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "1x", "-1s", "1s2", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_format_duration_round_trips() -> None:
    assert config.format_duration(120) == "120s"
    assert config.format_duration(0.25) == "250ms"

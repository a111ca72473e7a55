"""config: the documented default file, bad input named by key and file, env overrides."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

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


# --- round two: YAML that is not a plain configuration, environment overrides, cycle bounds ---


def one_line_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        config.load(path, environ=environ or {})
    line = str(caught.value)
    assert "\n" not in line and len(line) < 400, line
    return line


@pytest.mark.parametrize("depth", [5_000, 100_000])
@pytest.mark.parametrize("kind", ["flow", "block"])
def test_deeply_nested_yaml_is_one_line(tmp_path: Path, depth: int, kind: str) -> None:
    path = tmp_path / "deep.yaml"
    if kind == "flow":
        path.write_text("upstream: " + "[" * depth + "]" * depth + "\n")
    else:  # indented one more space a level: 1,200 levels fit in 1 MiB
        path.write_text("".join(f"{' ' * i}k{i}:\n" for i in range(min(depth, 1_200))) + "\n")
    assert one_line_error(path) == f"{path}: not valid YAML: nested too deeply"


def test_a_fifo_as_the_configuration_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    outcome: list[str] = []
    reader = threading.Thread(target=lambda: outcome.append(one_line_error(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # unblock the hung open() before failing
        with open(fifo, "w"):
            pass
        reader.join(5)
        pytest.fail("reading a FIFO hung")
    assert outcome == [f"{fifo}: not a regular file"]
    web = tmp_path / "web.yml"
    os.mkfifo(web)
    with pytest.raises(ConfigError, match="not a regular file"):
        config.load_web_config(web)
    with pytest.raises(ConfigError, match=": not a regular file"):
        config.load(Path("/dev/null"), environ={})


def test_a_configuration_file_over_a_mebibyte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (1 << 20) + "\n")
    assert one_line_error(path) == f"{path}: larger than 1 MiB; not a configuration file"


@pytest.mark.parametrize("text, line, key", [
    ("upstream: {url: 'http://a:9090', url: 'http://b:9090'}\n", 1, "url"),
    ("upstream:\n  url: http://a:9090\n  timeout: 5s\n  url: http://b:9090\n", 4, "url"),
    ("evaluation: {interval: 30s}\nevaluation: {interval: 1m}\n", 2, "evaluation"),
    ("web:\n  basic_auth_users:\n    prom: '$2b$04$x'\n    prom: '$2b$04$y'\n", 4, "prom"),
    ("replica_labels: [a]\n'replica_labels': [b]\n", 2, "replica_labels"),
    ("rules: {alert_labels: {1: a, 1: b}}\n", 1, "1"),
])
def test_duplicate_keys_are_refused_with_the_line_and_the_key(
    tmp_path: Path, text: str, line: int, key: str
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert one_line_error(path) == (
        f"{path}: line {line}: duplicate key {key!r} (the last one would silently win)")
    web = tmp_path / "web.yml"
    web.write_text("basic_auth_users: {a: x, a: y}\n")
    with pytest.raises(ConfigError, match=r"web.yml: line 1: duplicate key 'a'"):
        config.load_web_config(web)


def test_merge_keys_may_be_overridden_without_being_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("upstream:\n  <<: {url: 'http://a:9090', timeout: 5s}\n  timeout: 7s\n")
    cfg = config.load(path, environ={})
    assert cfg.upstream.url == "http://a:9090" and cfg.upstream.timeout == 7


EMPTY_KEY = ("an empty key (levels are separated by a double underscore: "
             "TRITON_MIG_EXPORTER_UPSTREAM__URL)")


@pytest.mark.parametrize("name, message", [
    ("TRITON_MIG_EXPORTER_UPSTREM__URL",
     "'upstrem' is not a configuration section (did you mean upstream?)"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__URLL", "'urll' is not a key of upstream (did you mean url?)"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__TLS__CA", "'ca' is not a key of upstream.tls"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__URL__HOST", "upstream.url has no keys"),
    ("TRITON_MIG_EXPORTER_EVALUATON__WINDOW",
     "'evaluaton' is not a configuration section (did you mean evaluation?)"),
    ("TRITON_MIG_EXPORTER_REPLICA_LABEL", "'replica_label' is not a configuration section "
     "(did you mean replica_labels?)"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__", EMPTY_KEY),
    ("TRITON_MIG_EXPORTER___URL", EMPTY_KEY),
    ("TRITON_MIG_EXPORTER_UPSTREAM____URL", EMPTY_KEY),
    ("triton_mig_exporter_web__listen_adress", "'listen_adress' is not a key of web "
     "(did you mean listen_address?)"),
])
def test_a_misspelled_environment_variable_is_an_error_naming_it(name: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(None, environ={name: "http://mimir:9009"})
    assert str(caught.value) == f"environment: {name}: {message}"


def test_a_whole_section_or_a_mapping_key_from_the_environment() -> None:
    cfg = config.load(None, environ={
        "TRITON_MIG_EXPORTER_UPSTREAM": "{url: 'http://mimir:9009', timeout: 3s}",
        "TRITON_MIG_EXPORTER_RULES__ALERT_LABELS__TEAM": "inference",
    })
    assert cfg.upstream.url == "http://mimir:9009" and cfg.upstream.timeout == 3
    assert cfg.rules.alert_labels == {"team": "inference"}


def test_our_variables_that_are_not_configuration_are_left_alone() -> None:
    from exporter.lab import promserver

    assert promserver.CACHE_ENV in config.OTHER_VARIABLES
    assert config.load(None, environ={promserver.CACHE_ENV: "/x"}) == config.load(None, environ={})


@pytest.mark.parametrize("name, raw, message", [
    ("TRITON_MIG_EXPORTER_EVALUATION__WINDOW", "soon", "evaluation.window: expected a duration"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__RETRIES", "many", "upstream.retries: Input should be a "
     "valid integer"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__URL", "ftp://x", "upstream.url: must be an http://"),
    ("TRITON_MIG_EXPORTER_UPSTREAM__HEADERS", "[a, b]", "upstream.headers: Input should be a "
     "valid dictionary"),
    ("TRITON_MIG_EXPORTER_WEB__LISTEN_ADDRESS", "{a: 1, a: 2}",
     "duplicate key 'a' (the last one would silently win)"),
    ("TRITON_MIG_EXPORTER_REPLICA_LABELS", "[" * 5000 + "]" * 5000, "nested"),
    ("TRITON_MIG_EXPORTER_DCGM__SLICE_LABELS", "[a, a]", "dcgm.slice_labels: labels must be "
     "unique"),
])
def test_a_bad_environment_value_names_the_variable_not_the_file(
    tmp_path: Path, name: str, raw: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {url: 'http://a:9090'}\n")
    line = one_line_error(path, {name: raw})
    assert line.startswith(f"environment: {name}: "), line
    assert message in line, line
    assert str(path) not in line


def test_a_check_across_keys_names_the_file_and_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("evaluation: {scrape_interval: 30s}\n")
    line = one_line_error(path, {"TRITON_MIG_EXPORTER_EVALUATION__WINDOW": "1m"})
    assert line == (f"{path}: evaluation: window: 60s is under 4x the scrape_interval 30s; "
                    "rate() needs several samples (with TRITON_MIG_EXPORTER_EVALUATION__WINDOW "
                    "from the environment)")


@pytest.mark.parametrize("timeout, retries, backoff, seconds", [
    (10.0, 2, 0.5, 30 + 10 + 10),  # each wait: a Retry-After of up to one timeout
    (1.0, 2, 0.5, 3 + 1 + 1),
    (0.5, 1, 0.05, 1 + 1),  # a Retry-After is capped at max(1 s, timeout)
    (2.0, 0, 0.5, 2),
    # Backoffs 0, 1, 2, 4 (x 0.5 s), each capped at max(backoff, timeout) = 1 s, each at
    # least a Retry-After's 1 s.
    (1.0, 4, 0.5, 5 + 1 + 1 + 1 + 1),
    (10.0, 3, 8.0, 40 + 10 + 10 + 10),  # backoffs 0, 16, 32: capped at 10
])
def test_the_worst_case_of_one_upstream_call(
    timeout: float, retries: int, backoff: float, seconds: float
) -> None:
    assert config.worst_case_seconds(timeout, retries, backoff) == seconds
    cfg = config.from_mapping({"upstream": {"timeout": timeout, "retries": retries,
                                            "backoff": backoff}}, environ={})
    assert cfg.upstream.worst_case_seconds == seconds


def test_the_defaults_and_the_demo_are_outside_the_flapping_regime() -> None:
    from exporter.lab import demo

    assert config.load(None, environ={}).warnings() == []
    assert config.load(ROOT / "config.yaml", environ={}).warnings() == []
    for argv in ([], ["--interval", "1s", "--scrape-interval", "1s", "--window", "4s"],
                 ["--interval", "2m"]):
        parser = argparse.ArgumentParser()
        demo.add_arguments(parser)
        cfg = demo.demo_config("http://127.0.0.1:9090", parser.parse_args(argv))
        assert cfg.warnings() == [], argv
        up, ev = cfg.upstream, cfg.evaluation
        assert up.worst_case_seconds + ev.interval <= ev.staleness_bound


@pytest.mark.parametrize("evaluation, upstream", [
    ({"interval": "1s"}, {"timeout": "1s", "retries": 2}),  # the issue's: 28 % of scrapes
    ({"interval": "10s", "staleness": "30s"}, {"timeout": "10s", "retries": 2}),  # the old demo
    ({"interval": "30s", "staleness": "60s"}, {}),
])
def test_a_cycle_that_can_outlast_the_staleness_bound_warns(
    evaluation: dict[str, str], upstream: dict[str, Any]
) -> None:
    cfg = config.from_mapping({"evaluation": evaluation, "upstream": upstream}, environ={})
    [warning] = cfg.warnings()
    worst = cfg.upstream.worst_case_seconds
    assert warning.startswith(
        f"upstream: a cycle can take up to {worst:g}s ((retries + 1) x timeout and the waits "
        "between tries)"), warning
    assert f"evaluation.staleness {cfg.evaluation.staleness_bound:g}s" in warning, warning

"""The recording rules on backfilled history equal what ``once --at T`` prints at past instants.

The live test (tests/test_rules.py) compares the rules with the exporter while a Prometheus
scrapes the simulator. This one does it on history written after the fact: three hours
(``HOURS``) of the simulator's scrapes, with an undeduplicated HA replica, Triton series without
a model label, model churn at each epoch boundary and two server restarts (counter resets, one
while the replica is stored) in it, is written as OpenMetrics and backfilled with
``promtool tsdb create-blocks-from openmetrics`` into a fresh TSDB that a real Prometheus
serves on 127.0.0.1.

A backfill holds raw series only, and most rules read series recorded by earlier rules. Two ways
give every rule a value at a past instant: ``promtool tsdb create-blocks-from rules`` once per
dependency level (four levels here), loading each level's blocks into the Prometheus before the
next is evaluated; or :func:`exporter.rules.inline_recording_rules`, which replaces each
recorded series a rule reads by the expression that records it, so every rule is one
expression over raw series. This test inlines: each rule is then one instant query at any
instant chosen, such as a few seconds after a reset (promtool evaluates on the group
interval's aligned instants), with no block loading or restarts between levels. What inlining
does not run, the rule manager storing a rule's output and a later rule reading it back, is
what the live test runs.

Tolerance: both sides read the same stored samples at the same instant through the same
functions (rate, avg_over_time, max_over_time); only the order of additions differs (Go's
aggregation vs pandas), so the values agree to a few ulps. The bound asserted is a relative
1e-6; the largest difference measured is recorded as the ``max_relative_difference`` property
(with ``series_compared`` and ``instants``) and printed (-s). Measured: 5.3e-16 over 1,295
values at 10 instants.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from figures import exporter_figures, prometheus_figures, relative_difference, series_key

from exporter import catalog, config, rules
from exporter.lab import promserver, simulate

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = config.load(ROOT / "config.yaml", environ={})

# --------------------------------------------------------------------------------------------
# inline_recording_rules (pure)


def selectors(expr: str) -> list[str | None]:
    """Names of the vector selectors in ``expr``, parsed."""
    names: list[str | None] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.append(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def group(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"name": "g", "rules": [{"record": r, "expr": e} for r, e in pairs]}]


def test_every_inlined_rule_reads_raw_series_only() -> None:
    recording, alerting = rules.groups(DEFAULTS)
    inlined = rules.inline_recording_rules([recording, alerting])
    assert list(inlined) == [s.name for s in catalog.SERIES]
    own = {r["record"]: r["expr"] for r in recording["rules"]}
    for name, expr in inlined.items():
        read = selectors(expr)
        assert read and not set(read) & set(inlined), (name, read)
        if not set(selectors(own[name])) & set(inlined):
            assert expr == own[name]  # a rule over raw series is left as it is
    # A recorded name inside a longer one (rate inside rate_raw) is not replaced.
    rate = inlined[":nv_inference_count:rate"]
    raw = inlined[":nv_inference_count:rate_raw"]
    assert inlined[":triton_inference_rate_drift:ratio"] == f"({rate}) / (({raw}) > 0)"


def test_inlining_nests_and_keeps_aggregations_strings_and_comments() -> None:
    inlined = rules.inline_recording_rules(group(
        ("a:x:rate", "sum by (m) (rate(x[5m]))"),
        ("b", 'label_replace(a:x:rate, "src", "a:x:rate", "m", "(.*)") # a:x:rate\n'),
        ("c:x:sum", "sum without (m) (b) / on() group_left sum(a:x:rate > 1e6)"),
    ))
    assert inlined["b"] == (
        'label_replace((sum by (m) (rate(x[5m]))), "src", "a:x:rate", "m", "(.*)") # a:x:rate\n')
    assert inlined["c:x:sum"] == (
        f"sum without (m) (({inlined['b']})) / on() group_left sum((sum by (m) "
        "(rate(x[5m]))) > 1e6)")


def test_label_matchers_on_a_recorded_series_become_filters() -> None:
    inlined = rules.inline_recording_rules(group(
        ("a:x:avg", "max by (p) (y)"),
        ("b", 'a:x:avg{p=~"1g\\\\..*"} * 2 or a:x:avg{p="2g.x", q!=""} or a:x:avg{p!~"7g.*"}'),
    ))
    keep = '"__inline_keep"'
    mark = f'label_replace(vector(1), {keep}, "1", "", "")'

    def kept(inner: str, label: str, regex: str, op: str = "and") -> str:
        return (f"(label_replace(label_replace({inner}, {keep}, \"1\", \"{label}\", \"{regex}\")"
                f" {op} on(__inline_keep) {mark}, {keep}, \"\", \"\", \"\"))")

    base = "(max by (p) (y))"
    one_g, two_g_x = "1g\\\\..*", "2g\\\\.x"  # as PromQL string literals write them
    # A literal value is matched as a regex quoting it (Go's QuoteMeta): "." stays a dot.
    assert inlined["b"] == (
        f"{kept(base, 'p', one_g)} * 2 or "
        f"{kept(kept(base, 'p', two_g_x), 'q', '', 'unless')} or "
        f"{kept(base, 'p', '7g.*', 'unless')}")
    assert selectors(inlined["b"]).count("y") == 3


@pytest.mark.parametrize(("expr", "message"), [
    ("rate(a:x:sum[5m])", "over a range"),
    ("a:x:sum offset 5m", "offset"),
    ("a:x:sum @ 100", "@"),
    ("max_over_time(a:x:sum[5m:30s])", "over a range"),
    ('{__name__="a:x:sum"}', "__name__ matcher"),
    ("sum(later:x:sum)", "recorded after it"),
    ("sum(b)", "recorded after it"),  # itself
])
def test_what_no_single_expression_reproduces_is_refused(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rules.inline_recording_rules(group(("a:x:sum", "sum(x)"), ("b", expr),
                                           ("later:x:sum", "sum(y)")))


def test_a_recorded_name_used_as_a_label_name_or_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="not a selector"):
        rules.inline_recording_rules(group(("a", "sum(x)"), ("b", "sum by (a) (a)")))
    with pytest.raises(ValueError, match="recorded twice"):
        rules.inline_recording_rules(group(("a", "sum(x)"), ("a", "sum(y)")))


# --------------------------------------------------------------------------------------------
# The backfilled history

T0 = 1700000400.0  # 2023-11-14 22:20 UTC
HOURS = 3
SCRAPE = 15.0
EPOCH = 600.0  # the loaded models change (churn) at each epoch boundary
UNLABELED = (T0 + 600, T0 + 9000)
DUPLICATE = (T0 + 1200, T0 + 2400)
#: (server index, time): counter resets between two scrapes, one while the replica is stored.
RESTARTS = ((0, T0 + 1807.5), (2, T0 + 7207.5))
#: (what the 2 m window holds, instant).
INSTANTS = (
    ("clean", T0 + 300.0),
    ("unlabeled series", T0 + 907.5),
    ("replica and unlabeled series", T0 + 1500.0),
    ("a reset under the replica", RESTARTS[0][1] + 10.0),  # one sample after it
    ("a reset under the replica, later", RESTARTS[0][1] + 62.5),
    ("replica stored until 1 m ago", T0 + 2460.0),
    ("an epoch boundary", T0 + 7 * EPOCH + 5.0),
    ("a reset", RESTARTS[1][1] + 10.0),
    ("clean again", T0 + 9600.0),
    ("the last scrape", T0 + HOURS * 3600),
)
#: The agreed bound; measured differences are a few ulps (see the module docstring).
REL = 1e-6



@dataclass
class History:
    fleet: simulate.Fleet
    prom: promserver.PrometheusServer
    exporter_config: Path
    inlined: dict[str, str]


@pytest.fixture(scope="module", name="h")
def history(prometheus_binaries: promserver.PrometheusBinaries,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    root = tmp_path_factory.mktemp("rules-history")
    faults = simulate.Faults()
    faults.set_switch("unlabeled_series", True, at=UNLABELED[0])
    faults.set_switch("unlabeled_series", False, at=UNLABELED[1])
    faults.set_switch("duplicate_replica", True, at=DUPLICATE[0])
    faults.set_switch("duplicate_replica", False, at=DUPLICATE[1])
    spec = simulate.FleetSpec(servers=4, models=3, hosts=2, gpus_per_host=1, seed=11,
                              epoch_seconds=EPOCH, churn=0.3, start=T0)
    fleet = simulate.Fleet(spec, faults)
    for server, at in RESTARTS:
        faults.restart(fleet.pods[server], at=at)
    source = root / "history.om"
    written = fleet.write_openmetrics(source, T0, T0 + HOURS * 3600, SCRAPE)
    # promtool drops out-of-order samples silently: every sample written must be stored.
    assert promserver.backfill(prometheus_binaries, source, root / "tsdb") == written
    source.unlink()
    prom = promserver.PrometheusServer(
        prometheus_binaries, {"global": {"scrape_interval": f"{SCRAPE:g}s"}}, root / "tsdb")
    exporter_config = root / "exporter.yaml"
    try:
        prom.start()
        exporter_config.write_text(yaml.safe_dump({
            "upstream": {"url": prom.url, "timeout": "10s", "retries": 0},
            "evaluation": {"window": "2m", "scrape_interval": f"{SCRAPE:g}s"},
        }))
        cfg = config.load(exporter_config, environ={})
        groups = rules.groups(cfg)
        assert groups[0] == rules.groups(DEFAULTS)[0], "the committed recording rules are tested"
        yield History(fleet, prom, exporter_config, rules.inline_recording_rules(groups))
    finally:
        prom.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
def test_rules_on_backfilled_history_equal_once_at_past_instants(
    h: History, record_property: Any,
) -> None:
    largest, compared, seen = 0.0, 0, set()
    drift: dict[str, float] = {}
    for label, at in INSTANTS:
        got = prometheus_figures(h.prom, h.inlined, at)
        want = exporter_figures(h.exporter_config, at)
        for series in catalog.SERIES:
            ours, theirs = got.get(series.name, {}), want.get(series.name, {})
            # A label set on one side only (a series one side leaves out) fails here.
            assert set(ours) == set(theirs), (label, series.name, set(ours) ^ set(theirs))
            for labels, value in theirs.items():
                difference = relative_difference(ours[labels], value)
                assert difference <= REL, (label, series.name, labels, ours[labels], value)
                largest = max(largest, difference)
                compared += 1
            if theirs:
                seen.add(series.name)
        drift[label] = got[":triton_inference_rate_drift:ratio"][()]
    assert seen == {s.name for s in catalog.SERIES}, "every contract series was compared"

    # The faults were in the windows compared: the replica halves the deduplicated share and
    # the unlabelled series lower it; the restarted server's counters went back in the window.
    assert drift["clean"] == pytest.approx(1.0) == drift["clean again"]
    assert drift["replica and unlabeled series"] < 0.51
    assert drift["a reset under the replica"] < 0.51
    assert 0.51 < drift["unlabeled series"] < 1.0
    for server, at in RESTARTS:
        pod = h.fleet.pods[server]
        resets = h.prom.query(f'sum(resets(nv_inference_count{{pod="{pod}"}}[2m]))', at + 10)
        assert float(resets[0]["value"][1]) > 0, pod

    record_property("max_relative_difference", largest)
    record_property("series_compared", compared)
    record_property("instants", len(INSTANTS))
    print(f"\nrules vs once on backfilled history: largest relative difference {largest:.3g} "
          f"over {compared} series values at {len(INSTANTS)} instants")


@pytest.mark.integration
def test_inlined_label_filters_select_what_the_matchers_select(h: History) -> None:
    """The filter an inlined matcher becomes keeps exactly the series the matcher keeps, for
    each matcher type, a label some series lack, and a regex that needs its anchors."""
    raw = "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"
    matchers = ['GPU_I_PROFILE=~"1g\\\\..*"', 'GPU_I_PROFILE="3g.40gb"', 'GPU_I_PROFILE!="3g.40gb"',
                'GPU_I_PROFILE!~"[12]g.*"', 'exported_pod=""', 'exported_pod!=""',
                'GPU_I_PROFILE=~"g"', 'exported_pod=~".*"']
    pairs = [("x:raw:copy", raw)] + [(f"filtered_{i}", f"x:raw:copy{{{m}}}")
                                     for i, m in enumerate(matchers)]
    inlined = rules.inline_recording_rules(group(*pairs))
    at = T0 + 1500
    nonempty = 0
    for i, m in enumerate(matchers):
        want = {series_key(r["metric"]): r["value"][1] for r in h.prom.query(f"{raw}{{{m}}}", at)}
        got = {series_key(r["metric"]): r["value"][1]
               for r in h.prom.query(inlined[f"filtered_{i}"], at)}
        assert got == want, m
        nonempty += bool(want)
    assert nonempty >= 5

"""Monitoring assets: the Grafana dashboard queries only metrics the relay and operator
register, covers both, and every alert the operator installs is documented with a runbook
that exists."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from delivery_lib import ROOT

DASHBOARD = ROOT / "docs" / "monitoring" / "dchat-dashboard.json"
ALERTS_DOC = ROOT / "docs" / "monitoring" / "alerts.md"
RUNBOOKS = ROOT / "docs" / "runbooks"
METRIC_SOURCES = [ROOT / "relay" / "src" / "metrics.rs", ROOT / "operator" / "src" / "metrics.rs"]
MONITORING_RS = ROOT / "operator" / "src" / "build" / "monitoring.rs"
# Alerts the operator installs (contract in the delivery issue). DchatBackupTooOld comes
# with backups (docs/architecture.md, "Roadmap"); alerts.md documents only what is installed.
CONTRACT_ALERTS = {"DchatRelayDown", "DchatRelayHighErrorRate", "DchatRelayHighLatency"}
# Series Prometheus itself adds.
BUILTIN = {"up"}


def exposed_metrics(source: str) -> dict[str, str]:
    """Series names a prometheus-client registry in Rust `source` exposes, mapped to the
    metric type: `Registry::with_prefix("p")` + `register("name", "help", ident.clone())`,
    with the type of `ident` (Counter -> name_total; Histogram -> _bucket/_sum/_count)."""
    prefix_match = re.search(r'Registry::with_prefix\(\s*"([A-Za-z0-9_]+)"\s*\)', source)
    prefix = prefix_match.group(1) + "_" if prefix_match else ""
    types: dict[str, str] = {}
    for m in re.finditer(r"(?m)^\s*(?:pub(?:\([^)]*\))?\s+)?(\w+)\s*:\s*([A-Za-z].*?),?\s*$", source):
        types.setdefault(m.group(1), m.group(2))
    for m in re.finditer(r"\blet\s+(?:mut\s+)?(\w+)\s*=\s*([^;]+);", source):
        types[m.group(1)] = m.group(2)
    out: dict[str, str] = {}
    pattern = r'\.register\(\s*"(\w+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*(?:\w+\.)?(\w+)\.clone\(\)'
    for m in re.finditer(pattern, source):
        name, ident = prefix + m.group(1), m.group(2)
        declared = types.get(ident, "")
        if "Histogram" in declared:
            out.update({f"{name}_bucket": "histogram", f"{name}_sum": "histogram",
                        f"{name}_count": "histogram"})
        elif "Counter" in declared:
            out[f"{name}_total"] = "counter"
        elif "Gauge" in declared:
            out[name] = "gauge"
        else:
            raise AssertionError(f"cannot tell the type of metric {name} ({ident}: {declared!r})")
    return out


def all_exposed() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in METRIC_SOURCES:
        if path.exists():
            out.update(exposed_metrics(path.read_text()))
    return out


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def _metric_names(expr: str) -> set[str]:
    cleaned = re.sub(r'"[^"]*"', '""', expr)           # label values
    cleaned = re.sub(r"\{[^}]*\}", "{}", cleaned)       # label matchers
    cleaned = re.sub(r"\[[^\]]*\]", "[]", cleaned)      # ranges
    cleaned = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", cleaned)
    return {t for t in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", cleaned)
            if t.startswith("dchat_") or t in BUILTIN}


def test_extractor_understands_prometheus_client_registrations() -> None:
    source = '''
        pub struct M {
            pub hits: Counter,
            pub lat: Family<L, Histogram>,
            pub open: Gauge,
        }
        let mut registry = Registry::with_prefix("demo");
        let errors = Family::<E, Counter>::default();
        r.register("hits", "Hits \\"quoted\\"", m.hits.clone());
        r.register("latency_seconds", "Latency", m.lat.clone());
        r.register("open", "Open", m.open.clone());
        registry.register("errors", "Errors", errors.clone());
    '''
    assert exposed_metrics(source) == {
        "demo_hits_total": "counter", "demo_latency_seconds_bucket": "histogram",
        "demo_latency_seconds_sum": "histogram", "demo_latency_seconds_count": "histogram",
        "demo_open": "gauge", "demo_errors_total": "counter"}
    assert _metric_names('sum by (le) (rate(demo_x_bucket{a="dchat_fake"}[5m])) / up') == {"up"} | set()
    assert _metric_names("rate(dchat_a_total[5m]) + dchat_b") == {"dchat_a_total", "dchat_b"}


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert "datasource" in names
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], f"panel {panel['title']} has no query"


def test_dashboard_queries_only_metrics_that_exist() -> None:
    exposed = all_exposed()
    if not exposed:
        pytest.skip("relay/src/metrics.rs and operator/src/metrics.rs are not in the tree yet")
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for expr in _exprs(dash):
        used |= _metric_names(expr)
    # A component whose metrics module is not in the tree yet cannot be checked; once it is,
    # every name the dashboard uses for it must be registered there.
    relay_src, operator_src = (p.exists() for p in METRIC_SOURCES)
    checkable = {n for n in used
                 if (operator_src if n.startswith("dchat_operator_") else relay_src)}
    unknown = sorted(checkable - set(exposed) - BUILTIN)
    assert not unknown, f"the dashboard queries metrics no source registers: {unknown}"
    assert any(n.startswith("dchat_operator_") for n in used), "operator metrics missing"
    relay = {n for n in used if n.startswith("dchat_") and not n.startswith("dchat_operator_")}
    assert len(relay) >= 10, "relay metrics missing"
    for expr in _exprs(dash):
        if expr.startswith("label_values("):
            continue  # variable queries only read labels
        for name in _metric_names(expr):
            if exposed.get(name) == "counter":
                assert re.search(rf"(rate|increase)\(\s*{name}\b", expr), \
                    f"counter {name} used without rate/increase: {expr}"


def _documented_alerts() -> dict[str, str]:
    """alert name -> runbook slug from the table in alerts.md."""
    out = {}
    for line in ALERTS_DOC.read_text().splitlines():
        m = re.match(r"\|\s*(Dchat\w+)\s*\|.*\]\(\.\./runbooks/([a-z0-9-]+)\.md\)\s*\|$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _operator_alerts() -> tuple[set[str], set[str]]:
    """Alert names and runbook slugs in the operator's PrometheusRule builder."""
    if not MONITORING_RS.exists():
        return set(), set()
    text = MONITORING_RS.read_text()
    code = text.split("#[cfg(test)]")[0]
    alerts = set(re.findall(r'alert\(\s*"(Dchat\w+)"', code))
    slugs = set(re.findall(r'"((?:relay|backup|rollout|operator)-[a-z0-9-]+)"', code))
    return alerts, slugs


def test_every_alert_is_documented_with_an_existing_runbook() -> None:
    documented = _documented_alerts()
    operator_alerts, operator_slugs = _operator_alerts()
    missing = (CONTRACT_ALERTS | operator_alerts) - set(documented)
    assert not missing, f"alerts not documented in docs/monitoring/alerts.md: {missing}"
    for alert, slug in documented.items():
        assert (RUNBOOKS / f"{slug}.md").exists(), f"{alert}: runbook {slug}.md missing"
        assert f"## {alert}" in ALERTS_DOC.read_text(), f"{alert} needs its own section"
    for slug in operator_slugs:
        assert (RUNBOOKS / f"{slug}.md").exists(), \
            f"operator alerts link runbook {slug}.md, which does not exist"


@pytest.mark.parametrize("slug", ["rollout-stuck", "rollback", "backup-failed", "restore",
                                  "relay-crash-loop", "operator-down"])
def test_required_runbooks_exist_and_are_actionable(slug: str) -> None:
    text = (RUNBOOKS / f"{slug}.md").read_text()
    assert text.startswith("# ")
    assert "```sh" in text, f"{slug}: a runbook needs commands to run"
    assert "kubectl" in text


def test_operator_alerts_query_metrics_the_relay_exports() -> None:
    if not MONITORING_RS.exists() or not METRIC_SOURCES[0].exists():
        pytest.skip("operator monitoring builder or relay metrics not in the tree yet")
    code = MONITORING_RS.read_text().split("#[cfg(test)]")[0]
    exposed = set(all_exposed())
    # The builder names the series it queries in METRIC_* constants.
    queried = set(re.findall(r'const\s+METRIC_\w+\s*:\s*&str\s*=\s*"(\w+)"', code))
    assert queried, "no metric names found in operator/src/build/monitoring.rs"
    missing = sorted(n for n in queried
                     if n not in exposed and f"{n}_bucket" not in exposed)
    assert not missing, f"operator alerts query series no relay exports: {missing}"

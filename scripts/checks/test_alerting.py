"""The alerts the operator installs and where they go.

- The PrometheusRule comes from the operator itself (`dchat-operator render` of
  examples/backup.yaml), and `promtool test rules` runs scripts/checks/alert-rules.test.yaml
  against it: every alert fires on a series that should fire it, after its `for:`, and
  stays quiet otherwise. Mutating the rules (an alert that never fires, a `for:` dropped)
  must make those tests fail, so they cannot pass vacuously.
- docs/monitoring/alertmanager.yaml passes `amtool check-config`, routes every alert the
  operator renders by its severity (critical to PagerDuty, warning to Slack), keeps its
  secrets in files, and, on a real Alertmanager, groups alerts per cluster and lets a
  cluster's critical alert inhibit that cluster's warnings only.

The tools come from Debian's prometheus and prometheus-alertmanager packages, unpacked
into .venv/prometheus-tools by scripts/ensure-deps.sh.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from delivery_lib import ROOT, OperatorRbacUnavailable, operator_cli

TOOLS = ROOT / ".venv" / "prometheus-tools" / "bin"
RULE_TESTS = ROOT / "scripts" / "checks" / "alert-rules.test.yaml"
ALERTMANAGER_CONFIG = ROOT / "docs" / "monitoring" / "alertmanager.yaml"
# A cluster with every alert: relays plus backups on a schedule (DchatBackupTooOld).
EXAMPLE = ROOT / "examples" / "backup.yaml"
NAMESPACE = "chat"
# Where each severity the operator uses must be routed.
RECEIVER_BY_SEVERITY = {"critical": "pagerduty-critical", "warning": "slack-warnings"}
# Receiver fields that would hold a secret inline; each has a `<field>_file` form.
INLINE_SECRETS = {"routing_key", "service_key", "api_url", "slack_api_url",
                  "pagerduty_url", "auth_password", "auth_secret", "bearer_token",
                  "password", "api_key"}


def tool(name: str) -> Path:
    path = TOOLS / name
    assert path.exists(), f"{path} missing: run scripts/ensure-deps.sh"
    return path


def run(*cmd: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def rule_groups() -> list[dict[str, Any]]:
    """The rule groups of the PrometheusRule the operator builds for the example."""
    try:
        text = operator_cli("render", "-f", str(EXAMPLE), "-n", NAMESPACE)
    except OperatorRbacUnavailable as err:
        pytest.fail(f"`dchat-operator render` failed: {err}")
    rules = [d for d in yaml.safe_load_all(text) if d and d.get("kind") == "PrometheusRule"]
    assert len(rules) == 1, "the example must render exactly one PrometheusRule"
    groups: list[dict[str, Any]] = rules[0]["spec"]["groups"]
    return groups


def alerts_of(groups: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for group in groups:
        yield from group["rules"]


def promtool_test(groups: list[dict[str, Any]], directory: Path,
                  only: str | None = None) -> subprocess.CompletedProcess[str]:
    """`promtool test rules` of the checked-in tests against `groups` (with `only`, just
    the cases that test that alert)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    if only is None:
        shutil.copy(RULE_TESTS, directory / "tests.yaml")
    else:
        tests = yaml.safe_load(RULE_TESTS.read_text())
        tests["tests"] = [case for case in tests["tests"]
                          if any(c["alertname"] == only for c in case.get("alert_rule_test", []))]
        (directory / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    return run(tool("promtool"), "test", "rules", "tests.yaml", cwd=directory)


def test_rendered_rules_pass_promtool_check(rule_groups, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
    proc = run(tool("promtool"), "check", "rules", tmp_path / "rules.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{sum(1 for _ in alerts_of(rule_groups))} rules found" in proc.stdout


def test_every_alert_fires_when_it_should_and_only_then(rule_groups, tmp_path: Path) -> None:
    proc = promtool_test(rule_groups, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_tested_in_both_directions(rule_groups) -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts_of(rule_groups)}
    assert names == {"DchatRelayDown", "DchatRelayHighErrorRate", "DchatRelayHighLatency",
                     "DchatBackupFailed", "DchatBackupTooOld"}, names
    assert not names - fires, f"alerts never expected to fire: {sorted(names - fires)}"
    assert not names - quiet, f"alerts never expected to stay quiet: {sorted(names - quiet)}"
    assert not (fires | quiet) - names, f"tests of alerts the operator does not install: " \
                                        f"{sorted((fires | quiet) - names)}"


def test_the_rule_tests_fail_when_an_alert_never_fires_or_loses_its_for(
        rule_groups, tmp_path: Path) -> None:
    """Mutation check: the tests notice an alert that cannot fire and one that fires
    without waiting for its `for:` duration."""
    survived = []
    for gi, group in enumerate(rule_groups):
        for ri, rule in enumerate(group["rules"]):
            mutants = {"never fires": {"expr": "vector(0) > 1"}}
            if rule["for"] not in ("0m", "0s"):
                mutants["no for"] = {"for": "0m"}
            for what, change in mutants.items():
                groups = copy.deepcopy(rule_groups)
                groups[gi]["rules"][ri].update(change)
                directory = tmp_path / f"{rule['alert']}-{what.replace(' ', '-')}"
                proc = promtool_test(groups, directory, only=rule["alert"])
                if proc.returncode == 0:
                    survived.append(f"{rule['alert']} ({what})")
                else:
                    assert rule["alert"] in proc.stdout + proc.stderr, proc.stdout
    assert not survived, f"the rule tests still pass with these alerts broken: {survived}"


def test_alertmanager_config_passes_amtool() -> None:
    proc = run(tool("amtool"), "check-config", ALERTMANAGER_CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_operator_alert_is_routed_by_its_severity(rule_groups) -> None:
    for rule in alerts_of(rule_groups):
        labels = {**rule["labels"], "alertname": rule["alert"]}
        severity = labels["severity"]
        assert severity in RECEIVER_BY_SEVERITY, \
            f"{rule['alert']}: severity {severity!r} has no route in {ALERTMANAGER_CONFIG.name}"
        proc = run(tool("amtool"), "config", "routes", "test",
                   f"--config.file={ALERTMANAGER_CONFIG}",
                   f"--verify.receivers={RECEIVER_BY_SEVERITY[severity]}",
                   *(f"{k}={v}" for k, v in sorted(labels.items())))
        assert proc.returncode == 0, f"{rule['alert']}: {proc.stdout}{proc.stderr}"
    # An alert of another team keeps reaching someone.
    proc = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}",
               "--verify.receivers=slack-warnings", "alertname=NodeDown", "severity=critical")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _keys(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", key
            yield from _keys(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _keys(item, f"{path}[{i}]")


def test_alertmanager_secrets_are_read_from_files() -> None:
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    inline = [path for path, key in _keys(config) if key in INLINE_SECRETS]
    assert not inline, f"secrets written inline (use the *_file field): {inline}"
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["pagerduty-critical"]["pagerduty_configs"][0]["routing_key_file"]
    assert receivers["slack-warnings"]["slack_configs"][0]["api_url_file"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local server
        return json.loads(response.read())


@pytest.fixture()
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager on the example config; yields its base URL. Its secret files
    point at throwaway files and its group_wait is an hour, so it never notifies anyone
    while the test runs."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    config["route"]["group_wait"] = "1h"
    for receiver in config["receivers"]:
        for configs in receiver.values():
            if isinstance(configs, list):
                for c in configs:
                    for key in [k for k in c if k.endswith("_file")]:
                        secret = tmp_path / key
                        secret.write_text("https://example.invalid/not-a-secret\n")
                        c[key] = str(secret)
    path = tmp_path / "alertmanager.yaml"
    path.write_text(yaml.safe_dump(config))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(tool("prometheus-alertmanager")), f"--config.file={path}",
         f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--cluster.listen-address=", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2).close()  # noqa: S310
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    out = proc.communicate()[0]
                    pytest.fail(f"alertmanager did not become ready: {out}")
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_clusters_critical_alert_inhibits_only_its_own_warnings(
        rule_groups, alertmanager: str) -> None:
    rules = {r["alert"]: r for r in alerts_of(rule_groups)}

    def alert(name: str, **labels: str) -> dict[str, Any]:
        rule = rules.get(name)
        base = {**rule["labels"], "alertname": name} if rule else {"alertname": name}
        return {"labels": {**base, **labels},
                "annotations": dict(rule["annotations"]) if rule else {}}

    posted = [
        alert("DchatRelayDown", pod="dchat-blue-0"),                       # critical, chat/dchat
        alert("DchatRelayHighLatency"),                                    # warning, chat/dchat
        alert("DchatBackupFailed"),                                        # warning, chat/dchat
        alert("DchatRelayHighLatency", dchat_cluster="other"),             # warning, chat/other
        alert("DchatRelayHighErrorRate", namespace="elsewhere"),           # warning, elsewhere/dchat
        # Operator-wide alerts (alerts.md) carry no dchat_cluster: they take no part.
        alert("DchatOperatorDown", severity="critical", namespace="chat"),
        alert("DchatOperatorReconcileErrors", severity="warning", namespace="chat"),
    ]
    request = urllib.request.Request(f"{alertmanager}/api/v2/alerts", method="POST",
                                     data=json.dumps(posted).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).close()  # noqa: S310 - local server

    state = {}
    for a in _get(f"{alertmanager}/api/v2/alerts"):
        key = (a["labels"]["alertname"], a["labels"].get("namespace"),
               a["labels"].get("dchat_cluster"))
        state[key] = a["status"]["state"]
    assert state == {
        ("DchatRelayDown", "chat", "dchat"): "active",
        ("DchatRelayHighLatency", "chat", "dchat"): "suppressed",
        ("DchatBackupFailed", "chat", "dchat"): "suppressed",
        ("DchatRelayHighLatency", "chat", "other"): "active",
        ("DchatRelayHighErrorRate", "elsewhere", "dchat"): "active",
        ("DchatOperatorDown", "chat", None): "active",
        ("DchatOperatorReconcileErrors", "chat", None): "active",
    }, state

    # One notification group per cluster and receiver.
    groups = {(g["receiver"]["name"], g["labels"].get("namespace"), g["labels"].get("dchat_cluster")):
              sorted(a["labels"]["alertname"] for a in g["alerts"])
              for g in _get(f"{alertmanager}/api/v2/alerts/groups")}
    assert groups[("pagerduty-critical", "chat", "dchat")] == ["DchatRelayDown"]
    assert groups[("slack-warnings", "chat", "dchat")] == ["DchatBackupFailed",
                                                           "DchatRelayHighLatency"]
    assert groups[("slack-warnings", "chat", "other")] == ["DchatRelayHighLatency"]
    assert groups[("slack-warnings", "elsewhere", "dchat")] == ["DchatRelayHighErrorRate"]

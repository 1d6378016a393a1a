"""GitHub Actions workflows: actionlint (with shellcheck) passes on every workflow, and each
workflow does what the delivery issue requires."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from delivery_lib import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
REQUIRED = ["ci.yml", "e2e.yml", "release.yml", "deploy-staging.yml", "deploy-production.yml"]
ACTIONLINT = ROOT / ".venv" / "bin" / "actionlint"


def _load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def _steps(wf: dict[str, Any], job: str | None = None) -> list[dict[str, Any]]:
    jobs = [wf["jobs"][job]] if job else list(wf["jobs"].values())
    return [s for j in jobs for s in j.get("steps", [])]


def _runs(wf: dict[str, Any], job: str | None = None) -> str:
    return "\n".join(s.get("run", "") for s in _steps(wf, job))


def _uses(wf: dict[str, Any], job: str | None = None) -> list[str]:
    return [s["uses"] for s in _steps(wf, job) if "uses" in s]


def test_required_workflows_exist() -> None:
    present = sorted(p.name for p in WORKFLOWS.glob("*.yml"))
    for name in REQUIRED:
        assert name in present


def test_actionlint_passes_with_shellcheck() -> None:
    assert shutil.which("shellcheck"), "shellcheck missing: scripts/ensure-deps.sh installs it"
    files = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    proc = subprocess.run([str(ACTIONLINT), "-no-color", *files], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    # Proves the linter really runs and fails (a missing binary or a no-op would pass above).
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                   "      - run: echo ${{ github.event.issue.title }} $UNQUOTED\n"
                   "      - uses: actions/checkout@v6\n        with:\n          no-such-input: 1\n")
    proc = subprocess.run([str(ACTIONLINT), "-no-color", str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "no-such-input" in proc.stdout and "SC2086" in proc.stdout


@pytest.mark.parametrize("name", REQUIRED)
def test_workflows_have_least_privilege_and_timeouts(name: str) -> None:
    wf = _load(name)
    assert wf["permissions"] == {"contents": "read"} or wf["permissions"].get("contents") == "read"
    for job_name, job in wf["jobs"].items():
        assert "timeout-minutes" in job, f"{name}:{job_name} needs timeout-minutes"
        for perm, level in (job.get("permissions") or {}).items():
            assert level in ("read", "write", "none")
    text = (WORKFLOWS / name).read_text()
    assert "pull_request_target" not in text


def test_ci_runs_the_readme_test_command_and_supply_chain_checks() -> None:
    wf = _load("ci.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    runs = _runs(wf)
    assert "scripts/test-all.sh" in runs
    assert "cargo fmt --all -- --check" in runs
    assert "cargo clippy --workspace --all-targets" in runs and "-D warnings" in runs
    assert any(u.startswith("EmbarkStudios/cargo-deny-action@") for u in _uses(wf))
    assert "cargo audit" in runs
    assert (ROOT / "deny.toml").exists()
    crd_job = _runs(wf, "crds")
    assert "-- crd >" in crd_job and "git diff --exit-code -- crds/" in crd_job
    assert "diff -r crds charts/dchat-operator/crds" in crd_job


def test_e2e_uses_kind_loads_images_installs_chart_runs_ignored_tests() -> None:
    wf = _load("e2e.yml")
    uses = _uses(wf)
    assert any(u.startswith("helm/kind-action@") for u in uses)
    files = [s["with"]["file"] for s in _steps(wf) if s.get("uses", "").startswith("docker/build-push")]
    assert files == ["operator/Dockerfile", "relay/Dockerfile"]
    runs = _runs(wf)
    assert "kind load docker-image" in runs
    assert "helm upgrade --install dchat-operator charts/dchat-operator" in runs
    assert "examples/*.yaml" in runs
    assert "cargo test --locked --workspace -- --ignored" in runs
    steps = [s.get("run", "") for s in _steps(wf)]
    tests = next(i for i, r in enumerate(steps) if "-- --ignored" in r)
    install = next(i for i, r in enumerate(steps) if "helm upgrade --install" in r)
    assert tests < install, "the in-process e2e controller must not share the cluster with the chart's"


def test_release_builds_multi_arch_images_with_sbom_and_scan_and_publishes_charts() -> None:
    wf = _load("release.yml")
    assert wf["on"]["push"]["tags"] == ["v*.*.*"]
    build = next(s for s in _steps(wf, "images") if s.get("uses", "").startswith("docker/build-push"))
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["push"] is True and build["with"]["sbom"] is True
    assert {i["dockerfile"] for i in wf["jobs"]["images"]["strategy"]["matrix"]["include"]} == \
        {"operator/Dockerfile", "relay/Dockerfile"}
    trivy = next(s for s in _steps(wf, "images") if s.get("uses", "").startswith("aquasecurity/trivy-action"))
    assert trivy["with"]["exit-code"] == "1" and "CRITICAL" in trivy["with"]["severity"]
    assert wf["jobs"]["images"]["permissions"]["packages"] == "write"
    charts = _runs(wf, "charts")
    assert "helm package" in charts and "helm push" in charts and "oci://ghcr.io/" in charts
    assert "needs" in wf["jobs"]["charts"]


def test_release_builds_the_kubectl_plugin_for_four_platforms_and_its_krew_manifest() -> None:
    wf = _load("release.yml")
    plugin = wf["jobs"]["plugin"]
    matrix = plugin["strategy"]["matrix"]["include"]
    assert sorted((m["os"], m["arch"]) for m in matrix) == [
        ("darwin", "amd64"), ("darwin", "arm64"), ("linux", "amd64"), ("linux", "arm64")]
    for m in matrix:
        arch = {"amd64": "x86_64", "arm64": "aarch64"}[m["arch"]]
        system = {"linux": "unknown-linux-musl", "darwin": "apple-darwin"}[m["os"]]
        assert m["target"] == f"{arch}-{system}"
    runs = _runs(wf, "plugin")
    assert "cargo build --locked --release -p kubectl-dchat" in runs
    assert "kubectl-dchat/kubectl_complete-dchat" in runs and "tar -C staging -czf" in runs
    assert plugin["env"]["ARCHIVE"].startswith("kubectl-dchat_v${{ needs.version.outputs.version }}_")
    krew = wf["jobs"]["krew"]
    assert set(krew["needs"]) == {"version", "plugin"}
    krew_runs = _runs(wf, "krew")
    assert ".github/scripts/krew_manifest.py --template kubectl-dchat/krew/dchat.yaml" in krew_runs
    assert "shasum -a 256 -c" in krew_runs
    upload = [s for s in _steps(wf, "krew") if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload and upload[0]["with"]["name"] == "kubectl-dchat-${{ env.VERSION }}"


def test_staging_follows_release_and_waits_for_the_rollout() -> None:
    wf = _load("deploy-staging.yml")
    assert wf["on"]["workflow_run"]["workflows"] == ["release"]
    assert wf["jobs"]["deploy"]["environment"]["name"] == "staging"
    assert "dchat_deploy.py rollout" in _runs(wf)


def test_production_is_manual_confirmed_backed_up_and_released_after_success() -> None:
    wf = _load("deploy-production.yml")
    assert set(wf["on"]) == {"workflow_dispatch"}, "production deploys only by hand"
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["version"]["required"] and inputs["confirm"]["required"]
    pre = _runs(wf, "preflight")
    assert "dchat_deploy.py confirm" in pre and "cargo audit" in pre
    assert sum(u.startswith("aquasecurity/trivy-action") for u in _uses(wf, "preflight")) == 2
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "preflight"
    assert deploy["environment"]["name"] == "production"
    names = [s.get("name", "") for s in deploy["steps"]]
    runs = [s.get("run", "") for s in deploy["steps"]]
    snapshot = next(i for i, r in enumerate(runs) if "aws rds create-db-snapshot" in r)
    backup = next(i for i, r in enumerate(runs) if "dchat_deploy.py backup" in r)
    rollout = next(i for i, r in enumerate(runs) if "dchat_deploy.py rollout" in r)
    assert snapshot < rollout and backup < rollout, f"backups must precede the rollout: {names}"
    assert "if" not in deploy["steps"][rollout], "the rollout step must always run and gate"
    release = wf["jobs"]["release"]
    assert release["needs"] == "deploy"
    # actions: read only to download the kubectl-dchat artifact of the release workflow.
    assert release["permissions"] == {"contents": "write", "actions": "read"}
    runs = _runs(wf, "release")
    assert "gh release create" in runs and "gh run download" in runs
    assert "kubectl-dchat-$VERSION" in runs and "plugin/*" in runs
    assert wf["concurrency"]["cancel-in-progress"] is False


@pytest.mark.parametrize("name,environment", [("deploy-staging.yml", "staging"),
                                              ("deploy-production.yml", "production")])
def test_deploys_notify_slack_only_with_a_webhook(name: str, environment: str) -> None:
    wf = _load(name)
    deploy = wf["jobs"]["deploy"]
    # The secret reaches steps through the job's env, so `if:` can test it.
    assert deploy["env"]["SLACK_WEBHOOK_URL"] == "${{ secrets.SLACK_WEBHOOK_URL }}"
    start = [s for s in deploy["steps"] if "dchat_notify.py start" in s.get("run", "")]
    assert len(start) == 1 and start[0]["if"] == "env.SLACK_WEBHOOK_URL != ''"
    assert f"--environment {environment}" in start[0]["run"]
    runs = [s.get("run", "") for s in deploy["steps"]]
    rollout = next(i for i, r in enumerate(runs) if "dchat_deploy.py rollout" in r)
    assert runs.index(start[0]["run"]) < rollout, "the start message comes before the rollout"
    # The rollout step's outcome (rolled-back or not) is a job output the final message reads.
    assert deploy["steps"][rollout]["id"] == "rollout"
    assert deploy["outputs"]["outcome"] == "${{ steps.rollout.outputs.outcome }}"
    assert "version" in deploy["outputs"] and "cluster" in deploy["outputs"]
    notify = wf["jobs"]["notify"]
    assert notify["if"] == "always()", "the outcome is sent whether the deploy passed or not"
    assert "deploy" in notify["needs"]
    assert notify["env"]["SLACK_WEBHOOK_URL"] == "${{ secrets.SLACK_WEBHOOK_URL }}"
    assert notify["env"]["NEEDS"] == "${{ toJSON(needs) }}"
    finish = [s for s in notify["steps"] if "dchat_notify.py finish" in s.get("run", "")]
    assert len(finish) == 1 and finish[0]["if"] == "env.SLACK_WEBHOOK_URL != ''"
    assert '--needs-json "$NEEDS"' in finish[0]["run"]
    assert f"--environment {environment}" in finish[0]["run"]


def test_staging_load_tests_the_deployed_relays_with_thresholds() -> None:
    wf = _load("deploy-staging.yml")
    deploy = wf["jobs"]["deploy"]
    runs = [s.get("run", "") for s in deploy["steps"]]
    rollout = next(i for i, r in enumerate(runs) if "dchat_deploy.py rollout" in r)
    url = next(i for i, r in enumerate(runs) if "dchat_deploy.py relay-url" in r)
    assert rollout < url
    assert deploy["steps"][url]["env"]["RELAY_URL"] == "${{ vars.STAGING_RELAY_URL }}"
    assert deploy["outputs"]["relay_url"] == f"${{{{ steps.{deploy['steps'][url]['id']}.outputs.url }}}}"

    build = wf["jobs"]["loadgen"]
    assert "needs" not in build, "dchat-loadgen is built while the rollout runs"
    assert "cargo build --locked --release -p dchat-bench --bin dchat-loadgen" in _runs(wf, "loadgen")
    assert any(u.startswith("actions/upload-artifact@") for u in _uses(wf, "loadgen"))

    test = wf["jobs"]["load-test"]
    assert set(test["needs"]) == {"deploy", "loadgen"}
    assert "if" not in test, "the load test runs only after a successful rollout"
    assert test["env"]["RELAY_URL"] == "${{ needs.deploy.outputs.relay_url }}"
    run = _runs(wf, "load-test")
    assert "dchat-loadgen external --url \"$RELAY_URL\"" in run
    for flag, var in (("--max-p99-ms", "LOADTEST_MAX_P99_MS"),
                      ("--max-error-rate", "LOADTEST_MAX_ERROR_RATE"),
                      ("--clients", "LOADTEST_CLIENTS"), ("--rate", "LOADTEST_RATE"),
                      ("--duration", "LOADTEST_DURATION")):
        assert flag in run
        assert any(f"vars.{var} ||" in str(v) for v in test["env"].values()), var
    assert "--report loadtest.json" in run and "--summary loadtest.md" in run
    upload = next(s for s in test["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()", "a failed load test still uploads its report"
    assert "loadtest.json" in upload["with"]["path"] and "loadtest.md" in upload["with"]["path"]
    assert set(wf["jobs"]["notify"]["needs"]) == {"deploy", "loadgen", "load-test"}


def test_the_load_test_flags_the_workflow_uses_exist() -> None:
    """The flags the staging workflow passes are the ones dchat-loadgen external defines."""
    source = (ROOT / "relay" / "bench" / "src" / "external.rs").read_text()
    fields = set(re.findall(r"pub (\w+): ", source.split("pub struct Report")[0]))
    run = _runs(_load("deploy-staging.yml"), "load-test")
    used = set(re.findall(r"--([a-z0-9-]+)", run.split("external", 1)[1]))
    flags = {f.replace("_", "-") for f in fields}
    assert used <= flags, f"flags dchat-loadgen external does not have: {used - flags}"

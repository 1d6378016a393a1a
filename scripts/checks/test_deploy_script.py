"""The decisions .github/scripts/dchat_deploy.py makes for the deploy workflows: typed
confirmation, rollout success/failure from DchatCluster status, backup job outcome."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import pytest

from delivery_lib import ROOT

_spec = importlib.util.spec_from_file_location(
    "dchat_deploy", ROOT / ".github" / "scripts" / "dchat_deploy.py")
assert _spec and _spec.loader
deploy = importlib.util.module_from_spec(_spec)
sys.modules["dchat_deploy"] = deploy
_spec.loader.exec_module(deploy)


def cluster(*, observed: int = 7, phase: str = "Running", active: str = "1.5.0",
            ready: str = "True", progressing: str = "False", degraded: str = "False",
            rollout: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "relays", "generation": 7},
        "status": {
            "observedGeneration": observed, "phase": phase, "activeVersion": active,
            "activeSlot": "green", "rollout": rollout or {},
            "conditions": [
                {"type": "Ready", "status": ready, "reason": "R", "message": ""},
                {"type": "Progressing", "status": progressing, "reason": "P", "message": ""},
                {"type": "Degraded", "status": degraded, "reason": "SmokeTestFailed",
                 "message": "2 of 3 relays failed"},
            ],
        },
    }


def test_success_needs_new_generation_version_ready_and_rollout_finished() -> None:
    v = deploy.evaluate_rollout(cluster(), "1.5.0", 7)
    assert v.done and not v.failed and "green" in v.message


@pytest.mark.parametrize("kwargs", [
    {"observed": 6},                      # operator has not seen the new spec
    {"active": "1.4.2"},                  # old version still active
    {"ready": "False"},
    {"progressing": "True"},              # post-promotion window still open
    {"phase": "AwaitingPromotion", "active": "1.4.2"},
    {"phase": "Progressing"},
])
def test_in_flight_states_wait(kwargs: dict[str, Any]) -> None:
    v = deploy.evaluate_rollout(cluster(**kwargs), "1.5.0", 7)
    assert not v.done and not v.failed


def test_stale_failure_from_an_older_generation_is_ignored() -> None:
    v = deploy.evaluate_rollout(cluster(observed=6, phase="RolledBack"), "1.5.0", 7)
    assert not v.done and not v.failed


@pytest.mark.parametrize("phase", ["RolledBack", "Failed"])
def test_rollback_or_failure_fails_the_job(phase: str) -> None:
    v = deploy.evaluate_rollout(cluster(phase=phase, active="1.4.2", rollout={
        "rolledBackFrom": "1.5.0", "message": "smoke test failed"}), "1.5.0", 7)
    assert v.failed and not v.done
    assert phase in v.message and "smoke test failed" in v.message


def test_degraded_fails_the_job_even_if_version_is_active() -> None:
    v = deploy.evaluate_rollout(cluster(degraded="True"), "1.5.0", 7)
    assert v.failed and "SmokeTestFailed" in v.message


def test_poll_times_out_as_failure() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    looks = []

    def look():
        looks.append(now[0])
        return deploy.evaluate_rollout(cluster(progressing="True"), "1.5.0", 7)

    v = deploy.poll(look, timeout=60, interval=15, sleep=sleep, clock=lambda: now[0])
    assert v.failed and "timed out after 60s" in v.message
    assert looks == [0.0, 15.0, 30.0, 45.0, 60.0]


def test_poll_stops_at_success() -> None:
    states = iter([cluster(observed=6), cluster(progressing="True"), cluster()])
    v = deploy.poll(lambda: deploy.evaluate_rollout(next(states), "1.5.0", 7),
                    timeout=600, interval=1, sleep=lambda s: None, clock=lambda: 0.0)
    assert v.done


@pytest.mark.parametrize("version,typed,ok", [
    ("1.5.0", "deploy 1.5.0 to production", True),
    ("1.5.0", "  deploy 1.5.0 to production ", True),
    ("1.5.0", "deploy 1.5.1 to production", False),
    ("1.5.0", "yes", False),
    ("v1.5.0", "deploy v1.5.0 to production", False),
    ("1.5", "deploy 1.5 to production", False),
    ("1.5.0; rm -rf /", "deploy 1.5.0; rm -rf / to production", False),
])
def test_typed_confirmation(version: str, typed: str, ok: bool) -> None:
    if ok:
        deploy.check_confirmation(version, typed)
    else:
        with pytest.raises(deploy.DeployError):
            deploy.check_confirmation(version, typed)


def test_cluster_without_backups_relies_on_the_rds_snapshot() -> None:
    reason = deploy.backup_skip_reason({"metadata": {"name": "relays"}, "spec": {}})
    assert reason is not None and "RDS snapshot" in reason and "relays" in reason
    assert deploy.backup_skip_reason({"metadata": {"name": "relays"},
                                      "spec": {"backup": {"schedule": "0 * * * *"}}}) is None


def test_the_predeploy_backup_is_a_dchatbackup_of_the_cluster() -> None:
    obj = deploy.backup_object("relays", 1796558400.0)  # 2026-12-06T12:00:00Z
    assert obj["kind"] == "DchatBackup"
    assert obj["metadata"]["name"] == "relays-predeploy-20261206t120000z"
    assert obj["spec"] == {"cluster": {"name": "relays"}}
    assert obj["metadata"]["labels"]["dchat.network/cluster"] == "relays"
    assert len(deploy.backup_object("r" * 300, 0.0)["metadata"]["name"]) <= 253


def test_backup_outcome_follows_its_phase() -> None:
    pending = {"metadata": {"name": "b"}}
    running = {"metadata": {"name": "b"}, "status": {"phase": "Running"}}
    done = {"metadata": {"name": "b"}, "status": {"phase": "Completed", "sizeBytes": 9,
                                                  "location": "s3://x/y"}}
    failed = {"metadata": {"name": "b"}, "status": {"phase": "Failed", "error": "AccessDenied"}}
    for v in (deploy.evaluate_backup(pending), deploy.evaluate_backup(running)):
        assert not v.done and not v.failed
    assert deploy.evaluate_backup(done).done and "s3://x/y" in deploy.evaluate_backup(done).message
    v = deploy.evaluate_backup(failed)
    assert v.failed and "AccessDenied" in v.message


def test_cli_confirm_exit_codes(capsys) -> None:
    assert deploy.main(["confirm", "--version", "2.0.0", "--typed", "deploy 2.0.0 to production"]) == 0
    assert deploy.main(["confirm", "--version", "2.0.0", "--typed", "deploy"]) == 1
    assert "::error::confirmation mismatch" in capsys.readouterr().out


def test_status_fields_the_script_reads_exist_in_the_crd() -> None:
    """The deploy workflows decide on DchatCluster status; every field and phase the script
    relies on must be in the generated CRD, or a renamed field would make deploys hang."""
    from crd_schema import load_crd, version_schema
    from delivery_lib import CRD_FILE

    if not CRD_FILE.exists():
        pytest.skip("crds/ not generated yet")
    crd = load_crd(CRD_FILE)
    status = version_schema(crd, "v1alpha1")["properties"]["status"]["properties"]
    for field in ("observedGeneration", "phase", "activeVersion", "activeSlot", "conditions"):
        assert field in status, f"status.{field} missing from the CRD"
    phases = set(status["phase"]["enum"])
    used = set(deploy.TERMINAL_FAILURE_PHASES) | set(deploy.IN_FLIGHT_PHASES) | {"Running"}
    assert used <= phases, f"phases the script uses but the CRD lacks: {used - phases}"
    if "rollout" in status:
        rollout = status["rollout"]["properties"]
        for field in ("step", "message", "rolledBackFrom"):
            assert field in rollout, f"status.rollout.{field} missing from the CRD"
    condition_types = status["conditions"].get("description", "")
    for kind in ("Ready", "Progressing", "Degraded"):
        assert kind in condition_types, f"condition {kind} not documented in the CRD"


def test_rollout_outcome_tells_a_rollback_from_other_failures() -> None:
    rolled_back = deploy.evaluate_rollout(cluster(phase="RolledBack", active="1.4.2"), "1.5.0", 7)
    failed = deploy.evaluate_rollout(cluster(phase="Failed"), "1.5.0", 7)
    degraded = deploy.evaluate_rollout(cluster(degraded="True"), "1.5.0", 7)
    done = deploy.evaluate_rollout(cluster(), "1.5.0", 7)
    assert deploy.rollout_outcome(rolled_back) == "rolled-back"
    assert deploy.rollout_outcome(failed) == "failed"
    assert deploy.rollout_outcome(degraded) == "failed"
    assert deploy.rollout_outcome(done) == "succeeded"
    timed_out = deploy.poll(lambda: deploy.evaluate_rollout(cluster(progressing="True"), "1.5.0", 7),
                            timeout=0, interval=1, sleep=lambda s: None, clock=lambda: 0.0)
    assert deploy.rollout_outcome(timed_out) == "failed"


def _with_ingress(**ingress: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "chat", "name": "relays"}, "spec": {"ingress": ingress}}


def test_relay_url_from_the_ingress_or_the_variable() -> None:
    alb = _with_ingress(enabled=True, host="relay.staging.example", annotations={
        "alb.ingress.kubernetes.io/certificate-arn": "arn:aws:acm:eu-west-1:1:certificate/x"})
    assert deploy.relay_url(alb) == "wss://relay.staging.example/v1/ws"
    secret = _with_ingress(enabled=True, host="relay.example", tlsSecretName="relay-tls")
    assert deploy.relay_url(secret) == "wss://relay.example/v1/ws"
    plain = _with_ingress(enabled=True, host="relay.internal")
    assert deploy.relay_url(plain) == "ws://relay.internal/v1/ws"
    # The repository variable wins, and is checked.
    assert deploy.relay_url(alb, "wss://lb.example/v1/ws") == "wss://lb.example/v1/ws"
    with pytest.raises(deploy.DeployError, match="not ws://"):
        deploy.relay_url(alb, "https://lb.example/v1/ws")
    for no_way_in in (_with_ingress(enabled=False, host="relay.example"),
                      _with_ingress(enabled=True), {"metadata": {"name": "relays"}}):
        with pytest.raises(deploy.DeployError, match="STAGING_RELAY_URL"):
            deploy.relay_url(no_way_in)


def test_relay_url_and_rollout_write_step_outputs(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    assert deploy.main(["relay-url", "--namespace", "chat", "--name", "relays",
                        "--url", "wss://relay.staging.example/v1/ws"]) == 0
    assert out.read_text() == "url=wss://relay.staging.example/v1/ws\n"
    assert deploy.main(["relay-url", "--namespace", "chat", "--name", "relays",
                        "--url", "http://x"]) == 1
    assert "::error::" in capsys.readouterr().out
    # A rollout that cannot even start (bad version) still says how it ended.
    out.write_text("")
    assert deploy.main(["rollout", "--namespace", "chat", "--name", "relays",
                        "--version", "v1"]) == 1
    assert out.read_text() == "outcome=failed\n"

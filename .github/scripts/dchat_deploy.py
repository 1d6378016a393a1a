#!/usr/bin/env python3
"""Deployment helper for the deploy-staging and deploy-production workflows.

Talks to the cluster only through `kubectl` (already configured by the workflow) and keeps
every decision in pure functions so scripts/checks/test_deploy_script.py can test them.

  dchat_deploy.py check-version --version 1.4.2
  dchat_deploy.py confirm --version 1.4.2 --typed "deploy 1.4.2 to production"
  dchat_deploy.py backup  --namespace chat --name relays --timeout 1800   # a DchatBackup, waited for
  dchat_deploy.py rollout --namespace chat --name relays --version 1.4.2 --timeout 2700
  dchat_deploy.py relay-url --namespace chat --name relays [--url wss://relay.example/v1/ws]

`rollout` sets spec.version and waits on the operator's status until the blue-green
rollout has completed (exit 0) or was rolled back / failed / degraded / timed out (exit 1);
in a workflow it also writes the step output `outcome` (succeeded, rolled-back, failed).
`relay-url` writes the step output `url`: the client WebSocket URL the load test uses,
`--url` when given, otherwise from the cluster's Ingress host.
Only the Python standard library is used, so any runner can execute it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")
TERMINAL_FAILURE_PHASES = ("RolledBack", "Failed")
# Phases in which a rollout (or the first provisioning) is still under way.
IN_FLIGHT_PHASES = ("Pending", "Provisioning", "Progressing", "AwaitingPromotion")


class DeployError(Exception):
    """A deployment step failed; the message says which object and why."""


@dataclass(frozen=True)
class Verdict:
    """Outcome of one look at the cluster: `done` (success), `failed`, or neither (wait)."""

    done: bool
    failed: bool
    message: str
    rolled_back: bool = False



def check_version(version: str) -> None:
    """Reject anything that is not a plain SemVer release such as 1.4.2 (no leading v)."""
    if not SEMVER.match(version):
        raise DeployError(f"version {version!r} is not SemVer like 1.4.2 (no leading 'v')")


def check_confirmation(version: str, typed: str) -> None:
    """The production workflow requires the operator to type the exact sentence."""
    check_version(version)
    expected = f"deploy {version} to production"
    if typed.strip() != expected:
        raise DeployError(f"confirmation mismatch: type exactly {expected!r}")


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def evaluate_rollout(cluster: dict[str, Any], version: str, generation: int) -> Verdict:
    """Decide from a DchatCluster object whether the rollout to `version` (requested at
    metadata.generation `generation`) has finished, failed, or is still going.

    Success needs all of: status.observedGeneration >= generation, status.activeVersion ==
    version, condition Ready=True (observed at that generation when the condition says so),
    and no rollout still in progress (Progressing not True, phase not in IN_FLIGHT_PHASES):
    the post-promotion window, during which the operator may still roll back, must be over. Failure: phase RolledBack or Failed, or Degraded=True,
    once the operator has seen the new generation (older status is about the old spec)."""
    status = cluster.get("status") or {}
    observed = int(status.get("observedGeneration") or 0)
    phase = status.get("phase") or "Unknown"
    if observed < generation:
        return Verdict(False, False, f"operator has not observed generation {generation} yet "
                                     f"(observed {observed}, phase {phase})")
    rollout = status.get("rollout") or {}
    degraded = _condition(status, "Degraded")
    if phase in TERMINAL_FAILURE_PHASES:
        detail = rollout.get("message") or (degraded or {}).get("message") or ""
        origin = rollout.get("rolledBackFrom")
        extra = f" (rolled back from {origin})" if origin else ""
        return Verdict(False, True, f"rollout to {version} ended in phase {phase}{extra}: {detail}",
                       rolled_back=phase == "RolledBack")
    if degraded and degraded.get("status") == "True":
        return Verdict(False, True, f"cluster is Degraded ({degraded.get('reason')}): "
                                    f"{degraded.get('message', '')}")
    ready = _condition(status, "Ready")
    ready_ok = bool(ready and ready.get("status") == "True"
                    and int(ready.get("observedGeneration") or observed) >= generation)
    progressing = _condition(status, "Progressing")
    still_progressing = bool(progressing and progressing.get("status") == "True")
    active = status.get("activeVersion")
    if (active == version and ready_ok and not still_progressing
            and phase not in IN_FLIGHT_PHASES):
        return Verdict(True, False, f"version {version} is active on slot "
                                    f"{status.get('activeSlot')} and Ready")
    step = rollout.get("step") or "-"
    return Verdict(False, False, f"phase {phase}, step {step}, active {active}, "
                                 f"ready {ready_ok}: {rollout.get('message', '')}")


def backup_skip_reason(cluster: dict[str, Any]) -> str | None:
    """Why no operator backup runs before the rollout (a cluster without spec.backup), or
    None when one must run."""
    name = cluster.get("metadata", {}).get("name", "?")
    if (cluster.get("spec") or {}).get("backup"):
        return None
    return (f"DchatCluster {name} has no operator backup (no spec.backup): the RDS snapshot "
            "taken before this step is the pre-deploy backup of the relay data")


def backup_object(cluster: str, now: float) -> dict[str, Any]:
    """The on-demand DchatBackup this step creates (what `dchat-operator backup` creates):
    named <cluster>-predeploy-<UTC time>, labelled with its cluster."""
    stamp = time.strftime("%Y%m%dt%H%M%Sz", time.gmtime(now))
    name = f"{cluster[:253 - len(stamp) - 11]}-predeploy-{stamp}"
    return {
        "apiVersion": "dchat.network/v1alpha1",
        "kind": "DchatBackup",
        "metadata": {"name": name, "labels": {"dchat.network/cluster": cluster}},
        "spec": {"cluster": {"name": cluster}},
    }


def evaluate_backup(backup: dict[str, Any]) -> Verdict:
    """Whether a DchatBackup has completed, failed, or is still on its way."""
    name = backup.get("metadata", {}).get("name", "?")
    status = backup.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Completed":
        return Verdict(True, False, f"backup {name} completed: {status.get('sizeBytes')} bytes "
                                    f"at {status.get('location')}")
    if phase == "Failed":
        return Verdict(False, True, f"backup {name} failed: {status.get('error', '')}")
    return Verdict(False, False, f"backup {name} {phase}")


def rollout_outcome(verdict: Verdict) -> str:
    """The `outcome` step output of the rollout step (the Slack notification tells a
    rollback from other failures by it)."""
    if verdict.rolled_back:
        return "rolled-back"
    return "failed" if verdict.failed else "succeeded"


def relay_url(cluster: dict[str, Any], given: str = "") -> str:
    """The client WebSocket URL of a DchatCluster as seen from outside the cluster:
    `given` when set, otherwise its Ingress host with path /v1/ws, over wss:// when the
    Ingress terminates TLS (spec.ingress.tlsSecretName, or an ALB certificate annotation)."""
    if given:
        if not re.match(r"^wss?://[^/\s]+", given):
            raise DeployError(f"relay URL {given!r} is not ws://host/... or wss://host/...")
        return given
    meta = cluster.get("metadata") or {}
    name = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
    ingress = (cluster.get("spec") or {}).get("ingress") or {}
    host = ingress.get("host")
    if not ingress.get("enabled") or not host:
        raise DeployError(f"DchatCluster {name} has no spec.ingress host to reach the relays "
                          "from the runner: set the repository variable STAGING_RELAY_URL")
    annotations = ingress.get("annotations") or {}
    tls = bool(ingress.get("tlsSecretName")) or any(
        key.endswith("/certificate-arn") for key in annotations)
    return f"{'wss' if tls else 'ws'}://{host}/v1/ws"


def write_output(name: str, value: str) -> None:
    """A step output (`$GITHUB_OUTPUT`), when running in a workflow."""
    path = os.environ.get("GITHUB_OUTPUT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{name}={value}\n")


def kubectl(*args: str) -> dict[str, Any]:
    """Run kubectl with JSON output and return the parsed object."""
    proc = subprocess.run(["kubectl", *args, "-o", "json"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise DeployError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    try:
        parsed: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise DeployError(f"kubectl {' '.join(args)} printed invalid JSON: {err}") from err
    return parsed


def poll(look: Callable[[], Verdict], timeout: float, interval: float,
         sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> Verdict:
    """Call `look` until it reports done or failed, or `timeout` seconds pass."""
    deadline = clock() + timeout
    last = ""
    while True:
        verdict = look()
        if verdict.message != last:
            print(verdict.message, flush=True)
            last = verdict.message
        if verdict.done or verdict.failed:
            return verdict
        if clock() >= deadline:
            return Verdict(False, True, f"timed out after {int(timeout)}s; last state: {last}")
        sleep(interval)


def cmd_rollout(args: argparse.Namespace) -> Verdict:
    check_version(args.version)
    patch = json.dumps({"spec": {"version": args.version}})
    patched = kubectl("-n", args.namespace, "patch", "dchatcluster", args.name,
                      "--type=merge", "-p", patch)
    generation = int(patched["metadata"]["generation"])
    print(f"set {args.namespace}/{args.name} spec.version={args.version} "
          f"(generation {generation})", flush=True)
    return poll(lambda: evaluate_rollout(
        kubectl("-n", args.namespace, "get", "dchatcluster", args.name), args.version, generation),
        args.timeout, args.interval)


def cmd_backup(args: argparse.Namespace) -> Verdict:
    cluster = kubectl("-n", args.namespace, "get", "dchatcluster", args.name)
    reason = backup_skip_reason(cluster)
    if reason is not None:
        print(reason, flush=True)
        return Verdict(True, False, reason)
    backup = backup_object(args.name, time.time())
    name = backup["metadata"]["name"]
    proc = subprocess.run(["kubectl", "-n", args.namespace, "create", "-f", "-"],
                          input=json.dumps(backup), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeployError(f"creating DchatBackup {name}: {proc.stderr.strip()}")
    print(f"created DchatBackup {args.namespace}/{name}", flush=True)
    return poll(lambda: evaluate_backup(kubectl("-n", args.namespace, "get", "dchatbackup", name)),
                args.timeout, args.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-version", help="check a version is plain SemVer")
    check.add_argument("--version", required=True)
    confirm = sub.add_parser("confirm", help="check the typed production confirmation")
    confirm.add_argument("--version", required=True)
    confirm.add_argument("--typed", required=True)
    for name in ("backup", "rollout"):
        p = sub.add_parser(name)
        p.add_argument("--namespace", required=True)
        p.add_argument("--name", required=True, help="DchatCluster name")
        p.add_argument("--timeout", type=float, default=2700)
        p.add_argument("--interval", type=float, default=15)
        if name == "rollout":
            p.add_argument("--version", required=True)
    url = sub.add_parser("relay-url", help="the relays' client URL from outside the cluster")
    url.add_argument("--namespace", required=True)
    url.add_argument("--name", required=True, help="DchatCluster name")
    url.add_argument("--url", default="", help="use this URL (checked) instead of the Ingress")
    args = parser.parse_args(argv)
    try:
        if args.command == "check-version":
            check_version(args.version)
            print(f"version {args.version} accepted")
            return 0
        if args.command == "confirm":
            check_confirmation(args.version, args.typed)
            print("confirmation accepted")
            return 0
        if args.command == "relay-url":
            cluster = {} if args.url else kubectl("-n", args.namespace, "get", "dchatcluster",
                                                  args.name)
            found = relay_url(cluster, args.url)
            print(f"relay URL: {found}")
            write_output("url", found)
            return 0
        if args.command == "rollout":
            verdict = cmd_rollout(args)
            write_output("outcome", rollout_outcome(verdict))
        else:
            verdict = cmd_backup(args)
    except DeployError as err:
        print(f"::error::{err}", flush=True)
        if args.command == "rollout":
            write_output("outcome", "failed")
        return 1
    if verdict.failed:
        print(f"::error::{verdict.message}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Slack notifications of the deploy-staging and deploy-production workflows.

  dchat_notify.py start  --environment staging --version 1.4.2 --cluster chat/relays
  dchat_notify.py finish --environment staging --needs-json "$NEEDS"   # NEEDS=${{ toJSON(needs) }}

`start` says a deploy began. `finish` runs in the workflow's last job (`needs` every other
job, `if: always()`) and turns the jobs' results into one message: success, rollback (the
rollout step reported `outcome=rolled-back`), or failure (naming the jobs that failed); when
no job ran it sends nothing. The webhook URL is read from the environment variable
SLACK_WEBHOOK_URL (a repository secret); without it nothing is sent. A notification that
cannot be delivered is a warning, never a failed deploy.

Only the Python standard library is used; the payload is built by pure functions that
scripts/checks/test_notify_script.py tests offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

EVENTS = ("start", "success", "failure", "rollback")
# Job results (`needs.<job>.result`) that mean the job did not do its work.
FAILED_RESULTS = ("failure", "cancelled")
ICONS = {"start": ":rocket:", "success": ":white_check_mark:", "failure": ":x:",
         "rollback": ":rewind:"}


class NotifyError(Exception):
    """Bad arguments or input; the message names what is wrong."""


def escape(text: str) -> str:
    """Slack mrkdwn control characters, escaped as Slack asks."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def headline(event: str, environment: str, version: str) -> str:
    """One line saying what happened, without markup (also the notification text)."""
    what = version or "an unknown version"
    if event == "start":
        return f"Deploying dchat {what} to {environment}"
    if event == "success":
        return f"dchat {what} is deployed to {environment}"
    if event == "rollback":
        return f"dchat {what} was rolled back on {environment}"
    if event == "failure":
        return f"Deploying dchat {what} to {environment} failed"
    raise NotifyError(f"unknown event {event!r} (one of {', '.join(EVENTS)})")


def build_payload(event: str, environment: str, version: str, *, cluster: str = "",
                  detail: str = "", run_url: str = "") -> dict[str, Any]:
    """The JSON body for a Slack incoming webhook: `text` (what notifications show) and
    Block Kit blocks with the detail and a link to the workflow run."""
    title = headline(event, environment, version)
    body = f"{ICONS[event]} *{escape(title)}*"
    if detail:
        body += f"\n{escape(detail)}"
    context = [f"environment: *{escape(environment)}*"]
    if cluster:
        context.append(f"DchatCluster: `{escape(cluster)}`")
    if run_url:
        context.append(f"<{run_url}|workflow run>")
    return {
        "text": title,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": body}},
            {"type": "context",
             "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]},
        ],
    }


def final_event(needs: dict[str, Any]) -> tuple[str | None, str]:
    """The event for a finished workflow from its `needs` context (job -> {result,
    outputs}) and a detail line. A job output `outcome` of `rolled-back` makes it a
    rollback; any failed or cancelled job a failure; all jobs successful a success; no job
    run at all (every job skipped) nothing."""
    if not needs:
        raise NotifyError("--needs-json names no jobs")
    results = {job: str((value or {}).get("result") or "unknown") for job, value in needs.items()}
    outcomes = [str(((value or {}).get("outputs") or {}).get("outcome") or "")
                for value in needs.values()]
    failed = [job for job, result in results.items() if result in FAILED_RESULTS]
    summary = ", ".join(f"{job}: {result}" for job, result in results.items())
    if "rolled-back" in outcomes:
        return "rollback", f"The operator rolled the new version back ({summary})."
    if failed:
        return "failure", f"Failed: {', '.join(failed)} ({summary})."
    if all(result == "success" for result in results.values()):
        return "success", ""
    if all(result == "skipped" for result in results.values()):
        return None, "no job ran"
    return "failure", f"Not every job succeeded ({summary})."


def first_output(needs: dict[str, Any], name: str) -> str:
    """The first non-empty job output `name` among the needed jobs."""
    for value in needs.values():
        found = ((value or {}).get("outputs") or {}).get(name)
        if found:
            return str(found)
    return ""


def run_url(env: dict[str, str]) -> str:
    """Link to this workflow run, from the runner's default environment variables."""
    server, repo, run = (env.get("GITHUB_SERVER_URL"), env.get("GITHUB_REPOSITORY"),
                         env.get("GITHUB_RUN_ID"))
    if server and repo and run:
        return f"{server}/{repo}/actions/runs/{run}"
    return ""


def post(url: str, payload: dict[str, Any], timeout: float = 15) -> None:
    """POST the payload as JSON to the webhook."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - https webhook
        response.read()


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="a deploy began")
    start.add_argument("--version", required=True)
    finish = sub.add_parser("finish", help="the outcome of a finished workflow")
    finish.add_argument("--needs-json", required=True, help="${{ toJSON(needs) }}")
    finish.add_argument("--version", default="", help="default: a job output `version`")
    for p in (start, finish):
        p.add_argument("--environment", required=True)
        p.add_argument("--cluster", default="", help="namespace/name of the DchatCluster "
                                                     "(finish: default a job output `cluster`)")
        p.add_argument("--dry-run", action="store_true", help="print the payload, send nothing")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            event, detail, version, cluster = "start", "", args.version, args.cluster
        else:
            try:
                needs = json.loads(args.needs_json)
            except json.JSONDecodeError as err:
                raise NotifyError(f"--needs-json is not JSON: {err}") from err
            if not isinstance(needs, dict):
                raise NotifyError("--needs-json must be a JSON object (toJSON(needs))")
            found, detail = final_event(needs)
            if found is None:
                print(f"nothing to notify: {detail}")
                return 0
            event = found
            version = args.version or first_output(needs, "version")
            cluster = args.cluster or first_output(needs, "cluster")
        payload = build_payload(event, args.environment, version, cluster=cluster,
                                detail=detail, run_url=run_url(env))
    except NotifyError as err:
        print(f"::error::{err}")
        return 2
    if args.dry_run:
        print(json.dumps(payload, indent=1))
        return 0
    webhook = env.get("SLACK_WEBHOOK_URL", "")
    if not webhook:
        print("SLACK_WEBHOOK_URL is not set: no Slack notification")
        return 0
    try:
        post(webhook, payload)
    except (urllib.error.URLError, OSError, ValueError) as err:
        # The webhook URL is a secret: never print it, nor an error that may quote it.
        status = getattr(err, "code", None)
        print(f"::warning::the Slack notification ({event}) could not be sent: "
              f"{type(err).__name__}{f' (HTTP {status})' if status else ''}")
        return 0
    print(f"Slack notified: {payload['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Slack notifications of the deploy workflows (.github/scripts/dchat_notify.py): the
payload of each event, the final event from the jobs' results, and no network use without
a webhook. Offline: nothing is posted."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest

from delivery_lib import ROOT

_spec = importlib.util.spec_from_file_location(
    "dchat_notify", ROOT / ".github" / "scripts" / "dchat_notify.py")
assert _spec and _spec.loader
notify = importlib.util.module_from_spec(_spec)
sys.modules["dchat_notify"] = notify
_spec.loader.exec_module(notify)

RUN = {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "dchat/dchat-operator",
       "GITHUB_RUN_ID": "42"}


def job(result: str, **outputs: str) -> dict[str, Any]:
    return {"result": result, "outputs": outputs}


@pytest.mark.parametrize("event,icon,words", [
    ("start", ":rocket:", "Deploying dchat 1.5.0 to staging"),
    ("success", ":white_check_mark:", "dchat 1.5.0 is deployed to staging"),
    ("failure", ":x:", "Deploying dchat 1.5.0 to staging failed"),
    ("rollback", ":rewind:", "dchat 1.5.0 was rolled back on staging"),
])
def test_each_event_has_its_headline(event: str, icon: str, words: str) -> None:
    payload = notify.build_payload(event, "staging", "1.5.0", cluster="chat/relays",
                                   run_url="https://github.com/o/r/actions/runs/42")
    assert payload["text"] == words
    section, context = payload["blocks"]
    assert section["text"]["text"].startswith(f"{icon} *{words}*")
    assert context["elements"][0]["text"] == (
        "environment: *staging* · DchatCluster: `chat/relays` · "
        "<https://github.com/o/r/actions/runs/42|workflow run>")
    json.dumps(payload)  # serializable as is


def test_detail_is_escaped_for_slack() -> None:
    payload = notify.build_payload("failure", "production", "1.5.0",
                                   detail="<!channel> deploy & load-test: failure")
    assert "&lt;!channel&gt; deploy &amp; load-test: failure" in payload["blocks"][0]["text"]["text"]
    with pytest.raises(notify.NotifyError, match="unknown event"):
        notify.build_payload("exploded", "staging", "1.5.0")


@pytest.mark.parametrize("needs,event,detail_has", [
    ({"deploy": job("success", version="1.5.0", outcome="succeeded"),
      "load-test": job("success")}, "success", ""),
    ({"deploy": job("failure", version="1.5.0", outcome="rolled-back"),
      "load-test": job("skipped")}, "rollback", "rolled the new version back"),
    ({"deploy": job("success", outcome="succeeded"), "load-test": job("failure")},
     "failure", "Failed: load-test"),
    ({"deploy": job("failure", outcome="failed"), "load-test": job("skipped")},
     "failure", "Failed: deploy"),
    ({"preflight": job("failure"), "deploy": job("skipped"), "release": job("skipped")},
     "failure", "Failed: preflight"),
    ({"deploy": job("cancelled"), "load-test": job("skipped")}, "failure", "deploy: cancelled"),
    ({"deploy": job("success"), "release": job("skipped")}, "failure", "Not every job succeeded"),
    ({"deploy": job("skipped"), "load-test": job("skipped")}, None, "no job ran"),
])
def test_final_event_from_the_jobs(needs: dict[str, Any], event: str | None,
                                   detail_has: str) -> None:
    found, detail = notify.final_event(needs)
    assert found == event
    assert detail_has in detail


def test_finish_takes_version_and_cluster_from_job_outputs(capsys) -> None:
    needs = {"deploy": job("success", version="1.5.0", outcome="succeeded",
                           cluster="chat/relays"),
             "load-test": job("success")}
    assert notify.main(["finish", "--environment", "staging",
                        "--needs-json", json.dumps(needs), "--dry-run"], env=RUN) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["text"] == "dchat 1.5.0 is deployed to staging"
    assert "`chat/relays`" in payload["blocks"][1]["elements"][0]["text"]
    assert "https://github.com/dchat/dchat-operator/actions/runs/42" in \
        payload["blocks"][1]["elements"][0]["text"]


def test_nothing_is_sent_without_a_webhook_or_when_no_job_ran(monkeypatch, capsys) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("must not post")

    monkeypatch.setattr(notify, "post", no_network)
    assert notify.main(["start", "--environment", "staging", "--version", "1.5.0"], env={}) == 0
    assert "SLACK_WEBHOOK_URL is not set" in capsys.readouterr().out
    skipped = json.dumps({"deploy": job("skipped")})
    assert notify.main(["finish", "--environment", "staging", "--needs-json", skipped],
                       env={"SLACK_WEBHOOK_URL": "https://hooks.slack.invalid/x"}) == 0
    assert "nothing to notify" in capsys.readouterr().out


def test_a_webhook_gets_the_payload_and_a_failed_post_is_only_a_warning(monkeypatch,
                                                                        capsys) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(notify, "post", lambda url, payload: sent.append((url, payload)))
    secret = "https://hooks.slack.invalid/services/T0/B0/secret"
    env = {**RUN, "SLACK_WEBHOOK_URL": secret}
    assert notify.main(["start", "--environment", "production", "--version", "1.5.0",
                        "--cluster", "dchat/dchat"], env=env) == 0
    assert sent[0][0] == secret and sent[0][1]["text"] == "Deploying dchat 1.5.0 to production"

    def refused(url: str, payload: dict[str, Any]) -> None:
        raise notify.urllib.error.URLError(f"cannot reach {url}")

    monkeypatch.setattr(notify, "post", refused)
    capsys.readouterr()
    assert notify.main(["start", "--environment", "production", "--version", "1.5.0"],
                       env=env) == 0
    out = capsys.readouterr().out
    assert "::warning::" in out and secret not in out


def test_bad_needs_json_is_an_error(capsys) -> None:
    assert notify.main(["finish", "--environment", "staging", "--needs-json", "{"], env={}) == 2
    assert notify.main(["finish", "--environment", "staging", "--needs-json", "[]"], env={}) == 2
    assert notify.main(["finish", "--environment", "staging", "--needs-json", "{}"], env={}) == 2
    assert capsys.readouterr().out.count("::error::") == 3

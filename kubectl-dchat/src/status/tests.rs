//! The status summary and screen on fixtures.

use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::fixtures::{self, NOW};
use super::screen::render;
use super::*;
use crate::style::Style;

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn screen(snapshot: &Snapshot) -> String {
    render(&summarize(snapshot), now(), &Style::PLAIN)
}

/// The whole screen of a cluster in the middle of a rollout: every section, in order.
#[test]
fn the_screen_of_a_rollout_in_flight() {
    let expected = "\
DchatCluster prod/chat  Progressing
  version      1.0 serving on slot blue (spec.version 1.1)
  relays       3/3 ready

Conditions
  TYPE         STATUS  REASON          AGE  MESSAGE
  Ready        True    AllRelaysReady  63m  3/3 relays ready
  Progressing  True    RollingUpdate   3m   rolling out 1.1 to slot green
  Degraded     False   AsExpected      63m

Slots
  SLOT   ROLE     VERSION  READY  TEMPLATE
  blue   serving  1.0      3/3    aaaa1111bb
  green  rollout  1.1      3/3    cccc3333dd

Rollout
  1.0 -> 1.1 in slot green: Validating for 60s (started 3m ago)
  waiting for  the smoke test Job against the preview Service
  message      smoke test chat-smoke-cccc3333 running against chat-preview

  autoscaler   HPA chat: 3 current, 3 desired, min 3, max 10
  disruptions  PDB chat: minAvailable 2; 3 healthy of 2 needed, 1 disruption allowed

Backups
  schedule     \"0 */6 * * *\" UTC, next in 117m (2026-11-01T12:00:00Z)
  last success chat-20261101t060000z (4h2m ago)
  NAME                   PHASE      AGE    SIZE     ERROR
  chat-20261101t060000z  Completed  4h3m   1.5 MiB
  chat-20261101t000000z  Failed     10h3m  -        upload: connection reset

Events
  AGE         TYPE     REASON          MESSAGE
  10h2m (x2)  Warning  BackupFailed    chat-20261101t000000z: upload: connection reset
  3m          Normal   RolloutStarted  rolling out 1.1 to slot green
  60s         Normal   Validating      slot green is ready; running the smoke test
";
    let actual = screen(&fixtures::snapshot());
    assert_eq!(actual, expected, "actual:\n{actual}");
}

#[test]
fn the_summary_holds_absolute_times_for_scripts() {
    let summary = summarize(&fixtures::snapshot());
    let value = serde_json::to_value(&summary).unwrap();
    assert_eq!(value["phase"], "Progressing");
    assert_eq!(value["rollout"]["step"], "Validating");
    assert_eq!(value["rollout"]["stepStartedAt"], "2026-11-01T10:02:00Z");
    assert_eq!(value["rollout"]["inFlight"], true);
    assert_eq!(value["backups"]["nextScheduledAt"], "2026-11-01T12:00:00Z");
    assert_eq!(
        value["backups"]["recent"][0]["name"],
        "chat-20261101t060000z"
    );
    assert_eq!(value["slots"][1]["role"], "rollout");
    assert_eq!(value["autoscaler"]["max"], 10);
    assert_eq!(value["disruptionBudget"]["disruptionsAllowed"], 1);
    assert_eq!(value["events"][0]["type"], "Warning");
    assert_eq!(value["conditions"][0]["type"], "Ready");
}

#[test]
fn a_part_the_user_may_not_read_is_marked_and_the_rest_still_shows() {
    let mut snapshot = fixtures::snapshot();
    snapshot.events = Section::Unavailable {
        unavailable: "forbidden: events is forbidden".into(),
    };
    snapshot.autoscaler = Section::Unavailable {
        unavailable: "forbidden: no".into(),
    };
    let text = screen(&snapshot);
    assert!(
        text.ends_with("Events\n  unavailable: forbidden: events is forbidden\n"),
        "{text}"
    );
    assert!(
        text.contains("  autoscaler   unavailable: forbidden: no\n"),
        "{text}"
    );
    assert!(text.contains("Slots\n  SLOT"), "{text}");
    let json = serde_json::to_value(summarize(&snapshot)).unwrap();
    assert_eq!(
        json["events"],
        json!({"unavailable": "forbidden: events is forbidden"})
    );
}

#[test]
fn a_new_cluster_without_status_or_children() {
    let mut raw = fixtures::cluster();
    raw.as_object_mut().unwrap().remove("status");
    raw["spec"].as_object_mut().unwrap().remove("backup");
    let snapshot = Snapshot {
        cluster: crate::view::ClusterView::from_value(raw).unwrap(),
        statefulsets: Section::Shown(vec![]),
        autoscaler: Section::Shown(None),
        disruption_budget: Section::Shown(None),
        backups: Section::Shown(vec![]),
        events: Section::Shown(vec![]),
    };
    let text = screen(&snapshot);
    assert!(text.starts_with("DchatCluster prod/chat  (no status yet)\n  version      nothing serving yet (spec.version 1.1)\n\nConditions\n  none reported yet\n"), "{text}");
    assert!(
        text.contains("Slots\n  no relay StatefulSets yet\n"),
        "{text}"
    );
    assert!(text.contains("Rollout\n  none yet\n"), "{text}");
    assert!(
        text.contains("  autoscaler   none (spec.autoscaling off)\n"),
        "{text}"
    );
    assert!(
        text.contains("Backups\n  not configured (spec.backup)\n\nEvents\n  none\n"),
        "{text}"
    );
}

#[test]
fn stale_status_and_day_two_controls_are_called_out() {
    let mut raw = fixtures::cluster();
    raw["metadata"]["generation"] = json!(6);
    raw["metadata"]["annotations"] = json!({
        "dchat.network/reconcile": "paused",
        "dchat.network/hibernation": "on",
        "dchat.network/restartedAt": "2026-11-01T10:02:30Z"
    });
    raw["spec"]["paused"] = json!(true);
    raw["status"]["phase"] = json!("Hibernating");
    raw["status"]["restartedAt"] = json!("2026-11-01T09:00:00Z");
    raw["status"]["conditions"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "type": "Paused", "status": "True", "reason": "Paused", "message": "",
            "lastTransitionTime": "2026-11-01T10:02:40Z"
        }));
    let mut snapshot = fixtures::snapshot();
    snapshot.cluster = crate::view::ClusterView::from_value(raw).unwrap();
    let text = screen(&snapshot);
    assert!(
        text.starts_with(
            "DchatCluster prod/chat  Hibernating  (status is of generation 5; the spec is at 6)\n"
        ),
        "{text}"
    );
    assert!(text.contains("  paused       by annotation dchat.network/reconcile=paused and spec.paused (condition Paused True)\n"), "{text}");
    assert!(
        text.contains("  hibernation  requested by annotation dchat.network/hibernation=on\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "  restart      requested 2026-11-01T10:02:30Z; acted on 2026-11-01T09:00:00Z\n"
        ),
        "{text}"
    );
}

#[test]
fn what_each_rollout_step_waits_for() {
    let cases = [
        (
            "Preparing",
            Some("the relays of slot green to become Ready (3/3 ready)"),
        ),
        (
            "BackingUp",
            Some("the backup taken before the switch (spec.backup.beforeRollout)"),
        ),
        (
            "AwaitingPromotion",
            Some("promotion: kubectl dchat promote chat -n prod"),
        ),
        (
            "ScalingDown",
            Some("the scale-down delay; then slot blue scales to zero"),
        ),
        ("Complete", None),
        ("SomethingNewer", None),
    ];
    for (step, waiting) in cases {
        let mut raw = fixtures::cluster();
        raw["status"]["rollout"]["step"] = json!(step);
        let mut snapshot = fixtures::snapshot();
        snapshot.cluster = crate::view::ClusterView::from_value(raw).unwrap();
        let summary = summarize(&snapshot);
        let rollout = summary.rollout.unwrap();
        assert_eq!(rollout.waiting_for.as_deref(), waiting, "{step}");
    }
}

#[test]
fn the_newest_events_and_backups_only() {
    let mut snapshot = fixtures::snapshot();
    let Section::Shown(events) = &mut snapshot.events else {
        panic!()
    };
    let template = events[0].clone();
    events.clear();
    for minute in 0..15 {
        let mut e = template.clone();
        e.reason = Some(format!("R{minute:02}"));
        e.last_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            format!("2026-11-01T09:{minute:02}:00Z").parse().unwrap(),
        ));
        events.push(e);
    }
    let summary = summarize(&snapshot);
    let Section::Shown(lines) = summary.events else {
        panic!()
    };
    assert_eq!(lines.len(), RECENT_EVENTS);
    assert_eq!(lines.first().unwrap().reason, "R05");
    assert_eq!(lines.last().unwrap().reason, "R14");
}

#[test]
fn colour_only_when_asked() {
    let summary = summarize(&fixtures::snapshot());
    assert!(!render(&summary, now(), &Style::PLAIN).contains('\x1b'));
    let coloured = render(&summary, now(), &Style { color: true });
    assert!(
        coloured.contains("\x1b[33mProgressing\x1b[0m"),
        "{coloured}"
    );
    assert!(coloured.contains("\x1b[31mFailed\x1b[0m"), "{coloured}");
}

#[test]
fn image_tags() {
    assert_eq!(
        image_tag("ghcr.io/dchat/relay:1.4.2").as_deref(),
        Some("1.4.2")
    );
    assert_eq!(
        image_tag("registry:5000/relay:1.4.2@sha256:ab").as_deref(),
        Some("1.4.2")
    );
    assert_eq!(image_tag("registry:5000/relay"), None);
}

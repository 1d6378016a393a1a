//! What each command changes and says, decided from the cluster as read.

use serde_json::{json, Value};

use super::*;
use crate::view::tests::running;

fn now() -> Timestamp {
    "2026-11-01T10:00:00.250Z".parse().unwrap()
}

fn view(raw: Value) -> ClusterView {
    ClusterView::from_value(raw).unwrap()
}

fn rolling(step: &str) -> ClusterView {
    let mut raw = running();
    raw["status"]["rollout"] = json!({
        "targetVersion": "1.1", "targetTemplateHash": "h2", "slot": "green",
        "fromVersion": "1.0", "replicas": 3, "step": step, "message": "",
        "startedAt": "2026-11-01T09:55:00Z", "stepStartedAt": "2026-11-01T09:58:00Z"
    });
    view(raw)
}

fn annotated(annotations: Value) -> Value {
    let mut raw = running();
    raw["metadata"]["annotations"] = annotations;
    raw
}

#[test]
fn promote_sets_the_annotation_when_a_rollout_awaits_it() {
    let cluster = rolling("AwaitingPromotion");
    let plan = plan(Action::Promote, &cluster, now()).unwrap();
    assert_eq!(
        plan.changes,
        vec![(
            "dchat.network/promote",
            Some("2026-11-01T10:00:00.25Z".into())
        )]
    );
    assert_eq!(
        plan.said,
        vec!["dchatcluster prod/chat: promote requested for the rollout 1.0 -> 1.1 (slot green, step AwaitingPromotion); traffic switches at the operator's next reconcile"]
    );
    assert_eq!(
        plan.waiter,
        Waiter::RolloutComplete(cluster.rollout().unwrap().identity())
    );
}

#[test]
fn promote_ahead_of_validation_says_when_it_takes_effect() {
    let plan = plan(Action::Promote, &rolling("Validating"), now()).unwrap();
    assert_eq!(plan.changes.len(), 1);
    assert!(plan.said[0].ends_with("traffic switches as soon as the new version is validated"));
}

#[test]
fn promote_after_the_switch_changes_nothing_but_can_still_wait() {
    let plan = plan(Action::Promote, &rolling("Promoted"), now()).unwrap();
    assert!(plan.changes.is_empty());
    assert!(plan.said[0].ends_with("is promoted already; nothing to do"));
    assert!(matches!(plan.waiter, Waiter::RolloutComplete(_)));
}

#[test]
fn promote_or_abort_without_a_rollout_in_flight_is_refused() {
    for action in [Action::Promote, Action::Abort] {
        let error = plan(action, &view(running()), now()).unwrap_err();
        assert!(matches!(error, Error::Refused(_)));
        assert!(error
            .to_string()
            .starts_with("DchatCluster \"chat\" in namespace \"prod\" has no rollout in flight"));
        let error = plan(action, &rolling("Complete"), now()).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("; the last one, of 1.1, ended Complete"),
            "{error}"
        );
    }
}

#[test]
fn abort_sets_the_annotation_and_waits_for_aborted() {
    let plan = plan(Action::Abort, &rolling("Promoted"), now()).unwrap();
    assert_eq!(plan.changes[0].0, "dchat.network/abort");
    assert!(matches!(plan.waiter, Waiter::RolloutAborted(_)));
    assert!(plan.said[0].contains("traffic stays on or returns to 1.0"));
}

#[test]
fn pause_sets_the_annotation_once() {
    let plan1 = plan(Action::Pause, &view(running()), now()).unwrap();
    assert_eq!(
        plan1.changes,
        vec![("dchat.network/reconcile", Some("paused".into()))]
    );
    assert_eq!(plan1.said, vec!["dchatcluster prod/chat: paused (dchat.network/reconcile=paused); the operator changes nothing for it until `kubectl dchat resume chat -n prod`"]);
    assert_eq!(plan1.waiter, Waiter::Paused);
    let again = plan(
        Action::Pause,
        &view(annotated(json!({"dchat.network/reconcile": "paused"}))),
        now(),
    )
    .unwrap();
    assert!(again.changes.is_empty());
    assert!(again.said[0].contains("paused already"));
}

#[test]
fn resume_removes_the_annotation_and_says_when_the_spec_still_pauses() {
    let mut raw = annotated(json!({"dchat.network/reconcile": "paused"}));
    let plan1 = plan(Action::Resume, &view(raw.clone()), now()).unwrap();
    assert_eq!(plan1.changes, vec![("dchat.network/reconcile", None)]);
    assert!(plan1.warnings.is_empty());
    raw["spec"]["paused"] = json!(true);
    let plan2 = plan(Action::Resume, &view(raw), now()).unwrap();
    assert_eq!(plan2.warnings, vec!["spec.paused is true: DchatCluster prod/chat stays paused until spec.paused is set to false where the spec is managed (e.g. in Git)"]);
    let nothing = plan(Action::Resume, &view(running()), now()).unwrap();
    assert!(nothing.changes.is_empty());
    assert_eq!(
        nothing.said,
        vec!["dchatcluster prod/chat: no dchat.network/reconcile annotation to remove"]
    );
}

#[test]
fn hibernate_and_wake() {
    let hibernate = plan(Action::Hibernate, &view(running()), now()).unwrap();
    assert_eq!(
        hibernate.changes,
        vec![("dchat.network/hibernation", Some("on".into()))]
    );
    assert_eq!(hibernate.waiter, Waiter::Hibernating);
    let mut raw = annotated(json!({"dchat.network/hibernation": "on"}));
    let wake = plan(Action::Wake, &view(raw.clone()), now()).unwrap();
    assert_eq!(wake.changes, vec![("dchat.network/hibernation", None)]);
    assert_eq!(wake.waiter, Waiter::Awake);
    assert!(wake.warnings.is_empty());
    raw["spec"]["hibernate"] = json!(true);
    let wake = plan(Action::Wake, &view(raw), now()).unwrap();
    assert!(wake.warnings[0].starts_with("spec.hibernate is true"));
}

#[test]
fn restart_stamps_whole_seconds_and_waits_for_that_stamp() {
    let plan = plan(Action::Restart, &view(running()), now()).unwrap();
    let at: Timestamp = "2026-11-01T10:00:00Z".parse().unwrap();
    assert_eq!(
        plan.changes,
        vec![(
            "dchat.network/restartedAt",
            Some("2026-11-01T10:00:00Z".into())
        )]
    );
    assert_eq!(plan.waiter, Waiter::Restarted(at));
    assert_eq!(
        plan.waiter.describe(),
        "status.restartedAt to reach 2026-11-01T10:00:00Z"
    );
}

#[test]
fn a_paused_cluster_warns_that_other_requests_wait_for_resume() {
    let raw = annotated(json!({"dchat.network/reconcile": "paused"}));
    for action in [Action::Restart, Action::Hibernate, Action::Wake] {
        let plan = plan(action, &view(raw.clone()), now()).unwrap();
        assert_eq!(
            plan.warnings,
            vec!["DchatCluster prod/chat is paused: the operator acts on this once it is resumed"],
            "{action:?}"
        );
    }
}

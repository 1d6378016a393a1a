//! What the plugin asks of the operator and what it waits to see, in one place.
//!
//! The requests are annotations (their names come from `dchat_operator::labels` and
//! `dchat_operator::rollout`); the answers are status fields. Pause, hibernation and
//! restart are newer than the API types this plugin was written against, so their
//! status and spec fields are read from the raw object by the JSON pointers below —
//! if the operator names them differently, these constants are the only thing to change.
//!
//! Every `--wait` is one pure predicate here, from the cluster as last read to a
//! [`Check`]; `crate::wait` only polls.

use dchat_operator::api::RolloutStep;
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::view::{ClusterView, RolloutView};

pub use dchat_operator::labels::{
    HIBERNATION_ANNOTATION, RECONCILE_ANNOTATION, RECONCILE_PAUSED, RESTARTED_AT_ANNOTATION,
};
pub use dchat_operator::rollout::{ABORT_ANNOTATION, PROMOTE_ANNOTATION};

/// Value of [`HIBERNATION_ANNOTATION`] that hibernates (`off` or absent wakes).
pub const HIBERNATION_ON: &str = "on";
/// Condition type that is `True` while the operator leaves the cluster alone.
pub const PAUSED_CONDITION: &str = "Paused";
/// `status.phase` of a hibernated cluster.
pub const HIBERNATING_PHASE: &str = "Hibernating";
/// Condition type that is `True` once no relay of a hibernating cluster runs.
pub const HIBERNATED_CONDITION: &str = "Hibernated";
/// The status field present while a cluster hibernates and until it has woken.
pub const STATUS_HIBERNATION: &str = "/status/hibernation";
/// The spec field that pauses reconciliation (the annotation's declarative twin).
pub const SPEC_PAUSED: &str = "/spec/paused";
/// The spec field that hibernates the cluster.
pub const SPEC_HIBERNATE: &str = "/spec/hibernate";
/// The status field recording the last restart request (RFC 3339) the operator acted on.
pub const STATUS_RESTARTED_AT: &str = "/status/restartedAt";

/// Where a wait stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Not yet; what is seen now.
    Waiting(String),
    /// Done, as asked; what was seen.
    Done(String),
    /// It cannot end as asked any more; why.
    Failed(String),
}

/// `spec.paused` is true.
pub fn spec_paused(cluster: &ClusterView) -> bool {
    cluster.raw.pointer(SPEC_PAUSED) == Some(&Value::Bool(true))
}

/// `spec.hibernate` is true.
pub fn spec_hibernates(cluster: &ClusterView) -> bool {
    cluster.raw.pointer(SPEC_HIBERNATE) == Some(&Value::Bool(true))
}

/// The pause annotation is set to pause.
pub fn annotation_pauses(cluster: &ClusterView) -> bool {
    cluster.annotation(RECONCILE_ANNOTATION) == Some(RECONCILE_PAUSED)
}

/// The hibernation annotation is set to hibernate.
pub fn annotation_hibernates(cluster: &ClusterView) -> bool {
    cluster.annotation(HIBERNATION_ANNOTATION) == Some(HIBERNATION_ON)
}

/// The last restart the operator acted on, as written in status.
pub fn restarted_at(cluster: &ClusterView) -> Option<&str> {
    cluster.raw.pointer(STATUS_RESTARTED_AT)?.as_str()
}

/// A JSON pointer as people write the field: `/status/restartedAt` → `status.restartedAt`.
pub fn field(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

fn paused_condition(cluster: &ClusterView) -> Option<&str> {
    cluster
        .condition(PAUSED_CONDITION)
        .map(|c| c.status.as_str())
}

fn phase(cluster: &ClusterView) -> String {
    cluster.phase().unwrap_or("(no status yet)").to_string()
}

/// `pause --wait`: the Paused condition is True.
pub fn paused(cluster: &ClusterView) -> Check {
    match paused_condition(cluster) {
        Some("True") => Check::Done("condition Paused is True".into()),
        Some(other) => Check::Waiting(format!("condition Paused is {other}")),
        None => Check::Waiting("no Paused condition yet".into()),
    }
}

/// `resume --wait`: the Paused condition is no longer True. Fails at once while
/// `spec.paused` still pauses the cluster: removing the annotation cannot resume it.
pub fn resumed(cluster: &ClusterView) -> Check {
    if spec_paused(cluster) {
        return Check::Failed(spec_still_pauses(cluster));
    }
    match paused_condition(cluster) {
        Some("True") => Check::Waiting("condition Paused is True".into()),
        Some(other) => Check::Done(format!("condition Paused is {other}")),
        None => Check::Done("no Paused condition".into()),
    }
}

/// What `resume` says when the spec keeps the cluster paused.
pub fn spec_still_pauses(cluster: &ClusterView) -> String {
    format!(
        "spec.paused is true: DchatCluster {}/{} stays paused until spec.paused is set to false \
         where the spec is managed (e.g. in Git)",
        cluster.namespace, cluster.name
    )
}

/// `hibernate --wait`: the Hibernated condition is True — no relay of the serving slot
/// runs any more. (Phase Hibernating appears as soon as the operator acts on the
/// request, while relays may still be stopping.)
pub fn hibernating(cluster: &ClusterView) -> Check {
    match cluster.condition(HIBERNATED_CONDITION) {
        Some(c) if c.status == "True" => {
            Check::Done(format!("condition {HIBERNATED_CONDITION} is True"))
        }
        Some(c) => Check::Waiting(format!(
            "condition {HIBERNATED_CONDITION} is {} ({}); phase is {}",
            c.status,
            c.reason,
            phase(cluster)
        )),
        None => Check::Waiting(format!(
            "no {HIBERNATED_CONDITION} condition yet; phase is {}",
            phase(cluster)
        )),
    }
}

/// `wake --wait`: `status.hibernation` is gone — the operator removes it once every
/// relay is ready again — and the phase is no longer Hibernating. (Waiting for phase
/// Running would never end for a cluster that wakes into a rollout or a degraded
/// state.) Fails at once while `spec.hibernate` still hibernates the cluster.
pub fn awake(cluster: &ClusterView) -> Check {
    if spec_hibernates(cluster) {
        return Check::Failed(spec_still_hibernates(cluster));
    }
    let hibernation = cluster
        .raw
        .pointer(STATUS_HIBERNATION)
        .is_some_and(|v| !v.is_null());
    match cluster.phase() {
        Some(HIBERNATING_PHASE) => Check::Waiting(format!("phase is {HIBERNATING_PHASE}")),
        _ if hibernation => Check::Waiting(format!(
            "{} present; phase is {}",
            field(STATUS_HIBERNATION),
            phase(cluster)
        )),
        _ => Check::Done(format!("awake; phase is {}", phase(cluster))),
    }
}

/// What `wake` says when the spec keeps the cluster hibernated.
pub fn spec_still_hibernates(cluster: &ClusterView) -> String {
    format!(
        "spec.hibernate is true: DchatCluster {}/{} stays hibernated until spec.hibernate is \
         set to false where the spec is managed (e.g. in Git)",
        cluster.namespace, cluster.name
    )
}

/// `restart --wait`: the status records a restart at or after `requested` (the value
/// the plugin wrote into the annotation).
pub fn restarted(cluster: &ClusterView, requested: Timestamp) -> Check {
    match restarted_at(cluster) {
        None => Check::Waiting(format!("{} not set yet", field(STATUS_RESTARTED_AT))),
        Some(text) => match text.parse::<Timestamp>() {
            Ok(at) if at >= requested => Check::Done(format!("restart of {text} acted on")),
            Ok(_) => Check::Waiting(format!("last restart acted on: {text}")),
            Err(_) => Check::Waiting(format!("last restart acted on: {text:?} (not a time)")),
        },
    }
}

/// The rollout a promote or abort was about, to tell it from a later one.
pub type RolloutIdentity = (String, Option<String>);

fn same_rollout<'a>(
    cluster: &'a ClusterView,
    which: &RolloutIdentity,
) -> Result<&'a RolloutView, Check> {
    match cluster.rollout() {
        Some(r) if &r.identity() == which => Ok(r),
        Some(r) => Err(Check::Failed(format!(
            "another rollout started (of version {}, step {})",
            r.target_version, r.step
        ))),
        None => Err(Check::Failed("the rollout disappeared from status".into())),
    }
}

fn ended(r: &RolloutView) -> String {
    let mut text = format!("the rollout of {} ended {}", r.target_version, r.step);
    if !r.message.is_empty() {
        text.push_str(": ");
        text.push_str(&r.message);
    }
    text
}

/// `promote --wait`: the rollout `which` reaches Complete. Any other final step ends
/// the wait with a failure.
pub fn rollout_complete(cluster: &ClusterView, which: &RolloutIdentity) -> Check {
    let r = match same_rollout(cluster, which) {
        Ok(r) => r,
        Err(check) => return check,
    };
    match r.known_step() {
        Some(RolloutStep::Complete) => Check::Done(format!(
            "version {} serves; rollout Complete",
            r.target_version
        )),
        _ if r.in_flight() => Check::Waiting(format!("step {}", r.step)),
        _ => Check::Failed(ended(r)),
    }
}

/// `abort --wait`: the rollout `which` reaches Aborted.
pub fn rollout_aborted(cluster: &ClusterView, which: &RolloutIdentity) -> Check {
    let r = match same_rollout(cluster, which) {
        Ok(r) => r,
        Err(check) => return check,
    };
    match r.known_step() {
        Some(RolloutStep::Aborted) => Check::Done(format!(
            "rollout of {} Aborted; {} serves",
            r.target_version,
            r.from_version.as_deref().unwrap_or("the old version")
        )),
        _ if r.in_flight() => Check::Waiting(format!("step {}", r.step)),
        _ => Check::Failed(ended(r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::running;
    use serde_json::json;

    fn view(raw: Value) -> ClusterView {
        ClusterView::from_value(raw).unwrap()
    }

    fn with_condition(status: &str) -> ClusterView {
        let mut raw = running();
        raw["status"]["conditions"].as_array_mut().unwrap().push(
            json!({"type": "Paused", "status": status, "reason": "Annotation",
                         "message": "", "lastTransitionTime": "2026-11-01T10:00:00Z"}),
        );
        view(raw)
    }

    #[test]
    fn pause_waits_for_the_paused_condition() {
        assert_eq!(
            paused(&view(running())),
            Check::Waiting("no Paused condition yet".into())
        );
        assert_eq!(
            paused(&with_condition("False")),
            Check::Waiting("condition Paused is False".into())
        );
        assert!(matches!(paused(&with_condition("True")), Check::Done(_)));
    }

    #[test]
    fn resume_waits_for_the_condition_to_leave_true_unless_the_spec_pauses() {
        assert!(matches!(
            resumed(&with_condition("True")),
            Check::Waiting(_)
        ));
        assert!(matches!(resumed(&with_condition("False")), Check::Done(_)));
        assert!(matches!(resumed(&view(running())), Check::Done(_)));
        let mut raw = running();
        raw["spec"]["paused"] = json!(true);
        let Check::Failed(why) = resumed(&view(raw)) else {
            panic!("spec.paused must fail the wait")
        };
        assert!(why.starts_with("spec.paused is true: DchatCluster prod/chat stays paused"));
    }

    #[test]
    fn hibernate_waits_for_the_condition_and_wake_for_the_hibernation_status() {
        assert!(matches!(hibernating(&view(running())), Check::Waiting(_)));
        assert!(matches!(awake(&view(running())), Check::Done(_)));
        let mut raw = running();
        raw["status"]["phase"] = json!("Hibernating");
        raw["status"]["hibernation"] = json!({"since": "2026-11-01T10:00:00Z", "replicas": 3});
        raw["status"]["conditions"] = json!([{"type": "Hibernated", "status": "False",
            "reason": "Hibernating", "message": "", "lastTransitionTime": "2026-11-01T10:00:00Z"}]);
        assert_eq!(
            hibernating(&view(raw.clone())),
            Check::Waiting(
                "condition Hibernated is False (Hibernating); phase is Hibernating".into()
            )
        );
        raw["status"]["conditions"][0]["status"] = json!("True");
        assert!(matches!(hibernating(&view(raw.clone())), Check::Done(_)));
        assert_eq!(
            awake(&view(raw.clone())),
            Check::Waiting("phase is Hibernating".into())
        );
        // Waking: phase Provisioning, status.hibernation still there.
        let mut waking = raw.clone();
        waking["status"]["phase"] = json!("Provisioning");
        assert_eq!(
            awake(&view(waking.clone())),
            Check::Waiting("status.hibernation present; phase is Provisioning".into())
        );
        // Woken into a rollout: not Running, but awake.
        waking["status"]["phase"] = json!("RollingOut");
        waking["status"]
            .as_object_mut()
            .unwrap()
            .remove("hibernation");
        assert!(matches!(awake(&view(waking)), Check::Done(_)));
        raw["spec"]["hibernate"] = json!(true);
        assert!(
            matches!(awake(&view(raw)), Check::Failed(why) if why.starts_with("spec.hibernate is true"))
        );
    }

    #[test]
    fn restart_is_done_when_status_records_the_request_or_a_later_one() {
        let requested: Timestamp = "2026-11-01T10:00:00Z".parse().unwrap();
        let at = |value: Value| {
            let mut raw = running();
            raw["status"]["restartedAt"] = value;
            restarted(&view(raw), requested)
        };
        assert_eq!(
            restarted(&view(running()), requested),
            Check::Waiting("status.restartedAt not set yet".into())
        );
        assert!(matches!(
            at(json!("2026-11-01T09:00:00Z")),
            Check::Waiting(_)
        ));
        assert!(matches!(at(json!("2026-11-01T10:00:00Z")), Check::Done(_)));
        assert!(matches!(at(json!("2026-11-01T10:00:05Z")), Check::Done(_)));
        assert!(matches!(at(json!("yesterday")), Check::Waiting(_)));
    }

    fn rolling(step: &str, started: &str) -> ClusterView {
        let mut raw = running();
        raw["status"]["rollout"] = json!({
            "targetVersion": "1.1", "targetTemplateHash": "h2", "slot": "green",
            "fromVersion": "1.0", "replicas": 3, "step": step, "message": "m",
            "startedAt": started, "stepStartedAt": started
        });
        view(raw)
    }

    #[test]
    fn promote_waits_for_complete_of_the_same_rollout() {
        let which = rolling("AwaitingPromotion", "2026-11-01T10:00:00Z")
            .rollout()
            .unwrap()
            .identity();
        let at = |step| rollout_complete(&rolling(step, "2026-11-01T10:00:00Z"), &which);
        assert_eq!(at("Promoted"), Check::Waiting("step Promoted".into()));
        assert!(matches!(at("Complete"), Check::Done(_)));
        assert_eq!(
            at("RolledBack"),
            Check::Failed("the rollout of 1.1 ended RolledBack: m".into())
        );
        assert!(matches!(at("SomethingNew"), Check::Waiting(_)));
        let later = rollout_complete(&rolling("Complete", "2026-11-01T11:00:00Z"), &which);
        assert!(matches!(later, Check::Failed(why) if why.starts_with("another rollout started")));
        assert!(matches!(
            rollout_complete(&view(running()), &which),
            Check::Failed(_)
        ));
    }

    #[test]
    fn abort_waits_for_aborted() {
        let which = rolling("Validating", "2026-11-01T10:00:00Z")
            .rollout()
            .unwrap()
            .identity();
        let at = |step| rollout_aborted(&rolling(step, "2026-11-01T10:00:00Z"), &which);
        assert_eq!(at("Validating"), Check::Waiting("step Validating".into()));
        assert_eq!(
            at("Aborted"),
            Check::Done("rollout of 1.1 Aborted; 1.0 serves".into())
        );
        assert!(matches!(at("Complete"), Check::Failed(_)));
    }
}

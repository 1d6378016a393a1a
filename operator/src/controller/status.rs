//! Status as a pure function of the spec, the previous status and what the reconcile
//! observed. Conditions follow the Kubernetes conventions and kstatus:
//!
//! - `Ready`, `Progressing`, `Degraded` always present, with a reason. `Ready` is
//!   `Unknown` when a reconcile failed before it could look at the relays.
//! - `Reconciling` (True) is present exactly while the cluster is changing, and
//!   `Stalled` (True) exactly while it cannot progress without a change by a person (an
//!   invalid spec, a failed rollout, a request the API server refuses) — the
//!   "abnormal-true" pair kstatus-based tools (Flux, Argo CD, `kstatus`) read.
//! - `Monitoring` is present when the spec asks for a ServiceMonitor or PrometheusRule:
//!   True when they are applied, False while the cluster does not serve their kinds.
//! - `observedGeneration` says which spec the status describes — also when the
//!   reconcile of that spec failed ([`failed`]). While reconciliation is paused it
//!   stays at the last generation acted on ([`paused`]).
//! - `Paused` (True) is present exactly while reconciliation is paused; `Hibernated`
//!   while the cluster hibernates, waits to, or wakes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use crate::api::{ClusterBackupStatus, RestorePhase, RestoreStatus};
use crate::api::{
    DchatCluster, DchatClusterStatus, MonitoringSpec, Phase, RolloutStatus, RolloutStep, Slot,
};
use crate::backup::health::Health;
use crate::build::OptionalKinds;
use crate::day2::{self, HibernationView, Source};
use crate::labels::{HIBERNATION_ANNOTATION, RECONCILE_ANNOTATION, RECONCILE_PAUSED};

/// Condition type: every relay of the serving slot is ready with the desired template.
pub const READY: &str = "Ready";
/// Condition type: the cluster is moving towards its spec.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: the cluster is not as desired and needs attention.
pub const DEGRADED: &str = "Degraded";
/// kstatus condition type, present while progressing.
pub const RECONCILING: &str = "Reconciling";
/// kstatus condition type, present while stalled.
pub const STALLED: &str = "Stalled";
/// Condition type: the monitoring objects the spec asks for exist.
pub const MONITORING: &str = "Monitoring";
/// Condition type: backups complete on time (with `spec.backup`).
pub const BACKUP_HEALTHY: &str = "BackupHealthy";
/// Condition type, present (True) only while reconciliation is paused.
pub const PAUSED: &str = "Paused";
/// Condition type, present while the cluster hibernates, waits to, or wakes: True once
/// no relay of the serving slot runs.
pub const HIBERNATED: &str = "Hibernated";

/// Condition reasons, stable for alerting and automation.
pub mod reason {
    /// The spec fails validation.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A reconcile failed; retrying.
    pub const RECONCILE_ERROR: &str = "ReconcileError";
    /// Relays are being created for the first time.
    pub const PROVISIONING: &str = "Provisioning";
    /// Relays are being replaced with a new template.
    pub const ROLLING_UPDATE: &str = "RollingUpdate";
    /// Some relays are not ready.
    pub const RELAYS_NOT_READY: &str = "RelaysNotReady";
    /// Every relay is ready.
    pub const ALL_RELAYS_READY: &str = "AllRelaysReady";
    /// Nothing left to do.
    pub const COMPLETE: &str = "Complete";
    /// Nothing is wrong.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// A blue-green rollout failed validation; the old version keeps serving.
    pub const ROLLOUT_FAILED: &str = "RolloutFailed";
    /// A blue-green rollout failed after the switch; traffic went back.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// A blue-green rollout was aborted.
    pub const ROLLOUT_ABORTED: &str = "RolloutAborted";
    /// The old slot's stored messages could not be handed over (embedded store).
    pub const HANDOVER_FAILED: &str = "HandoverFailed";
    /// The ServiceMonitor and PrometheusRule the spec asks for are applied.
    pub const MONITORING_CONFIGURED: &str = "Configured";
    /// A new cluster loads its backup before it serves.
    pub const RESTORING: &str = "Restoring";
    /// Restoring a new cluster's backup failed.
    pub const RESTORE_FAILED: &str = "RestoreFailed";
    /// The cluster does not serve the Prometheus Operator's kinds.
    pub const PROMETHEUS_OPERATOR_MISSING: &str = "PrometheusOperatorNotInstalled";
    /// `Progressing`: reconciliation is paused, nothing moves.
    pub const PAUSED: &str = "Paused";
    /// `Paused`: paused by `spec.paused`.
    pub const PAUSED_BY_SPEC: &str = "PausedBySpec";
    /// `Paused`: paused by the `dchat.network/reconcile: paused` annotation.
    pub const PAUSED_BY_ANNOTATION: &str = "PausedByAnnotation";
    /// `Paused`: paused by both.
    pub const PAUSED_BY_SPEC_AND_ANNOTATION: &str = "PausedBySpecAndAnnotation";
    /// `Hibernated` (True), `Ready` and `Progressing` (False): no relay runs.
    pub const HIBERNATED: &str = "Hibernated";
    /// `Hibernated` (False), `Progressing` (True): the relays are stopping.
    pub const HIBERNATING: &str = "Hibernating";
    /// `Hibernated` (False): hibernation is asked for but waits for a switched rollout,
    /// a handback or a bootstrap restore to finish.
    pub const HIBERNATION_PENDING: &str = "HibernationPending";
    /// `Hibernated` (False), `Ready` (False), `Progressing` (True): the relays start again
    /// after hibernation.
    pub const WAKING: &str = "Waking";
}

/// What a reconcile saw of the serving slot's StatefulSet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlotObservation {
    /// `spec.replicas` (set by the operator or the HPA).
    pub desired: i32,
    /// `status.replicas`.
    pub replicas: i32,
    /// `status.readyReplicas`.
    pub ready: i32,
    /// `status.updatedReplicas`.
    pub updated: i32,
    /// Whether the StatefulSet controller has seen the latest spec and every pod runs
    /// the latest revision.
    pub rolled_out: bool,
}

/// A reconcile that failed, as status reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// The error, naming the object and the request.
    pub message: String,
    /// Whether retrying alone cannot fix it (the API server refused the request as
    /// forbidden or invalid): kstatus `Stalled` rather than `Reconciling`.
    pub needs_intervention: bool,
}

/// Whether the monitoring objects the spec asks for can exist on this cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Monitoring {
    /// The spec asks for neither a ServiceMonitor nor a PrometheusRule.
    #[default]
    NotRequested,
    /// Every requested kind is served, so its object is applied.
    Served,
    /// These requested kinds are not served (no Prometheus Operator CRDs).
    Missing(Vec<&'static str>),
}

/// Everything the status depends on besides the cluster itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Validation failure message, if the spec is invalid.
    pub invalid_spec: Option<String>,
    /// This reconcile's apply, if it failed.
    pub reconcile_error: Option<Failure>,
    /// The serving slot.
    pub active_slot: Slot,
    /// Its StatefulSet, if it exists.
    pub active: Option<SlotObservation>,
    /// Hash of the desired relay pod template.
    pub template_hash: String,
    /// Label selector of the serving relays.
    pub selector: String,
    /// The time to stamp on conditions that change.
    pub now: Timestamp,
    /// The rollout to record (from the rollout state machine).
    pub rollout: Option<RolloutStatus>,
    /// Whether the serving slot runs the template the spec asks for; only then may a
    /// ready cluster record `spec.version` as serving.
    pub active_is_desired: bool,
    /// Version serving according to the rollout (promotion and rollback change it).
    pub serving_version: Option<String>,
    /// Template hash serving according to the rollout.
    pub serving_hash: Option<String>,
    /// Whether the requested monitoring objects can exist.
    pub monitoring: Monitoring,
    /// `status.backup` (with `spec.backup`).
    pub backup: Option<ClusterBackupStatus>,
    /// The `BackupHealthy` condition (with `spec.backup`).
    pub backup_health: Option<Health>,
    /// The restore of a new cluster (`spec.bootstrap.recovery`).
    pub restore: Option<RestoreStatus>,
    /// Where hibernation stands.
    pub hibernation: HibernationView,
    /// `status.restartedAt`: the restart the relay pod template carries.
    pub restarted_at: Option<Time>,
}

/// A condition's status: `True`, `False` or `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Truth {
    True,
    False,
    Unknown,
}

impl Truth {
    fn as_str(self) -> &'static str {
        match self {
            Truth::True => "True",
            Truth::False => "False",
            Truth::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Truth {
    fn from(value: bool) -> Self {
        if value {
            Truth::True
        } else {
            Truth::False
        }
    }
}

/// One condition before it gets its type, generation and time.
#[derive(Clone, Debug)]
struct Cond {
    status: Truth,
    reason: &'static str,
    message: String,
}

fn cond(status: impl Into<Truth>, reason: &'static str, message: impl Into<String>) -> Cond {
    Cond {
        status: status.into(),
        reason,
        message: message.into(),
    }
}

struct Verdict {
    phase: Phase,
    ready: Cond,
    progressing: Cond,
    degraded: Cond,
    stalled: bool,
}

fn verdict(cluster: &DchatCluster, previous: &DchatClusterStatus, obs: &Observation) -> Verdict {
    let counts = obs
        .active
        .as_ref()
        .map(|a| format!("{}/{} relays ready", a.ready, a.desired))
        .unwrap_or_else(|| "no relays yet".to_string());
    if let Some(message) = &obs.invalid_spec {
        return Verdict {
            phase: Phase::Failed,
            ready: cond(false, reason::INVALID_SPEC, message.clone()),
            progressing: cond(false, reason::INVALID_SPEC, "waiting for a valid spec"),
            degraded: cond(true, reason::INVALID_SPEC, message.clone()),
            stalled: true,
        };
    }
    let all_ready = obs
        .active
        .as_ref()
        .is_some_and(|a| a.rolled_out && a.desired > 0 && a.ready >= a.desired);
    if let Some(failure) = &obs.reconcile_error {
        return failure_verdict(failure, cond(all_ready, reason::RECONCILE_ERROR, counts));
    }
    if let Some(v) = restore_verdict(obs, &counts) {
        return v;
    }
    if let Some(v) = hibernation_verdict(obs, &counts) {
        return v;
    }
    if let Some(v) = rollout_verdict(obs, all_ready, &counts) {
        return v;
    }
    let served_before = previous.active_version.is_some();
    match &obs.active {
        Some(a) if all_ready => Verdict {
            phase: Phase::Running,
            ready: cond(true, reason::ALL_RELAYS_READY, counts),
            progressing: cond(
                false,
                reason::COMPLETE,
                format!(
                    "version {} serving from slot {}",
                    cluster.spec.version, obs.active_slot
                ),
            ),
            degraded: cond(
                false,
                reason::AS_EXPECTED,
                format!("{}/{} relays ready", a.ready, a.desired),
            ),
            stalled: false,
        },
        Some(a) if !a.rolled_out && served_before => Verdict {
            phase: Phase::Progressing,
            ready: cond(false, reason::ROLLING_UPDATE, counts.clone()),
            progressing: cond(
                true,
                reason::ROLLING_UPDATE,
                format!(
                    "updating relays to version {}: {}/{} updated",
                    cluster.spec.version, a.updated, a.desired
                ),
            ),
            degraded: cond(false, reason::AS_EXPECTED, counts),
            stalled: false,
        },
        Some(_) if served_before => Verdict {
            phase: Phase::Degraded,
            ready: cond(false, reason::RELAYS_NOT_READY, counts.clone()),
            progressing: cond(false, reason::RELAYS_NOT_READY, counts.clone()),
            degraded: cond(true, reason::RELAYS_NOT_READY, counts),
            stalled: false,
        },
        _ => Verdict {
            phase: Phase::Provisioning,
            ready: cond(false, reason::PROVISIONING, counts.clone()),
            progressing: cond(
                true,
                reason::PROVISIONING,
                format!("starting relays: {counts}"),
            ),
            degraded: cond(false, reason::AS_EXPECTED, counts),
            stalled: false,
        },
    }
}

/// The verdict of a failed reconcile: Degraded with the error, and either retrying
/// (`Reconciling`) or waiting for a person (`Stalled`).
fn failure_verdict(failure: &Failure, ready: Cond) -> Verdict {
    let progressing = if failure.needs_intervention {
        cond(
            false,
            reason::RECONCILE_ERROR,
            "the API server refused a request; retrying, but a change is needed",
        )
    } else {
        cond(true, reason::RECONCILE_ERROR, "retrying")
    };
    Verdict {
        phase: Phase::Degraded,
        ready,
        progressing,
        degraded: cond(true, reason::RECONCILE_ERROR, failure.message.clone()),
        stalled: failure.needs_intervention,
    }
}

/// The verdict while a new cluster restores its backup, or after that failed.
fn restore_verdict(obs: &Observation, counts: &str) -> Option<Verdict> {
    let r = obs.restore.as_ref()?;
    match r.phase {
        RestorePhase::Completed => None,
        RestorePhase::Running => {
            let message = format!(
                "restoring backup {} (Job {}) before clients are admitted; {counts}",
                r.backup_path,
                r.job_name
                    .as_deref()
                    .unwrap_or("not created yet: waiting for a relay")
            );
            Some(Verdict {
                phase: Phase::Restoring,
                ready: cond(false, reason::RESTORING, message.clone()),
                progressing: cond(true, reason::RESTORING, message),
                degraded: cond(false, reason::AS_EXPECTED, counts),
                stalled: false,
            })
        }
        RestorePhase::Failed => {
            let message = format!(
                "restoring backup {} failed: {}; clients are not admitted (delete the restore Job to retry, or change spec.bootstrap)",
                r.backup_path,
                r.error.as_deref().unwrap_or("no reason given")
            );
            Some(Verdict {
                phase: Phase::Failed,
                ready: cond(false, reason::RESTORE_FAILED, message.clone()),
                progressing: cond(false, reason::RESTORE_FAILED, message.clone()),
                degraded: cond(true, reason::RESTORE_FAILED, message),
                stalled: true,
            })
        }
    }
}

/// Who asked for hibernation, for messages.
fn hibernation_source(source: Source) -> String {
    day2::describe(
        source,
        "hibernate",
        &format!("{HIBERNATION_ANNOTATION}={}", day2::HIBERNATION_ON),
    )
}

/// The verdict while the cluster hibernates or wakes; `None` otherwise (waiting to
/// hibernate leaves the verdict to the rollout it waits for).
fn hibernation_verdict(obs: &Observation, counts: &str) -> Option<Verdict> {
    match &obs.hibernation {
        HibernationView::Hibernating { .. } => {
            let message = hibernated_message(obs);
            let stopped = hibernation_stopped(obs);
            Some(Verdict {
                phase: Phase::Hibernating,
                ready: cond(false, reason::HIBERNATED, message.clone()),
                progressing: if stopped {
                    cond(false, reason::HIBERNATED, message)
                } else {
                    cond(true, reason::HIBERNATING, message)
                },
                degraded: cond(false, reason::AS_EXPECTED, "hibernating as asked"),
                stalled: false,
            })
        }
        HibernationView::Waking { replicas, .. } => {
            let message = format!(
                "waking from hibernation: starting {replicas} relay(s) in slot {}; {counts}",
                obs.active_slot
            );
            Some(Verdict {
                phase: Phase::Provisioning,
                ready: cond(false, reason::WAKING, counts),
                progressing: cond(true, reason::WAKING, message),
                degraded: cond(false, reason::AS_EXPECTED, counts),
                stalled: false,
            })
        }
        HibernationView::Off | HibernationView::Waiting { .. } => None,
    }
}

/// Whether no relay of the serving slot runs any more.
fn hibernation_stopped(obs: &Observation) -> bool {
    obs.active.as_ref().is_none_or(|a| a.replicas == 0)
}

fn hibernated_message(obs: &Observation) -> String {
    let HibernationView::Hibernating { source, record } = &obs.hibernation else {
        return String::new();
    };
    let by = hibernation_source(*source);
    let running = obs.active.as_ref().map(|a| a.replicas).unwrap_or(0);
    let state = if running == 0 {
        "no relay runs".to_string()
    } else {
        format!("stopping relays, {running} still running")
    };
    format!(
        "hibernating as asked by {by}: {state}; volumes and Services are kept; waking starts {} relay(s) in slot {}",
        record.replicas, obs.active_slot
    )
}

/// The `Hibernated` condition, or `None` when hibernation is neither asked for nor
/// being undone.
fn hibernation_condition(obs: &Observation) -> Option<Cond> {
    match &obs.hibernation {
        HibernationView::Off => None,
        HibernationView::Waiting { source, why } => Some(cond(
            false,
            reason::HIBERNATION_PENDING,
            format!(
                "hibernation asked by {} waits: {why}",
                hibernation_source(*source)
            ),
        )),
        HibernationView::Hibernating { .. } => {
            let stopped = hibernation_stopped(obs);
            Some(cond(
                stopped,
                if stopped {
                    reason::HIBERNATED
                } else {
                    reason::HIBERNATING
                },
                hibernated_message(obs),
            ))
        }
        HibernationView::Waking { replicas, .. } => Some(cond(
            false,
            reason::WAKING,
            format!(
                "waking: {replicas} relay(s) starting in slot {}; the autoscaler (if any) returns once all are ready",
                obs.active_slot
            ),
        )),
    }
}

/// The verdict while a rollout moves or after one failed on the template the spec still
/// asks for; `None` leaves it to the relay counts.
fn rollout_verdict(obs: &Observation, all_ready: bool, counts: &str) -> Option<Verdict> {
    let r = obs.rollout.as_ref()?;
    let ready_reason = if all_ready {
        reason::ALL_RELAYS_READY
    } else {
        reason::RELAYS_NOT_READY
    };
    match r.step {
        RolloutStep::Preparing
        | RolloutStep::Validating
        | RolloutStep::BackingUp
        | RolloutStep::AwaitingPromotion
        | RolloutStep::Promoted => Some(Verdict {
            phase: if r.step == RolloutStep::AwaitingPromotion {
                Phase::AwaitingPromotion
            } else {
                Phase::Progressing
            },
            ready: cond(all_ready, ready_reason, counts),
            progressing: cond(true, r.step.as_str(), r.message.clone()),
            degraded: cond(false, reason::AS_EXPECTED, counts),
            stalled: false,
        }),
        RolloutStep::Failed | RolloutStep::RolledBack | RolloutStep::Aborted
            if r.failed_template_hash.as_deref() == Some(obs.template_hash.as_str()) =>
        {
            // One phase for "the rollout failed and the previous version serves",
            // whether traffic never moved, moved back, or a person aborted; the
            // condition reason and status.rollout.step tell them apart.
            let why = match r.step {
                RolloutStep::Failed => reason::ROLLOUT_FAILED,
                RolloutStep::RolledBack => reason::ROLLED_BACK,
                _ => reason::ROLLOUT_ABORTED,
            };
            Some(Verdict {
                phase: Phase::RolledBack,
                ready: cond(all_ready, ready_reason, counts),
                progressing: cond(false, why, r.message.clone()),
                degraded: cond(true, why, r.message.clone()),
                // Nothing moves until the spec changes: kstatus "Stalled".
                stalled: true,
            })
        }
        RolloutStep::HandoverFailed if r.target_template_hash == obs.template_hash => {
            // The new version serves, but the old slot still holds stored messages and
            // stays up until a person retries the handover.
            Some(Verdict {
                phase: Phase::Degraded,
                ready: cond(all_ready, ready_reason, counts),
                progressing: cond(false, reason::HANDOVER_FAILED, r.message.clone()),
                degraded: cond(true, reason::HANDOVER_FAILED, r.message.clone()),
                stalled: true,
            })
        }
        _ => None,
    }
}

/// The `Monitoring` condition, or `None` when the spec asks for no monitoring object.
fn monitoring_condition(monitoring: &Monitoring) -> Option<Cond> {
    match monitoring {
        Monitoring::NotRequested => None,
        Monitoring::Served => Some(cond(
            true,
            reason::MONITORING_CONFIGURED,
            "ServiceMonitor and PrometheusRule are applied as the spec asks",
        )),
        Monitoring::Missing(kinds) => Some(cond(
            false,
            reason::PROMETHEUS_OPERATOR_MISSING,
            format!(
                "this cluster does not serve {} (monitoring.coreos.com/v1: the Prometheus \
                 Operator's CRDs are not installed); they are created as soon as it does",
                kinds.join(" or ")
            ),
        )),
    }
}

/// Builds the condition list: the three standard conditions, the kstatus pair when they
/// apply, and `extra` ones. A condition keeps its previous `lastTransitionTime` unless
/// its status flips, so unchanged inputs give an identical list.
fn conditions(
    previous: &DchatClusterStatus,
    generation: Option<i64>,
    now: Timestamp,
    v: &Verdict,
    extra: Vec<(&str, Cond)>,
) -> Vec<Condition> {
    let condition = |type_: &str, c: &Cond| {
        let status = c.status.as_str();
        let since = previous
            .conditions
            .iter()
            .find(|p| p.type_ == type_ && p.status == status)
            .map(|p| p.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: c.reason.to_string(),
            message: c.message.clone(),
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    let mut list = vec![
        condition(READY, &v.ready),
        condition(PROGRESSING, &v.progressing),
        condition(DEGRADED, &v.degraded),
    ];
    if v.progressing.status == Truth::True {
        list.push(condition(
            RECONCILING,
            &cond(true, v.progressing.reason, v.progressing.message.clone()),
        ));
    }
    if v.stalled {
        list.push(condition(
            STALLED,
            &cond(true, v.degraded.reason, v.degraded.message.clone()),
        ));
    }
    for (type_, c) in extra {
        list.push(condition(type_, &c));
    }
    list
}

/// The status the cluster should have. Conditions keep their previous
/// `lastTransitionTime` unless their status flips, so an unchanged cluster yields an
/// identical status and no write.
pub fn compute(cluster: &DchatCluster, obs: &Observation) -> DchatClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let v = verdict(cluster, &previous, obs);
    let generation = cluster.meta().generation;
    let mut extra: Vec<(&str, Cond)> = monitoring_condition(&obs.monitoring)
        .map(|c| vec![(MONITORING, c)])
        .unwrap_or_default();
    if let Some(h) = &obs.backup_health {
        extra.push((BACKUP_HEALTHY, cond(h.healthy, h.reason, h.message.clone())));
    }
    if let Some(c) = hibernation_condition(obs) {
        extra.push((HIBERNATED, c));
    }
    let conditions = conditions(&previous, generation, obs.now, &v, extra);

    let (replicas, ready_replicas, desired) = obs
        .active
        .as_ref()
        .map(|a| (a.replicas, a.ready, a.desired))
        .unwrap_or((0, 0, 0));
    // The spec's version serves once the slot running the desired template is ready;
    // otherwise whatever the rollout says serves (promotion and rollback move it).
    let serving_now = v.phase == Phase::Running && obs.active_is_desired;
    DchatClusterStatus {
        observed_generation: generation,
        phase: v.phase,
        active_slot: obs.active_slot,
        active_version: if serving_now {
            Some(cluster.spec.version.clone())
        } else {
            obs.serving_version
                .clone()
                .or_else(|| previous.active_version.clone())
        },
        active_template_hash: if serving_now {
            Some(obs.template_hash.clone())
        } else {
            obs.serving_hash
                .clone()
                .or_else(|| previous.active_template_hash.clone())
        },
        replicas,
        ready_replicas,
        ready: Some(format!("{ready_replicas}/{desired}")),
        selector: Some(obs.selector.clone()),
        conditions,
        rollout: obs.rollout.clone(),
        backup: obs.backup.clone(),
        restore: obs.restore.clone(),
        restarted_at: obs.restarted_at.clone(),
        hibernation: obs.hibernation.record(),
    }
}

/// The status after a reconcile that failed before it could observe the cluster (or
/// after it wrote status): everything the operator knew stays, the phase is `Degraded`,
/// `Ready` is `Unknown` because the relays were not looked at, and the error is in
/// `Degraded`'s message. `observedGeneration` is the current generation: this spec was
/// seen, and this is what became of it.
pub fn failed(cluster: &DchatCluster, failure: &Failure, now: Timestamp) -> DchatClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let v = failure_verdict(
        failure,
        cond(
            Truth::Unknown,
            reason::RECONCILE_ERROR,
            "the relays were not observed: the reconcile failed first",
        ),
    );
    let generation = cluster.meta().generation;
    let mut conditions = conditions(&previous, generation, now, &v, Vec::new());
    // Monitoring, backups and hibernation are not re-evaluated without an
    // observation: they stay.
    conditions.extend(
        previous
            .conditions
            .iter()
            .filter(|c| [MONITORING, BACKUP_HEALTHY, HIBERNATED].contains(&c.type_.as_str()))
            .cloned(),
    );
    DchatClusterStatus {
        observed_generation: generation,
        phase: v.phase,
        ready: previous
            .ready
            .clone()
            .or_else(|| Some(format!("{}/0", previous.ready_replicas))),
        conditions,
        ..previous
    }
}

/// The status of a paused cluster: what it said when the pause began, with `Paused`
/// (True) saying who paused it, `Progressing` False with reason `Paused` (nothing moves,
/// so no `Reconciling` either), and `observedGeneration` left at the last generation the
/// operator acted on — a spec changed while paused is not acted on, and status says so.
/// Nothing else is looked at: a paused cluster costs no request but this status check.
pub fn paused(cluster: &DchatCluster, source: Source, now: Timestamp) -> DchatClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let generation = cluster.meta().generation;
    let (why, undo) = match source {
        Source::Spec => (reason::PAUSED_BY_SPEC, "spec.paused is set back to false"),
        Source::Annotation => (reason::PAUSED_BY_ANNOTATION, "the annotation is removed"),
        Source::Both => (
            reason::PAUSED_BY_SPEC_AND_ANNOTATION,
            "spec.paused is false and the annotation is removed",
        ),
    };
    let by = day2::describe(
        source,
        "paused",
        &format!("{RECONCILE_ANNOTATION}={RECONCILE_PAUSED}"),
    );
    let message = format!(
        "reconciliation paused by {by}: the operator changes nothing for this cluster (no child applied, scaled or deleted, no rollout step, no scheduled backup) until {undo}"
    );
    let condition = |type_: &str, c: Cond| {
        let status = c.status.as_str();
        let since = previous
            .conditions
            .iter()
            .find(|p| p.type_ == type_ && p.status == status)
            .map(|p| p.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: c.reason.to_string(),
            message: c.message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    let progressing = condition(PROGRESSING, cond(false, reason::PAUSED, message.clone()));
    let mut conditions: Vec<Condition> = previous
        .conditions
        .iter()
        .filter(|c| c.type_ != RECONCILING && c.type_ != PAUSED)
        .map(|c| {
            if c.type_ == PROGRESSING {
                progressing.clone()
            } else {
                c.clone()
            }
        })
        .collect();
    if !conditions.iter().any(|c| c.type_ == PROGRESSING) {
        conditions.push(progressing);
    }
    conditions.push(condition(PAUSED, cond(true, why, message)));
    DchatClusterStatus {
        conditions,
        ..previous
    }
}

/// When reconciliation was paused, if the status says it is: the `Paused` condition's
/// `lastTransitionTime`.
pub fn paused_since(status: &DchatClusterStatus) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == PAUSED && c.status == "True")
        .map(|c| c.last_transition_time.0)
}

/// Which of the monitoring objects `spec` asks for the cluster cannot hold.
pub fn monitoring(spec: &MonitoringSpec, served: OptionalKinds) -> Monitoring {
    let requested = [
        (
            "ServiceMonitor",
            spec.service_monitor,
            served.service_monitor,
        ),
        (
            "PrometheusRule",
            spec.prometheus_rule,
            served.prometheus_rule,
        ),
    ];
    if !requested.iter().any(|(_, wanted, _)| *wanted) {
        return Monitoring::NotRequested;
    }
    let missing: Vec<&'static str> = requested
        .iter()
        .filter(|(_, wanted, served)| *wanted && !*served)
        .map(|(kind, _, _)| *kind)
        .collect();
    if missing.is_empty() {
        Monitoring::Served
    } else {
        Monitoring::Missing(missing)
    }
}

/// Name of the phase change for Events, e.g. "Running", or `None` when unchanged.
pub fn phase_transition(cluster: &DchatCluster, next: &DchatClusterStatus) -> Option<Phase> {
    let before = cluster.status.as_ref().map(|s| s.phase);
    (before != Some(next.phase)).then_some(next.phase)
}

/// Whether `next` newly says the monitoring objects cannot exist (for a one-time Event).
pub fn monitoring_became_unavailable(
    cluster: &DchatCluster,
    next: &DchatClusterStatus,
) -> Option<String> {
    let find = |conditions: &[Condition]| {
        conditions
            .iter()
            .find(|c| c.type_ == MONITORING)
            .map(|c| (c.status.clone(), c.message.clone()))
    };
    let before = cluster
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions))
        .map(|(status, _)| status);
    match find(&next.conditions) {
        Some((status, message)) if status == "False" && before.as_deref() != Some("False") => {
            Some(message)
        }
        _ => None,
    }
}

/// The cluster's name and namespace for messages.
pub fn display_name(cluster: &DchatCluster) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::cluster_from_yaml;

    fn obs(active: Option<SlotObservation>) -> Observation {
        Observation {
            invalid_spec: None,
            reconcile_error: None,
            active_slot: Slot::Blue,
            active,
            template_hash: "t1".into(),
            selector: "app=x".into(),
            now: Timestamp::from_second(1_000).unwrap(),
            rollout: None,
            active_is_desired: true,
            serving_version: None,
            serving_hash: None,
            monitoring: Monitoring::NotRequested,
            backup: None,
            backup_health: None,
            restore: None,
            hibernation: HibernationView::Off,
            restarted_at: None,
        }
    }

    fn ready(n: i32) -> SlotObservation {
        SlotObservation {
            desired: n,
            replicas: n,
            ready: n,
            updated: n,
            rolled_out: true,
        }
    }

    fn cond<'a>(status: &'a DchatClusterStatus, type_: &str) -> Option<&'a Condition> {
        status.conditions.iter().find(|c| c.type_ == type_)
    }

    #[test]
    fn first_reconcile_is_provisioning() {
        let cluster = cluster_from_yaml("version: '1.0'");
        let status = compute(&cluster, &obs(None));
        assert_eq!(status.phase, Phase::Provisioning);
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(cond(&status, READY).unwrap().status, "False");
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "True");
        assert_eq!(cond(&status, RECONCILING).unwrap().status, "True");
        assert!(cond(&status, STALLED).is_none());
        assert_eq!(status.active_version, None);
        assert_eq!(status.ready.as_deref(), Some("0/0"));
    }

    #[test]
    fn all_ready_is_running_and_records_version() {
        let cluster = cluster_from_yaml("version: '1.0'");
        let status = compute(&cluster, &obs(Some(ready(1))));
        assert_eq!(status.phase, Phase::Running);
        assert_eq!(status.active_version.as_deref(), Some("1.0"));
        assert_eq!(status.active_template_hash.as_deref(), Some("t1"));
        assert_eq!(cond(&status, READY).unwrap().status, "True");
        assert_eq!(
            cond(&status, READY).unwrap().reason,
            reason::ALL_RELAYS_READY
        );
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "False");
        assert_eq!(cond(&status, DEGRADED).unwrap().status, "False");
        assert!(cond(&status, RECONCILING).is_none());
        assert_eq!(status.ready.as_deref(), Some("1/1"));
    }

    #[test]
    fn unchanged_inputs_give_identical_status_with_old_times() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        let first = compute(&cluster, &obs(Some(ready(1))));
        cluster.status = Some(first.clone());
        let mut later = obs(Some(ready(1)));
        later.now = Timestamp::from_second(9_999).unwrap();
        assert_eq!(compute(&cluster, &later), first);
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(None)));
        let mut later = obs(Some(ready(1)));
        later.now = Timestamp::from_second(5_000).unwrap();
        let status = compute(&cluster, &later);
        assert_eq!(
            cond(&status, READY)
                .unwrap()
                .last_transition_time
                .0
                .as_second(),
            5_000
        );
        // Degraded stayed False: its time is kept.
        assert_eq!(
            cond(&status, DEGRADED)
                .unwrap()
                .last_transition_time
                .0
                .as_second(),
            1_000
        );
    }

    #[test]
    fn invalid_spec_is_stalled_and_failed() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(1)))));
        let mut o = obs(Some(ready(1)));
        o.invalid_spec = Some("spec.resources.limits.cpu: limit 1 is below the request 2".into());
        let status = compute(&cluster, &o);
        assert_eq!(status.phase, Phase::Failed);
        let degraded = cond(&status, DEGRADED).unwrap();
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, reason::INVALID_SPEC);
        assert!(degraded.message.contains("spec.resources.limits.cpu"));
        assert_eq!(cond(&status, STALLED).unwrap().status, "True");
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "False");
        assert_eq!(
            status.active_version.as_deref(),
            Some("1.0"),
            "keeps what serves"
        );
    }

    #[test]
    fn apply_error_is_degraded_and_retrying() {
        let cluster = cluster_from_yaml("version: '1.0'");
        let mut o = obs(Some(ready(1)));
        o.reconcile_error = Some(Failure {
            message: "applying StatefulSet apps/chat-blue: 500".into(),
            needs_intervention: false,
        });
        let status = compute(&cluster, &o);
        assert_eq!(status.phase, Phase::Degraded);
        assert_eq!(
            cond(&status, DEGRADED).unwrap().reason,
            reason::RECONCILE_ERROR
        );
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "True");
        assert!(cond(&status, STALLED).is_none());
    }

    #[test]
    fn rolling_update_after_serving_is_progressing() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(3)))));
        cluster.spec.version = "1.1".into();
        let mut rolling = ready(3);
        rolling.rolled_out = false;
        rolling.updated = 1;
        let status = compute(&cluster, &obs(Some(rolling)));
        assert_eq!(status.phase, Phase::Progressing);
        assert_eq!(status.active_version.as_deref(), Some("1.0"));
        assert!(cond(&status, PROGRESSING)
            .unwrap()
            .message
            .contains("1/3 updated"));
    }

    #[test]
    fn lost_relays_after_serving_are_degraded() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(3)))));
        let mut lost = ready(3);
        lost.ready = 2;
        let status = compute(&cluster, &obs(Some(lost)));
        assert_eq!(status.phase, Phase::Degraded);
        assert_eq!(cond(&status, DEGRADED).unwrap().message, "2/3 relays ready");
        assert_eq!(status.ready.as_deref(), Some("2/3"));
    }

    fn rollout(step: RolloutStep, failed: Option<&str>) -> RolloutStatus {
        RolloutStatus {
            target_version: "1.1".into(),
            target_template_hash: "t2".into(),
            slot: Slot::Green,
            from_version: Some("1.0".into()),
            from_template_hash: Some("t1".into()),
            replicas: 1,
            step,
            reason: None,
            message: format!("{step} message"),
            started_at: Time(Timestamp::from_second(900).unwrap()),
            step_started_at: Time(Timestamp::from_second(900).unwrap()),
            promoted_at: None,
            rolled_back_from: None,
            failed_template_hash: failed.map(Into::into),
            handback: None,
            paused_seconds: None,
        }
    }

    /// A cluster serving 1.0 (t1) whose spec asks for 1.1 (t2).
    fn rolling(step: RolloutStep, failed: Option<&str>) -> DchatClusterStatus {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(1)))));
        cluster.spec.version = "1.1".into();
        let mut o = obs(Some(ready(1)));
        o.template_hash = "t2".into();
        o.rollout = Some(rollout(step, failed));
        o.active_is_desired = false;
        compute(&cluster, &o)
    }

    #[test]
    fn rollout_steps_map_to_phases_and_conditions() {
        for (step, phase) in [
            (RolloutStep::Preparing, Phase::Progressing),
            (RolloutStep::Validating, Phase::Progressing),
            (RolloutStep::AwaitingPromotion, Phase::AwaitingPromotion),
            (RolloutStep::Promoted, Phase::Progressing),
        ] {
            let status = rolling(step, None);
            assert_eq!(status.phase, phase, "{step}");
            let progressing = cond(&status, PROGRESSING).unwrap();
            assert_eq!(progressing.status, "True");
            assert_eq!(progressing.reason, step.as_str());
            assert_eq!(progressing.message, format!("{step} message"));
            assert_eq!(cond(&status, READY).unwrap().status, "True");
            assert_eq!(cond(&status, RECONCILING).unwrap().status, "True");
            assert!(cond(&status, STALLED).is_none());
            assert_eq!(status.active_version.as_deref(), Some("1.0"), "{step}");
            assert_eq!(status.rollout.as_ref().unwrap().step, step);
        }
    }

    #[test]
    fn failed_rollouts_are_degraded_and_stalled_while_the_spec_asks_for_them() {
        for (step, phase, why) in [
            (
                RolloutStep::Failed,
                Phase::RolledBack,
                reason::ROLLOUT_FAILED,
            ),
            (
                RolloutStep::RolledBack,
                Phase::RolledBack,
                reason::ROLLED_BACK,
            ),
            (
                RolloutStep::Aborted,
                Phase::RolledBack,
                reason::ROLLOUT_ABORTED,
            ),
        ] {
            let status = rolling(step, Some("t2"));
            assert_eq!(status.phase, phase, "{step}");
            let degraded = cond(&status, DEGRADED).unwrap();
            assert_eq!(
                (degraded.status.as_str(), degraded.reason.clone()),
                ("True", why.to_string())
            );
            assert_eq!(cond(&status, STALLED).unwrap().status, "True");
            assert_eq!(cond(&status, PROGRESSING).unwrap().status, "False");
            // The old version serves and is ready.
            assert_eq!(cond(&status, READY).unwrap().status, "True");
            assert_eq!(status.active_version.as_deref(), Some("1.0"));
        }
        // Once the spec asks for something else, the old failure no longer colours status.
        let status = rolling(RolloutStep::Failed, Some("t9"));
        assert_eq!(status.phase, Phase::Running);
    }

    #[test]
    fn failed_handover_is_degraded_and_stalled_while_the_new_version_serves() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(1)))));
        let mut o = obs(Some(ready(1)));
        let mut r = rollout(RolloutStep::HandoverFailed, None);
        r.target_template_hash = o.template_hash.clone();
        o.rollout = Some(r);
        let status = compute(&cluster, &o);
        assert_eq!(status.phase, Phase::Degraded);
        let degraded = cond(&status, DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", reason::HANDOVER_FAILED)
        );
        assert_eq!(degraded.message, "HandoverFailed message");
        assert_eq!(cond(&status, STALLED).unwrap().status, "True");
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "False");
        assert_eq!(cond(&status, READY).unwrap().status, "True");
    }

    #[test]
    fn promotion_records_the_new_version_before_the_window_ends() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(1)))));
        cluster.spec.version = "1.1".into();
        let mut o = obs(Some(ready(1)));
        o.template_hash = "t2".into();
        o.active_slot = Slot::Green;
        o.rollout = Some(rollout(RolloutStep::Promoted, None));
        o.serving_version = Some("1.1".into());
        o.serving_hash = Some("t2".into());
        let status = compute(&cluster, &o);
        assert_eq!(status.active_slot, Slot::Green);
        assert_eq!(status.active_version.as_deref(), Some("1.1"));
        assert_eq!(status.active_template_hash.as_deref(), Some("t2"));
    }

    #[test]
    fn phase_transition_is_reported_once() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        let status = compute(&cluster, &obs(Some(ready(1))));
        assert_eq!(phase_transition(&cluster, &status), Some(Phase::Running));
        cluster.status = Some(status.clone());
        assert_eq!(phase_transition(&cluster, &status), None);
    }

    #[test]
    fn a_refused_request_is_stalled_not_retrying() {
        let cluster = cluster_from_yaml("version: '1.0'");
        let mut o = obs(Some(ready(1)));
        o.reconcile_error = Some(Failure {
            message: "applying StatefulSet apps/chat-blue: forbidden".into(),
            needs_intervention: true,
        });
        let status = compute(&cluster, &o);
        assert_eq!(status.phase, Phase::Degraded);
        assert_eq!(cond(&status, STALLED).unwrap().status, "True");
        assert!(cond(&status, STALLED)
            .unwrap()
            .message
            .contains("forbidden"));
        assert!(cond(&status, RECONCILING).is_none());
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "False");
    }

    #[test]
    fn a_failure_before_any_status_gives_a_phase_and_the_error() {
        let cluster = cluster_from_yaml("version: '1.0'");
        let failure = Failure {
            message: "listing StatefulSet apps/: 500 Internal Server Error".into(),
            needs_intervention: false,
        };
        let status = failed(&cluster, &failure, Timestamp::from_second(7).unwrap());
        assert_eq!(status.phase, Phase::Degraded);
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(cond(&status, READY).unwrap().status, "Unknown");
        let degraded = cond(&status, DEGRADED).unwrap();
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, reason::RECONCILE_ERROR);
        assert_eq!(degraded.message, failure.message);
        assert_eq!(cond(&status, RECONCILING).unwrap().status, "True");
        assert!(cond(&status, STALLED).is_none());
        assert_eq!(status.ready.as_deref(), Some("0/0"));
    }

    #[test]
    fn a_failure_of_a_running_cluster_no_longer_says_ready() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        let mut o = obs(Some(ready(3)));
        o.monitoring = Monitoring::Served;
        cluster.status = Some(compute(&cluster, &o));
        cluster.metadata.generation = Some(2);
        let failure = Failure {
            message: "listing StatefulSet apps/: connection refused".into(),
            needs_intervention: false,
        };
        let status = failed(&cluster, &failure, Timestamp::from_second(9_000).unwrap());
        assert_eq!(status.phase, Phase::Degraded);
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(cond(&status, READY).unwrap().status, "Unknown");
        assert_eq!(
            cond(&status, READY)
                .unwrap()
                .last_transition_time
                .0
                .as_second(),
            9_000
        );
        assert_eq!(cond(&status, DEGRADED).unwrap().status, "True");
        // What the operator knew stays: the serving version, counts, Monitoring.
        assert_eq!(status.active_version.as_deref(), Some("1.0"));
        assert_eq!(status.ready.as_deref(), Some("3/3"));
        assert_eq!(cond(&status, MONITORING).unwrap().status, "True");
        // Every condition describes generation 2.
        assert!(status
            .conditions
            .iter()
            .filter(|c| c.type_ != MONITORING)
            .all(|c| c.observed_generation == Some(2)));
    }

    #[test]
    fn monitoring_condition_follows_what_the_cluster_serves() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        let none = compute(&cluster, &obs(Some(ready(1))));
        assert!(
            cond(&none, MONITORING).is_none(),
            "not requested: no condition"
        );

        let mut o = obs(Some(ready(1)));
        o.monitoring = Monitoring::Missing(vec!["ServiceMonitor", "PrometheusRule"]);
        let missing = compute(&cluster, &o);
        let c = cond(&missing, MONITORING).unwrap();
        assert_eq!(c.status, "False");
        assert_eq!(c.reason, reason::PROMETHEUS_OPERATOR_MISSING);
        assert!(c.message.contains("ServiceMonitor or PrometheusRule"));
        // Not an error: the cluster runs.
        assert_eq!(missing.phase, Phase::Running);
        assert_eq!(cond(&missing, DEGRADED).unwrap().status, "False");
        assert!(monitoring_became_unavailable(&cluster, &missing).is_some());
        cluster.status = Some(missing.clone());
        assert!(
            monitoring_became_unavailable(&cluster, &missing).is_none(),
            "said once"
        );

        o.monitoring = Monitoring::Served;
        let served = compute(&cluster, &o);
        assert_eq!(cond(&served, MONITORING).unwrap().status, "True");
    }

    #[test]
    fn a_paused_cluster_keeps_its_status_and_says_who_paused_it() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        let running = compute(&cluster, &obs(Some(ready(3))));
        cluster.status = Some(running.clone());
        // The spec changes while paused: status keeps describing generation 1.
        cluster.metadata.generation = Some(2);
        let at = Timestamp::from_second(5_000).unwrap();
        let paused = paused(&cluster, Source::Annotation, at);
        assert_eq!(paused.phase, Phase::Running);
        assert_eq!(paused.observed_generation, Some(1));
        assert_eq!(paused.active_version, running.active_version);
        let p = cond(&paused, PAUSED).unwrap();
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", reason::PAUSED_BY_ANNOTATION)
        );
        assert!(
            p.message.contains("dchat.network/reconcile=paused"),
            "{}",
            p.message
        );
        assert_eq!(p.observed_generation, Some(2));
        assert_eq!(p.last_transition_time.0, at);
        let progressing = cond(&paused, PROGRESSING).unwrap();
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("False", reason::PAUSED)
        );
        assert!(cond(&paused, RECONCILING).is_none());
        assert_eq!(
            cond(&paused, READY),
            cond(&running, READY),
            "kept as it was"
        );
        assert_eq!(paused_since(&paused), Some(at));
        // Paused again later: identical, so nothing is written.
        cluster.status = Some(paused.clone());
        let later = super::paused(
            &cluster,
            Source::Annotation,
            Timestamp::from_second(9_000).unwrap(),
        );
        assert_eq!(later, paused);
        // Another source: the reason says so, the time stays.
        let both = super::paused(
            &cluster,
            Source::Both,
            Timestamp::from_second(9_000).unwrap(),
        );
        let p = cond(&both, PAUSED).unwrap();
        assert_eq!(p.reason, reason::PAUSED_BY_SPEC_AND_ANNOTATION);
        assert_eq!(p.last_transition_time.0, at);
        // Resumed: compute drops the condition.
        let resumed = compute(&cluster, &obs(Some(ready(3))));
        assert!(cond(&resumed, PAUSED).is_none());
        assert_eq!(paused_since(&resumed), None);
    }

    #[test]
    fn a_cluster_paused_before_its_first_reconcile_is_pending() {
        let cluster = cluster_from_yaml("version: '1.0'\npaused: true");
        let status = paused(&cluster, Source::Spec, Timestamp::from_second(7).unwrap());
        assert_eq!(status.phase, Phase::Pending);
        assert_eq!(status.observed_generation, None);
        assert_eq!(
            cond(&status, PAUSED).unwrap().reason,
            reason::PAUSED_BY_SPEC
        );
        assert_eq!(cond(&status, PROGRESSING).unwrap().status, "False");
    }

    fn hibernating(running: i32) -> Observation {
        let mut o = obs(Some(SlotObservation {
            desired: 0,
            replicas: running,
            ready: running,
            updated: 0,
            rolled_out: running == 0,
        }));
        o.hibernation = HibernationView::Hibernating {
            source: Source::Spec,
            record: crate::api::HibernationStatus {
                since: Time(Timestamp::from_second(900).unwrap()),
                replicas: 3,
            },
        };
        o
    }

    #[test]
    fn hibernation_is_its_own_phase_with_the_record_in_status() {
        let mut cluster = cluster_from_yaml("version: '1.0'\nhibernate: true");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(3)))));
        // Relays still stopping.
        let stopping = compute(&cluster, &hibernating(2));
        assert_eq!(stopping.phase, Phase::Hibernating);
        let h = cond(&stopping, HIBERNATED).unwrap();
        assert_eq!(
            (h.status.as_str(), h.reason.as_str()),
            ("False", reason::HIBERNATING)
        );
        assert!(h.message.contains("2 still running"), "{}", h.message);
        assert_eq!(cond(&stopping, PROGRESSING).unwrap().status, "True");
        assert_eq!(stopping.hibernation.as_ref().map(|h| h.replicas), Some(3));
        // Every relay stopped: hibernated, nothing moves, nothing is wrong.
        let stopped = compute(&cluster, &hibernating(0));
        assert_eq!(stopped.phase, Phase::Hibernating);
        let h = cond(&stopped, HIBERNATED).unwrap();
        assert_eq!(
            (h.status.as_str(), h.reason.as_str()),
            ("True", reason::HIBERNATED)
        );
        assert!(h.message.contains("spec.hibernate"), "{}", h.message);
        assert!(
            h.message.contains("waking starts 3 relay(s)"),
            "{}",
            h.message
        );
        let ready = cond(&stopped, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::HIBERNATED)
        );
        assert_eq!(cond(&stopped, PROGRESSING).unwrap().status, "False");
        assert_eq!(cond(&stopped, DEGRADED).unwrap().status, "False");
        assert!(cond(&stopped, RECONCILING).is_none());
        assert!(cond(&stopped, STALLED).is_none());
        assert_eq!(stopped.active_version.as_deref(), Some("1.0"), "kept");
    }

    #[test]
    fn waking_is_provisioning_until_every_relay_is_back() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &hibernating(0)));
        let record = cluster
            .status
            .as_ref()
            .unwrap()
            .hibernation
            .clone()
            .unwrap();
        let mut starting = ready(3);
        starting.ready = 1;
        let mut o = obs(Some(starting));
        o.hibernation = HibernationView::Waking {
            record: record.clone(),
            replicas: 3,
        };
        let waking = compute(&cluster, &o);
        assert_eq!(waking.phase, Phase::Provisioning);
        assert_eq!(waking.hibernation, Some(record));
        let h = cond(&waking, HIBERNATED).unwrap();
        assert_eq!(
            (h.status.as_str(), h.reason.as_str()),
            ("False", reason::WAKING)
        );
        let progressing = cond(&waking, PROGRESSING).unwrap();
        assert_eq!(
            (progressing.status.as_str(), progressing.reason.as_str()),
            ("True", reason::WAKING)
        );
        assert!(
            progressing.message.contains("1/3 relays ready"),
            "{}",
            progressing.message
        );
        // Awake: the view is off, the record and the condition go.
        let awake = compute(&cluster, &obs(Some(ready(3))));
        assert_eq!(awake.phase, Phase::Running);
        assert_eq!(awake.hibernation, None);
        assert!(cond(&awake, HIBERNATED).is_none());
    }

    #[test]
    fn hibernation_waiting_for_a_rollout_leaves_the_phase_to_the_rollout() {
        let mut cluster = cluster_from_yaml("version: '1.0'");
        cluster.status = Some(compute(&cluster, &obs(Some(ready(1)))));
        let mut o = obs(Some(ready(1)));
        o.rollout = Some(rollout(RolloutStep::Promoted, None));
        o.hibernation = HibernationView::Waiting {
            source: Source::Annotation,
            why:
                "the rollout of version 1.1 has switched traffic (step Promoted); it finishes first"
                    .into(),
        };
        let status = compute(&cluster, &o);
        assert_eq!(status.phase, Phase::Progressing);
        assert_eq!(status.hibernation, None);
        let h = cond(&status, HIBERNATED).unwrap();
        assert_eq!(
            (h.status.as_str(), h.reason.as_str()),
            ("False", reason::HIBERNATION_PENDING)
        );
        assert!(
            h.message.contains("dchat.network/hibernation=on"),
            "{}",
            h.message
        );
        assert!(h.message.contains("finishes first"), "{}", h.message);
    }

    #[test]
    fn the_restart_acted_on_is_recorded() {
        let cluster = cluster_from_yaml("version: '1.0'");
        let mut o = obs(Some(ready(1)));
        let at = Time(Timestamp::from_second(1_000_000).unwrap());
        o.restarted_at = Some(at.clone());
        assert_eq!(compute(&cluster, &o).restarted_at, Some(at));
    }
}

//! Blue-green rollouts as a pure state machine.
//!
//! [`decide`] takes what the controller knows — the rollout settings, the template the
//! spec asks for, what serves now, the rollout recorded in status, what it observed of
//! the two slots, the pods and the smoke test, the promote/abort annotations, what
//! hibernation asks ([`Hibernation`]), and the time — and returns the next rollout status
//! plus the plan the controller applies: which slot the client Service selects, which
//! StatefulSets get the desired template, which keep the one they run, at what size, and
//! whether a smoke test Job must exist. [`resumed`] moves a rollout's timers past a pause.
//!
//! No I/O and no clock: the same inputs give the same decision, which is what makes a
//! rollout resumable after an operator restart (everything it needs is in status) and
//! what lets the transition table in the tests cover every step, timeout, abort and
//! supersede.

pub mod handover;
pub mod smoke;
#[cfg(test)]
mod tests;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::analysis::Reading;
use crate::api::{
    DchatClusterSpec, HandoverOutcome, RolloutAnalysis, RolloutStatus, RolloutStep, Slot,
};
use crate::quantity::{parse_duration, ParseError};

/// Annotation on the DchatCluster that promotes a rollout waiting in
/// AwaitingPromotion (any value). The operator removes it once handled.
pub const PROMOTE_ANNOTATION: &str = "dchat.network/promote";
/// Annotation on the DchatCluster that aborts the rollout in flight (any value) and
/// returns traffic to the old slot. The operator removes it once handled.
pub const ABORT_ANNOTATION: &str = "dchat.network/abort";
/// Annotation the operator puts on a relay StatefulSet: hash of the pod template it
/// was given, so a rollout knows whether the slot already runs the target.
pub const TEMPLATE_HASH_ANNOTATION: &str = "dchat.network/template-hash";
/// Pod template annotation: hash of the database Secret's connection keys, so a changed
/// password or host rolls out blue-green like any other template change.
pub const SECRET_HASH_ANNOTATION: &str = "dchat.network/secret-hash";
/// Keys of the database Secret the relays read (see `spec.database.secretRef`).
const DATABASE_SECRET_KEYS: [&str; 5] = ["host", "port", "name", "username", "password"];
/// How often the analysis query is taken while the post-promotion window runs, and a
/// restore drill's Job looked at (it belongs to its DchatBackup: no change of it starts a
/// reconcile of the cluster).
pub const POLL: Duration = Duration::from_secs(10);
/// The longest a rollout or restore in flight goes without a look. Its steps advance on
/// watch events (its StatefulSets, relay Pods that restart or fail, its Jobs, the
/// cluster's annotations) and at its own timers; this only bounds what a lost event can
/// delay.
pub const IN_FLIGHT_RESYNC: Duration = Duration::from_secs(60);
/// Separates the window's message from why the last analysis query had no answer.
const INCONCLUSIVE: &str = "; analysis inconclusive: ";
/// How often a failed handover is looked at for its retry (the Job deleted).
pub const HANDOVER_RETRY_POLL: Duration = Duration::from_secs(30);

/// Reasons recorded in `status.rollout.reason` and used for Events; stable for
/// alerting and automation.
pub mod reason {
    /// A rollout started.
    pub const STARTED: &str = "RolloutStarted";
    /// The new slot's relays are ready; the smoke test runs.
    pub const VALIDATING: &str = "Validating";
    /// Validated, waiting for promotion.
    pub const AWAITING_PROMOTION: &str = "AwaitingPromotion";
    /// Traffic switched to the new slot.
    pub const PROMOTED: &str = "Promoted";
    /// The post-promotion window passed without failure.
    pub const WINDOW_PASSED: &str = "PostPromotionWindowPassed";
    /// The old slot was scaled to zero; the rollout is complete.
    pub const COMPLETE: &str = "RolloutComplete";
    /// The old slot's stored messages (embedded store) are being handed over.
    pub const HANDING_OVER: &str = "HandingOver";
    /// The handover Job failed; the old slot keeps running with its messages.
    pub const HANDOVER_FAILED: &str = "HandoverFailed";
    /// After a rollback, the failed slot's stored messages went back to the serving slot.
    pub const HANDED_BACK: &str = "HandedBack";
    /// After a rollback, handing the failed slot's messages back failed.
    pub const HANDBACK_FAILED: &str = "HandbackFailed";
    /// The analysis query went above its threshold after the switch.
    pub const ANALYSIS_FAILED: &str = "AnalysisFailed";
    /// The new relays were not all ready within `validation.readyTimeout`.
    pub const READY_TIMEOUT: &str = "ReadyTimeout";
    /// A new relay restarted.
    pub const POD_RESTARTED: &str = "PodRestarted";
    /// A new relay is crash-looping or cannot start.
    pub const POD_FAILING: &str = "PodFailing";
    /// The new slot lost ready relays after the switch.
    pub const RELAYS_NOT_READY: &str = "RelaysNotReady";
    /// `dchat smoke` against the preview Service failed.
    pub const SMOKE_FAILED: &str = "SmokeTestFailed";
    /// Validated; the backup before the switch runs.
    pub const BACKING_UP: &str = "BackingUp";
    /// The backup before the switch failed; traffic did not move.
    pub const BACKUP_FAILED: &str = "BackupFailed";
    /// A step took longer than `progressDeadline`.
    pub const PROGRESS_DEADLINE: &str = "ProgressDeadlineExceeded";
    /// Aborted with the abort annotation.
    pub const ABORTED: &str = "Aborted";
    /// A newer spec replaced the rollout in flight.
    pub const SUPERSEDED: &str = "Superseded";
    /// The spec went back to the serving template before the switch.
    pub const CANCELLED: &str = "Cancelled";
    /// The cluster hibernates: a rollout that had not switched traffic is cancelled (it
    /// starts again after the wake).
    pub const HIBERNATED: &str = "Hibernated";
}

impl Settings {
    /// How long after the switch the old slot goes to zero: the window and the delay
    /// both passed.
    pub fn scale_down_after(&self) -> Duration {
        self.post_promotion_window.max(self.scale_down_delay)
    }
}

/// The rollout settings of a spec, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Promote as soon as validated.
    pub auto_promote: bool,
    /// Promote by itself after waiting this long for manual promotion.
    pub auto_promote_after: Option<Duration>,
    /// Every new relay must be ready this soon after the rollout starts.
    pub ready_timeout: Duration,
    /// Run the smoke test Job.
    pub smoke_test: bool,
    /// Watch the new slot this long after the switch.
    pub post_promotion_window: Duration,
    /// Keep the old slot warm this long after the switch.
    pub scale_down_delay: Duration,
    /// Longest a step waiting on the cluster may take.
    pub progress_deadline: Duration,
    /// Whether a HorizontalPodAutoscaler owns the serving slot's size.
    pub autoscaling: bool,
    /// `spec.autoscaling.maxReplicas`: how far the HPA may scale out.
    pub max_replicas: i32,
    /// `spec.replicas`.
    pub replicas: i32,
    /// The relays keep messages on their own volumes (embedded store): before the old
    /// slot goes to zero, its stored messages are handed over to the new slot.
    pub handover: bool,
    /// The metric check of the post-promotion window, if any.
    pub analysis: Option<RolloutAnalysis>,
    /// A backup must complete after validation and before the switch.
    pub backup_before_switch: bool,
}

/// A rollout setting that is not a valid duration (the operator validates the spec
/// before it gets here, so this names the field for a clear message if it ever does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {source}")]
pub struct SettingsError {
    /// Path of the field.
    pub field: &'static str,
    /// What is wrong with it.
    #[source]
    pub source: ParseError,
}

impl Settings {
    /// Parses `spec.rollout` (and the scaling fields the plan needs).
    pub fn from_spec(spec: &DchatClusterSpec) -> Result<Self, SettingsError> {
        let parse = |field: &'static str, value: &str| {
            parse_duration(value).map_err(|source| SettingsError { field, source })
        };
        let rollout = &spec.rollout;
        Ok(Self {
            auto_promote: rollout.auto_promote,
            auto_promote_after: rollout
                .auto_promote_after
                .as_deref()
                .map(|v| parse("spec.rollout.autoPromoteAfter", v))
                .transpose()?,
            ready_timeout: parse(
                "spec.rollout.validation.readyTimeout",
                &rollout.validation.ready_timeout,
            )?,
            smoke_test: rollout.validation.smoke_test,
            post_promotion_window: parse(
                "spec.rollout.postPromotionWindow",
                &rollout.post_promotion_window,
            )?,
            scale_down_delay: parse("spec.rollout.scaleDownDelay", &rollout.scale_down_delay)?,
            progress_deadline: parse("spec.rollout.progressDeadline", &rollout.progress_deadline)?,
            autoscaling: spec.autoscaling.enabled,
            max_replicas: spec.autoscaling.max_replicas,
            replicas: spec.replicas,
            handover: spec.database.is_none(),
            analysis: rollout.analysis.clone(),
            backup_before_switch: spec.backup.as_ref().is_some_and(|b| b.before_rollout),
        })
    }

    /// Replicas the operator sets on a serving slot: none when the HPA owns the count.
    fn fixed_replicas(&self) -> Option<i32> {
        (!self.autoscaling).then_some(self.replicas)
    }
}

/// `minReplicas` / `maxReplicas` for the HorizontalPodAutoscaler during a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HpaBounds {
    /// `spec.minReplicas`.
    pub min: i32,
    /// `spec.maxReplicas`.
    pub max: i32,
}

/// The relay pod template the spec asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `spec.version`.
    pub version: String,
    /// Hash of the pod template (slot-independent).
    pub hash: String,
}

/// What serves client traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    /// Slot the client Service selects.
    pub slot: Slot,
    /// Version it runs; `None` before the cluster first served.
    pub version: Option<String>,
    /// Pod template hash it runs; `None` before the cluster first served.
    pub hash: Option<String>,
}

/// What the controller saw of one slot's StatefulSet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// `spec.replicas`.
    pub replicas: i32,
    /// `status.readyReplicas`.
    pub ready: i32,
    /// The StatefulSet controller saw the latest spec and every pod runs it.
    pub rolled_out: bool,
    /// The [`TEMPLATE_HASH_ANNOTATION`] of the StatefulSet.
    pub template_hash: Option<String>,
}

/// Problems of the pods running the rollout's target template, one line per pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodHealth {
    /// Which slot these pods are in; `None` when pods were not looked at.
    pub slot: Option<Slot>,
    /// Pods whose containers restarted, e.g. "chat-green-0 restarted 2 times (last exit 1: Error)".
    pub restarted: Vec<String>,
    /// Pods crash-looping or unable to start, e.g. "chat-green-1: CrashLoopBackOff".
    pub failing: Vec<String>,
}

/// State of a Job the rollout runs (the smoke test, the handover).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JobState {
    /// No Job yet (or not looked at).
    #[default]
    Absent,
    /// The Job runs.
    Running,
    /// The Job's command succeeded.
    Succeeded,
    /// The Job failed; why.
    Failed(String),
}

/// Everything [`decide`] looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// Name of the DchatCluster (for the smoke Job's name).
    pub cluster_name: &'a str,
    /// Rollout settings.
    pub settings: &'a Settings,
    /// Template the spec asks for.
    pub desired: &'a Target,
    /// What serves, from status.
    pub serving: &'a Serving,
    /// Rollout recorded in status.
    pub rollout: Option<&'a RolloutStatus>,
    /// The blue StatefulSet, if it exists.
    pub blue: Option<SlotState>,
    /// The green StatefulSet, if it exists.
    pub green: Option<SlotState>,
    /// Health of the pods of the rollout's slot running the target template.
    pub pods: PodHealth,
    /// Smoke test Job of the rollout in flight.
    pub smoke: JobState,
    /// Handover Job of the rollout (embedded store, at scale-down).
    pub handover: JobState,
    /// The backup taken before the switch (`BackingUp`), as a Job-like state.
    pub backup: JobState,
    /// The analysis query's reading, taken while `Promoted` (`None`: not taken).
    pub analysis: Option<Reading>,
    /// The promote annotation is set.
    pub promote: bool,
    /// The abort annotation is set.
    pub abort: bool,
    /// What hibernation asks of the plan.
    pub hibernation: Hibernation,
    /// Now.
    pub now: Timestamp,
}

/// What hibernation (`spec.hibernate`, the `dchat.network/hibernation` annotation) asks
/// of the plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hibernation {
    /// Nothing: the relays run as the spec and the rollout say.
    #[default]
    Off,
    /// Every slot to zero, once nothing in flight needs running relays: a rollout that
    /// has not switched traffic is cancelled (it starts again after the wake); one that
    /// has switched finishes first, and so does handing a failed slot's stored messages
    /// back. No rollout starts.
    Hibernate,
    /// Waking: the serving slot runs at `replicas`, also when autoscaling (the
    /// autoscaler is not back until every relay is ready); no rollout starts meanwhile.
    Wake {
        /// Relays the serving slot starts.
        replicas: i32,
    },
}

/// What became of hibernation in a [`Decision`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HibernationPlan {
    /// Not asked: the plan is the rollout's.
    #[default]
    Off,
    /// Asked, but the rollout needs running relays first; says what it waits for.
    Waiting(String),
    /// Every slot is planned at zero and the autoscaler must not exist.
    Hibernated,
    /// The serving slot is planned at the wake size and the autoscaler must not exist.
    Waking,
}

impl HibernationPlan {
    /// Whether the HorizontalPodAutoscaler must not exist: it would not scale a
    /// StatefulSet at zero anyway, and while waking it would fight the fixed wake size.
    pub fn suspends_autoscaler(&self) -> bool {
        matches!(self, Self::Hibernated | Self::Waking)
    }
}

impl Input<'_> {
    fn slot(&self, slot: Slot) -> Option<&SlotState> {
        match slot {
            Slot::Blue => self.blue.as_ref(),
            Slot::Green => self.green.as_ref(),
        }
    }
}

/// Where a StatefulSet's pod template comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// Rendered from the current spec.
    Desired,
    /// Left as the live StatefulSet has it (the old or failed version), only resized.
    Keep,
}

/// One relay StatefulSet in the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Which slot.
    pub slot: Slot,
    /// Where its template comes from.
    pub template: Template,
    /// Replicas to set; `None` leaves the count to the HorizontalPodAutoscaler.
    pub replicas: Option<i32>,
}

/// A smoke test Job that must exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmokeRequest {
    /// Job name (unique per rollout attempt).
    pub job_name: String,
    /// Slot under test (behind the preview Service).
    pub slot: Slot,
    /// Relay version whose image runs the test.
    pub version: String,
}

/// A DchatBackup that must exist: the backup before a rollout's switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRequest {
    /// DchatBackup name (unique per rollout attempt).
    pub name: String,
}

/// A handover Job that must exist: the old slot's stored messages go to the new slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoverRequest {
    /// Job name (unique per rollout attempt).
    pub job_name: String,
    /// Slot giving its messages away (about to scale to zero).
    pub from: Slot,
    /// Slot receiving them (serving).
    pub to: Slot,
    /// Relay version whose image runs `dchat handover`.
    pub version: String,
}

/// An Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Warning rather than Normal.
    pub warning: bool,
    /// Event reason.
    pub reason: &'static str,
    /// Event message.
    pub message: String,
}

/// What [`decide`] wants done.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Next `status.rollout`.
    pub rollout: Option<RolloutStatus>,
    /// What serves after this reconcile (slot for the client Service and the HPA;
    /// version and hash for status).
    pub serving: Serving,
    /// Whether the serving slot runs the desired template (so status may record
    /// `spec.version` once it is ready).
    pub active_is_desired: bool,
    /// The relay StatefulSets, serving slot first.
    pub slots: Vec<SlotPlan>,
    /// Bounds the HorizontalPodAutoscaler gets instead of the spec's while a rollout
    /// runs; `None` leaves the spec's.
    pub hpa_bounds: Option<HpaBounds>,
    /// A smoke test Job that must exist.
    pub smoke: Option<SmokeRequest>,
    /// A handover Job that must exist.
    pub handover: Option<HandoverRequest>,
    /// A backup that must exist (before the switch).
    pub backup: Option<BackupRequest>,
    /// Events to record, in order.
    pub notes: Vec<Note>,
    /// Remove the promote annotation (handled or stale).
    pub consume_promote: bool,
    /// Remove the abort annotation (handled or stale).
    pub consume_abort: bool,
    /// Look again this soon (a rollout is in flight).
    pub requeue: Option<Duration>,
    /// What became of hibernation.
    pub hibernation: HibernationPlan,
}

/// Decides the next rollout step and the plan to apply. Pure: see the module docs.
pub fn decide(input: &Input<'_>) -> Decision {
    let mut machine = Machine {
        input,
        notes: Vec::new(),
        consume_promote: false,
        consume_abort: false,
        promote_stale: false,
    };
    let mut state = State {
        serving: input.serving.clone(),
        rollout: input.rollout.cloned(),
    };
    // Each transition may enable the next with the same observations (validated and
    // auto-promoted in one go); a bound keeps a logic slip from looping forever.
    for _ in 0..8 {
        match machine.step(&state) {
            Some(next) => state = next,
            None => break,
        }
    }
    machine.finish(state)
}

/// Serving slot plus rollout record: the whole state.
#[derive(Clone, Debug, PartialEq)]
struct State {
    serving: Serving,
    rollout: Option<RolloutStatus>,
}

struct Machine<'i, 'a> {
    input: &'i Input<'a>,
    notes: Vec<Note>,
    consume_promote: bool,
    consume_abort: bool,
    /// The promote annotation was written for a rollout that is no longer in flight (or
    /// outside one): it is removed and promotes nothing in this decision.
    promote_stale: bool,
}

/// When traffic switched to the rollout's slot (its step start, in a status written
/// before `promotedAt` existed).
fn promoted_at(r: &RolloutStatus) -> &Time {
    r.promoted_at.as_ref().unwrap_or(&r.step_started_at)
}

fn elapsed(now: Timestamp, since: &Time) -> Duration {
    let d = now.duration_since(since.0);
    if d.is_negative() {
        Duration::ZERO
    } else {
        d.unsigned_abs()
    }
}

/// Time since the rollout started, not counting the time reconciliation was paused.
fn active_elapsed(now: Timestamp, r: &RolloutStatus) -> Duration {
    let paused = Duration::from_secs(r.paused_seconds.unwrap_or(0).max(0).unsigned_abs());
    elapsed(now, &r.started_at).saturating_sub(paused)
}

/// The rollout as it resumes after reconciliation was paused for `paused`: its step
/// timers (`stepStartedAt`, `promotedAt`) move forward by that long and `pausedSeconds`
/// grows by it, so no timeout, window or delay counts time in which the operator did not
/// look. `startedAt` stays: it names the rollout's Jobs and backup. A rollout that is not
/// in flight is returned as it is.
pub fn resumed(r: &RolloutStatus, paused: Duration) -> RolloutStatus {
    if !r.step.in_flight() || paused.is_zero() {
        return r.clone();
    }
    let shift = |t: &Time| Time(after(t, paused));
    let mut next = r.clone();
    next.step_started_at = shift(&r.step_started_at);
    next.promoted_at = r.promoted_at.as_ref().map(shift);
    let seconds = i64::try_from(paused.as_secs()).unwrap_or(i64::MAX);
    next.paused_seconds = Some(r.paused_seconds.unwrap_or(0).saturating_add(seconds));
    next
}

fn after(at: &Time, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| at.0.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// A duration as people write it: "90s", "15m", "2h".
pub(crate) fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Hash of the database Secret keys the relays use (other keys do not matter to them).
/// The values never leave this function; only a truncated digest does.
pub fn secret_hash(data: &std::collections::BTreeMap<String, k8s_openapi::ByteString>) -> String {
    use sha2::{Digest, Sha256};
    let mut digest = Sha256::new();
    for key in DATABASE_SECRET_KEYS {
        digest.update(key.as_bytes());
        match data.get(key) {
            Some(value) => {
                digest.update([1]);
                digest.update((value.0.len() as u64).to_be_bytes());
                digest.update(&value.0);
            }
            None => digest.update([0]),
        }
    }
    hex::encode(&digest.finalize()[..8])
}

/// The template hash a rollout compares: the pod template's, combined with the
/// database Secret's when the cluster uses one.
pub fn combined_hash(template_hash: &str, secret_hash: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    match secret_hash {
        None => template_hash.to_string(),
        Some(secret) => {
            let seed = format!("{template_hash}/{secret}");
            hex::encode(&Sha256::digest(seed.as_bytes())[..8])
        }
    }
}

/// Name of the smoke Job of a rollout attempt: unique per target and start time, so a
/// retried template gets a fresh test, and derived from status only, so a restarted
/// operator finds the Job it created.
pub fn smoke_job_name(cluster_name: &str, rollout: &RolloutStatus) -> String {
    use sha2::{Digest, Sha256};
    let seed = format!(
        "{}/{}",
        rollout.target_template_hash,
        rollout.started_at.0.as_second()
    );
    let digest = hex::encode(&Sha256::digest(seed.as_bytes())[..5]);
    let prefix: String = cluster_name.chars().take(40).collect();
    format!("{}-smoke-{digest}", prefix.trim_end_matches('-'))
}

/// Name of the DchatBackup taken before a rollout attempt's switch, derived from status
/// like [`smoke_job_name`].
pub fn prerollout_backup_name(cluster_name: &str, rollout: &RolloutStatus) -> String {
    use sha2::{Digest, Sha256};
    let seed = format!(
        "backup/{}/{}",
        rollout.target_template_hash,
        rollout.started_at.0.as_second()
    );
    let digest = hex::encode(&Sha256::digest(seed.as_bytes())[..5]);
    let prefix: String = cluster_name.chars().take(200).collect();
    format!("{}-prerollout-{digest}", prefix.trim_end_matches('-'))
}

/// Name of the handover Job of a rollout attempt, derived from status like
/// [`smoke_job_name`]. Deleting a failed handover Job lets the operator create it again.
pub fn handover_job_name(cluster_name: &str, rollout: &RolloutStatus) -> String {
    use sha2::{Digest, Sha256};
    let seed = format!(
        "handover/{}/{}",
        rollout.target_template_hash,
        rollout.started_at.0.as_second()
    );
    let digest = hex::encode(&Sha256::digest(seed.as_bytes())[..5]);
    let prefix: String = cluster_name.chars().take(37).collect();
    format!("{}-handover-{digest}", prefix.trim_end_matches('-'))
}

fn handing_over_message(cluster_name: &str, r: &RolloutStatus) -> String {
    format!(
        "handing slot {}'s stored messages over to slot {} (Job {}); then slot {} scales to zero",
        r.slot.other(),
        r.slot,
        handover_job_name(cluster_name, r),
        r.slot.other()
    )
}

impl Machine<'_, '_> {
    fn note(&mut self, warning: bool, reason: &'static str, message: String) {
        self.notes.push(Note {
            warning,
            reason,
            message,
        });
    }

    fn now(&self) -> Time {
        Time(self.input.now)
    }

    /// Whether the promote annotation asks this decision's rollout to promote.
    fn promote_asked(&self) -> bool {
        self.input.promote && !self.promote_stale
    }

    /// Drops a promote annotation that was not written for the rollout now in flight.
    fn withdraw_promote(&mut self) {
        if self.input.promote {
            self.consume_promote = true;
            self.promote_stale = true;
        }
    }

    /// One transition, or `None` when the state is settled for these observations.
    fn step(&mut self, state: &State) -> Option<State> {
        match &state.rollout {
            Some(r) if r.step.in_flight() => self.in_flight(state, r),
            _ => self.idle(state),
        }
    }

    /// No rollout moving: start one if the spec asks for a template that does not
    /// serve and has not just failed.
    fn idle(&mut self, state: &State) -> Option<State> {
        let input = self.input;
        // Annotations outside a rollout have nothing to act on; drop them so they do
        // not act on a later rollout by surprise.
        self.withdraw_promote();
        self.consume_abort |= input.abort;
        if let Some(r) = self.handback_pending(state) {
            let outcome = match &input.handover {
                JobState::Succeeded => Some((
                    HandoverOutcome::Succeeded,
                    false,
                    reason::HANDED_BACK,
                    format!(
                        "; slot {}'s stored messages were handed back to slot {}",
                        r.slot, state.serving.slot
                    ),
                )),
                JobState::Failed(why) => Some((
                    HandoverOutcome::Failed,
                    true,
                    reason::HANDBACK_FAILED,
                    format!(
                        "; handing slot {}'s stored messages back to slot {} failed ({why}): they stay on its retained volume and are delivered when it serves again",
                        r.slot, state.serving.slot
                    ),
                )),
                JobState::Absent | JobState::Running => None,
            };
            if let Some((outcome, warning, why, detail)) = outcome {
                let mut next = r.clone();
                next.handback = Some(outcome);
                next.message.push_str(&detail);
                self.note(warning, why, detail.trim_start_matches("; ").to_string());
                return Some(State {
                    serving: state.serving.clone(),
                    rollout: Some(next),
                });
            }
        }
        if let Some(r) = state.rollout.as_ref().filter(|r| {
            r.step == RolloutStep::HandoverFailed
                && r.target_template_hash == input.desired.hash
                && input.handover == JobState::Absent
                // The retry needs both slots' relays running.
                && input.hibernation != Hibernation::Hibernate
        }) {
            // The failed Job was deleted: that is the request to try again.
            let mut next = r.clone();
            next.step = RolloutStep::ScalingDown;
            next.reason = Some(reason::HANDING_OVER.to_string());
            next.step_started_at = self.now();
            next.message = handing_over_message(input.cluster_name, r);
            self.note(
                false,
                reason::HANDING_OVER,
                format!("retrying: {}", next.message),
            );
            return Some(State {
                serving: state.serving.clone(),
                rollout: Some(next),
            });
        }
        // A rollout needs running relays: none starts while the cluster hibernates,
        // nor before a woken cluster's relays are all back.
        if input.hibernation != Hibernation::Off {
            return None;
        }
        let serving_hash = state.serving.hash.as_deref()?;
        if serving_hash == input.desired.hash {
            return None;
        }
        let failed = state
            .rollout
            .as_ref()
            .and_then(|r| r.failed_template_hash.as_deref());
        if failed == Some(input.desired.hash.as_str()) {
            return None;
        }
        let slot = state.serving.slot.other();
        let replicas = self.held_replicas(state.serving.slot);
        Some(State {
            serving: state.serving.clone(),
            rollout: Some(self.start(&state.serving, slot, replicas)),
        })
    }

    /// The count a new slot starts at: the serving slot's current size (the HPA's
    /// choice when autoscaling), so the switch does not change capacity.
    fn held_replicas(&self, serving: Slot) -> i32 {
        let settings = self.input.settings;
        let live = self.input.slot(serving).map(|s| s.replicas).unwrap_or(0);
        if settings.autoscaling && live > 0 {
            live
        } else {
            settings.replicas.max(1)
        }
    }

    fn start(&mut self, serving: &Serving, slot: Slot, replicas: i32) -> RolloutStatus {
        let desired = self.input.desired;
        let message = format!(
            "starting {replicas} relay(s) of version {} in slot {slot}",
            desired.version
        );
        self.note(false, reason::STARTED, message.clone());
        RolloutStatus {
            target_version: desired.version.clone(),
            target_template_hash: desired.hash.clone(),
            slot,
            from_version: serving.version.clone(),
            from_template_hash: serving.hash.clone(),
            replicas,
            step: RolloutStep::Preparing,
            reason: Some(reason::STARTED.to_string()),
            message,
            started_at: self.now(),
            step_started_at: self.now(),
            promoted_at: None,
            rolled_back_from: None,
            failed_template_hash: None,
            handback: None,
            paused_seconds: None,
        }
    }

    fn in_flight(&mut self, state: &State, r: &RolloutStatus) -> Option<State> {
        let input = self.input;
        if input.hibernation == Hibernation::Hibernate && !r.step.switched() {
            return Some(self.cancel_for_hibernation(state, r));
        }
        if input.desired.hash != r.target_template_hash {
            // A promote asked for the superseded rollout, not for the one that follows.
            self.withdraw_promote();
            return Some(self.supersede(state, r));
        }
        if input.abort {
            self.consume_abort = true;
            return Some(self.abort(state, r));
        }
        if r.step.switched() {
            // Promotion happened; a promote annotation now has nothing to do.
            self.withdraw_promote();
        }
        let next = match r.step {
            RolloutStep::Preparing => self.preparing(state, r),
            RolloutStep::Validating => self.validating(state, r),
            RolloutStep::BackingUp => self.backed_up(state, r),
            RolloutStep::AwaitingPromotion => self.awaiting(state, r),
            RolloutStep::Promoted => self.promoted(state, r),
            RolloutStep::ScalingDown => self.scaling_down(state, r),
            _ => None,
        };
        // A step that stays put may still refresh its message (progress counts).
        match next {
            Some(Progress::Move(next)) => Some(*next),
            Some(Progress::Message(message)) if message != r.message => {
                let mut r = r.clone();
                r.message = message;
                Some(State {
                    serving: state.serving.clone(),
                    rollout: Some(r),
                })
            }
            _ => None,
        }
    }

    fn supersede(&mut self, state: &State, r: &RolloutStatus) -> State {
        let input = self.input;
        if !r.step.switched() {
            if state.serving.hash.as_deref() == Some(input.desired.hash.as_str()) {
                let mut r = r.clone();
                let message = format!(
                    "cancelled: the spec went back to version {} serving from slot {}",
                    input.desired.version, state.serving.slot
                );
                self.note(false, reason::CANCELLED, message.clone());
                r.step = RolloutStep::Cancelled;
                r.reason = Some(reason::CANCELLED.to_string());
                r.message = message;
                r.step_started_at = self.now();
                return State {
                    serving: state.serving.clone(),
                    rollout: Some(r),
                };
            }
            self.note(
                false,
                reason::SUPERSEDED,
                format!(
                    "rollout of version {} superseded by version {} before the switch",
                    r.target_version, input.desired.version
                ),
            );
            return State {
                serving: state.serving.clone(),
                rollout: Some(self.start(&state.serving, r.slot, r.replicas)),
            };
        }
        // After the switch the new slot serves: the old slot, still warm, becomes the
        // next rollout's target.
        self.note(
            false,
            reason::SUPERSEDED,
            format!(
                "rollout of version {} superseded by version {} after the switch; version {} keeps serving while slot {} takes the new one",
                r.target_version, input.desired.version, r.target_version, r.slot.other()
            ),
        );
        let replicas = self.held_replicas(r.slot);
        State {
            serving: state.serving.clone(),
            rollout: Some(self.start(&state.serving, r.slot.other(), replicas)),
        }
    }

    /// Hibernation before the switch: the new slot has served nothing, so the attempt
    /// is dropped without marking its template failed; after the wake the spec's
    /// template differs from the serving one again and a fresh rollout starts.
    fn cancel_for_hibernation(&mut self, state: &State, r: &RolloutStatus) -> State {
        let mut next = r.clone();
        next.step = RolloutStep::Cancelled;
        next.reason = Some(reason::HIBERNATED.to_string());
        next.step_started_at = self.now();
        next.message = format!(
            "cancelled at step {}: the cluster hibernates; version {} serving from slot {} is kept, and version {} rolls out again after the wake",
            r.step,
            state.serving.version.as_deref().unwrap_or("unknown"),
            state.serving.slot,
            r.target_version
        );
        self.note(false, reason::HIBERNATED, next.message.clone());
        State {
            serving: state.serving.clone(),
            rollout: Some(next),
        }
    }

    fn abort(&mut self, state: &State, r: &RolloutStatus) -> State {
        let mut next = r.clone();
        next.step = RolloutStep::Aborted;
        next.reason = Some(reason::ABORTED.to_string());
        next.step_started_at = self.now();
        next.failed_template_hash = Some(r.target_template_hash.clone());
        let serving = if r.step.switched() {
            next.rolled_back_from = Some(r.target_version.clone());
            Serving {
                slot: r.slot.other(),
                version: r.from_version.clone(),
                hash: r.from_template_hash.clone(),
            }
        } else {
            state.serving.clone()
        };
        next.message = format!(
            "aborted at step {}: traffic on slot {} (version {}); version {} is not retried until the spec changes",
            r.step,
            serving.slot,
            serving.version.as_deref().unwrap_or("unknown"),
            r.target_version
        );
        self.note(true, reason::ABORTED, next.message.clone());
        State {
            serving,
            rollout: Some(next),
        }
    }

    /// Why the new pods are unhealthy, if they are.
    fn pod_failure(&self, r: &RolloutStatus) -> Option<(&'static str, String)> {
        let pods = &self.input.pods;
        if pods.slot != Some(r.slot) {
            return None;
        }
        if !pods.failing.is_empty() {
            return Some((reason::POD_FAILING, pods.failing.join("; ")));
        }
        if !pods.restarted.is_empty() {
            return Some((reason::POD_RESTARTED, pods.restarted.join("; ")));
        }
        None
    }

    /// Whether the rollout's slot runs the target with every relay ready; otherwise
    /// what it waits for.
    fn slot_ready(&self, r: &RolloutStatus) -> Result<(), String> {
        let Some(s) = self.input.slot(r.slot) else {
            return Err(format!("creating StatefulSet of slot {}", r.slot));
        };
        if s.template_hash.as_deref() != Some(r.target_template_hash.as_str()) {
            return Err(format!(
                "giving slot {} the template of version {}",
                r.slot, r.target_version
            ));
        }
        if s.replicas != r.replicas {
            return Err(format!("scaling slot {} to {}", r.slot, r.replicas));
        }
        if !s.rolled_out || s.ready < r.replicas {
            return Err(format!(
                "{}/{} relays of version {} ready in slot {}",
                s.ready, r.replicas, r.target_version, r.slot
            ));
        }
        Ok(())
    }

    fn fail(
        &mut self,
        state: &State,
        r: &RolloutStatus,
        why: &'static str,
        detail: String,
    ) -> State {
        let mut next = r.clone();
        next.step = RolloutStep::Failed;
        next.reason = Some(why.to_string());
        next.step_started_at = self.now();
        next.failed_template_hash = Some(r.target_template_hash.clone());
        next.message = format!(
            "version {} failed validation ({why}: {detail}); traffic stays on slot {}; slot {} is kept for inspection for {}, then scaled to zero; not retried until the spec changes",
            r.target_version,
            state.serving.slot,
            r.slot,
            human(self.input.settings.scale_down_delay)
        );
        self.note(true, why, next.message.clone());
        State {
            serving: state.serving.clone(),
            rollout: Some(next),
        }
    }

    fn moved(&mut self, state: &State, r: RolloutStatus) -> Option<Progress> {
        Some(Progress::Move(Box::new(State {
            serving: state.serving.clone(),
            rollout: Some(r),
        })))
    }

    fn preparing(&mut self, state: &State, r: &RolloutStatus) -> Option<Progress> {
        let settings = self.input.settings;
        if let Some((why, detail)) = self.pod_failure(r) {
            return Some(Progress::Move(Box::new(self.fail(state, r, why, detail))));
        }
        match self.slot_ready(r) {
            Ok(()) => {
                if settings.smoke_test {
                    let mut next = r.clone();
                    next.step = RolloutStep::Validating;
                    next.reason = Some(reason::VALIDATING.to_string());
                    next.step_started_at = self.now();
                    next.message = format!(
                        "all {} relays of version {} ready; smoke test against the preview Service",
                        r.replicas, r.target_version
                    );
                    self.note(false, reason::VALIDATING, next.message.clone());
                    self.moved(state, next)
                } else {
                    Some(Progress::Move(Box::new(
                        self.validated_or_backing_up(state, r),
                    )))
                }
            }
            Err(waiting) => {
                let now = self.input.now;
                if active_elapsed(now, r) > settings.ready_timeout {
                    let detail = format!("{waiting} after {}", human(settings.ready_timeout));
                    return Some(Progress::Move(Box::new(self.fail(
                        state,
                        r,
                        reason::READY_TIMEOUT,
                        detail,
                    ))));
                }
                if elapsed(now, &r.step_started_at) > settings.progress_deadline {
                    let detail = format!(
                        "{waiting}; no progress for {}",
                        human(settings.progress_deadline)
                    );
                    return Some(Progress::Move(Box::new(self.fail(
                        state,
                        r,
                        reason::PROGRESS_DEADLINE,
                        detail,
                    ))));
                }
                Some(Progress::Message(waiting))
            }
        }
    }

    fn validating(&mut self, state: &State, r: &RolloutStatus) -> Option<Progress> {
        if let Some((why, detail)) = self.pod_failure(r) {
            return Some(Progress::Move(Box::new(self.fail(state, r, why, detail))));
        }
        match &self.input.smoke {
            JobState::Succeeded if self.input.settings.backup_before_switch => {
                Some(Progress::Move(Box::new(self.backing_up(state, r))))
            }
            JobState::Succeeded => Some(Progress::Move(Box::new(self.validated(state, r)))),
            JobState::Failed(why) => {
                let detail = why.clone();
                Some(Progress::Move(Box::new(self.fail(
                    state,
                    r,
                    reason::SMOKE_FAILED,
                    detail,
                ))))
            }
            JobState::Absent | JobState::Running => {
                let deadline = self.input.settings.progress_deadline;
                if elapsed(self.input.now, &r.step_started_at) > deadline {
                    let detail = format!("smoke test did not finish within {}", human(deadline));
                    return Some(Progress::Move(Box::new(self.fail(
                        state,
                        r,
                        reason::PROGRESS_DEADLINE,
                        detail,
                    ))));
                }
                None
            }
        }
    }

    /// Validation passed: a backup first when the spec asks for one, else on.
    fn validated_or_backing_up(&mut self, state: &State, r: &RolloutStatus) -> State {
        if self.input.settings.backup_before_switch {
            self.backing_up(state, r)
        } else {
            self.validated(state, r)
        }
    }

    /// Validation passed and a backup must come first.
    fn backing_up(&mut self, state: &State, r: &RolloutStatus) -> State {
        let mut next = r.clone();
        next.step = RolloutStep::BackingUp;
        next.reason = Some(reason::BACKING_UP.to_string());
        next.step_started_at = self.now();
        next.message = format!(
            "version {} validated in slot {}; backing up version {} (DchatBackup {}) before the switch",
            r.target_version,
            r.slot,
            r.from_version.as_deref().unwrap_or("?"),
            prerollout_backup_name(self.input.cluster_name, r)
        );
        self.note(false, reason::BACKING_UP, next.message.clone());
        State {
            serving: state.serving.clone(),
            rollout: Some(next),
        }
    }

    /// The backup before the switch: done → on as validated; failed → the rollout fails.
    fn backed_up(&mut self, state: &State, r: &RolloutStatus) -> Option<Progress> {
        if let Some((why, detail)) = self.pod_failure(r) {
            return Some(Progress::Move(Box::new(self.fail(state, r, why, detail))));
        }
        match &self.input.backup {
            JobState::Succeeded => Some(Progress::Move(Box::new(self.validated(state, r)))),
            JobState::Failed(why) => {
                let detail = format!("the backup before the switch failed: {why}");
                Some(Progress::Move(Box::new(self.fail(
                    state,
                    r,
                    reason::BACKUP_FAILED,
                    detail,
                ))))
            }
            JobState::Absent | JobState::Running => None,
        }
    }

    /// Validation passed: promote now or wait for a person.
    fn validated(&mut self, state: &State, r: &RolloutStatus) -> State {
        if self.input.settings.auto_promote {
            return self.promote(r, "validated; promoted automatically".into());
        }
        if self.promote_asked() {
            self.consume_promote = true;
            return self.promote(
                r,
                "validated; promoted by the dchat.network/promote annotation".into(),
            );
        }
        let mut next = r.clone();
        next.step = RolloutStep::AwaitingPromotion;
        next.reason = Some(reason::AWAITING_PROMOTION.to_string());
        next.step_started_at = self.now();
        let after = self
            .input
            .settings
            .auto_promote_after
            .map(|d| format!(" (or automatically after {})", human(d)))
            .unwrap_or_default();
        next.message = format!(
            "version {} validated in slot {}; waiting for promotion{after}: kubectl annotate dchatcluster <name> {PROMOTE_ANNOTATION}=true",
            r.target_version, r.slot
        );
        self.note(false, reason::AWAITING_PROMOTION, next.message.clone());
        State {
            serving: state.serving.clone(),
            rollout: Some(next),
        }
    }

    fn awaiting(&mut self, state: &State, r: &RolloutStatus) -> Option<Progress> {
        let input = self.input;
        if let Some((why, detail)) = self.pod_failure(r) {
            return Some(Progress::Move(Box::new(self.fail(state, r, why, detail))));
        }
        if self.promote_asked() {
            self.consume_promote = true;
            let how = "promoted by the dchat.network/promote annotation".to_string();
            return Some(Progress::Move(Box::new(self.promote(r, how))));
        }
        if input.settings.auto_promote {
            let how = "promoted: rollout.autoPromote is now true".to_string();
            return Some(Progress::Move(Box::new(self.promote(r, how))));
        }
        if let Some(after) = input.settings.auto_promote_after {
            if elapsed(input.now, &r.step_started_at) >= after {
                let how = format!("promoted automatically after waiting {}", human(after));
                return Some(Progress::Move(Box::new(self.promote(r, how))));
            }
        }
        None
    }

    fn promote(&mut self, r: &RolloutStatus, how: String) -> State {
        let mut next = r.clone();
        next.step = RolloutStep::Promoted;
        next.reason = Some(reason::PROMOTED.to_string());
        next.step_started_at = self.now();
        next.promoted_at = Some(self.now());
        next.message = format!(
            "{how}: version {} serves from slot {}; watching it for {}",
            r.target_version,
            r.slot,
            human(self.input.settings.post_promotion_window)
        );
        self.note(false, reason::PROMOTED, next.message.clone());
        State {
            serving: Serving {
                slot: r.slot,
                version: Some(r.target_version.clone()),
                hash: Some(r.target_template_hash.clone()),
            },
            rollout: Some(next),
        }
    }

    fn promoted(&mut self, state: &State, r: &RolloutStatus) -> Option<Progress> {
        let failure = self.pod_failure(r).or_else(|| {
            let s = self.input.slot(r.slot)?;
            // Relays the HPA added in the window are still starting; the validated
            // count must stay ready. (Added relays that crash are pod failures.)
            let required = s.replicas.min(r.replicas);
            (s.ready < required || s.replicas == 0).then(|| {
                (
                    reason::RELAYS_NOT_READY,
                    format!("{}/{} relays ready in slot {}", s.ready, required, r.slot),
                )
            })
        });
        if let Some((why, detail)) = failure {
            return Some(Progress::Move(Box::new(self.rollback(r, why, detail))));
        }
        let settings = self.input.settings;
        if let (Some(analysis), Some(Reading::Value(value))) =
            (&settings.analysis, &self.input.analysis)
        {
            if *value > analysis.fail_above {
                let detail = format!(
                    "analysis query returned {value}, above {} (query: {})",
                    analysis.fail_above, analysis.query
                );
                return Some(Progress::Move(Box::new(self.rollback(
                    r,
                    reason::ANALYSIS_FAILED,
                    detail,
                ))));
            }
        }
        let promoted_at = promoted_at(r);
        if elapsed(self.input.now, promoted_at) >= settings.post_promotion_window {
            let mut next = r.clone();
            next.step = RolloutStep::ScalingDown;
            next.reason = Some(reason::WINDOW_PASSED.to_string());
            next.step_started_at = self.now();
            let due = after(promoted_at, settings.scale_down_after());
            next.message = format!(
                "version {} healthy for {}; slot {} scales to zero at {due}",
                r.target_version,
                human(settings.post_promotion_window),
                r.slot.other()
            );
            self.note(false, reason::WINDOW_PASSED, next.message.clone());
            return self.moved(state, next);
        }
        // An unanswered query does not roll back by itself, but status says so.
        let base = r.message.split(INCONCLUSIVE).next().unwrap_or_default();
        match &self.input.analysis {
            Some(Reading::Inconclusive(why)) if settings.analysis.is_some() => {
                Some(Progress::Message(format!("{base}{INCONCLUSIVE}{why}")))
            }
            _ => Some(Progress::Message(base.to_string())),
        }
    }

    fn rollback(&mut self, r: &RolloutStatus, why: &'static str, detail: String) -> State {
        let mut next = r.clone();
        next.step = RolloutStep::RolledBack;
        next.reason = Some(why.to_string());
        next.step_started_at = self.now();
        next.rolled_back_from = Some(r.target_version.clone());
        next.failed_template_hash = Some(r.target_template_hash.clone());
        let serving = Serving {
            slot: r.slot.other(),
            version: r.from_version.clone(),
            hash: r.from_template_hash.clone(),
        };
        next.message = format!(
            "version {} failed after the switch ({why}: {detail}); traffic back on slot {} (version {}); slot {} is kept for inspection for {}, then scaled to zero; not retried until the spec changes",
            r.target_version,
            serving.slot,
            serving.version.as_deref().unwrap_or("unknown"),
            r.slot,
            human(self.input.settings.scale_down_delay)
        );
        self.note(true, "RolledBack", next.message.clone());
        State {
            serving,
            rollout: Some(next),
        }
    }

    fn scaling_down(&mut self, state: &State, r: &RolloutStatus) -> Option<Progress> {
        let settings = self.input.settings;
        if !self.scale_down_due(r) {
            return None;
        }
        let mut handed_over = "";
        if settings.handover {
            let job = handover_job_name(self.input.cluster_name, r);
            match &self.input.handover {
                JobState::Succeeded => {
                    handed_over = "; its stored messages were handed over first";
                }
                JobState::Failed(why) => {
                    let mut next = r.clone();
                    next.step = RolloutStep::HandoverFailed;
                    next.reason = Some(reason::HANDOVER_FAILED.to_string());
                    next.step_started_at = self.now();
                    next.message = format!(
                        "version {} serves from slot {}, but slot {}'s stored messages could not be handed over ({why}); slot {} keeps running so none is lost; fix the cause, then `kubectl delete job {job}` to retry",
                        r.target_version,
                        r.slot,
                        r.slot.other(),
                        r.slot.other()
                    );
                    self.note(true, reason::HANDOVER_FAILED, next.message.clone());
                    return self.moved(state, next);
                }
                JobState::Absent | JobState::Running => {
                    return Some(Progress::Message(handing_over_message(
                        self.input.cluster_name,
                        r,
                    )));
                }
            }
        }
        let mut next = r.clone();
        next.step = RolloutStep::Complete;
        next.reason = Some(reason::COMPLETE.to_string());
        next.step_started_at = self.now();
        next.message = format!(
            "version {} serves from slot {}; slot {} scaled to zero{handed_over}",
            r.target_version,
            r.slot,
            r.slot.other()
        );
        self.note(false, reason::COMPLETE, next.message.clone());
        self.moved(state, next)
    }

    /// Whether the old slot's scale-down is due (window and delay passed).
    fn scale_down_due(&self, r: &RolloutStatus) -> bool {
        elapsed(self.input.now, promoted_at(r)) >= self.input.settings.scale_down_after()
    }

    /// How much longer a failed, rolled-back or aborted slot stays up for inspection;
    /// `None` when it should be (or is) at zero.
    fn failed_slot_kept_for(&self, state: &State) -> Option<Duration> {
        let r = state.rollout.as_ref()?;
        if !matches!(
            r.step,
            RolloutStep::Failed | RolloutStep::RolledBack | RolloutStep::Aborted
        ) || r.slot == state.serving.slot
        {
            return None;
        }
        let delay = self.input.settings.scale_down_delay;
        let waited = elapsed(self.input.now, &r.step_started_at);
        (waited < delay).then(|| delay - waited)
    }

    /// Embedded store: a slot that served traffic and was rolled back from (or aborted
    /// after the switch), past its inspection delay, whose stored messages have not been
    /// handed back to the serving slot yet.
    fn handback_pending<'s>(&self, state: &'s State) -> Option<&'s RolloutStatus> {
        self.handback_owed(state)
            .filter(|_| self.failed_slot_kept_for(state).is_none())
    }

    /// Embedded store: a slot that served traffic and was rolled back from (or aborted
    /// after the switch) whose stored messages have not been handed back yet, whether or
    /// not its inspection delay has passed. Hibernation waits for it: the handback needs
    /// the failed slot's relay running.
    fn handback_owed<'s>(&self, state: &'s State) -> Option<&'s RolloutStatus> {
        let r = state.rollout.as_ref()?;
        (self.input.settings.handover
            && matches!(r.step, RolloutStep::RolledBack | RolloutStep::Aborted)
            && r.rolled_back_from.is_some()
            && r.handback.is_none()
            && r.slot != state.serving.slot)
            .then_some(r)
    }

    /// When an in-flight rollout must be looked at again although nothing it watches
    /// changed: when the next timer of its step runs out (ready timeout, progress
    /// deadline, automatic promotion, post-promotion window, scale-down delay), every
    /// [`POLL`] while an analysis query watches the window, and at the latest after
    /// [`IN_FLIGHT_RESYNC`].
    fn next_look(&self, r: &RolloutStatus) -> Duration {
        let settings = self.input.settings;
        let now = self.input.now;
        let since_step = elapsed(now, &r.step_started_at);
        let since_promotion = elapsed(now, promoted_at(r));
        let left = |timer: Duration, since: Duration| timer.checked_sub(since);
        let timers = match r.step {
            RolloutStep::Preparing => vec![
                left(settings.ready_timeout, active_elapsed(now, r)),
                left(settings.progress_deadline, since_step),
            ],
            RolloutStep::Validating => vec![left(settings.progress_deadline, since_step)],
            RolloutStep::AwaitingPromotion => vec![settings
                .auto_promote_after
                .and_then(|after| left(after, since_step))],
            // The window's end moves it to ScalingDown, whose delay is no shorter.
            RolloutStep::Promoted => vec![left(settings.post_promotion_window, since_promotion)],
            RolloutStep::ScalingDown => {
                vec![left(settings.scale_down_after(), since_promotion)]
            }
            _ => Vec::new(),
        };
        // Timestamps have whole seconds and some timers compare with `>`: one second
        // later the timer has certainly run out.
        let timer = timers
            .into_iter()
            .flatten()
            .map(|left| left + Duration::from_secs(1))
            .min();
        let analysis =
            (r.step == RolloutStep::Promoted && settings.analysis.is_some()).then_some(POLL);
        [timer, analysis]
            .into_iter()
            .flatten()
            .fold(IN_FLIGHT_RESYNC, Duration::min)
    }

    /// Whether the serving slot's rollout ended with a failed handover (the other slot
    /// still holds stored messages).
    fn handover_failed(&self, state: &State) -> bool {
        state
            .rollout
            .as_ref()
            .is_some_and(|r| r.step == RolloutStep::HandoverFailed && r.slot == state.serving.slot)
    }

    /// The plan for the settled state.
    fn finish(self, state: State) -> Decision {
        let input = self.input;
        let settings = input.settings;
        let fixed = settings.fixed_replicas();
        let active = state.serving.slot;
        let idle = active.other();
        // Before the switch the size is held, so the two slots compare and switch at
        // the same count. In the post-promotion window the new slot may grow (a traffic
        // spike right after a release) but not shrink below what was validated.
        let hold = |n: i32| settings.autoscaling.then_some(HpaBounds { min: n, max: n });
        let floor = |n: i32| {
            settings.autoscaling.then_some(HpaBounds {
                min: n,
                max: settings.max_replicas.max(n),
            })
        };
        let plan = |active_template, active_replicas, idle_template, idle_replicas| {
            vec![
                SlotPlan {
                    slot: active,
                    template: active_template,
                    replicas: active_replicas,
                },
                SlotPlan {
                    slot: idle,
                    template: idle_template,
                    replicas: idle_replicas,
                },
            ]
        };
        let in_flight = state.rollout.as_ref().filter(|r| r.step.in_flight());
        let mut handover = None;
        let mut backup = None;
        let (mut slots, mut hpa_bounds, active_is_desired, smoke) = match in_flight {
            Some(r) => match r.step {
                // Inside the window the HPA may scale the new slot out, never below the
                // validated count; "every relay ready" is judged on that count.
                RolloutStep::Promoted => (
                    plan(
                        Template::Desired,
                        (!settings.autoscaling).then_some(r.replicas),
                        Template::Keep,
                        Some(r.replicas),
                    ),
                    floor(r.replicas),
                    true,
                    None,
                ),
                RolloutStep::ScalingDown => {
                    if settings.handover
                        && self.scale_down_due(r)
                        && matches!(input.handover, JobState::Absent | JobState::Running)
                    {
                        handover = Some(HandoverRequest {
                            job_name: handover_job_name(input.cluster_name, r),
                            from: r.slot.other(),
                            to: r.slot,
                            version: r.target_version.clone(),
                        });
                    }
                    (
                        plan(Template::Desired, fixed, Template::Keep, Some(r.replicas)),
                        None,
                        true,
                        None,
                    )
                }
                // Before the switch: the serving slot keeps its template and its size;
                // the new slot gets the target at the held size.
                _ => {
                    let smoke = (r.step == RolloutStep::Validating
                        && settings.smoke_test
                        && matches!(input.smoke, JobState::Absent | JobState::Running))
                    .then(|| SmokeRequest {
                        job_name: smoke_job_name(input.cluster_name, r),
                        slot: r.slot,
                        version: r.target_version.clone(),
                    });
                    if r.step == RolloutStep::BackingUp
                        && matches!(input.backup, JobState::Absent | JobState::Running)
                    {
                        backup = Some(BackupRequest {
                            name: prerollout_backup_name(input.cluster_name, r),
                        });
                    }
                    (
                        plan(Template::Keep, fixed, Template::Desired, Some(r.replicas)),
                        hold(r.replicas),
                        false,
                        smoke,
                    )
                }
            },
            None => {
                let desired = state.serving.hash.is_none()
                    || state.serving.hash.as_deref() == Some(input.desired.hash.as_str());
                let template = if desired {
                    Template::Desired
                } else {
                    Template::Keep
                };
                // A slot that just failed keeps running, untouched, for the scale-down
                // delay, so its pods, logs and Events can be inspected; then it goes
                // to zero.
                let idle_replicas = match self.failed_slot_kept_for(&state) {
                    Some(_) => None,
                    // The old slot still holds messages nobody else has.
                    None if self.handover_failed(&state) => {
                        state.rollout.as_ref().map(|r| r.replicas)
                    }
                    // The failed slot hands its messages back before it goes to zero;
                    // it stays as it is meanwhile.
                    None => match self.handback_pending(&state) {
                        Some(r) => {
                            handover = Some(HandoverRequest {
                                job_name: handover_job_name(input.cluster_name, r),
                                from: r.slot,
                                to: state.serving.slot,
                                version: r.target_version.clone(),
                            });
                            None
                        }
                        None => Some(0),
                    },
                };
                (
                    plan(template, fixed, Template::Keep, idle_replicas),
                    None,
                    desired,
                    None,
                )
            }
        };
        let mut requeue = match in_flight {
            Some(r) => Some(self.next_look(r)),
            // The retry request is the Job's deletion, which starts a reconcile; this
            // looks now and then in case that event was missed.
            None if self.handover_failed(&state) => Some(HANDOVER_RETRY_POLL),
            // The handback Job's changes start a reconcile; this bounds a missed one.
            None if self.handback_pending(&state).is_some() => Some(IN_FLIGHT_RESYNC),
            None => self.failed_slot_kept_for(&state),
        };
        let hibernation = match input.hibernation {
            Hibernation::Off => HibernationPlan::Off,
            Hibernation::Hibernate => match (in_flight, self.handback_owed(&state)) {
                (Some(r), _) => HibernationPlan::Waiting(format!(
                    "the rollout of version {} has switched traffic (step {}); it finishes first",
                    r.target_version, r.step
                )),
                (None, Some(r)) => HibernationPlan::Waiting(format!(
                    "slot {}'s stored messages are handed back to slot {} first (after its inspection delay)",
                    r.slot, state.serving.slot
                )),
                (None, None) => {
                    // Both slots to zero, templates as they are; the volumes stay.
                    for plan in &mut slots {
                        plan.replicas = Some(0);
                    }
                    hpa_bounds = None;
                    handover = None;
                    requeue = None;
                    HibernationPlan::Hibernated
                }
            },
            Hibernation::Wake { replicas } if in_flight.is_none() => {
                if let Some(serving) = slots.first_mut() {
                    serving.replicas = Some(replicas);
                }
                HibernationPlan::Waking
            }
            Hibernation::Wake { .. } => HibernationPlan::Off,
        };
        Decision {
            rollout: state.rollout,
            serving: state.serving,
            active_is_desired,
            slots,
            hpa_bounds,
            smoke,
            handover,
            backup,
            notes: self.notes,
            consume_promote: self.consume_promote,
            consume_abort: self.consume_abort,
            requeue,
            hibernation,
        }
    }
}

/// Outcome of a step that did not need the whole state replaced.
enum Progress {
    /// A transition.
    Move(Box<State>),
    /// Still waiting; this says for what.
    Message(String),
}

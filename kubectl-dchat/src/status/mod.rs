//! `kubectl dchat status`: everything about one DchatCluster on one screen.
//!
//! Three steps: [`fetch`] reads the objects (the only I/O), [`summarize`] turns them into
//! a [`Summary`] (what `-o json|yaml` prints), and [`screen::render`] turns that into
//! text. The last two are pure and unit-tested on fixtures.

pub mod fetch;
pub mod screen;

use std::collections::BTreeMap;

use dchat_operator::api::{DchatBackup, RolloutStep, Slot};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::contract;
use crate::view::ClusterView;

/// Backups shown on the screen, newest first.
pub const RECENT_BACKUPS: usize = 5;
/// Events shown on the screen, newest last.
pub const RECENT_EVENTS: usize = 10;
/// The relay container of a slot's StatefulSet (for its image tag).
const RELAY_CONTAINER: &str = dchat_operator::build::CONTAINER_NAME;

/// A part of the screen that may be unreadable on its own (e.g. RBAC lets the user read
/// DchatClusters but not Events): the rest of the screen is still shown.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Section<T> {
    /// What was read.
    Shown(T),
    /// Why it could not be read.
    Unavailable {
        /// The reason, e.g. `forbidden: ...`.
        unavailable: String,
    },
}

impl<T> Section<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Section<U> {
        match self {
            Section::Shown(value) => Section::Shown(f(value)),
            Section::Unavailable { unavailable } => Section::Unavailable { unavailable },
        }
    }
}

/// Everything fetched for one status screen.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The DchatCluster.
    pub cluster: ClusterView,
    /// Its relay StatefulSets (`<name>-blue`, `<name>-green`) that exist.
    pub statefulsets: Section<Vec<StatefulSet>>,
    /// Its HorizontalPodAutoscaler, if any.
    pub autoscaler: Section<Option<HorizontalPodAutoscaler>>,
    /// Its PodDisruptionBudget, if any.
    pub disruption_budget: Section<Option<PodDisruptionBudget>>,
    /// Its DchatBackups (label `dchat.network/cluster`).
    pub backups: Section<Vec<DchatBackup>>,
    /// Events about the DchatCluster.
    pub events: Section<Vec<Event>>,
}

/// The status screen's content (and the `-o json|yaml` output).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The DchatCluster.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// `status.phase`; `None` before the operator wrote a status.
    pub phase: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `status.observedGeneration`: behind `generation` while the operator has not yet
    /// looked at the latest spec.
    pub observed_generation: Option<i64>,
    /// `spec.version`.
    pub desired_version: String,
    /// The version serving traffic.
    pub serving_version: Option<String>,
    /// The slot serving traffic.
    pub active_slot: Option<String>,
    /// Ready relays in the serving slot.
    pub ready_replicas: Option<i32>,
    /// Relays in the serving slot.
    pub replicas: Option<i32>,
    /// Pause, hibernation and restart requests and how the operator answered.
    pub control: Control,
    /// `status.conditions`.
    pub conditions: Vec<ConditionLine>,
    /// The two slots' StatefulSets.
    pub slots: Section<Vec<SlotLine>>,
    /// The current or last rollout.
    pub rollout: Option<RolloutLine>,
    /// The HorizontalPodAutoscaler (`None`: none exists).
    pub autoscaler: Section<Option<AutoscalerLine>>,
    /// The PodDisruptionBudget (`None`: none exists).
    pub disruption_budget: Section<Option<BudgetLine>>,
    /// Backups.
    pub backups: Backups,
    /// The latest Events of the DchatCluster, oldest first.
    pub events: Section<Vec<EventLine>>,
}

/// Day-2 controls: what asks for them and what the operator reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Control {
    /// What asks for a pause: the annotation, `spec.paused`, or both.
    pub paused_by: Vec<String>,
    /// Status of the Paused condition, if the operator reports one.
    pub paused_condition: Option<String>,
    /// What asks for hibernation.
    pub hibernated_by: Vec<String>,
    /// The restart last requested (the annotation's value).
    pub restart_requested: Option<String>,
    /// The restart the operator last acted on (from status).
    pub restart_acted_on: Option<String>,
}

/// One condition.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionLine {
    /// Type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// Last transition.
    pub since: Time,
}

/// One slot's StatefulSet.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotLine {
    /// `blue` or `green`.
    pub slot: String,
    /// `serving`, `rollout` (the new version's slot before it serves) or `idle`.
    pub role: String,
    /// Relay version of its pod template.
    pub version: Option<String>,
    /// Ready relays.
    pub ready: i32,
    /// Desired relays.
    pub desired: i32,
    /// The pod template hash the operator gave it.
    pub template_hash: Option<String>,
}

/// The current or last rollout.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutLine {
    /// Version serving when it started.
    pub from_version: Option<String>,
    /// Version being rolled out.
    pub target_version: String,
    /// Slot of the new version.
    pub slot: String,
    /// Step.
    pub step: String,
    /// Still moving.
    pub in_flight: bool,
    /// When it started.
    pub started_at: Option<Time>,
    /// When the step started.
    pub step_started_at: Option<Time>,
    /// What it waits for now (only while in flight).
    pub waiting_for: Option<String>,
    /// Reason of the step.
    pub reason: Option<String>,
    /// The operator's message.
    pub message: String,
}

/// The HorizontalPodAutoscaler.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerLine {
    /// Its name.
    pub name: String,
    /// Relays now.
    pub current: Option<i32>,
    /// Relays it wants.
    pub desired: Option<i32>,
    /// Lower bound.
    pub min: Option<i32>,
    /// Upper bound.
    pub max: i32,
}

/// The PodDisruptionBudget.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetLine {
    /// Its name.
    pub name: String,
    /// `minAvailable`.
    pub min_available: Option<String>,
    /// `maxUnavailable`.
    pub max_unavailable: Option<String>,
    /// Healthy relays now.
    pub current_healthy: Option<i32>,
    /// Healthy relays needed.
    pub desired_healthy: Option<i32>,
    /// Evictions allowed now.
    pub disruptions_allowed: Option<i32>,
}

/// Backups of the cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backups {
    /// `spec.backup` is set.
    pub configured: bool,
    /// `spec.backup.schedule`.
    pub schedule: Option<String>,
    /// `spec.backup.suspend`.
    pub suspended: bool,
    /// When the next scheduled backup is due (`status.backup.nextScheduledAt`).
    pub next_scheduled_at: Option<Time>,
    /// The newest Completed backup.
    pub last_successful: Option<String>,
    /// When it completed.
    pub last_successful_at: Option<Time>,
    /// The newest DchatBackups, newest first.
    pub recent: Section<Vec<BackupLine>>,
}

/// One DchatBackup.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupLine {
    /// Its name.
    pub name: String,
    /// Pending, Running, Completed or Failed.
    pub phase: String,
    /// When it was created.
    pub created: Option<Time>,
    /// Bytes uploaded.
    pub size_bytes: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// One Event.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventLine {
    /// When it (last) happened.
    pub time: Option<Time>,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
    /// How often it happened.
    pub count: i32,
}

/// The summary of a snapshot.
pub fn summarize(snapshot: &Snapshot) -> Summary {
    let cluster = &snapshot.cluster;
    let status = cluster.status.clone().unwrap_or_default();
    let slots = snapshot
        .statefulsets
        .clone()
        .map(|sets| slot_lines(cluster, &sets));
    let rollout = cluster.rollout().map(|r| {
        let ready_in_slot = match &slots {
            Section::Shown(lines) => lines.iter().find(|l| l.slot == r.slot).map(|l| l.ready),
            Section::Unavailable { .. } => None,
        };
        RolloutLine {
            from_version: r.from_version.clone(),
            target_version: r.target_version.clone(),
            slot: r.slot.clone(),
            step: r.step.clone(),
            in_flight: r.in_flight(),
            started_at: r.started_at.clone(),
            step_started_at: r.step_started_at.clone(),
            waiting_for: waiting_for(cluster, r.known_step(), &r.slot, ready_in_slot, r.replicas),
            reason: r.reason.clone(),
            message: r.message.clone(),
        }
    });
    let backup_status = status.backup.clone().unwrap_or_default();
    Summary {
        name: cluster.name.clone(),
        namespace: cluster.namespace.clone(),
        phase: status.phase.clone(),
        generation: cluster.generation,
        observed_generation: status.observed_generation,
        desired_version: cluster.spec.version.clone(),
        serving_version: status.active_version.clone(),
        active_slot: status.active_slot.clone(),
        ready_replicas: status.ready_replicas,
        replicas: status.replicas,
        control: control(cluster),
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionLine {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                since: c.last_transition_time.clone(),
            })
            .collect(),
        slots,
        rollout,
        autoscaler: snapshot.autoscaler.clone().map(|hpa| {
            hpa.map(|hpa| {
                let spec = hpa.spec.unwrap_or_default();
                let hpa_status = hpa.status.unwrap_or_default();
                AutoscalerLine {
                    name: hpa.metadata.name.unwrap_or_default(),
                    current: hpa_status.current_replicas,
                    desired: Some(hpa_status.desired_replicas),
                    min: spec.min_replicas,
                    max: spec.max_replicas,
                }
            })
        }),
        disruption_budget: snapshot.disruption_budget.clone().map(|pdb| {
            pdb.map(|pdb| {
                let spec = pdb.spec.unwrap_or_default();
                let pdb_status = pdb.status;
                BudgetLine {
                    name: pdb.metadata.name.unwrap_or_default(),
                    min_available: spec.min_available.as_ref().map(int_or_string),
                    max_unavailable: spec.max_unavailable.as_ref().map(int_or_string),
                    current_healthy: pdb_status.as_ref().map(|s| s.current_healthy),
                    desired_healthy: pdb_status.as_ref().map(|s| s.desired_healthy),
                    disruptions_allowed: pdb_status.as_ref().map(|s| s.disruptions_allowed),
                }
            })
        }),
        backups: Backups {
            configured: cluster.spec.backup.is_some(),
            schedule: cluster
                .spec
                .backup
                .as_ref()
                .and_then(|b| b.schedule.clone()),
            suspended: cluster.spec.backup.as_ref().is_some_and(|b| b.suspend),
            next_scheduled_at: backup_status.next_scheduled_at.clone(),
            last_successful: backup_status.last_successful_backup.clone(),
            last_successful_at: backup_status.last_successful_backup_time.clone(),
            recent: snapshot.backups.clone().map(|list| backup_lines(&list)),
        },
        events: snapshot.events.clone().map(|list| event_lines(&list)),
    }
}

fn int_or_string(value: &IntOrString) -> String {
    match value {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

fn control(cluster: &ClusterView) -> Control {
    let mut paused_by = Vec::new();
    if contract::annotation_pauses(cluster) {
        paused_by.push(format!(
            "annotation {}={}",
            contract::RECONCILE_ANNOTATION,
            contract::RECONCILE_PAUSED
        ));
    }
    if contract::spec_paused(cluster) {
        paused_by.push(contract::field(contract::SPEC_PAUSED));
    }
    let mut hibernated_by = Vec::new();
    if contract::annotation_hibernates(cluster) {
        hibernated_by.push(format!(
            "annotation {}={}",
            contract::HIBERNATION_ANNOTATION,
            contract::HIBERNATION_ON
        ));
    }
    if contract::spec_hibernates(cluster) {
        hibernated_by.push(contract::field(contract::SPEC_HIBERNATE));
    }
    Control {
        paused_by,
        paused_condition: cluster
            .condition(contract::PAUSED_CONDITION)
            .map(|c| c.status.clone()),
        hibernated_by,
        restart_requested: cluster
            .annotation(contract::RESTARTED_AT_ANNOTATION)
            .map(str::to_string),
        restart_acted_on: contract::restarted_at(cluster).map(str::to_string),
    }
}

/// What an in-flight rollout step waits for, in words a person can act on.
fn waiting_for(
    cluster: &ClusterView,
    step: Option<RolloutStep>,
    slot: &str,
    ready: Option<i32>,
    replicas: Option<i32>,
) -> Option<String> {
    let other = match slot {
        "blue" => "green",
        "green" => "blue",
        _ => "the old slot",
    };
    let text = match step? {
        RolloutStep::Preparing => {
            let count = match (ready, replicas) {
                (Some(ready), Some(replicas)) => format!(" ({ready}/{replicas} ready)"),
                _ => String::new(),
            };
            format!("the relays of slot {slot} to become Ready{count}")
        }
        RolloutStep::Validating => "the smoke test Job against the preview Service".into(),
        RolloutStep::BackingUp => {
            "the backup taken before the switch (spec.backup.beforeRollout)".into()
        }
        RolloutStep::AwaitingPromotion => format!(
            "promotion: kubectl dchat promote {} -n {}",
            cluster.name, cluster.namespace
        ),
        RolloutStep::Promoted => {
            "the post-promotion window to pass without failures (spec.rollout.postPromotionWindow)"
                .into()
        }
        RolloutStep::ScalingDown => {
            format!("the scale-down delay; then slot {other} scales to zero")
        }
        _ => return None,
    };
    Some(text)
}

fn slot_lines(cluster: &ClusterView, sets: &[StatefulSet]) -> Vec<SlotLine> {
    let active = cluster.status.as_ref().and_then(|s| s.active_slot.clone());
    let rollout_slot = cluster
        .rollout()
        .filter(|r| r.in_flight())
        .map(|r| r.slot.clone());
    let by_name: BTreeMap<&str, &StatefulSet> = sets
        .iter()
        .filter_map(|s| Some((s.metadata.name.as_deref()?, s)))
        .collect();
    let stub = cluster.stub();
    Slot::ALL
        .iter()
        .filter_map(|slot| {
            let name = dchat_operator::labels::statefulset_name(&stub, *slot);
            let set = by_name.get(name.as_str())?;
            let slot = slot.as_str().to_string();
            let role = if active.as_deref() == Some(slot.as_str()) {
                "serving"
            } else if rollout_slot.as_deref() == Some(slot.as_str()) {
                "rollout"
            } else {
                "idle"
            };
            Some(SlotLine {
                role: role.to_string(),
                version: template_version(set),
                ready: set
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0),
                desired: set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                template_hash: set
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(dchat_operator::rollout::TEMPLATE_HASH_ANNOTATION))
                    .cloned(),
                slot,
            })
        })
        .collect()
}

/// The relay version of a StatefulSet's pod template: its version label, else the tag
/// of the relay container's image.
fn template_version(set: &StatefulSet) -> Option<String> {
    let template = &set.spec.as_ref()?.template;
    if let Some(version) = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref())
        .and_then(|l| l.get("app.kubernetes.io/version"))
    {
        return Some(version.clone());
    }
    let image = template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == RELAY_CONTAINER)?
        .image
        .as_deref()?;
    image_tag(image)
}

/// The tag of an image reference (`repo:tag` or `repo:tag@digest`); `None` without one.
pub fn image_tag(image: &str) -> Option<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split_once(':').map(|(_, tag)| tag.to_string())
}

fn backup_lines(list: &[DchatBackup]) -> Vec<BackupLine> {
    let mut sorted: Vec<&DchatBackup> = list.iter().collect();
    // Newest first; names carry the UTC time too, so they break ties.
    sorted.sort_by(|a, b| {
        (&b.metadata.creation_timestamp, &b.metadata.name)
            .cmp(&(&a.metadata.creation_timestamp, &a.metadata.name))
    });
    sorted
        .into_iter()
        .take(RECENT_BACKUPS)
        .map(|b| {
            let status = b.status.clone().unwrap_or_default();
            BackupLine {
                name: b.metadata.name.clone().unwrap_or_default(),
                phase: status.phase.as_str().to_string(),
                created: b.metadata.creation_timestamp.clone(),
                size_bytes: status.size_bytes,
                error: status.error,
            }
        })
        .collect()
}

/// When an Event last happened, from whichever time field its writer filled in.
fn event_time(event: &Event) -> Option<Time> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| Time(t.0))
        .or_else(|| event.last_timestamp.clone())
        .or_else(|| event.event_time.as_ref().map(|t| Time(t.0)))
        .or_else(|| event.first_timestamp.clone())
        .or_else(|| event.metadata.creation_timestamp.clone())
}

fn event_lines(list: &[Event]) -> Vec<EventLine> {
    let mut lines: Vec<EventLine> = list
        .iter()
        .map(|e| EventLine {
            time: event_time(e),
            type_: e.type_.clone().unwrap_or_else(|| "Normal".into()),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1)
                .max(1),
        })
        .collect();
    lines.sort_by(|a, b| a.time.cmp(&b.time));
    let skip = lines.len().saturating_sub(RECENT_EVENTS);
    lines.split_off(skip)
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;

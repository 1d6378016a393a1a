//! A DchatCluster as the plugin reads it: leniently, from the raw object.
//!
//! The plugin and the operator are upgraded separately, so a plugin must read clusters
//! of an operator older or newer than itself. Enumerations are therefore kept as text
//! (a phase the plugin does not know, such as a newer `Hibernating`, is shown as
//! written, not an error) and only the fields the screens and waits need are read. The
//! typed [`dchat_operator::api`] values are used where they cannot drift that way.

use std::collections::BTreeMap;

use dchat_operator::api::{ClusterBackupStatus, DchatCluster, RolloutStep};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Deserialize;
use serde_json::Value;

use crate::error::Error;

/// The parts of a DchatCluster the plugin uses.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// What the plugin reads of `spec`.
    pub spec: SpecView,
    /// `status`, if the operator wrote one.
    pub status: Option<StatusView>,
    /// The whole object, for fields this version of the API types does not have yet
    /// (read through [`crate::contract`]).
    pub raw: Value,
}

/// What the plugin reads of `spec`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SpecView {
    /// `spec.version`.
    pub version: String,
    /// `spec.replicas`.
    pub replicas: Option<i32>,
    /// `spec.autoscaling`.
    pub autoscaling: Option<AutoscalingView>,
    /// `spec.rollout`.
    pub rollout: Option<RolloutSpecView>,
    /// `spec.backup` (only what the screen shows).
    pub backup: Option<BackupSpecView>,
}

/// `spec.autoscaling`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AutoscalingView {
    /// Whether an HPA owns the replica count.
    pub enabled: bool,
}

/// `spec.rollout`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RolloutSpecView {
    /// Promote as soon as validated.
    pub auto_promote: bool,
}

impl Default for RolloutSpecView {
    fn default() -> Self {
        Self { auto_promote: true }
    }
}

/// `spec.backup`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BackupSpecView {
    /// Cron schedule, UTC.
    pub schedule: Option<String>,
    /// Scheduled backups suspended.
    pub suspend: bool,
}

/// What the plugin reads of `status`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct StatusView {
    /// `status.observedGeneration`.
    pub observed_generation: Option<i64>,
    /// `status.phase`, as written.
    pub phase: Option<String>,
    /// `status.activeSlot`.
    pub active_slot: Option<String>,
    /// `status.activeVersion`.
    pub active_version: Option<String>,
    /// `status.replicas`.
    pub replicas: Option<i32>,
    /// `status.readyReplicas`.
    pub ready_replicas: Option<i32>,
    /// `status.activeTemplateHash`.
    pub active_template_hash: Option<String>,
    /// `status.conditions`.
    pub conditions: Vec<Condition>,
    /// `status.rollout`.
    pub rollout: Option<RolloutView>,
    /// `status.backup` (no enumerations in it, so the API type is read as is).
    #[serde(deserialize_with = "lenient")]
    pub backup: Option<ClusterBackupStatus>,
}

/// `status.rollout`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RolloutView {
    /// Version being rolled out.
    pub target_version: String,
    /// Its pod template hash.
    pub target_template_hash: String,
    /// Slot it runs in.
    pub slot: String,
    /// Version serving when it started.
    pub from_version: Option<String>,
    /// Relays of the new slot.
    pub replicas: Option<i32>,
    /// Step, as written.
    pub step: String,
    /// Machine-readable reason of the step.
    pub reason: Option<String>,
    /// What is happening, for people.
    pub message: String,
    /// When the rollout started.
    pub started_at: Option<Time>,
    /// When the step started.
    pub step_started_at: Option<Time>,
    /// When traffic switched.
    pub promoted_at: Option<Time>,
}

impl RolloutView {
    /// The step as the API type, or `None` for a step this plugin does not know.
    pub fn known_step(&self) -> Option<RolloutStep> {
        serde_json::from_value(Value::String(self.step.clone())).ok()
    }

    /// Whether the rollout is still moving; an unknown step counts as moving, so a
    /// wait does not end on a step it cannot judge.
    pub fn in_flight(&self) -> bool {
        self.known_step().is_none_or(RolloutStep::in_flight)
    }

    /// The identity of this rollout: a later rollout has another start or target.
    pub fn identity(&self) -> (String, Option<String>) {
        (
            self.target_template_hash.clone(),
            self.started_at.as_ref().map(|t| t.0.to_string()),
        )
    }
}

/// Reads an optional value, or `None` when it does not have the expected shape (a
/// newer operator's), so one odd field does not hide the whole status.
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).ok())
}

impl ClusterView {
    /// Reads a DchatCluster from its JSON. Fails only when the object has no name or a
    /// `status` that is not an object at all.
    pub fn from_value(raw: Value) -> Result<ClusterView, Error> {
        let meta = &raw["metadata"];
        let name = meta["name"].as_str().unwrap_or_default().to_string();
        let namespace = meta["namespace"].as_str().unwrap_or_default().to_string();
        let what = || format!("DchatCluster {namespace}/{name}");
        if name.is_empty() {
            return Err(Error::Unreadable {
                what: "DchatCluster".into(),
                message: "the object has no metadata.name".into(),
            });
        }
        let annotations = meta["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let spec = serde_json::from_value(raw["spec"].clone()).map_err(|e| Error::Unreadable {
            what: what(),
            message: format!("spec: {e}"),
        })?;
        let status = match &raw["status"] {
            Value::Null => None,
            value => {
                Some(
                    serde_json::from_value(value.clone()).map_err(|e| Error::Unreadable {
                        what: what(),
                        message: format!("status: {e}"),
                    })?,
                )
            }
        };
        Ok(ClusterView {
            uid: meta["uid"].as_str().map(str::to_string),
            generation: meta["generation"].as_i64(),
            name,
            namespace,
            annotations,
            spec,
            status,
            raw,
        })
    }

    /// `status.phase`, or `None` before the operator wrote a status.
    pub fn phase(&self) -> Option<&str> {
        self.status.as_ref()?.phase.as_deref()
    }

    /// The condition of `type_`.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }

    /// `status.rollout`.
    pub fn rollout(&self) -> Option<&RolloutView> {
        self.status.as_ref()?.rollout.as_ref()
    }

    /// A typed DchatCluster with this one's name and namespace only, for the naming
    /// functions of `dchat_operator::labels` (so names are formatted in one place).
    pub fn stub(&self) -> DchatCluster {
        let mut stub = DchatCluster::new(&self.name, Default::default());
        stub.metadata.namespace = Some(self.namespace.clone());
        stub
    }

    /// The annotation `key`.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A DchatCluster serving 1.0 on blue, three relays, a schedule.
    pub(crate) fn running() -> Value {
        json!({
            "apiVersion": "dchat.network/v1alpha1", "kind": "DchatCluster",
            "metadata": {"name": "chat", "namespace": "prod", "uid": "u-1", "generation": 4,
                          "creationTimestamp": "2026-11-01T08:00:00Z"},
            "spec": {"version": "1.0", "replicas": 3,
                     "database": {"secretRef": {"name": "db"}},
                     "autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 10},
                     "backup": {"destination": {"s3": {"bucket": "b", "region": "eu-west-1"}},
                                "schedule": "0 */6 * * *"}},
            "status": {
                "observedGeneration": 4, "phase": "Running", "activeSlot": "blue",
                "activeVersion": "1.0", "replicas": 3, "readyReplicas": 3, "ready": "3/3",
                "activeTemplateHash": "aaaa1111bbbb2222",
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "AllRelaysReady",
                     "message": "3/3 relays ready", "lastTransitionTime": "2026-11-01T09:00:00Z"},
                    {"type": "Progressing", "status": "False", "reason": "Complete",
                     "message": "", "lastTransitionTime": "2026-11-01T09:00:00Z"},
                    {"type": "Degraded", "status": "False", "reason": "AsExpected",
                     "message": "", "lastTransitionTime": "2026-11-01T09:00:00Z"}
                ],
                "backup": {"lastSuccessfulBackup": "chat-20261101t060000z",
                           "lastSuccessfulBackupTime": "2026-11-01T06:01:00Z",
                           "nextScheduledAt": "2026-11-01T12:00:00Z"}
            }
        })
    }

    #[test]
    fn reads_a_running_cluster() {
        let view = ClusterView::from_value(running()).unwrap();
        assert_eq!(view.name, "chat");
        assert_eq!(view.namespace, "prod");
        assert_eq!(view.phase(), Some("Running"));
        assert_eq!(view.spec.replicas, Some(3));
        assert!(view.spec.autoscaling.as_ref().unwrap().enabled);
        assert_eq!(
            view.condition("Ready").map(|c| c.status.as_str()),
            Some("True")
        );
        let backup = view.status.unwrap().backup.unwrap();
        assert_eq!(
            backup.next_scheduled_at.unwrap().0.to_string(),
            "2026-11-01T12:00:00Z"
        );
    }

    #[test]
    fn a_phase_and_a_step_unknown_to_this_plugin_are_read_as_text() {
        let mut raw = running();
        raw["status"]["phase"] = json!("Hibernating");
        raw["status"]["rollout"] = json!({
            "targetVersion": "1.1", "targetTemplateHash": "h", "slot": "green",
            "replicas": 3, "step": "Canarying", "message": "a newer step",
            "startedAt": "2026-11-01T10:00:00Z", "stepStartedAt": "2026-11-01T10:01:00Z"
        });
        raw["status"]["someNewField"] = json!({"x": 1});
        let view = ClusterView::from_value(raw).unwrap();
        assert_eq!(view.phase(), Some("Hibernating"));
        let rollout = view.rollout().unwrap();
        assert_eq!(rollout.known_step(), None);
        assert!(
            rollout.in_flight(),
            "an unknown step is not taken for finished"
        );
    }

    #[test]
    fn known_steps_use_the_api_types_rules() {
        let rollout = RolloutView {
            step: "Complete".into(),
            ..RolloutView::default()
        };
        assert_eq!(rollout.known_step(), Some(RolloutStep::Complete));
        assert!(!rollout.in_flight());
    }

    #[test]
    fn a_cluster_without_status_has_no_phase() {
        let mut raw = running();
        raw.as_object_mut().unwrap().remove("status");
        let view = ClusterView::from_value(raw).unwrap();
        assert_eq!(view.phase(), None);
        assert!(view.rollout().is_none());
    }

    #[test]
    fn a_status_that_is_not_an_object_is_a_clear_error() {
        let mut raw = running();
        raw["status"] = json!("garbage");
        let error = ClusterView::from_value(raw).unwrap_err().to_string();
        assert!(
            error.starts_with("DchatCluster prod/chat: status:"),
            "{error}"
        );
    }
}

//! The life of one DchatBackup as a pure decision: from what the operator observed (the
//! backup, its cluster, its Job, the cluster's other backups) to the next step and the
//! status to write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;

use crate::api::{
    BackupCounts, BackupPhase, DchatBackup, DchatBackupStatus, DchatCluster, DeletionPolicy,
};

/// Finalizer on a DchatBackup while its data may need deleting with it.
pub const FINALIZER: &str = "dchat.network/backup-data";
/// Annotation retention sets before it deletes a backup: the data goes too, whatever
/// `deletionPolicy` says.
pub const PRUNE_ANNOTATION: &str = "dchat.network/prune";

/// What a backup Job's pod reported: the manifest `dchat backup create` writes as its
/// termination message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// `s3://bucket/key` of the snapshot object.
    pub location: String,
    /// Its size.
    pub size_bytes: u64,
    /// Its hex SHA-256, verified after the upload.
    pub sha256: String,
    /// What it holds.
    #[serde(default)]
    pub counts: ManifestCounts,
    /// Relay version that served the data.
    #[serde(default)]
    pub relay_version: Option<String>,
    /// `embedded` or `postgres`.
    #[serde(default)]
    pub store_kind: Option<String>,
    /// The RDS snapshot taken with it.
    #[serde(default)]
    pub rds_snapshot_identifier: Option<String>,
}

/// Record counts in a manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ManifestCounts {
    /// Stored messages.
    #[serde(default)]
    pub messages: u64,
    /// Dedup records.
    #[serde(default)]
    pub tombstones: u64,
    /// Profiles.
    #[serde(default)]
    pub profiles: u64,
    /// Channel memberships.
    #[serde(default)]
    pub memberships: u64,
}

/// How a backup's Job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// Not created (or already gone).
    Absent,
    /// Running (or waiting for its pod).
    Running,
    /// Finished successfully; the termination message of its pod, if found.
    Succeeded(Option<String>),
    /// Failed; the best description of why.
    Failed(String),
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The backup.
    pub backup: &'a DchatBackup,
    /// Its cluster, if it exists.
    pub cluster: Option<&'a DchatCluster>,
    /// Its create Job.
    pub job: JobOutcome,
    /// Another backup of the same cluster is Running, or Pending and older.
    pub another_first: bool,
    /// Now.
    pub now: Timestamp,
}

/// The next step.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing to do until something changes.
    Idle,
    /// Wait and look again (another backup first, the cluster not serving yet, the Job
    /// running).
    Wait(String),
    /// Create the Job and record Running.
    Start,
    /// Record this status (Completed or Failed).
    Finish(Box<DchatBackupStatus>),
}

/// The phase a backup's status records (Pending without status).
pub fn phase(backup: &DchatBackup) -> BackupPhase {
    backup.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// Decides the next step of a backup that is not being deleted.
pub fn decide(o: &Observed<'_>) -> Step {
    let status = o.backup.status.clone().unwrap_or_default();
    match status.phase {
        BackupPhase::Completed | BackupPhase::Failed => Step::Idle,
        BackupPhase::Pending => {
            let Some(cluster) = o.cluster else {
                return finish(failed(
                    status,
                    format!("DchatCluster {} not found", o.backup.spec.cluster.name),
                    o.now,
                ));
            };
            if cluster.spec.backup.is_none() {
                return finish(failed(
                    status,
                    format!(
                        "DchatCluster {} has no spec.backup: nowhere to write the backup",
                        cluster.name_any()
                    ),
                    o.now,
                ));
            }
            if o.another_first {
                return Step::Wait("another backup of the cluster runs first".into());
            }
            let serving = cluster
                .status
                .as_ref()
                .and_then(|s| s.active_version.as_ref());
            if serving.is_none() {
                return Step::Wait("waiting for the cluster to serve".into());
            }
            Step::Start
        }
        BackupPhase::Running => match &o.job {
            JobOutcome::Running => Step::Wait("the backup Job runs".into()),
            JobOutcome::Absent => finish(failed(
                status,
                "the backup Job disappeared before it finished".into(),
                o.now,
            )),
            JobOutcome::Failed(why) => finish(failed(status, why.clone(), o.now)),
            JobOutcome::Succeeded(message) => {
                match message.as_deref().map(serde_json::from_str::<Manifest>) {
                    Some(Ok(manifest)) => finish(completed(status, manifest, o.now)),
                    Some(Err(e)) => finish(failed(
                        status,
                        format!("the backup Job's result is not a manifest: {e}"),
                        o.now,
                    )),
                    None => finish(failed(
                        status,
                        "the backup Job succeeded but reported no manifest".into(),
                        o.now,
                    )),
                }
            }
        },
    }
}

fn finish(status: DchatBackupStatus) -> Step {
    Step::Finish(Box::new(status))
}

/// Whether deleting this backup must delete its data first.
pub fn deletes_data(backup: &DchatBackup) -> bool {
    backup.spec.deletion_policy == DeletionPolicy::Delete
        || backup.annotations().contains_key(PRUNE_ANNOTATION)
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, now: Timestamp) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: None,
        last_transition_time: Time(now),
    }
}

/// The status that shows why a Pending backup waits, or `None` when the backup is not
/// Pending or its status already says so (a wait writes nothing while it lasts).
pub fn waiting(backup: &DchatBackup, why: &str, now: Timestamp) -> Option<DchatBackupStatus> {
    let status = backup.status.clone().unwrap_or_default();
    if status.phase != BackupPhase::Pending {
        return None;
    }
    let says_so = backup.status.is_some()
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "Pending" && c.message == why);
    if says_so {
        return None;
    }
    Some(DchatBackupStatus {
        phase: BackupPhase::Pending,
        conditions: vec![
            condition("Ready", "False", "Pending", why, now),
            condition("Reconciling", "True", "Pending", why, now),
        ],
        ..status
    })
}

/// The status of a backup whose Job was just created.
pub fn running(status: DchatBackupStatus, job_name: String, now: Timestamp) -> DchatBackupStatus {
    DchatBackupStatus {
        phase: BackupPhase::Running,
        started_at: Some(Time(now)),
        job_name: Some(job_name.clone()),
        conditions: vec![
            condition(
                "Ready",
                "False",
                "Running",
                &format!("Job {job_name} runs"),
                now,
            ),
            condition(
                "Reconciling",
                "True",
                "Running",
                &format!("Job {job_name} runs"),
                now,
            ),
        ],
        ..status
    }
}

fn completed(status: DchatBackupStatus, m: Manifest, now: Timestamp) -> DchatBackupStatus {
    let message = format!(
        "{} bytes at {}, sha256 {}",
        m.size_bytes, m.location, m.sha256
    );
    DchatBackupStatus {
        phase: BackupPhase::Completed,
        completed_at: Some(Time(now)),
        location: Some(m.location),
        size_bytes: Some(m.size_bytes),
        sha256: Some(m.sha256),
        counts: Some(BackupCounts {
            messages: m.counts.messages,
            tombstones: m.counts.tombstones,
            profiles: m.counts.profiles,
            memberships: m.counts.memberships,
        }),
        relay_version: m.relay_version,
        store_kind: m.store_kind,
        rds_snapshot_identifier: m.rds_snapshot_identifier,
        error: None,
        conditions: vec![condition("Ready", "True", "Completed", &message, now)],
        ..status
    }
}

fn failed(status: DchatBackupStatus, why: String, now: Timestamp) -> DchatBackupStatus {
    DchatBackupStatus {
        phase: BackupPhase::Failed,
        completed_at: Some(Time(now)),
        conditions: vec![
            condition("Ready", "False", "Failed", &why, now),
            condition("Stalled", "True", "Failed", &why, now),
        ],
        error: Some(why),
        ..status
    }
}

/// The description of a failed Job: its pod's termination message (`{"error": …}` or
/// plain text), else the Job's own condition message.
pub fn failure_message(termination: Option<&str>, job_message: Option<&str>) -> String {
    #[derive(Deserialize)]
    struct Reported {
        error: String,
    }
    if let Some(text) = termination.map(str::trim).filter(|t| !t.is_empty()) {
        return match serde_json::from_str::<Reported>(text) {
            Ok(r) => r.error,
            Err(_) => text.chars().take(1000).collect(),
        };
    }
    job_message
        .map(str::to_string)
        .unwrap_or_else(|| "the backup Job failed without a message".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClusterReference, DchatBackupSpec, DchatClusterStatus};
    use crate::testing::cluster_from_yaml;

    fn now() -> Timestamp {
        "2026-12-06T12:00:00Z".parse().unwrap()
    }

    fn backup(phase: Option<BackupPhase>) -> DchatBackup {
        let mut b = DchatBackup::new(
            "b1",
            DchatBackupSpec {
                cluster: ClusterReference {
                    name: "chat".into(),
                },
                deletion_policy: DeletionPolicy::Retain,
            },
        );
        b.status = phase.map(|phase| DchatBackupStatus {
            phase,
            job_name: Some("b1-backup-x".into()),
            ..Default::default()
        });
        b
    }

    #[test]
    fn a_waiting_backup_says_why_once() {
        let fresh = backup(None);
        let status = waiting(&fresh, "waiting for the cluster to serve", now()).unwrap();
        assert_eq!(status.phase, BackupPhase::Pending);
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.message.as_str()
            ),
            ("False", "Pending", "waiting for the cluster to serve")
        );
        let mut recorded = fresh.clone();
        recorded.status = Some(status);
        assert_eq!(
            waiting(&recorded, "waiting for the cluster to serve", now()),
            None
        );
        let next = waiting(&recorded, "another backup of the cluster runs first", now())
            .expect("a new reason is written");
        assert!(next
            .conditions
            .iter()
            .any(|c| c.message == "another backup of the cluster runs first"));
        assert_eq!(
            waiting(
                &backup(Some(BackupPhase::Running)),
                "the backup Job runs",
                now()
            ),
            None
        );
    }

    fn serving_cluster() -> DchatCluster {
        let mut c = cluster_from_yaml(
            "version: '1'\nbackup: {destination: {s3: {bucket: bkt, region: eu-west-1}}}",
        );
        c.status = Some(DchatClusterStatus {
            active_version: Some("1".into()),
            ..Default::default()
        });
        c
    }

    const MANIFEST: &str = r#"{"formatVersion":1,"cluster":"chat","namespace":"apps","backup":"b1","location":"s3://bkt/apps/chat/b1/data.dchat","sizeBytes":4096,"sha256":"ab12","counts":{"messages":7,"tombstones":1,"profiles":2,"memberships":3},"relayVersion":"1","storeKind":"embedded"}"#;

    #[test]
    fn lifecycle_table() {
        let cluster = serving_cluster();
        let mut unconfigured = cluster.clone();
        unconfigured.spec.backup = None;
        let mut not_serving = cluster.clone();
        not_serving.status = None;
        let observe =
            |b: &DchatBackup, c: Option<&DchatCluster>, job: JobOutcome, another: bool| {
                decide(&Observed {
                    backup: &b.clone(),
                    cluster: c,
                    job,
                    another_first: another,
                    now: now(),
                })
            };
        let pending = backup(None);
        assert_eq!(
            observe(&pending, Some(&cluster), JobOutcome::Absent, false),
            Step::Start
        );
        assert!(matches!(
            observe(&pending, Some(&cluster), JobOutcome::Absent, true),
            Step::Wait(w) if w.contains("another backup")
        ));
        assert!(matches!(
            observe(&pending, Some(&not_serving), JobOutcome::Absent, false),
            Step::Wait(w) if w.contains("serve")
        ));
        let Step::Finish(s) = observe(&pending, None, JobOutcome::Absent, false) else {
            panic!()
        };
        assert_eq!(s.phase, BackupPhase::Failed);
        assert!(s.error.unwrap().contains("DchatCluster chat not found"));
        let Step::Finish(s) = observe(&pending, Some(&unconfigured), JobOutcome::Absent, false)
        else {
            panic!()
        };
        assert!(s.error.unwrap().contains("no spec.backup"));

        let running = backup(Some(BackupPhase::Running));
        assert!(matches!(
            observe(&running, Some(&cluster), JobOutcome::Running, false),
            Step::Wait(_)
        ));
        let Step::Finish(s) = observe(
            &running,
            Some(&cluster),
            JobOutcome::Succeeded(Some(MANIFEST.into())),
            false,
        ) else {
            panic!()
        };
        assert_eq!(s.phase, BackupPhase::Completed);
        assert_eq!(s.size_bytes, Some(4096));
        assert_eq!(
            s.location.as_deref(),
            Some("s3://bkt/apps/chat/b1/data.dchat")
        );
        assert_eq!(s.counts.as_ref().unwrap().memberships, 3);
        assert_eq!(s.store_kind.as_deref(), Some("embedded"));
        assert_eq!(s.job_name.as_deref(), Some("b1-backup-x"), "kept");
        assert_eq!(s.conditions[0].status, "True");

        for (job, phrase) in [
            (
                JobOutcome::Failed("S3 access denied".into()),
                "S3 access denied",
            ),
            (JobOutcome::Absent, "disappeared"),
            (JobOutcome::Succeeded(None), "no manifest"),
            (
                JobOutcome::Succeeded(Some("{oops".into())),
                "not a manifest",
            ),
        ] {
            let Step::Finish(s) = observe(&running, Some(&cluster), job, false) else {
                panic!()
            };
            assert_eq!(s.phase, BackupPhase::Failed);
            assert!(s.error.as_deref().unwrap().contains(phrase), "{s:?}");
            assert!(s.conditions.iter().any(|c| c.type_ == "Stalled"));
        }
        for phase in [BackupPhase::Completed, BackupPhase::Failed] {
            assert_eq!(
                observe(
                    &backup(Some(phase)),
                    Some(&cluster),
                    JobOutcome::Absent,
                    false
                ),
                Step::Idle
            );
        }
    }

    #[test]
    fn failure_messages_prefer_what_the_pod_said() {
        assert_eq!(
            failure_message(
                Some(r#"{"error":"bucket missing"}"#),
                Some("BackoffLimitExceeded")
            ),
            "bucket missing"
        );
        assert_eq!(failure_message(Some("panic: boom\n"), None), "panic: boom");
        assert_eq!(
            failure_message(None, Some("Job has reached the specified backoff limit")),
            "Job has reached the specified backoff limit"
        );
        assert!(failure_message(None, None).contains("without a message"));
    }

    #[test]
    fn pruning_and_delete_policy_delete_data() {
        let mut b = backup(Some(BackupPhase::Completed));
        assert!(!deletes_data(&b));
        b.spec.deletion_policy = DeletionPolicy::Delete;
        assert!(deletes_data(&b));
        b.spec.deletion_policy = DeletionPolicy::Retain;
        b.metadata.annotations =
            Some([(PRUNE_ANNOTATION.to_string(), "retention".to_string())].into());
        assert!(deletes_data(&b));
    }
}

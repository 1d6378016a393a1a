//! Restoring a new cluster from a backup (`spec.bootstrap.recovery`), as pure decisions:
//! whether a restore is due, where the backup is, and the status that follows from the
//! restore Job.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::job::backup_path;
use super::lifecycle::JobOutcome;
use crate::api::{BackupDestination, DchatBackup, DchatCluster, RestorePhase, RestoreStatus};

/// What `spec.bootstrap.recovery` asks of this reconcile.
#[derive(Clone, Debug, PartialEq)]
pub enum RestorePlan {
    /// Nothing: no recovery asked, the cluster already served, or the restore is done.
    NotNeeded,
    /// A recovery is asked but cannot run; the message says why (names the field).
    Impossible(String),
    /// Restore this backup from this bucket.
    Restore {
        /// The bucket.
        destination: BackupDestination,
        /// `<namespace>/<cluster>/<backup>`.
        backup_path: String,
    },
}

/// Whether a restore is due for `cluster`; `referenced` is the DchatBackup that
/// `recovery.backup.name` names, as read (`None` when it does not exist or is not named).
pub fn plan(cluster: &DchatCluster, referenced: Option<&DchatBackup>) -> RestorePlan {
    let Some(recovery) = cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|b| b.recovery.as_ref())
    else {
        return RestorePlan::NotNeeded;
    };
    let status = cluster.status.clone().unwrap_or_default();
    // Only a new cluster restores: one that served has data of its own.
    if status.active_version.is_some()
        || status
            .restore
            .as_ref()
            .is_some_and(|r| r.phase == RestorePhase::Completed)
    {
        return RestorePlan::NotNeeded;
    }
    if let Some(source) = &recovery.source {
        return RestorePlan::Restore {
            destination: source.destination.clone(),
            backup_path: source.backup_path.clone(),
        };
    }
    let Some(reference) = &recovery.backup else {
        return RestorePlan::Impossible(
            "spec.bootstrap.recovery: name a backup or a source".into(),
        );
    };
    let Some(destination) = cluster.spec.backup.as_ref().map(|b| b.destination.clone()) else {
        return RestorePlan::Impossible(
            "spec.bootstrap.recovery.backup: the bucket is spec.backup.destination, which is not set; set it or use recovery.source".into(),
        );
    };
    let Some(backup) = referenced else {
        return RestorePlan::Impossible(format!(
            "spec.bootstrap.recovery.backup.name: DchatBackup {} not found in this namespace",
            reference.name
        ));
    };
    if backup.status.as_ref().map(|s| s.phase) != Some(crate::api::BackupPhase::Completed) {
        return RestorePlan::Impossible(format!(
            "spec.bootstrap.recovery.backup.name: DchatBackup {} is not Completed",
            reference.name
        ));
    }
    RestorePlan::Restore {
        destination,
        backup_path: backup_path(
            &backup.namespace().unwrap_or_default(),
            &backup.spec.cluster.name,
            &backup.name_any(),
        ),
    }
}

/// The restore status after observing its Job (`None` for the Job: not created yet).
pub fn status(
    previous: Option<&RestoreStatus>,
    backup_path: &str,
    job_name: &str,
    job: &JobOutcome,
    now: Timestamp,
) -> RestoreStatus {
    let base = RestoreStatus {
        backup_path: backup_path.to_string(),
        phase: RestorePhase::Running,
        job_name: Some(job_name.to_string()),
        ..Default::default()
    };
    match job {
        JobOutcome::Absent | JobOutcome::Running => base,
        JobOutcome::Succeeded(_) => RestoreStatus {
            phase: RestorePhase::Completed,
            completed_at: previous
                .and_then(|p| p.completed_at.clone())
                .or(Some(Time(now))),
            ..base
        },
        JobOutcome::Failed(why) => RestoreStatus {
            phase: RestorePhase::Failed,
            completed_at: previous
                .and_then(|p| p.completed_at.clone())
                .or(Some(Time(now))),
            error: Some(why.clone()),
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        BackupPhase, ClusterReference, DchatBackupSpec, DchatBackupStatus, DchatClusterStatus,
        DeletionPolicy,
    };
    use crate::testing::cluster_from_yaml;

    const S3: &str = "destination: {s3: {bucket: bkt, region: eu-west-1}}";

    fn completed(name: &str, of: &str) -> DchatBackup {
        let mut b = DchatBackup::new(
            name,
            DchatBackupSpec {
                cluster: ClusterReference { name: of.into() },
                deletion_policy: DeletionPolicy::Retain,
            },
        );
        b.metadata.namespace = Some("apps".into());
        b.status = Some(DchatBackupStatus {
            phase: BackupPhase::Completed,
            ..Default::default()
        });
        b
    }

    #[test]
    fn plan_table() {
        let by_name = cluster_from_yaml(&format!(
            "version: '1'\nbackup: {{{S3}}}\nbootstrap: {{recovery: {{backup: {{name: old-1}}}}}}"
        ));
        let backup = completed("old-1", "old-cluster");
        assert_eq!(
            plan(&by_name, Some(&backup)),
            RestorePlan::Restore {
                destination: by_name.spec.backup.clone().unwrap().destination,
                backup_path: "apps/old-cluster/old-1".into()
            }
        );
        assert!(
            matches!(plan(&by_name, None), RestorePlan::Impossible(m) if m.contains("not found"))
        );
        let mut running = backup.clone();
        running.status.as_mut().unwrap().phase = BackupPhase::Running;
        assert!(
            matches!(plan(&by_name, Some(&running)), RestorePlan::Impossible(m) if m.contains("not Completed"))
        );

        let no_destination =
            cluster_from_yaml("version: '1'\nbootstrap: {recovery: {backup: {name: old-1}}}");
        assert!(
            matches!(plan(&no_destination, Some(&backup)), RestorePlan::Impossible(m) if m.contains("spec.backup.destination"))
        );

        let by_path = cluster_from_yaml(&format!(
            "version: '1'\nbootstrap: {{recovery: {{source: {{{S3}, backupPath: prod/chat/chat-20261206t120000z}}}}}}"
        ));
        assert!(
            matches!(plan(&by_path, None), RestorePlan::Restore { backup_path, .. } if backup_path == "prod/chat/chat-20261206t120000z")
        );

        // A cluster that served, or restored, never restores again.
        let mut served = by_path.clone();
        served.status = Some(DchatClusterStatus {
            active_version: Some("1".into()),
            ..Default::default()
        });
        assert_eq!(plan(&served, None), RestorePlan::NotNeeded);
        let mut restored = by_path.clone();
        restored.status = Some(DchatClusterStatus {
            restore: Some(RestoreStatus {
                phase: RestorePhase::Completed,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(plan(&restored, None), RestorePlan::NotNeeded);
        assert_eq!(
            plan(&cluster_from_yaml("version: '1'"), None),
            RestorePlan::NotNeeded
        );
    }

    #[test]
    fn status_follows_the_job() {
        let now: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let s = status(None, "a/b/c", "j", &JobOutcome::Running, now);
        assert_eq!(s.phase, RestorePhase::Running);
        let s = status(None, "a/b/c", "j", &JobOutcome::Succeeded(None), now);
        assert_eq!(s.phase, RestorePhase::Completed);
        let s = status(
            None,
            "a/b/c",
            "j",
            &JobOutcome::Failed("sha256 mismatch".into()),
            now,
        );
        assert_eq!(
            (s.phase, s.error.as_deref()),
            (RestorePhase::Failed, Some("sha256 mismatch"))
        );
    }
}

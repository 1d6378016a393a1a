//! Restore drills (`spec.backup.verify`): which backup a drill restores, its Job (`dchat
//! backup verify` into a scratch store), and what its report becomes.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;

use super::job::{backup_path, drill_job, DrillRequest};
use super::lifecycle::JobOutcome;
use crate::api::{BackupCounts, BackupPhase, DchatBackup, DchatCluster, Verification};

/// Where the scratch store lives in the drill's pod (an emptyDir: the root filesystem is
/// read-only).
pub const SCRATCH_DIR: &str = "/scratch";

/// The newest Completed backup, which a drill restores.
pub fn newest_completed(backups: &[DchatBackup]) -> Option<&DchatBackup> {
    backups
        .iter()
        .filter(|b| b.status.as_ref().map(|s| s.phase) == Some(BackupPhase::Completed))
        .max_by_key(|b| {
            (
                b.status
                    .as_ref()
                    .and_then(|s| s.completed_at.as_ref())
                    .map(|t| t.0),
                b.name_any(),
            )
        })
}

/// The drill Job for `backup`, started for the schedule's time `at`.
pub fn verify_job(
    cluster: &DchatCluster,
    backup: &DchatBackup,
    version: &str,
    at: Timestamp,
) -> Option<Job> {
    let namespace = backup.namespace()?;
    let path = backup_path(&namespace, &backup.spec.cluster.name, &backup.name_any());
    let mut job = drill_job(&DrillRequest {
        cluster,
        backup,
        version,
        backup_path: &path,
        scratch_dir: SCRATCH_DIR,
        stamp: &at.strftime("%Y%m%dt%H%M%Sz").to_string(),
    })?;
    let pod = job.spec.as_mut()?.template.spec.as_mut()?;
    pod.volumes = Some(vec![Volume {
        name: "scratch".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }]);
    for container in &mut pod.containers {
        container.volume_mounts = Some(vec![VolumeMount {
            name: "scratch".into(),
            mount_path: SCRATCH_DIR.into(),
            ..VolumeMount::default()
        }]);
    }
    Some(job)
}

/// `dchat backup verify`'s report (its termination message).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    ok: bool,
    #[serde(default)]
    restore_seconds: Option<f64>,
    #[serde(default)]
    counts: Option<BackupCounts>,
    #[serde(default)]
    error: Option<String>,
}

/// What a finished drill of `backup` says; `None` while it runs.
pub fn verification(backup: &str, outcome: &JobOutcome, now: Timestamp) -> Option<Verification> {
    let base = Verification {
        backup: backup.to_string(),
        verified_at: Time(now),
        passed: false,
        restore_seconds: None,
        counts: None,
        error: None,
    };
    match outcome {
        JobOutcome::Absent | JobOutcome::Running => None,
        JobOutcome::Succeeded(message) => Some(
            match message.as_deref().map(serde_json::from_str::<Report>) {
                Some(Ok(report)) => Verification {
                    passed: report.ok,
                    restore_seconds: report.restore_seconds,
                    counts: report.counts,
                    error: report.error,
                    ..base
                },
                _ => Verification {
                    error: Some("the drill reported no result".into()),
                    ..base
                },
            },
        ),
        JobOutcome::Failed(why) => Some(Verification {
            error: Some(why.clone()),
            ..base
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClusterReference, DchatBackupSpec, DchatBackupStatus, DeletionPolicy};
    use crate::testing::cluster_from_yaml;

    fn backup(name: &str, phase: BackupPhase, at: i64) -> DchatBackup {
        let mut b = DchatBackup::new(
            name,
            DchatBackupSpec {
                cluster: ClusterReference {
                    name: "chat".into(),
                },
                deletion_policy: DeletionPolicy::Retain,
            },
        );
        b.metadata.namespace = Some("apps".into());
        b.metadata.uid = Some(format!("uid-{name}"));
        b.status = Some(DchatBackupStatus {
            phase,
            completed_at: Some(Time(Timestamp::from_second(at).unwrap())),
            ..Default::default()
        });
        b
    }

    #[test]
    fn the_newest_completed_backup_is_drilled() {
        let backups = vec![
            backup("a", BackupPhase::Completed, 100),
            backup("b", BackupPhase::Completed, 300),
            backup("c", BackupPhase::Failed, 400),
        ];
        assert_eq!(newest_completed(&backups).unwrap().name_any(), "b");
        assert!(newest_completed(&backups[2..]).is_none());
    }

    #[test]
    fn the_job_verifies_into_a_scratch_volume() {
        let cluster = cluster_from_yaml(
            "version: '1'\nbackup: {destination: {s3: {bucket: bkt, region: eu-west-1}}, verify: {schedule: '0 3 * * 0'}}",
        );
        let b = backup("chat-20261206t120000z", BackupPhase::Completed, 100);
        let job = verify_job(
            &cluster,
            &b,
            "1",
            Timestamp::from_second(1_796_558_400).unwrap(),
        )
        .unwrap();
        let spec = job.spec.unwrap();
        assert_eq!(
            spec.backoff_limit,
            Some(0),
            "a failed drill is a result, not retried"
        );
        let pod = spec.template.spec.unwrap();
        let command = pod.containers[0].command.clone().unwrap().join(" ");
        assert!(
            command.contains("backup verify --backup-path apps/chat/chat-20261206t120000z --scratch-dir /scratch"),
            "{command}"
        );
        assert_eq!(pod.volumes.unwrap()[0].name, "scratch");
        assert_eq!(
            job.metadata.owner_references.unwrap()[0].kind,
            "DchatBackup"
        );
    }

    #[test]
    fn reports_become_verifications() {
        let now = Timestamp::from_second(1_000).unwrap();
        let ok = verification(
            "b",
            &JobOutcome::Succeeded(Some(r#"{"backup":"apps/chat/b","ok":true,"restoreSeconds":1.25,"counts":{"messages":3,"tombstones":0,"profiles":1,"memberships":2}}"#.into())),
            now,
        )
        .unwrap();
        assert!(ok.passed);
        assert_eq!(ok.restore_seconds, Some(1.25));
        assert_eq!(ok.counts.unwrap().memberships, 2);
        let failed = verification("b", &JobOutcome::Failed("sha256 mismatch".into()), now).unwrap();
        assert!(!failed.passed);
        assert_eq!(failed.error.as_deref(), Some("sha256 mismatch"));
        assert!(verification("b", &JobOutcome::Running, now).is_none());
    }
}

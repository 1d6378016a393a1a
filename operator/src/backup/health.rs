//! What a DchatCluster's status says about its backups: the `status.backup` summary and
//! the `BackupHealthy` condition, from its DchatBackups (pure).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::cron::Cron;
use crate::api::{BackupPhase, ClusterBackupStatus, DchatBackup, Verification};

/// Reasons of the `BackupHealthy` condition.
pub mod reason {
    /// The newest backup completed recently enough.
    pub const HEALTHY: &str = "BackupsHealthy";
    /// No backup has completed yet.
    pub const NO_BACKUP_YET: &str = "NoBackupYet";
    /// The newest finished backup failed.
    pub const LAST_BACKUP_FAILED: &str = "LastBackupFailed";
    /// No backup completed within twice the schedule's interval.
    pub const TOO_OLD: &str = "TooOld";
    /// The last restore drill of the newest Completed backup failed.
    pub const VERIFICATION_FAILED: &str = "VerificationFailed";
}

/// The `BackupHealthy` condition: status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// True when backups are healthy.
    pub healthy: bool,
    /// One of [`reason`].
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

fn taken_at(backup: &DchatBackup) -> Option<Timestamp> {
    backup
        .status
        .as_ref()
        .and_then(|s| s.completed_at.as_ref().or(s.started_at.as_ref()))
        .or(backup.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

fn phase(backup: &DchatBackup) -> BackupPhase {
    backup.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// The longest gap between two runs of `cron` over a year (for "too old"): the longest,
/// so a weekday schedule is not "too old" after a weekend; from a fixed start, so the
/// answer (and the alert built from it) never changes with the time it is asked.
pub fn interval(cron: &Cron) -> Option<Duration> {
    // 2026-01-05T00:00:00Z, a Monday.
    let start = Timestamp::from_second(1_767_571_200).ok()?;
    let end = Timestamp::from_second(1_767_571_200 + 366 * 24 * 3600).ok()?;
    let mut previous = cron.next_after(start)?;
    let mut longest = Duration::ZERO;
    // A minute schedule has half a million runs a year; the longest gap of anything that
    // frequent is known long before the end.
    for _ in 0..20_000 {
        let Some(next) = cron.next_after(previous) else {
            break;
        };
        longest = longest.max(next.duration_since(previous).unsigned_abs());
        if next > end {
            break;
        }
        previous = next;
    }
    (longest > Duration::ZERO).then_some(longest)
}

/// `status.backup` of a cluster from its backups (any order) and its schedule state.
pub fn summary(
    backups: &[DchatBackup],
    last_schedule_time: Option<Timestamp>,
    next_scheduled_at: Option<Timestamp>,
) -> ClusterBackupStatus {
    let mut sorted: Vec<&DchatBackup> = backups.iter().collect();
    sorted.sort_by_key(|b| (taken_at(b), b.name_any()));
    let completed: Vec<&&DchatBackup> = sorted
        .iter()
        .filter(|b| phase(b) == BackupPhase::Completed)
        .collect();
    ClusterBackupStatus {
        last_backup: sorted.last().map(|b| b.name_any()),
        last_successful_backup: completed.last().map(|b| b.name_any()),
        last_successful_backup_time: completed.last().and_then(|b| taken_at(b)).map(Time),
        first_recoverability_point: completed.first().and_then(|b| taken_at(b)).map(Time),
        last_schedule_time: last_schedule_time.map(Time),
        next_scheduled_at: next_scheduled_at.map(Time),
        ..ClusterBackupStatus::default()
    }
}

/// The `BackupHealthy` condition: the newest finished backup failed → unhealthy; no
/// Completed backup yet → unhealthy (`NoBackupYet`); with a schedule, none Completed
/// within twice its interval → unhealthy (`TooOld`).
pub fn health(
    backups: &[DchatBackup],
    schedule: Option<&Cron>,
    last_verification: Option<&Verification>,
    now: Timestamp,
) -> Health {
    let mut finished: Vec<&DchatBackup> = backups
        .iter()
        .filter(|b| matches!(phase(b), BackupPhase::Completed | BackupPhase::Failed))
        .collect();
    finished.sort_by_key(|b| (taken_at(b), b.name_any()));
    let newest_completed = finished
        .iter()
        .rev()
        .find(|b| phase(b) == BackupPhase::Completed);
    if let Some(last) = finished.last().filter(|b| phase(b) == BackupPhase::Failed) {
        let why = last
            .status
            .as_ref()
            .and_then(|s| s.error.clone())
            .unwrap_or_default();
        return Health {
            healthy: false,
            reason: reason::LAST_BACKUP_FAILED,
            message: format!("backup {} failed: {why}", last.name_any()),
        };
    }
    let Some(newest) = newest_completed else {
        return Health {
            healthy: false,
            reason: reason::NO_BACKUP_YET,
            message: "no backup has completed yet".into(),
        };
    };
    if let Some(v) = last_verification.filter(|v| !v.passed && v.backup == newest.name_any()) {
        return Health {
            healthy: false,
            reason: reason::VERIFICATION_FAILED,
            message: format!(
                "the restore drill of backup {} failed: {}",
                v.backup,
                v.error.as_deref().unwrap_or("no reason given")
            ),
        };
    }
    let when = taken_at(newest).unwrap_or(now);
    if let Some(every) = schedule.and_then(interval) {
        let age = now.duration_since(when).unsigned_abs();
        if age > 2 * every {
            return Health {
                healthy: false,
                reason: reason::TOO_OLD,
                message: format!(
                    "the newest completed backup, {}, is from {when}: older than twice the schedule's interval",
                    newest.name_any()
                ),
            };
        }
    }
    Health {
        healthy: true,
        reason: reason::HEALTHY,
        message: format!("backup {} completed at {when}", newest.name_any()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClusterReference, DchatBackupSpec, DchatBackupStatus, DeletionPolicy};

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn backup(name: &str, phase: BackupPhase, when: &str) -> DchatBackup {
        let mut b = DchatBackup::new(
            name,
            DchatBackupSpec {
                cluster: ClusterReference {
                    name: "chat".into(),
                },
                deletion_policy: DeletionPolicy::Retain,
            },
        );
        b.status = Some(DchatBackupStatus {
            phase,
            completed_at: Some(Time(at(when))),
            error: (phase == BackupPhase::Failed).then(|| "access denied".to_string()),
            ..Default::default()
        });
        b
    }

    #[test]
    fn health_table() {
        let six_hourly: Cron = "0 */6 * * *".parse().unwrap();
        let now = at("2026-12-06T12:30:00Z");
        let ok = backup("a", BackupPhase::Completed, "2026-12-06T12:05:00Z");
        let failed = backup("b", BackupPhase::Failed, "2026-12-06T12:10:00Z");
        let old = backup("c", BackupPhase::Completed, "2026-12-05T20:00:00Z");
        let running = backup("d", BackupPhase::Running, "2026-12-06T12:20:00Z");
        for (name, backups, expected) in [
            ("none", vec![], reason::NO_BACKUP_YET),
            ("only running", vec![running.clone()], reason::NO_BACKUP_YET),
            (
                "fresh",
                vec![old.clone(), ok.clone(), running.clone()],
                reason::HEALTHY,
            ),
            (
                "newest finished failed",
                vec![ok.clone(), failed.clone()],
                reason::LAST_BACKUP_FAILED,
            ),
            (
                "16.5 h old on a 6 h schedule",
                vec![old.clone()],
                reason::TOO_OLD,
            ),
        ] {
            let h = health(&backups, Some(&six_hourly), None, now);
            assert_eq!(h.reason, expected, "{name}: {h:?}");
            assert_eq!(h.healthy, expected == reason::HEALTHY, "{name}");
        }
        // On demand only: age alone is no problem.
        assert!(health(std::slice::from_ref(&old), None, None, now).healthy);
        let failed_message = health(&[failed], None, None, now).message;
        let drill = Verification {
            backup: "a".into(),
            verified_at: Time(now),
            passed: false,
            restore_seconds: None,
            counts: None,
            error: Some("sha256 mismatch".into()),
        };
        let h = health(std::slice::from_ref(&ok), None, Some(&drill), now);
        assert_eq!(h.reason, reason::VERIFICATION_FAILED);
        assert!(h.message.contains("sha256 mismatch"));
        assert!(failed_message.contains("access denied"), "{failed_message}");
    }

    #[test]
    fn interval_is_the_longest_gap() {
        let every = |c: &str| interval(&c.parse::<Cron>().unwrap()).unwrap().as_secs();
        assert_eq!(every("0 */6 * * *"), 6 * 3600);
        assert_eq!(every("* * * * *"), 60);
        // Friday 03:00 to Monday 03:00.
        assert_eq!(every("0 3 * * 1-5"), 72 * 3600);
        assert!(interval(&"0 0 30 2 *".parse::<Cron>().unwrap()).is_none());
    }

    #[test]
    fn summary_names_newest_and_oldest() {
        let backups = vec![
            backup("mid", BackupPhase::Completed, "2026-12-05T12:00:00Z"),
            backup("newest-failed", BackupPhase::Failed, "2026-12-06T12:00:00Z"),
            backup("oldest", BackupPhase::Completed, "2026-12-01T12:00:00Z"),
        ];
        let s = summary(
            &backups,
            Some(at("2026-12-06T12:00:00Z")),
            Some(at("2026-12-06T18:00:00Z")),
        );
        assert_eq!(s.last_backup.as_deref(), Some("newest-failed"));
        assert_eq!(s.last_successful_backup.as_deref(), Some("mid"));
        assert_eq!(
            s.first_recoverability_point,
            Some(Time(at("2026-12-01T12:00:00Z")))
        );
        assert_eq!(s.next_scheduled_at, Some(Time(at("2026-12-06T18:00:00Z"))));
    }
}

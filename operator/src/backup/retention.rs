//! Which backups retention deletes: a pure decision over a cluster's backups.
//!
//! A Completed backup is pruned only when it is older than `maxAge` and more than
//! `minKeep` newer Completed backups exist; the newest Completed backup is never pruned.
//! A Failed backup is pruned after 7 days. Pending and Running backups, and backups a
//! restore is reading, are never pruned.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::BackupPhase;

/// How long a Failed backup stays for inspection.
pub const FAILED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// What retention needs to know of one backup.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupFacts {
    /// Object name.
    pub name: String,
    /// Its phase.
    pub phase: BackupPhase,
    /// When it was taken: completion time when known, else creation time.
    pub taken_at: Timestamp,
    /// A restore (bootstrap recovery, a verification) reads it now.
    pub in_use: bool,
}

/// The names of the backups to prune, oldest first.
pub fn prune(
    backups: &[BackupFacts],
    max_age: Duration,
    min_keep: u32,
    now: Timestamp,
) -> Vec<String> {
    let age = |b: &BackupFacts| now.duration_since(b.taken_at).unsigned_abs();
    let mut completed: Vec<&BackupFacts> = backups
        .iter()
        .filter(|b| b.phase == BackupPhase::Completed)
        .collect();
    // Newest first; equal times by name, so the decision does not depend on list order.
    completed.sort_by(|a, b| b.taken_at.cmp(&a.taken_at).then(b.name.cmp(&a.name)));
    let mut pruned: Vec<&BackupFacts> = completed
        .iter()
        .enumerate()
        .filter(|(newer, b)| {
            *newer > 0 && *newer > min_keep as usize && age(b) > max_age && !b.in_use
        })
        .map(|(_, b)| *b)
        .collect();
    pruned.extend(
        backups
            .iter()
            .filter(|b| b.phase == BackupPhase::Failed && age(b) > FAILED_RETENTION && !b.in_use),
    );
    pruned.sort_by(|a, b| a.taken_at.cmp(&b.taken_at).then(a.name.cmp(&b.name)));
    pruned.into_iter().map(|b| b.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn backup(name: &str, phase: BackupPhase, days_ago: i64) -> BackupFacts {
        BackupFacts {
            name: name.into(),
            phase,
            taken_at: now() - k8s_openapi::jiff::SignedDuration::from_hours(24 * days_ago),
            in_use: false,
        }
    }

    fn now() -> Timestamp {
        "2026-12-06T12:00:00Z".parse().unwrap()
    }

    use BackupPhase::{Completed, Failed, Pending, Running};

    #[test]
    fn retention_table() {
        struct Case {
            name: &'static str,
            backups: Vec<BackupFacts>,
            max_age_days: u64,
            min_keep: u32,
            pruned: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "nothing old enough",
                backups: vec![backup("a", Completed, 1), backup("b", Completed, 2)],
                max_age_days: 30,
                min_keep: 1,
                pruned: vec![],
            },
            Case {
                name: "old ones go once more than minKeep newer exist",
                backups: (0..8)
                    .map(|i| {
                        backup(
                            ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"][i],
                            Completed,
                            10 * i as i64,
                        )
                    })
                    .collect(),
                max_age_days: 30,
                min_keep: 3,
                // b4 (40 days) has 4 newer, more than 3: pruned; b3 (30 days) is not older
                // than 30 days.
                pruned: vec!["b7", "b6", "b5", "b4"],
            },
            Case {
                name: "old but too few newer: kept",
                backups: vec![backup("new", Completed, 1), backup("old", Completed, 90)],
                max_age_days: 30,
                min_keep: 1,
                pruned: vec![],
            },
            Case {
                name: "the newest Completed is never pruned, however old",
                backups: vec![backup("only", Completed, 400), backup("f", Failed, 1)],
                max_age_days: 30,
                min_keep: 1,
                pruned: vec![],
            },
            Case {
                name: "failed backups go after 7 days; running and pending never",
                backups: vec![
                    backup("ok", Completed, 1),
                    backup("failed-new", Failed, 6),
                    backup("failed-old", Failed, 8),
                    backup("running", Running, 60),
                    backup("pending", Pending, 60),
                ],
                max_age_days: 30,
                min_keep: 1,
                pruned: vec!["failed-old"],
            },
            Case {
                name: "a backup in use by a restore stays",
                backups: vec![
                    backup("n0", Completed, 1),
                    backup("n1", Completed, 2),
                    backup("n2", Completed, 3),
                    BackupFacts {
                        in_use: true,
                        ..backup("restoring", Completed, 90)
                    },
                    backup("gone", Completed, 91),
                ],
                max_age_days: 30,
                min_keep: 1,
                pruned: vec!["gone"],
            },
        ];
        for case in cases {
            let pruned = prune(
                &case.backups,
                case.max_age_days as u32 * DAY,
                case.min_keep,
                now(),
            );
            assert_eq!(pruned, case.pruned, "{}", case.name);
        }
    }
}

//! When the schedule creates a backup: a pure decision from the cron expression, the
//! last scheduled time and what runs now.
//!
//! Missed runs (the operator was down, the API server unreachable) cause at most one
//! catch-up backup, for the latest missed time — never a burst. A run that comes due
//! while another backup of the cluster runs is skipped (and said in an Event), not
//! queued.

use k8s_openapi::jiff::Timestamp;

use super::cron::Cron;

/// What the schedule knows.
#[derive(Clone, Debug)]
pub struct ScheduleInput<'a> {
    /// The schedule.
    pub cron: &'a Cron,
    /// When the schedule last fired (created or skipped a backup); `None` before the
    /// first time.
    pub last_scheduled: Option<Timestamp>,
    /// Where counting starts before the first run: the time the schedule was first
    /// seen (the cluster's creation), so a new schedule does not fire for the past.
    pub since: Timestamp,
    /// Now.
    pub now: Timestamp,
    /// A backup of this cluster is Pending or Running.
    pub busy: bool,
    /// `spec.backup.suspend`.
    pub suspended: bool,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleAction {
    /// Nothing is due.
    Wait,
    /// Create the backup for this scheduled time.
    Create(Timestamp),
    /// The run for this time is due but another backup runs: record it as done.
    SkipBusy(Timestamp),
}

/// The decision and when to look again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleDecision {
    /// What to do now.
    pub action: ScheduleAction,
    /// The next time the schedule fires (for status and the requeue); `None` while
    /// suspended or when the expression never fires.
    pub next: Option<Timestamp>,
}

/// Decides what the schedule does at `input.now`.
pub fn plan(input: &ScheduleInput<'_>) -> ScheduleDecision {
    if input.suspended {
        return ScheduleDecision {
            action: ScheduleAction::Wait,
            next: None,
        };
    }
    let from = input.last_scheduled.unwrap_or(input.since);
    let action = match input.cron.last_fire_between(from, input.now) {
        None => ScheduleAction::Wait,
        Some(due) if input.busy => ScheduleAction::SkipBusy(due),
        Some(due) => ScheduleAction::Create(due),
    };
    ScheduleDecision {
        action,
        next: input.cron.next_after(input.now),
    }
}

/// The name of the scheduled backup of `cluster` for time `at`: `<cluster>-<UTC
/// timestamp>`, e.g. `chat-20261206t120000z`, cut to fit a Kubernetes name.
pub fn backup_name(cluster: &str, at: Timestamp) -> String {
    let stamp = at.strftime("%Y%m%dt%H%M%Sz").to_string();
    let room = 253 - stamp.len() - 1;
    let cluster: String = cluster.chars().take(room).collect();
    format!("{cluster}-{stamp}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn schedule_table() {
        let hourly: Cron = "0 * * * *".parse().unwrap();
        struct Case {
            name: &'static str,
            last: Option<&'static str>,
            now: &'static str,
            busy: bool,
            suspended: bool,
            action: ScheduleAction,
            next: Option<&'static str>,
        }
        let since = "2026-12-06T09:30:00Z";
        let cases = [
            Case {
                name: "new schedule: nothing for the past, waits for the first time",
                last: None,
                now: "2026-12-06T09:45:00Z",
                busy: false,
                suspended: false,
                action: ScheduleAction::Wait,
                next: Some("2026-12-06T10:00:00Z"),
            },
            Case {
                name: "first time due",
                last: None,
                now: "2026-12-06T10:00:05Z",
                busy: false,
                suspended: false,
                action: ScheduleAction::Create(at("2026-12-06T10:00:00Z")),
                next: Some("2026-12-06T11:00:00Z"),
            },
            Case {
                name: "already done for this hour",
                last: Some("2026-12-06T10:00:00Z"),
                now: "2026-12-06T10:30:00Z",
                busy: false,
                suspended: false,
                action: ScheduleAction::Wait,
                next: Some("2026-12-06T11:00:00Z"),
            },
            Case {
                name: "operator down 5 hours: one catch-up, for the latest time",
                last: Some("2026-12-06T10:00:00Z"),
                now: "2026-12-06T15:20:00Z",
                busy: false,
                suspended: false,
                action: ScheduleAction::Create(at("2026-12-06T15:00:00Z")),
                next: Some("2026-12-06T16:00:00Z"),
            },
            Case {
                name: "due while another backup runs: skipped, not queued",
                last: Some("2026-12-06T10:00:00Z"),
                now: "2026-12-06T11:00:10Z",
                busy: true,
                suspended: false,
                action: ScheduleAction::SkipBusy(at("2026-12-06T11:00:00Z")),
                next: Some("2026-12-06T12:00:00Z"),
            },
            Case {
                name: "suspended: nothing, no next time",
                last: Some("2026-12-06T10:00:00Z"),
                now: "2026-12-06T15:20:00Z",
                busy: false,
                suspended: true,
                action: ScheduleAction::Wait,
                next: None,
            },
        ];
        for case in cases {
            let decision = plan(&ScheduleInput {
                cron: &hourly,
                last_scheduled: case.last.map(at),
                since: at(since),
                now: at(case.now),
                busy: case.busy,
                suspended: case.suspended,
            });
            assert_eq!(decision.action, case.action, "{}", case.name);
            assert_eq!(decision.next, case.next.map(at), "{}", case.name);
        }
    }

    #[test]
    fn after_a_catch_up_the_schedule_resumes_normally() {
        let hourly: Cron = "0 * * * *".parse().unwrap();
        let first = plan(&ScheduleInput {
            cron: &hourly,
            last_scheduled: Some(at("2026-12-06T10:00:00Z")),
            since: at("2026-12-06T09:00:00Z"),
            now: at("2026-12-06T15:20:00Z"),
            busy: false,
            suspended: false,
        });
        let ScheduleAction::Create(done) = first.action else {
            panic!("{first:?}");
        };
        let again = plan(&ScheduleInput {
            cron: &hourly,
            last_scheduled: Some(done),
            since: at("2026-12-06T09:00:00Z"),
            now: at("2026-12-06T15:21:00Z"),
            busy: true,
            suspended: false,
        });
        assert_eq!(again.action, ScheduleAction::Wait, "no burst");
    }

    #[test]
    fn names_are_cluster_and_utc_time() {
        assert_eq!(
            backup_name("chat", at("2026-12-06T12:00:00Z")),
            "chat-20261206t120000z"
        );
        let long = "c".repeat(300);
        assert!(backup_name(&long, at("2026-12-06T12:00:00Z")).len() <= 253);
    }
}

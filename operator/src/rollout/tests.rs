//! The transition table: (state, observations, time) -> (next step, traffic, plan,
//! events). Every row is also run a second time from the status the first run produced,
//! with the same observations, as an operator restart would: it must make no further
//! transition and record no Event (decisions are resumable and never flap).

use std::time::Duration;

use super::*;
use crate::analysis::Reading;
use crate::api::{RolloutStatus, RolloutStep, Slot};
use RolloutStep::*;
use Slot::{Blue, Green};
use Template::{Desired, Keep};

const T0: i64 = 1_800_000_000;
const MIN: Duration = Duration::from_secs(60);

fn at(minutes: i64) -> Time {
    Time(Timestamp::from_second(T0 + minutes * 60).unwrap())
}

fn hash(version: &str) -> String {
    format!("hash-{version}")
}

fn settings() -> Settings {
    Settings {
        auto_promote: true,
        auto_promote_after: None,
        ready_timeout: 10 * MIN,
        smoke_test: true,
        post_promotion_window: 10 * MIN,
        scale_down_delay: 15 * MIN,
        progress_deadline: 15 * MIN,
        autoscaling: false,
        max_replicas: 10,
        replicas: 3,
        handover: false,
        analysis: None,
        backup_before_switch: false,
    }
}

/// A backup must complete between validation and the switch.
fn backed_up() -> Settings {
    Settings {
        backup_before_switch: true,
        ..settings()
    }
}

/// A cluster on the embedded store: the old slot hands its messages over first.
fn embedded() -> Settings {
    Settings {
        handover: true,
        ..settings()
    }
}

/// Watching `rate of rejected frames` after the switch, failing above 1.
fn analysed() -> Settings {
    Settings {
        analysis: Some(crate::api::RolloutAnalysis {
            prometheus_url: "http://prometheus:9090".into(),
            query: "rejected".into(),
            fail_above: 1.0,
        }),
        ..settings()
    }
}

fn handover_failed() -> JobState {
    JobState::Failed(
        "Job chat-handover-0 failed: BackoffLimitExceeded (see `kubectl logs job/chat-handover-0`)"
            .into(),
    )
}

fn manual() -> Settings {
    Settings {
        auto_promote: false,
        ..settings()
    }
}

/// A StatefulSet given `version`'s template with `ready` of `replicas` ready.
/// Traffic on `slot`, which runs `version`.
fn serving_on(slot: Slot, version: &str) -> Serving {
    Serving {
        slot,
        version: Some(version.into()),
        hash: Some(hash(version)),
    }
}

fn sts(version: &str, replicas: i32, ready: i32) -> Option<SlotState> {
    Some(SlotState {
        replicas,
        ready,
        rolled_out: true,
        template_hash: Some(hash(version)),
    })
}

/// The rollout v1 (blue) -> v2 (green) of 3 relays, started at minute 0, in `step`
/// since minute `since`; promoted at minute `since` when the step is past the switch.
fn r(step: RolloutStep, since: i64) -> Option<RolloutStatus> {
    Some(RolloutStatus {
        target_version: "v2".into(),
        target_template_hash: hash("v2"),
        slot: Green,
        from_version: Some("v1".into()),
        from_template_hash: Some(hash("v1")),
        replicas: 3,
        step,
        reason: None,
        message: format!("{step} (recorded)"),
        started_at: at(0),
        step_started_at: at(since),
        promoted_at: step.switched().then(|| at(since)),
        rolled_back_from: None,
        failed_template_hash: matches!(step, Failed | RolledBack | Aborted).then(|| hash("v2")),
        handback: None,
        paused_seconds: None,
    })
}

/// v2 in green failed after the switch at minute `since`; traffic back on blue.
fn rolled_back(since: i64) -> Option<RolloutStatus> {
    r(RolledBack, since).map(|r| RolloutStatus {
        rolled_back_from: Some("v2".into()),
        ..r
    })
}

fn crash(slot: Slot) -> PodHealth {
    PodHealth {
        slot: Some(slot),
        restarted: vec![],
        failing: vec![format!(
            "chat-{slot}-1: CrashLoopBackOff (last exit 1: Error)"
        )],
    }
}

fn restarted(slot: Slot) -> PodHealth {
    PodHealth {
        slot: Some(slot),
        restarted: vec![format!("chat-{slot}-0 restarted 1 time")],
        failing: vec![],
    }
}

fn healthy(slot: Slot) -> PodHealth {
    PodHealth {
        slot: Some(slot),
        ..PodHealth::default()
    }
}

struct Case {
    name: &'static str,
    settings: Settings,
    desired: &'static str,
    serving: (Slot, Option<&'static str>),
    rollout: Option<RolloutStatus>,
    blue: Option<SlotState>,
    green: Option<SlotState>,
    pods: PodHealth,
    smoke: JobState,
    handover: JobState,
    backup: JobState,
    analysis: Option<Reading>,
    promote: bool,
    abort: bool,
    hibernation: Hibernation,
    now: i64,
    // Expected:
    step: Option<RolloutStep>,
    reason: Option<&'static str>,
    target: Option<&'static str>,
    traffic: (Slot, Option<&'static str>),
    slots: [(Slot, Template, Option<i32>); 2],
    hpa: Option<(i32, i32)>,
    smoke_job: bool,
    handover_job: bool,
    backup_request: bool,
    consume: (bool, bool),
    notes: &'static [&'static str],
    /// What became of hibernation: "off", "waiting", "hibernated" or "waking".
    hibernated: &'static str,
}

/// Settled on v1 in blue, spec unchanged.
fn base() -> Case {
    Case {
        name: "",
        settings: settings(),
        desired: "v1",
        serving: (Blue, Some("v1")),
        rollout: None,
        blue: sts("v1", 3, 3),
        green: None,
        pods: PodHealth::default(),
        smoke: JobState::Absent,
        handover: JobState::Absent,
        backup: JobState::Absent,
        analysis: None,
        promote: false,
        abort: false,
        hibernation: Hibernation::Off,
        now: 0,
        step: None,
        reason: None,
        target: None,
        traffic: (Blue, Some("v1")),
        slots: [(Blue, Desired, Some(3)), (Green, Keep, Some(0))],
        hpa: None,
        smoke_job: false,
        handover_job: false,
        backup_request: false,
        consume: (false, false),
        notes: &[],
        hibernated: "off",
    }
}

/// A rollout of v2 into green before the switch: blue keeps v1 at 3, green gets v2 at 3.
const BEFORE_SWITCH: [(Slot, Template, Option<i32>); 2] =
    [(Blue, Keep, Some(3)), (Green, Desired, Some(3))];
/// After the switch: green serves v2, blue is held warm at 3.
const AFTER_SWITCH: [(Slot, Template, Option<i32>); 2] =
    [(Green, Desired, Some(3)), (Blue, Keep, Some(3))];
/// Failed or rolled back to blue, scale-down delay passed: blue keeps v1, green (the
/// failed v2) is at zero.
const BACK_ON_BLUE: [(Slot, Template, Option<i32>); 2] =
    [(Blue, Keep, Some(3)), (Green, Keep, Some(0))];
/// Just failed or rolled back: blue keeps v1, green (the failed v2) is left running as it
/// is for inspection until the scale-down delay passes.
const FAILED_KEPT: [(Slot, Template, Option<i32>); 2] =
    [(Blue, Keep, Some(3)), (Green, Keep, None)];
/// The same with autoscaling: the HPA owns the serving slot's count.
const FAILED_KEPT_AUTOSCALED: [(Slot, Template, Option<i32>); 2] =
    [(Blue, Keep, None), (Green, Keep, None)];
/// Hibernated on blue: both slots at zero, blue keeping the template it has.
const HIBERNATED_ON_BLUE: [(Slot, Template, Option<i32>); 2] =
    [(Blue, Keep, Some(0)), (Green, Keep, Some(0))];
/// Done: green serves v2 from the spec, blue at zero.
const DONE_ON_GREEN: [(Slot, Template, Option<i32>); 2] =
    [(Green, Desired, Some(3)), (Blue, Keep, Some(0))];

fn table() -> Vec<Case> {
    vec![
        // ---- settled, no rollout
        Case {
            name: "settled cluster: nothing to do",
            ..base()
        },
        Case {
            name: "never served yet: provision in place, no rollout",
            serving: (Blue, None),
            desired: "v2",
            blue: sts("v1", 3, 0),
            traffic: (Blue, None),
            ..base()
        },
        Case {
            name: "stale promote and abort annotations without a rollout are removed",
            promote: true,
            abort: true,
            consume: (true, true),
            ..base()
        },
        // ---- start
        Case {
            name: "template change starts a rollout into the idle slot",
            desired: "v2",
            step: Some(Preparing),
            reason: Some(reason::STARTED),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            notes: &[reason::STARTED],
            ..base()
        },
        Case {
            name: "autoscaling: new slot starts at the HPA's current count and the HPA is pinned",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            desired: "v2",
            blue: sts("v1", 5, 5),
            step: Some(Preparing),
            target: Some("v2"),
            reason: Some(reason::STARTED),
            slots: [(Blue, Keep, None), (Green, Desired, Some(5))],
            hpa: Some((5, 5)),
            notes: &[reason::STARTED],
            ..base()
        },
        // ---- Preparing
        Case {
            name: "preparing: waits while new relays start",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 1),
            now: 5,
            step: Some(Preparing),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "preparing: a ready slot with the old template is not the target",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v0", 3, 3),
            now: 1,
            step: Some(Preparing),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "preparing: all ready, smoke test on -> validating with a smoke Job",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            now: 2,
            step: Some(Validating),
            reason: Some(reason::VALIDATING),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            smoke_job: true,
            notes: &[reason::VALIDATING],
            ..base()
        },
        Case {
            name: "preparing: all ready, no smoke test, auto-promote -> switch",
            settings: Settings {
                smoke_test: false,
                ..settings()
            },
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 3),
            now: 2,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "preparing: all ready, no smoke test, manual -> awaiting promotion",
            settings: Settings {
                smoke_test: false,
                ..manual()
            },
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 3),
            now: 2,
            step: Some(AwaitingPromotion),
            reason: Some(reason::AWAITING_PROMOTION),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            notes: &[reason::AWAITING_PROMOTION],
            ..base()
        },
        Case {
            name: "preparing: a crash-looping relay fails validation even though others are ready",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 3),
            pods: crash(Green),
            now: 3,
            step: Some(Failed),
            reason: Some(reason::POD_FAILING),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::POD_FAILING],
            ..base()
        },
        Case {
            name: "preparing: a restarted relay fails validation",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 2),
            pods: restarted(Green),
            now: 3,
            step: Some(Failed),
            reason: Some(reason::POD_RESTARTED),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::POD_RESTARTED],
            ..base()
        },
        Case {
            name: "preparing: pod health of another slot is ignored",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 1),
            pods: crash(Blue),
            now: 3,
            step: Some(Preparing),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "preparing: not ready within readyTimeout -> failed, no switch",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 2),
            now: 11,
            step: Some(Failed),
            reason: Some(reason::READY_TIMEOUT),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::READY_TIMEOUT],
            ..base()
        },
        Case {
            name: "preparing: exactly at readyTimeout still waits",
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 2),
            now: 10,
            step: Some(Preparing),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "preparing: progress deadline shorter than readyTimeout fails first",
            settings: Settings {
                progress_deadline: 5 * MIN,
                ..settings()
            },
            desired: "v2",
            rollout: r(Preparing, 0),
            green: None,
            now: 6,
            step: Some(Failed),
            reason: Some(reason::PROGRESS_DEADLINE),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::PROGRESS_DEADLINE],
            ..base()
        },
        // ---- Validating
        Case {
            name: "validating: smoke Job missing -> it is requested",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            now: 2,
            step: Some(Validating),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            smoke_job: true,
            ..base()
        },
        Case {
            name: "validating: smoke Job running -> keep waiting",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Running,
            now: 4,
            step: Some(Validating),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            smoke_job: true,
            ..base()
        },
        Case {
            name: "validating: smoke passed, auto-promote -> switch",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Succeeded,
            now: 3,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "validating: smoke passed with beforeRollout -> a backup first, no switch",
            settings: backed_up(),
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Succeeded,
            now: 3,
            step: Some(BackingUp),
            reason: Some(reason::BACKING_UP),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            backup_request: true,
            notes: &[reason::BACKING_UP],
            ..base()
        },
        Case {
            name: "backing up: the backup runs -> traffic stays, the backup is still wanted",
            settings: backed_up(),
            desired: "v2",
            rollout: r(BackingUp, 3),
            green: sts("v2", 3, 3),
            backup: JobState::Running,
            now: 20,
            step: Some(BackingUp),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            backup_request: true,
            ..base()
        },
        Case {
            name: "backing up: the backup completed -> switch",
            settings: backed_up(),
            desired: "v2",
            rollout: r(BackingUp, 3),
            green: sts("v2", 3, 3),
            backup: JobState::Succeeded,
            now: 5,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "backing up: the backup failed -> the rollout fails, traffic never moves",
            settings: backed_up(),
            desired: "v2",
            rollout: r(BackingUp, 3),
            green: sts("v2", 3, 3),
            backup: JobState::Failed("AccessDenied".into()),
            now: 5,
            step: Some(Failed),
            reason: Some(reason::BACKUP_FAILED),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::BACKUP_FAILED],
            ..base()
        },
        Case {
            name: "validating: smoke passed, manual -> awaiting promotion",
            settings: manual(),
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Succeeded,
            now: 3,
            step: Some(AwaitingPromotion),
            reason: Some(reason::AWAITING_PROMOTION),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            notes: &[reason::AWAITING_PROMOTION],
            ..base()
        },
        Case {
            name: "validating: smoke passed, manual, promote set early -> switch and annotation removed",
            settings: manual(),
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Succeeded,
            promote: true,
            now: 3,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            consume: (true, false),
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "validating: promote set while preparing is kept for later",
            settings: manual(),
            desired: "v2",
            rollout: r(Preparing, 0),
            green: sts("v2", 3, 1),
            promote: true,
            now: 1,
            step: Some(Preparing),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "validating: smoke failed -> failed, no switch",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Failed("Job chat-smoke-x failed".into()),
            now: 3,
            step: Some(Failed),
            reason: Some(reason::SMOKE_FAILED),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::SMOKE_FAILED],
            ..base()
        },
        Case {
            name: "validating: smoke never finishes -> progress deadline",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            smoke: JobState::Running,
            now: 18,
            step: Some(Failed),
            reason: Some(reason::PROGRESS_DEADLINE),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::PROGRESS_DEADLINE],
            ..base()
        },
        Case {
            name: "validating: relay crash during the smoke test fails validation",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            pods: crash(Green),
            smoke: JobState::Running,
            now: 3,
            step: Some(Failed),
            reason: Some(reason::POD_FAILING),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::POD_FAILING],
            ..base()
        },
        // ---- AwaitingPromotion
        Case {
            name: "awaiting: waits indefinitely without autoPromoteAfter (no deadline)",
            settings: manual(),
            desired: "v2",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            now: 3 + 24 * 60,
            step: Some(AwaitingPromotion),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "awaiting: promote annotation -> switch, annotation removed",
            settings: manual(),
            desired: "v2",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            promote: true,
            now: 30,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            consume: (true, false),
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "awaiting: autoPromoteAfter passed -> switch",
            settings: Settings {
                auto_promote_after: Some(60 * MIN),
                ..manual()
            },
            desired: "v2",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            now: 63,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "awaiting: autoPromoteAfter not yet passed -> wait",
            settings: Settings {
                auto_promote_after: Some(60 * MIN),
                ..manual()
            },
            desired: "v2",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            now: 62,
            step: Some(AwaitingPromotion),
            target: Some("v2"),
            slots: BEFORE_SWITCH,
            ..base()
        },
        Case {
            name: "awaiting: autoPromote switched on in the spec -> switch",
            desired: "v2",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            now: 5,
            step: Some(Promoted),
            reason: Some(reason::PROMOTED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::PROMOTED],
            ..base()
        },
        Case {
            name: "awaiting: a relay crashes while waiting -> failed, no switch",
            settings: manual(),
            desired: "v2",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 2),
            pods: crash(Green),
            now: 9,
            step: Some(Failed),
            reason: Some(reason::POD_FAILING),
            target: Some("v2"),
            slots: FAILED_KEPT,
            notes: &[reason::POD_FAILING],
            ..base()
        },
        // ---- Promoted (post-promotion window)
        Case {
            name: "promoted: healthy inside the window -> keep watching, old slot warm",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            now: 8,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            ..base()
        },
        Case {
            name: "promoted: crash-loop inside the window -> automatic rollback to warm old slot",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 2),
            pods: crash(Green),
            now: 8,
            step: Some(RolledBack),
            reason: Some(reason::POD_FAILING),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT,
            notes: &["RolledBack"],
            ..base()
        },
        Case {
            name: "promoted: analysis query above its threshold -> automatic rollback",
            settings: analysed(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            analysis: Some(Reading::Value(2.5)),
            now: 8,
            step: Some(RolledBack),
            reason: Some(reason::ANALYSIS_FAILED),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT,
            notes: &["RolledBack"],
            ..base()
        },
        Case {
            name: "promoted: analysis query at its threshold -> keep watching",
            settings: analysed(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            analysis: Some(Reading::Value(1.0)),
            now: 8,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            ..base()
        },
        Case {
            name: "promoted: analysis inconclusive -> no rollback on its own",
            settings: analysed(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            analysis: Some(Reading::Inconclusive("prometheus:9090 did not answer".into())),
            now: 8,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            ..base()
        },
        Case {
            name: "promoted: analysis inconclusive at the window end -> the window still passes",
            settings: analysed(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            analysis: Some(Reading::Inconclusive("prometheus:9090 did not answer".into())),
            now: 13,
            step: Some(ScalingDown),
            reason: Some(reason::WINDOW_PASSED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::WINDOW_PASSED],
            ..base()
        },
        Case {
            name: "promoted: relays not ready inside the window -> rollback",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 1),
            now: 4,
            step: Some(RolledBack),
            reason: Some(reason::RELAYS_NOT_READY),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT,
            notes: &["RolledBack"],
            ..base()
        },
        Case {
            name: "promoted: window passed healthy -> scaling down later",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            now: 13,
            step: Some(ScalingDown),
            reason: Some(reason::WINDOW_PASSED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::WINDOW_PASSED],
            ..base()
        },
        Case {
            name: "promoted: failure seen after the window end still rolls back (checked first)",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            pods: restarted(Green),
            now: 14,
            step: Some(RolledBack),
            reason: Some(reason::POD_RESTARTED),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT,
            notes: &["RolledBack"],
            ..base()
        },
        Case {
            name: "promoted: window and delay both passed -> scaled down and complete at once",
            settings: Settings {
                scale_down_delay: 5 * MIN,
                ..settings()
            },
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            now: 13,
            step: Some(Complete),
            reason: Some(reason::COMPLETE),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: DONE_ON_GREEN,
            notes: &[reason::WINDOW_PASSED, reason::COMPLETE],
            ..base()
        },
        Case {
            name: "promoted: a replicas change waits for the window to end",
            settings: Settings {
                replicas: 5,
                ..settings()
            },
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            now: 5,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            ..base()
        },
        Case {
            name: "promoted: in the window the HPA may scale out from the validated count",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            now: 5,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Desired, None), (Blue, Keep, Some(3))],
            hpa: Some((3, 10)),
            ..base()
        },
        Case {
            name: "promoted: relays the HPA added in the window may still be starting",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            // Scaled out to 5; the 2 new relays are not ready yet.
            green: sts("v2", 5, 3),
            now: 5,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Desired, None), (Blue, Keep, Some(3))],
            hpa: Some((3, 10)),
            ..base()
        },
        Case {
            name: "promoted: the validated count not ready after a scale-out rolls back",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 5, 2),
            now: 5,
            step: Some(RolledBack),
            reason: Some(reason::RELAYS_NOT_READY),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT_AUTOSCALED,
            notes: &["RolledBack"],
            ..base()
        },
        // ---- ScalingDown
        Case {
            name: "scaling down: before the delay the old slot stays warm, HPA free",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 4, 4),
            now: 17,
            step: Some(ScalingDown),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Desired, None), (Blue, Keep, Some(3))],
            ..base()
        },
        Case {
            name: "scaling down: delay passed -> old slot to zero, complete",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            now: 18,
            step: Some(Complete),
            reason: Some(reason::COMPLETE),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: DONE_ON_GREEN,
            notes: &[reason::COMPLETE],
            ..base()
        },
        // ---- embedded store: hand the old slot's messages over before it goes to zero
        Case {
            name: "embedded: before the delay no handover yet",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            now: 17,
            step: Some(ScalingDown),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            ..base()
        },
        Case {
            name: "embedded: delay passed -> handover Job, old slot kept warm",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            now: 18,
            step: Some(ScalingDown),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            handover_job: true,
            ..base()
        },
        Case {
            name: "embedded: handover running -> keep waiting, Job stays wanted",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            handover: JobState::Running,
            now: 40,
            step: Some(ScalingDown),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            handover_job: true,
            ..base()
        },
        Case {
            name: "embedded: handover succeeded -> old slot to zero, complete",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            handover: JobState::Succeeded,
            now: 19,
            step: Some(Complete),
            reason: Some(reason::COMPLETE),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: DONE_ON_GREEN,
            notes: &[reason::COMPLETE],
            ..base()
        },
        Case {
            name: "embedded: handover failed -> HandoverFailed, old slot kept with its messages",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            handover: handover_failed(),
            now: 30,
            step: Some(HandoverFailed),
            reason: Some(reason::HANDOVER_FAILED),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            notes: &[reason::HANDOVER_FAILED],
            ..base()
        },
        Case {
            name: "handover failed: nothing moves while the failed Job exists",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(HandoverFailed, 30),
            green: sts("v2", 3, 3),
            blue: sts("v1", 3, 3),
            handover: handover_failed(),
            promote: true,
            now: 500,
            step: Some(HandoverFailed),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            consume: (true, false),
            ..base()
        },
        Case {
            name: "handover failed, Job deleted -> retried",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(HandoverFailed, 30),
            green: sts("v2", 3, 3),
            blue: sts("v1", 3, 3),
            now: 60,
            step: Some(ScalingDown),
            reason: Some(reason::HANDING_OVER),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            handover_job: true,
            notes: &[reason::HANDING_OVER],
            ..base()
        },
        Case {
            name: "handover failed, then a new version: rolls into the old slot, which keeps its volume",
            settings: embedded(),
            desired: "v3",
            serving: (Green, Some("v2")),
            rollout: r(HandoverFailed, 30),
            green: sts("v2", 3, 3),
            blue: sts("v1", 3, 3),
            handover: handover_failed(),
            now: 60,
            step: Some(Preparing),
            reason: Some(reason::STARTED),
            target: Some("v3"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Keep, Some(3)), (Blue, Desired, Some(3))],
            hpa: None,
            notes: &[reason::STARTED],
            ..base()
        },
        // ---- embedded store after a rollback: the failed slot hands its messages back
        Case {
            name: "embedded rollback: inspection delay running -> no handback yet",
            settings: embedded(),
            desired: "v2",
            rollout: rolled_back(5),
            green: sts("v2", 3, 3),
            now: 5,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: FAILED_KEPT,
            ..base()
        },
        Case {
            name: "embedded rollback: delay passed -> handback Job, failed slot kept as is",
            settings: embedded(),
            desired: "v2",
            rollout: rolled_back(5),
            green: sts("v2", 3, 3),
            now: 21,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: FAILED_KEPT,
            handover_job: true,
            ..base()
        },
        Case {
            name: "embedded rollback: handback succeeded -> recorded once, failed slot to zero",
            settings: embedded(),
            desired: "v2",
            rollout: rolled_back(5),
            green: sts("v2", 3, 3),
            handover: JobState::Succeeded,
            now: 22,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            notes: &[reason::HANDED_BACK],
            ..base()
        },
        Case {
            name: "embedded rollback: handback failed -> recorded once with a warning, failed slot to zero",
            settings: embedded(),
            desired: "v2",
            rollout: rolled_back(5),
            green: sts("v2", 3, 0),
            handover: handover_failed(),
            now: 25,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            notes: &[reason::HANDBACK_FAILED],
            ..base()
        },
        Case {
            name: "embedded rollback: handback recorded -> Job gone later, nothing runs again",
            settings: embedded(),
            desired: "v2",
            rollout: rolled_back(5).map(|r| RolloutStatus {
                handback: Some(crate::api::HandoverOutcome::Succeeded),
                ..r
            }),
            green: sts("v2", 0, 0),
            now: 3000,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            ..base()
        },
        Case {
            name: "postgres rollback: delay passed -> straight to zero, no handback",
            desired: "v2",
            rollout: rolled_back(5),
            green: sts("v2", 3, 3),
            now: 21,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            ..base()
        },
        Case {
            name: "embedded failure before the switch: nothing to hand back",
            settings: embedded(),
            desired: "v2",
            rollout: r(Failed, 5),
            green: sts("v2", 3, 1),
            now: 21,
            step: Some(Failed),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            ..base()
        },
        Case {
            name: "complete: settled, no events, no writes wanted",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Complete, 18),
            green: sts("v2", 3, 3),
            blue: sts("v1", 0, 0),
            now: 500,
            step: Some(Complete),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: DONE_ON_GREEN,
            ..base()
        },
        // ---- final steps never flap
        Case {
            name: "failed: the failed template is not retried, however long",
            desired: "v2",
            rollout: r(Failed, 11),
            green: sts("v2", 0, 0),
            now: 100_000,
            step: Some(Failed),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            ..base()
        },
        Case {
            name: "rolled back: the failed template is not retried",
            desired: "v2",
            rollout: r(RolledBack, 8),
            green: sts("v2", 0, 0),
            now: 60,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: BACK_ON_BLUE,
            ..base()
        },
        Case {
            name: "failed, then the spec changes again -> a new rollout",
            desired: "v3",
            rollout: r(Failed, 11),
            green: sts("v2", 0, 0),
            now: 60,
            step: Some(Preparing),
            reason: Some(reason::STARTED),
            target: Some("v3"),
            slots: BEFORE_SWITCH,
            notes: &[reason::STARTED],
            ..base()
        },
        Case {
            name: "failed, then the spec goes back to the serving version -> settled",
            desired: "v1",
            rollout: r(Failed, 11),
            green: sts("v2", 0, 0),
            now: 60,
            step: Some(Failed),
            target: Some("v2"),
            slots: [(Blue, Desired, Some(3)), (Green, Keep, Some(0))],
            ..base()
        },
        // ---- abort
        Case {
            name: "abort before the switch -> aborted, traffic stays, not retried",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            abort: true,
            now: 3,
            step: Some(Aborted),
            reason: Some(reason::ABORTED),
            target: Some("v2"),
            slots: FAILED_KEPT,
            consume: (false, true),
            notes: &[reason::ABORTED],
            ..base()
        },
        Case {
            name: "abort inside the window -> traffic back to the old slot",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            abort: true,
            now: 5,
            step: Some(Aborted),
            reason: Some(reason::ABORTED),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT,
            consume: (false, true),
            notes: &[reason::ABORTED],
            ..base()
        },
        Case {
            name: "abort while scaling down -> traffic back to the still-warm old slot",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(ScalingDown, 3),
            green: sts("v2", 3, 3),
            abort: true,
            now: 15,
            step: Some(Aborted),
            reason: Some(reason::ABORTED),
            target: Some("v2"),
            traffic: (Blue, Some("v1")),
            slots: FAILED_KEPT,
            consume: (false, true),
            notes: &[reason::ABORTED],
            ..base()
        },
        Case {
            name: "abort after completion is stale: removed, nothing moves",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Complete, 18),
            green: sts("v2", 3, 3),
            abort: true,
            now: 30,
            step: Some(Complete),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: DONE_ON_GREEN,
            consume: (false, true),
            ..base()
        },
        // ---- supersede
        Case {
            name: "supersede before the switch -> restart in the same slot with the new target",
            desired: "v3",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            now: 3,
            step: Some(Preparing),
            reason: Some(reason::STARTED),
            target: Some("v3"),
            slots: BEFORE_SWITCH,
            notes: &[reason::SUPERSEDED, reason::STARTED],
            ..base()
        },
        Case {
            name: "supersede while a promote of the old rollout is pending -> the annotation is removed, not kept for the new one",
            settings: manual(),
            desired: "v3",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            promote: true,
            now: 4,
            step: Some(Preparing),
            reason: Some(reason::STARTED),
            target: Some("v3"),
            slots: BEFORE_SWITCH,
            consume: (true, false),
            notes: &[reason::SUPERSEDED, reason::STARTED],
            ..base()
        },
        Case {
            name: "spec back to the serving version before the switch -> cancelled",
            desired: "v1",
            rollout: r(AwaitingPromotion, 3),
            green: sts("v2", 3, 3),
            now: 4,
            step: Some(Cancelled),
            reason: Some(reason::CANCELLED),
            target: Some("v2"),
            slots: [(Blue, Desired, Some(3)), (Green, Keep, Some(0))],
            notes: &[reason::CANCELLED],
            ..base()
        },
        Case {
            name: "supersede after the switch -> new version serves, old slot takes the newer one",
            desired: "v3",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 3),
            green: sts("v2", 3, 3),
            now: 5,
            step: Some(Preparing),
            reason: Some(reason::STARTED),
            target: Some("v3"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Keep, Some(3)), (Blue, Desired, Some(3))],
            notes: &[reason::SUPERSEDED, reason::STARTED],
            ..base()
        },
        // ---- hibernation
        Case {
            name: "hibernate a settled cluster: both slots to zero, serving template as it is",
            hibernation: Hibernation::Hibernate,
            slots: [(Blue, Desired, Some(0)), (Green, Keep, Some(0))],
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "hibernate with autoscaling: the serving slot gets a count (zero) again",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            blue: sts("v1", 5, 5),
            hibernation: Hibernation::Hibernate,
            slots: [(Blue, Desired, Some(0)), (Green, Keep, Some(0))],
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "hibernating: a new version starts no rollout; the old template is kept at zero",
            desired: "v2",
            hibernation: Hibernation::Hibernate,
            slots: HIBERNATED_ON_BLUE,
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "hibernate before the switch: the rollout is cancelled (not failed), both slots to zero",
            desired: "v2",
            rollout: r(Validating, 2),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            hibernation: Hibernation::Hibernate,
            now: 3,
            step: Some(Cancelled),
            reason: Some(reason::HIBERNATED),
            target: Some("v2"),
            slots: HIBERNATED_ON_BLUE,
            notes: &[reason::HIBERNATED],
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "hibernate while awaiting promotion: cancelled too, the annotation can wait",
            settings: manual(),
            desired: "v2",
            rollout: r(AwaitingPromotion, 2),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            hibernation: Hibernation::Hibernate,
            now: 50,
            step: Some(Cancelled),
            reason: Some(reason::HIBERNATED),
            target: Some("v2"),
            slots: HIBERNATED_ON_BLUE,
            notes: &[reason::HIBERNATED],
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "hibernate after the switch: the rollout goes on, hibernation waits",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Promoted, 0),
            green: sts("v2", 3, 3),
            blue: sts("v1", 3, 3),
            pods: healthy(Green),
            hibernation: Hibernation::Hibernate,
            now: 2,
            step: Some(Promoted),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: AFTER_SWITCH,
            hibernated: "waiting",
            ..base()
        },
        Case {
            name: "hibernation waited: the rollout completed, now both slots to zero",
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(Complete, 30),
            green: sts("v2", 3, 3),
            blue: sts("v1", 0, 0),
            hibernation: Hibernation::Hibernate,
            now: 31,
            step: Some(Complete),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Desired, Some(0)), (Blue, Keep, Some(0))],
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "embedded rollback: hibernation waits for the handback, also during the inspection delay",
            settings: embedded(),
            desired: "v2",
            rollout: rolled_back(5),
            green: sts("v2", 3, 3),
            hibernation: Hibernation::Hibernate,
            now: 5,
            step: Some(RolledBack),
            target: Some("v2"),
            slots: FAILED_KEPT,
            hibernated: "waiting",
            ..base()
        },
        Case {
            name: "hibernating with a failed handover: both slots to zero, no retry while the Job is gone",
            settings: embedded(),
            desired: "v2",
            serving: (Green, Some("v2")),
            rollout: r(HandoverFailed, 30),
            green: sts("v2", 3, 3),
            blue: sts("v1", 3, 3),
            hibernation: Hibernation::Hibernate,
            now: 60,
            step: Some(HandoverFailed),
            target: Some("v2"),
            traffic: (Green, Some("v2")),
            slots: [(Green, Desired, Some(0)), (Blue, Keep, Some(0))],
            hibernated: "hibernated",
            ..base()
        },
        Case {
            name: "waking: the serving slot at the wake size; a new version waits for the relays",
            desired: "v2",
            blue: sts("v1", 0, 0),
            hibernation: Hibernation::Wake { replicas: 3 },
            slots: [(Blue, Keep, Some(3)), (Green, Keep, Some(0))],
            hibernated: "waking",
            ..base()
        },
        Case {
            name: "waking with autoscaling: a fixed count until every relay is back",
            settings: Settings {
                autoscaling: true,
                ..settings()
            },
            blue: sts("v1", 0, 0),
            hibernation: Hibernation::Wake { replicas: 5 },
            slots: [(Blue, Desired, Some(5)), (Green, Keep, Some(0))],
            hibernated: "waking",
            ..base()
        },
    ]
}

fn run(case: &Case, rollout: Option<&RolloutStatus>, serving: &Serving) -> Decision {
    let desired = Target {
        version: case.desired.into(),
        hash: hash(case.desired),
    };
    decide(&Input {
        cluster_name: "chat",
        settings: &case.settings,
        desired: &desired,
        serving,
        rollout,
        blue: case.blue.clone(),
        green: case.green.clone(),
        pods: case.pods.clone(),
        smoke: case.smoke.clone(),
        handover: case.handover.clone(),
        backup: case.backup.clone(),
        analysis: case.analysis.clone(),
        promote: case.promote,
        abort: case.abort,
        hibernation: case.hibernation,
        now: at(case.now).0,
    })
}

#[test]
fn transition_table() {
    let mut failures = Vec::new();
    for case in table() {
        let serving = Serving {
            slot: case.serving.0,
            version: case.serving.1.map(Into::into),
            hash: case.serving.1.map(hash),
        };
        let d = run(&case, case.rollout.as_ref(), &serving);
        let mut check = |what: &str, ok: bool, detail: String| {
            if !ok {
                failures.push(format!("[{}] {what}: {detail}", case.name));
            }
        };
        let step = d.rollout.as_ref().map(|r| r.step);
        check("step", step == case.step, format!("{step:?}"));
        if let Some(reason) = case.reason {
            let got = d.rollout.as_ref().and_then(|r| r.reason.clone());
            check("reason", got.as_deref() == Some(reason), format!("{got:?}"));
        }
        let target = d.rollout.as_ref().map(|r| r.target_version.as_str());
        check("target", target == case.target, format!("{target:?}"));
        let traffic = (d.serving.slot, d.serving.version.as_deref());
        check("traffic", traffic == case.traffic, format!("{traffic:?}"));
        let slots: Vec<(Slot, Template, Option<i32>)> = d
            .slots
            .iter()
            .map(|s| (s.slot, s.template, s.replicas))
            .collect();
        check("slots", slots == case.slots, format!("{slots:?}"));
        let hpa = d.hpa_bounds.map(|b| (b.min, b.max));
        check("hpa bounds", hpa == case.hpa, format!("{hpa:?}"));
        check(
            "smoke job",
            d.smoke.is_some() == case.smoke_job,
            format!("{:?}", d.smoke),
        );
        check(
            "handover job",
            d.handover.is_some() == case.handover_job,
            format!("{:?}", d.handover),
        );
        check(
            "backup request",
            d.backup.is_some() == case.backup_request,
            format!("{:?}", d.backup),
        );
        if let Some(h) = &d.handover {
            let r = d.rollout.as_ref().unwrap();
            // Forward: old slot to the new one; after a rollback: the failed slot back.
            let direction = if matches!(r.step, RolledBack | Aborted) {
                (r.slot, r.slot.other())
            } else {
                (r.slot.other(), r.slot)
            };
            check(
                "handover direction",
                (h.from, h.to) == direction && h.version == r.target_version,
                format!("{h:?}"),
            );
        }
        let consume = (d.consume_promote, d.consume_abort);
        check("consume", consume == case.consume, format!("{consume:?}"));
        let notes: Vec<&str> = d.notes.iter().map(|n| n.reason).collect();
        check("notes", notes == case.notes, format!("{notes:?}"));
        let hibernated = match &d.hibernation {
            HibernationPlan::Off => "off",
            HibernationPlan::Waiting(_) => "waiting",
            HibernationPlan::Hibernated => "hibernated",
            HibernationPlan::Waking => "waking",
        };
        check(
            "hibernation",
            hibernated == case.hibernated,
            format!("{:?}", d.hibernation),
        );
        if matches!(d.hibernation, HibernationPlan::Hibernated) {
            check(
                "hibernated: no Job, no HPA bounds",
                d.smoke.is_none() && d.handover.is_none() && d.backup.is_none(),
                format!("{:?}", (&d.smoke, &d.handover, &d.backup)),
            );
        }
        let in_flight = d.rollout.as_ref().is_some_and(|r| r.step.in_flight());
        let failed_slot_kept = case.slots == FAILED_KEPT || case.slots == FAILED_KEPT_AUTOSCALED;
        let handover_stuck = d.rollout.as_ref().is_some_and(|r| r.step == HandoverFailed);
        let expected_requeue = if matches!(d.hibernation, HibernationPlan::Hibernated) {
            None
        } else if in_flight {
            // Its exact value: `an_in_flight_rollout_is_looked_at_when_its_timer_runs_out`.
            d.requeue
                .filter(|after| (Duration::from_secs(1)..=IN_FLIGHT_RESYNC).contains(after))
        } else if d.handover.is_some() {
            Some(IN_FLIGHT_RESYNC)
        } else if handover_stuck {
            Some(HANDOVER_RETRY_POLL)
        } else if failed_slot_kept {
            Some(case.settings.scale_down_delay)
        } else {
            None
        };
        check(
            "requeue",
            d.requeue == expected_requeue,
            format!("{:?}", d.requeue),
        );
        if let Some(r) = &d.rollout {
            check("message", !r.message.is_empty(), "empty message".into());
        }

        // Restart: a fresh decision from the stored status with the same observations
        // changes nothing and records nothing.
        let again = run(&case, d.rollout.as_ref(), &d.serving);
        check(
            "resume: rollout",
            again.rollout == d.rollout,
            format!("{:?}", again.rollout.map(|r| (r.step, r.message))),
        );
        check(
            "resume: serving",
            again.serving == d.serving,
            format!("{:?}", again.serving),
        );
        check(
            "resume: notes",
            again.notes.is_empty(),
            format!("{:?}", again.notes),
        );
        check(
            "resume: plan",
            again.slots == d.slots && again.smoke == d.smoke && again.handover == d.handover,
            format!("{:?}", again.slots),
        );
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn an_in_flight_rollout_is_looked_at_when_its_timer_runs_out() {
    let serving = serving_on(Blue, "v1");
    let look = |settings: Settings, rollout: Option<RolloutStatus>, green, now: i64| {
        let case = Case {
            settings,
            desired: "v2",
            rollout,
            green,
            now,
            ..base()
        };
        let d = run(&case, case.rollout.as_ref(), &serving);
        (d.rollout.map(|r| r.step), d.requeue)
    };
    let second = Duration::from_secs(1);
    // Preparing since minute 0, 1 of 3 ready: the ready timeout (10 min) is nearer than
    // the progress deadline (15 min); both are further than the resync.
    assert_eq!(
        look(settings(), r(Preparing, 0), sts("v2", 3, 1), 0),
        (Some(Preparing), Some(IN_FLIGHT_RESYNC))
    );
    let short = Settings {
        ready_timeout: Duration::from_secs(40),
        ..settings()
    };
    assert_eq!(
        look(short.clone(), r(Preparing, 0), sts("v2", 3, 1), 0),
        (Some(Preparing), Some(Duration::from_secs(40) + second))
    );
    // The timer ran out: the step moved on (failed), and nothing is in flight.
    assert_eq!(
        look(short, r(Preparing, 0), sts("v2", 3, 1), 1),
        (Some(Failed), Some(15 * MIN))
    );
    // Awaiting a person: only the resync, unless it promotes itself after a while.
    assert_eq!(
        look(manual(), r(AwaitingPromotion, 0), sts("v2", 3, 3), 0),
        (Some(AwaitingPromotion), Some(IN_FLIGHT_RESYNC))
    );
    let after = Settings {
        auto_promote_after: Some(Duration::from_secs(20)),
        ..manual()
    };
    assert_eq!(
        look(after, r(AwaitingPromotion, 0), sts("v2", 3, 3), 0),
        (Some(AwaitingPromotion), Some(Duration::from_secs(21)))
    );
    // Promoted at minute 0: the window (10 min) ends at minute 10.
    let window = Settings {
        post_promotion_window: Duration::from_secs(30),
        scale_down_delay: Duration::from_secs(45),
        ..settings()
    };
    assert_eq!(
        look(window.clone(), r(Promoted, 0), sts("v2", 3, 3), 0),
        (Some(Promoted), Some(Duration::from_secs(31)))
    );
    // With an analysis query, it is taken every POLL meanwhile.
    let analysed_window = Settings {
        analysis: analysed().analysis,
        ..window.clone()
    };
    assert_eq!(
        look(analysed_window, r(Promoted, 0), sts("v2", 3, 3), 0),
        (Some(Promoted), Some(POLL))
    );
    // Scaling down: the old slot goes to zero when the delay after promotion ran out.
    let mut scaling = r(ScalingDown, 0);
    if let Some(r) = scaling.as_mut() {
        r.promoted_at = Some(Time(at(0).0 - std::time::Duration::from_secs(5)));
        r.step_started_at = at(0);
    }
    assert_eq!(
        look(window, scaling, sts("v2", 3, 3), 0),
        (Some(ScalingDown), Some(Duration::from_secs(41)))
    );
}

#[test]
fn failed_slot_is_kept_for_the_scale_down_delay_then_zeroed() {
    let serving = serving_on(Blue, "v1");
    let mut plans = Vec::new();
    for minute in [11, 20, 25, 26, 500] {
        let case = Case {
            desired: "v2",
            rollout: r(Failed, 11),
            green: sts("v2", 3, 1),
            now: minute,
            ..base()
        };
        let d = run(&case, case.rollout.as_ref(), &serving);
        assert!(d.notes.is_empty());
        plans.push((minute, d.slots[1].replicas, d.requeue));
    }
    assert_eq!(
        plans,
        vec![
            (11, None, Some(15 * MIN)),
            (20, None, Some(6 * MIN)),
            (25, None, Some(MIN)),
            (26, Some(0), None),
            (500, Some(0), None),
        ]
    );
}

#[test]
fn failure_messages_say_why_and_where_traffic_is() {
    let case = Case {
        desired: "v2",
        rollout: r(Validating, 2),
        green: sts("v2", 3, 3),
        smoke: JobState::Failed("Job chat-smoke-x failed: BackoffLimitExceeded".into()),
        now: 3,
        ..base()
    };
    let serving = serving_on(Blue, "v1");
    let d = run(&case, case.rollout.as_ref(), &serving);
    let r = d.rollout.unwrap();
    assert_eq!(r.failed_template_hash.as_deref(), Some("hash-v2"));
    assert!(r.message.contains("BackoffLimitExceeded"), "{}", r.message);
    assert!(
        r.message.contains("traffic stays on slot blue"),
        "{}",
        r.message
    );
    assert!(d.notes[0].warning);
}

#[test]
fn analysis_messages_say_what_was_measured_and_what_was_not() {
    let desired = Target {
        version: "v2".into(),
        hash: hash("v2"),
    };
    let serving = serving_on(Green, "v2");
    let settings = analysed();
    let decide_with = |rollout: Option<&RolloutStatus>, reading: Reading| {
        decide(&Input {
            cluster_name: "chat",
            settings: &settings,
            desired: &desired,
            serving: &serving,
            rollout,
            blue: sts("v1", 3, 3),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            smoke: JobState::Absent,
            handover: JobState::Absent,
            backup: JobState::Absent,
            analysis: Some(reading),
            promote: false,
            abort: false,
            hibernation: Hibernation::Off,
            now: at(5).0,
        })
    };
    let promoted = r(Promoted, 3);
    let d = decide_with(promoted.as_ref(), Reading::Value(4.0));
    let rolled = d.rollout.unwrap();
    assert!(
        rolled
            .message
            .contains("AnalysisFailed: analysis query returned 4, above 1 (query: rejected)"),
        "{}",
        rolled.message
    );
    let d = decide_with(promoted.as_ref(), Reading::Inconclusive("timeout".into()));
    let waiting = d.rollout.unwrap();
    assert_eq!(
        waiting.message,
        "Promoted (recorded); analysis inconclusive: timeout"
    );
    assert!(d.notes.is_empty());
    // Answered again: the note goes away; it never piles up.
    let d = decide_with(Some(&waiting), Reading::Inconclusive("refused".into()));
    assert_eq!(
        d.rollout.as_ref().unwrap().message,
        "Promoted (recorded); analysis inconclusive: refused"
    );
    let d = decide_with(Some(&waiting), Reading::Value(0.5));
    assert_eq!(d.rollout.unwrap().message, "Promoted (recorded)");
}

#[test]
fn rollback_records_where_it_came_from() {
    let case = Case {
        desired: "v2",
        serving: (Green, Some("v2")),
        rollout: r(Promoted, 3),
        green: sts("v2", 3, 3),
        pods: crash(Green),
        now: 5,
        ..base()
    };
    let serving = serving_on(Green, "v2");
    let d = run(&case, case.rollout.as_ref(), &serving);
    let r = d.rollout.unwrap();
    assert_eq!(r.rolled_back_from.as_deref(), Some("v2"));
    assert_eq!(r.failed_template_hash.as_deref(), Some("hash-v2"));
    assert_eq!(d.serving.hash.as_deref(), Some("hash-v1"));
    assert!(r.message.contains("CrashLoopBackOff"), "{}", r.message);
    assert!(!d.active_is_desired, "old slot keeps its own template");
}

#[test]
fn a_full_rollout_walks_every_step_with_time_passing() {
    // Drive the machine the way reconciles do, one observation set after another.
    let settings = settings();
    let desired = Target {
        version: "v2".into(),
        hash: hash("v2"),
    };
    let mut serving = serving_on(Blue, "v1");
    let mut rollout: Option<RolloutStatus> = None;
    let mut steps = Vec::new();
    let script: Vec<(i64, Option<SlotState>, JobState)> = vec![
        (0, None, JobState::Absent),
        (1, sts("v2", 3, 1), JobState::Absent),
        (2, sts("v2", 3, 3), JobState::Absent),
        (3, sts("v2", 3, 3), JobState::Running),
        (4, sts("v2", 3, 3), JobState::Succeeded),
        (10, sts("v2", 3, 3), JobState::Absent),
        (14, sts("v2", 3, 3), JobState::Absent),
        (18, sts("v2", 3, 3), JobState::Absent),
        (19, sts("v2", 3, 3), JobState::Absent),
    ];
    for (minute, green, smoke) in script {
        let d = decide(&Input {
            cluster_name: "chat",
            settings: &settings,
            desired: &desired,
            serving: &serving,
            rollout: rollout.as_ref(),
            blue: sts("v1", 3, 3),
            green,
            pods: healthy(Green),
            smoke,
            handover: JobState::Absent,
            backup: JobState::Absent,
            analysis: None,
            promote: false,
            abort: false,
            hibernation: Hibernation::Off,
            now: at(minute).0,
        });
        serving = d.serving;
        rollout = d.rollout;
        steps.push((minute, rollout.as_ref().map(|r| r.step), serving.slot));
    }
    assert_eq!(
        steps,
        vec![
            (0, Some(Preparing), Blue),
            (1, Some(Preparing), Blue),
            (2, Some(Validating), Blue),
            (3, Some(Validating), Blue),
            (4, Some(Promoted), Green),
            (10, Some(Promoted), Green),
            (14, Some(ScalingDown), Green),
            (18, Some(ScalingDown), Green),
            (19, Some(Complete), Green),
        ]
    );
    let r = rollout.unwrap();
    assert_eq!(r.promoted_at, Some(at(4)));
    assert_eq!(r.started_at, at(0));
}

#[test]
fn smoke_job_name_is_stable_per_attempt_and_short() {
    let a = r(Validating, 2).unwrap();
    let mut b = a.clone();
    b.started_at = at(7);
    let name = smoke_job_name("chat", &a);
    assert_eq!(name, smoke_job_name("chat", &a));
    assert_ne!(name, smoke_job_name("chat", &b));
    assert!(name.starts_with("chat-smoke-"));
    let long = smoke_job_name(&"x".repeat(200), &a);
    assert!(long.len() <= 63, "{long}");
}

#[test]
fn settings_parse_spec_and_name_bad_fields() {
    let mut spec = crate::testing::spec_from_yaml(
        "version: '1'\nrollout: {autoPromote: false, autoPromoteAfter: 1h, validation: {readyTimeout: 5m, smokeTest: false}, postPromotionWindow: 2m, scaleDownDelay: 30s, progressDeadline: 20m}",
    );
    let s = Settings::from_spec(&spec).unwrap();
    assert!(!s.auto_promote);
    assert_eq!(s.auto_promote_after, Some(60 * MIN));
    assert_eq!(s.ready_timeout, 5 * MIN);
    assert!(!s.smoke_test);
    assert_eq!(s.post_promotion_window, 2 * MIN);
    assert_eq!(s.scale_down_delay, Duration::from_secs(30));
    assert_eq!(s.progress_deadline, 20 * MIN);
    spec.rollout.progress_deadline = "soon".into();
    let err = Settings::from_spec(&spec).unwrap_err();
    assert_eq!(err.field, "spec.rollout.progressDeadline");
}

#[test]
fn secret_hash_covers_the_connection_keys_only() {
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;
    let data = |password: &str, other: &str| {
        BTreeMap::from([
            ("host".to_string(), ByteString(b"db".to_vec())),
            (
                "password".to_string(),
                ByteString(password.as_bytes().to_vec()),
            ),
            (
                "unrelated".to_string(),
                ByteString(other.as_bytes().to_vec()),
            ),
        ])
    };
    let a = secret_hash(&data("s3cret", "x"));
    assert_eq!(
        a,
        secret_hash(&data("s3cret", "y")),
        "unused keys do not matter"
    );
    assert_ne!(
        a,
        secret_hash(&data("n3w", "x")),
        "a new password is a new template"
    );
    assert!(!a.contains("s3cret"));
    assert_eq!(a.len(), 16);
    assert_eq!(combined_hash("t1", None), "t1");
    assert_ne!(
        combined_hash("t1", Some(&a)),
        combined_hash("t1", Some("other"))
    );
    assert_ne!(combined_hash("t1", Some(&a)), "t1");
}

/// One decision on v1 (blue) -> v2 (green) from `rollout`, green as `green`.
fn decide_at(
    rollout: &RolloutStatus,
    serving: &Serving,
    green: Option<SlotState>,
    minute: i64,
) -> Decision {
    let desired = Target {
        version: "v2".into(),
        hash: hash("v2"),
    };
    decide(&Input {
        cluster_name: "chat",
        settings: &settings(),
        desired: &desired,
        serving,
        rollout: Some(rollout),
        blue: sts("v1", 3, 3),
        green,
        pods: healthy(Green),
        smoke: JobState::Absent,
        handover: JobState::Absent,
        backup: JobState::Absent,
        analysis: None,
        promote: false,
        abort: false,
        hibernation: Hibernation::Off,
        now: at(minute).0,
    })
}

fn on_blue() -> Serving {
    serving_on(Blue, "v1")
}

#[test]
fn time_paused_does_not_count_against_the_ready_timeout() {
    // Preparing since minute 0 with one of three relays ready; paused at minute 2 for an
    // hour; resumed at minute 62. readyTimeout is 10m.
    let preparing = r(Preparing, 0).unwrap();
    let not_resumed = decide_at(&preparing, &on_blue(), sts("v2", 3, 1), 62);
    assert_eq!(
        not_resumed.rollout.as_ref().map(|r| r.step),
        Some(Failed),
        "without the shift the hour paused would fail the rollout"
    );
    let resumed = resumed(&preparing, 60 * MIN);
    assert_eq!(
        resumed.started_at,
        at(0),
        "startedAt names the Jobs: it stays"
    );
    assert_eq!(resumed.step_started_at, at(60));
    assert_eq!(resumed.paused_seconds, Some(3600));
    let d = decide_at(&resumed, &on_blue(), sts("v2", 3, 1), 62);
    assert_eq!(d.rollout.as_ref().map(|r| r.step), Some(Preparing));
    // Still 10 minutes of the rollout's own time: at minute 71 (11 active) it fails.
    let d = decide_at(&resumed, &on_blue(), sts("v2", 3, 1), 71);
    let failed = d.rollout.unwrap();
    assert_eq!(failed.step, Failed);
    assert_eq!(failed.reason.as_deref(), Some(reason::READY_TIMEOUT));
    // The Jobs of the attempt keep their names.
    assert_eq!(
        smoke_job_name("chat", &resumed),
        smoke_job_name("chat", &preparing)
    );
}

#[test]
fn a_pause_in_the_post_promotion_window_resumes_the_window_where_it_stood() {
    // Promoted at minute 0 (window 10m); paused at minute 4 for 60 minutes.
    let serving = serving_on(Green, "v2");
    let promoted = r(Promoted, 0).unwrap();
    let resumed = resumed(&promoted, 60 * MIN);
    assert_eq!(resumed.promoted_at, Some(at(60)));
    // Four minutes after the resume the window (six minutes left) still runs...
    let d = decide_at(&resumed, &serving, sts("v2", 3, 3), 64 + 4);
    assert_eq!(d.rollout.as_ref().map(|r| r.step), Some(Promoted));
    // ...and passes after ten minutes of watching in all.
    let d = decide_at(&resumed, &serving, sts("v2", 3, 3), 70);
    assert_eq!(d.rollout.as_ref().map(|r| r.step), Some(ScalingDown));
    // A second pause adds up.
    let twice = super::resumed(&resumed, 5 * MIN);
    assert_eq!(twice.paused_seconds, Some(3900));
    assert_eq!(twice.promoted_at, Some(at(65)));
}

#[test]
fn a_settled_rollout_is_not_moved_by_a_pause() {
    let done = r(Complete, 30).unwrap();
    assert_eq!(resumed(&done, 60 * MIN), done);
    let preparing = r(Preparing, 0).unwrap();
    assert_eq!(resumed(&preparing, Duration::ZERO), preparing);
}

#[test]
fn a_rollout_cancelled_by_hibernation_starts_again_after_the_wake() {
    let validating = r(Validating, 2).unwrap();
    let desired = Target {
        version: "v2".into(),
        hash: hash("v2"),
    };
    let input = |rollout: Option<&RolloutStatus>, hibernation: Hibernation, minute: i64| {
        decide(&Input {
            cluster_name: "chat",
            settings: &settings(),
            desired: &desired,
            serving: &on_blue(),
            rollout,
            blue: sts("v1", 3, 3),
            green: sts("v2", 3, 3),
            pods: healthy(Green),
            smoke: JobState::Absent,
            handover: JobState::Absent,
            backup: JobState::Absent,
            analysis: None,
            promote: false,
            abort: false,
            hibernation,
            now: at(minute).0,
        })
    };
    let hibernated = input(Some(&validating), Hibernation::Hibernate, 3);
    let cancelled = hibernated.rollout.clone().unwrap();
    assert_eq!(cancelled.step, Cancelled);
    assert_eq!(cancelled.failed_template_hash, None, "not marked failed");
    assert!(
        cancelled.message.contains("rolls out again after the wake"),
        "{}",
        cancelled.message
    );
    // Waking: nothing starts until the relays are back.
    let waking = input(Some(&cancelled), Hibernation::Wake { replicas: 3 }, 100);
    assert_eq!(waking.rollout.as_ref().map(|r| r.step), Some(Cancelled));
    // Awake: a fresh attempt of the same version.
    let awake = input(Some(&cancelled), Hibernation::Off, 101);
    let again = awake.rollout.unwrap();
    assert!(again.step.in_flight(), "{:?}", again.step);
    assert_eq!(again.started_at, at(101));
    assert_eq!(awake.notes[0].reason, reason::STARTED);
    assert_ne!(
        smoke_job_name("chat", &again),
        smoke_job_name("chat", &validating)
    );
}

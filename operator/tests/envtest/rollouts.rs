//! Scenarios f and g: blue-green rollouts with the real StatefulSet and Job controllers.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dchat_operator::api::{DchatCluster, Phase, RolloutStep};
use dchat_operator::commands::{request, RolloutCommand};
use dchat_operator::labels::SLOT_LABEL;
use dchat_operator::rollout::IN_FLIGHT_RESYNC;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use kube::api::ListParams;

use crate::support::kubelet::{default_fate, image_tag, job_name, Fate};
use crate::support::{observed, wait_for, Env};

/// Short windows, so a rollout takes tens of seconds.
const FAST: &str =
    "rollout: {postPromotionWindow: 5s, scaleDownDelay: 3s, validation: {readyTimeout: 90s}}";

fn spec(version: &str, extra: &str) -> String {
    format!("version: '{version}'\n{FAST}\n{extra}")
}

fn step(c: &DchatCluster) -> Option<RolloutStep> {
    c.status.as_ref()?.rollout.as_ref().map(|r| r.step)
}

fn at_step(s: RolloutStep) -> impl Fn(&DchatCluster) -> bool {
    move |c| step(c) == Some(s)
}

fn running_on(version: &'static str) -> impl Fn(&DchatCluster) -> bool {
    move |c| {
        observed(c)
            && c.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Running && s.active_version.as_deref() == Some(version)
            })
    }
}

async fn service_slot(env: &Env, name: &str) -> String {
    let service: Service = env.get(name).await.expect("the client Service");
    service
        .spec
        .and_then(|s| s.selector)
        .and_then(|s| s.get(SLOT_LABEL).cloned())
        .unwrap_or_default()
}

async fn replicas(env: &Env, name: &str) -> Option<i32> {
    env.get::<StatefulSet>(name).await?.spec?.replicas
}

async fn jobs(env: &Env, kind: &str) -> Vec<Job> {
    env.api::<Job>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|j| j.metadata.name.as_deref().is_some_and(|n| n.contains(kind)))
        .collect()
}

/// Relay Pods of version 1.1 crash-loop once the returned flag is set; before that they
/// meet `before` (other Pods their default fate).
fn crash_new_relays_when_flagged(env: &Env, before: Fate) -> Arc<AtomicBool> {
    let crash = Arc::new(AtomicBool::new(false));
    let flag = crash.clone();
    env.kubelet.set_policy(move |pod| {
        if job_name(pod).is_some() || image_tag(pod).as_deref() != Some("1.1") {
            default_fate(pod)
        } else if flag.load(Ordering::Relaxed) {
            Fate::CrashLoop
        } else {
            before.clone()
        }
    });
    crash
}

/// Version 1.0 with `rollout` until it runs, then version 1.1 with it: a rollout starts.
async fn roll_out_1_1(env: &Env, rollout: &str) {
    env.apply_cluster("chat", &format!("version: '1.0'\n{rollout}"))
        .await
        .unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    env.apply_cluster("chat", &format!("version: '1.1'\n{rollout}"))
        .await
        .unwrap();
}

/// f. The smoke Job passes, the rollout promotes itself, the old slot goes to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_smoke_test_promotes() {
    let Some(env) = Env::shared("smoke-passes").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    let database = "replicas: 2\ndatabase: {secretRef: {name: dchat-db}}";
    env.apply_cluster("chat", &spec("1.0", database))
        .await
        .unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    env.apply_cluster("chat", &spec("1.1", database))
        .await
        .unwrap();
    env.wait_cluster("chat", "Validating", at_step(RolloutStep::Validating))
        .await;
    let validating = Instant::now();
    let cluster = env
        .wait_cluster("chat", "Running 1.1", running_on("1.1"))
        .await;
    // The smoke Job's completion moves the rollout on, and the window's end is a timer:
    // not the resync of rollouts in flight (60 s).
    let took = validating.elapsed();
    assert!(
        took < IN_FLIGHT_RESYNC / 2,
        "Validating to Complete took {took:?}"
    );
    let status = cluster.status.unwrap();
    assert_eq!(status.active_slot.as_str(), "green");
    assert_eq!(
        status.rollout.as_ref().map(|r| r.step),
        Some(RolloutStep::Complete)
    );
    assert_eq!(jobs(&env, "-smoke-").await.len(), 1, "one smoke Job");
    assert!(
        jobs(&env, "-handover-").await.is_empty(),
        "PostgreSQL: no handover"
    );
    assert_eq!(service_slot(&env, "chat").await, "green");
    wait_for("blue at zero", || async {
        (replicas(&env, "chat-blue").await == Some(0)).then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

/// f. The smoke Job fails: traffic never moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_smoke_test_does_not_switch() {
    let Some(env) = Env::shared("smoke-fails").await else {
        return;
    };
    env.kubelet.set_policy(|pod| match job_name(pod) {
        Some(job) if job.contains("-smoke-") => Fate::Fail,
        _ => default_fate(pod),
    });
    let operator = env.operator().await;
    env.apply_cluster("chat", &spec("1.0", "")).await.unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    env.apply_cluster("chat", &spec("1.1", "")).await.unwrap();
    let cluster = env
        .wait_cluster("chat", "the rollout Failed", at_step(RolloutStep::Failed))
        .await;
    let status = cluster.status.unwrap();
    assert_eq!(status.active_slot.as_str(), "blue");
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    assert_eq!(status.phase, Phase::RolledBack);
    assert_eq!(service_slot(&env, "chat").await, "blue");
    operator.assert_no_refusals();
}

/// f. A new relay that crash-loops before the switch fails the rollout when its
/// restarts show, not at the ready timeout or the next resync: its StatefulSet's status
/// does not change, its Pod's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_before_the_switch_fails_at_once() {
    let Some(env) = Env::shared("crash-before-switch").await else {
        return;
    };
    // The new relay stays Pending (its StatefulSet's status settles), then crash-loops.
    let crash = crash_new_relays_when_flagged(&env, Fate::Pending);
    let operator = env.operator().await;
    roll_out_1_1(
        &env,
        "rollout: {validation: {readyTimeout: 10m}, progressDeadline: 10m}",
    )
    .await;
    env.wait_cluster("chat", "0/1 new relays ready", |c| {
        c.status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .is_some_and(|r| r.step == RolloutStep::Preparing && r.message.starts_with("0/1"))
    })
    .await;
    // Past the debounce and any reconcile the StatefulSet's last status step started.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    crash.store(true, Ordering::Relaxed);
    let crashed = Instant::now();
    let cluster = env
        .wait_cluster("chat", "the rollout Failed", at_step(RolloutStep::Failed))
        .await;
    let took = crashed.elapsed();
    assert!(
        took < IN_FLIGHT_RESYNC / 2,
        "failed {took:?} after the crash"
    );
    let status = cluster.status.unwrap();
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    let rollout = status.rollout.unwrap();
    assert_eq!(rollout.reason.as_deref(), Some("PodFailing"), "{rollout:?}");
    assert_eq!(service_slot(&env, "chat").await, "blue");
    assert_pods_read_from_the_cache(&operator);
    operator.assert_no_refusals();
}

/// The rollout's reconciles read the relay Pods from the cache their watch fills: the
/// only list of Pods is that watch's own.
fn assert_pods_read_from_the_cache(operator: &crate::support::operator::RunningOperator) {
    let lists = operator.lists();
    let pods = lists.get("list pods").copied().unwrap_or(0);
    assert!(pods <= 1, "the reconciles listed Pods: {lists:?}");
}

/// f. A crash loop of the new relays inside the post-promotion window rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_in_the_window_rolls_back() {
    let Some(env) = Env::shared("crash-in-window").await else {
        return;
    };
    let crash = crash_new_relays_when_flagged(&env, Fate::Ready);
    let operator = env.operator().await;
    roll_out_1_1(
        &env,
        "rollout: {postPromotionWindow: 120s, scaleDownDelay: 3s}",
    )
    .await;
    env.wait_cluster("chat", "Promoted", at_step(RolloutStep::Promoted))
        .await;
    assert_eq!(service_slot(&env, "chat").await, "green");
    crash.store(true, Ordering::Relaxed);
    let cluster = env
        .wait_cluster("chat", "rolled back", at_step(RolloutStep::RolledBack))
        .await;
    let status = cluster.status.unwrap();
    assert_eq!(status.active_slot.as_str(), "blue");
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    let message = &status.rollout.as_ref().unwrap().message;
    assert!(message.contains("CrashLoopBackOff"), "{message}");
    assert_eq!(service_slot(&env, "chat").await, "blue");
    assert_pods_read_from_the_cache(&operator);
    operator.assert_no_refusals();
}

/// f. A manual gate: the rollout waits; the promote annotation (what `dchat-operator
/// promote` sets) lets it finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_gate_waits_for_promote() {
    let Some(env) = Env::shared("manual-gate").await else {
        return;
    };
    let operator = env.operator().await;
    let gate = "rollout: {autoPromote: false, postPromotionWindow: 5s, scaleDownDelay: 3s}";
    roll_out_1_1(&env, gate).await;
    let waiting = env
        .wait_cluster("chat", "AwaitingPromotion", |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::AwaitingPromotion)
        })
        .await;
    assert_eq!(waiting.status.unwrap().active_slot.as_str(), "blue");
    assert_eq!(service_slot(&env, "chat").await, "blue");
    request(env.admin.clone(), &env.ns, "chat", RolloutCommand::Promote)
        .await
        .unwrap();
    let cluster = env
        .wait_cluster("chat", "Running 1.1", running_on("1.1"))
        .await;
    assert_eq!(cluster.status.unwrap().active_slot.as_str(), "green");
    let annotations = env
        .cluster("chat")
        .await
        .metadata
        .annotations
        .unwrap_or_default();
    assert!(
        !annotations.contains_key("dchat.network/promote"),
        "the annotation is consumed"
    );
    operator.assert_no_refusals();
}

/// f. Abort while awaiting promotion: traffic stays on the old slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_keeps_the_old_version() {
    let Some(env) = Env::shared("abort").await else {
        return;
    };
    let operator = env.operator().await;
    let gate = "rollout: {autoPromote: false, scaleDownDelay: 3s}";
    roll_out_1_1(&env, gate).await;
    env.wait_cluster(
        "chat",
        "AwaitingPromotion",
        at_step(RolloutStep::AwaitingPromotion),
    )
    .await;
    request(env.admin.clone(), &env.ns, "chat", RolloutCommand::Abort)
        .await
        .unwrap();
    let cluster = env
        .wait_cluster("chat", "Aborted", at_step(RolloutStep::Aborted))
        .await;
    let status = cluster.status.unwrap();
    assert_eq!(status.active_slot.as_str(), "blue");
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    assert_eq!(service_slot(&env, "chat").await, "blue");
    wait_for("green back to zero", || async {
        (replicas(&env, "chat-green").await == Some(0)).then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

/// f. On the embedded store, the old relay's messages are handed over (a Job) before the
/// old slot scales down: while the handover Job runs, the old slot stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handover_job_runs_before_the_old_slot_scales_down() {
    let Some(env) = Env::shared("handover").await else {
        return;
    };
    let release = Arc::new(AtomicBool::new(false));
    let flag = release.clone();
    env.kubelet.set_policy(move |pod| match job_name(pod) {
        Some(job) if job.contains("-handover-") && !flag.load(Ordering::Relaxed) => Fate::Pending,
        _ => default_fate(pod),
    });
    let operator = env.operator().await;
    env.apply_cluster("chat", &spec("1.0", "")).await.unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    env.apply_cluster("chat", &spec("1.1", "")).await.unwrap();
    env.wait_cluster("chat", "ScalingDown", at_step(RolloutStep::ScalingDown))
        .await;
    wait_for("the handover Job", || async {
        (!jobs(&env, "-handover-").await.is_empty()).then_some(())
    })
    .await;
    // The Job has not finished: blue keeps its relay.
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert_eq!(
        replicas(&env, "chat-blue").await,
        Some(1),
        "scaled down before the handover"
    );
    assert_eq!(
        step(&env.cluster("chat").await),
        Some(RolloutStep::ScalingDown)
    );
    release.store(true, Ordering::Relaxed);
    env.wait_cluster("chat", "Complete", at_step(RolloutStep::Complete))
        .await;
    wait_for("blue at zero", || async {
        (replicas(&env, "chat-blue").await == Some(0)).then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

/// g. The operator killed (like SIGKILL) at every rollout step and started again: the
/// rollout resumes from status and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_the_operator_killed_at_every_step() {
    let Some(env) = Env::shared("killed-every-step").await else {
        return;
    };
    let gate = "rollout: {autoPromote: false, postPromotionWindow: 5s, scaleDownDelay: 3s}";
    let mut operator = env.operator().await;
    roll_out_1_1(&env, gate).await;
    let mut killed_at = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        let cluster = env.cluster("chat").await;
        if running_on("1.1")(&cluster) && step(&cluster) == Some(RolloutStep::Complete) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rollout did not finish; killed at {killed_at:?}; status {:?}",
            cluster.status
        );
        let current = step(&cluster).filter(|s| s.in_flight());
        if let Some(current) = current {
            if killed_at.insert(current.as_str()) {
                operator.assert_no_refusals();
                operator.kill();
                operator = env.operator().await;
                if current == RolloutStep::AwaitingPromotion {
                    request(env.admin.clone(), &env.ns, "chat", RolloutCommand::Promote)
                        .await
                        .unwrap();
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for expected in ["AwaitingPromotion", "Promoted", "ScalingDown"] {
        assert!(
            killed_at.contains(expected),
            "never killed at {expected}: {killed_at:?}"
        );
    }
    assert!(killed_at.len() >= 4, "{killed_at:?}");
    assert_eq!(service_slot(&env, "chat").await, "green");
    operator.assert_no_refusals();
}

/// The HPA during a rollout: held at the validated count until the switch; in the
/// post-promotion window free to scale the new slot out (not below that count), and a
/// scale-out is no reason to roll back; the spec's limits after the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hpa_may_scale_out_in_the_post_promotion_window() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use kube::api::{Patch, PatchParams};
    let Some(env) = Env::shared("hpa-window").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    let scaled = |version: &str| {
        format!(
            "version: '{version}'\nreplicas: 2\ndatabase: {{secretRef: {{name: dchat-db}}}}\n\
             autoscaling: {{enabled: true, minReplicas: 2, maxReplicas: 6}}\n\
             rollout: {{autoPromote: false, postPromotionWindow: 40s, scaleDownDelay: 3s}}"
        )
    };
    env.apply_cluster("chat", &scaled("1.0")).await.unwrap();
    env.wait_cluster("chat", "Running 1.0 with 2 relays", |c| {
        running_on("1.0")(c) && c.status.as_ref().is_some_and(|s| s.ready_replicas == 2)
    })
    .await;
    env.apply_cluster("chat", &scaled("1.1")).await.unwrap();
    env.wait_cluster(
        "chat",
        "AwaitingPromotion",
        at_step(RolloutStep::AwaitingPromotion),
    )
    .await;
    let bounds = |hpa: HorizontalPodAutoscaler| {
        let spec = hpa.spec.unwrap();
        (
            spec.min_replicas,
            spec.max_replicas,
            spec.scale_target_ref.name,
        )
    };
    let held = bounds(env.get("chat").await.unwrap());
    assert_eq!(
        held,
        (Some(2), 2, "chat-blue".to_string()),
        "held before the switch"
    );

    request(env.admin.clone(), &env.ns, "chat", RolloutCommand::Promote)
        .await
        .unwrap();
    env.wait_cluster("chat", "Promoted", at_step(RolloutStep::Promoted))
        .await;
    wait_for("the HPA on green with room to scale out", || async {
        let b = bounds(env.get("chat").await?);
        (b == (Some(2), 6, "chat-green".to_string())).then_some(())
    })
    .await;
    // A spike: the HPA scales the new slot out (through /scale).
    env.api::<StatefulSet>()
        .patch_scale(
            "chat-green",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    // Through the rest of the window: no rollback, the scale-out stays.
    let cluster = env
        .wait_cluster("chat", "past the window", |c| {
            matches!(
                step(c),
                Some(RolloutStep::ScalingDown | RolloutStep::Complete | RolloutStep::RolledBack)
            )
        })
        .await;
    assert_ne!(
        step(&cluster),
        Some(RolloutStep::RolledBack),
        "{:?}",
        cluster.status
    );
    assert_eq!(replicas(&env, "chat-green").await, Some(3));
    wait_for("the spec's HPA limits back", || async {
        let b = bounds(env.get("chat").await?);
        (b == (Some(2), 6, "chat-green".to_string())).then_some(())
    })
    .await;
    env.wait_cluster("chat", "Running 1.1", running_on("1.1"))
        .await;
    operator.assert_no_refusals();
}

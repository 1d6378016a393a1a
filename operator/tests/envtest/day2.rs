//! Day-2 operations on a real control plane: pause (nothing written while paused, the
//! change applied on resume), a rollout paused past its timeouts that resumes and
//! completes, hibernation (StatefulSet at zero with the real StatefulSet controller and
//! disruption budget, HPA gone, claims and Services kept) and wake, and a declarative
//! restart that replaces the relays once per value.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dchat_operator::api::{DchatCluster, Phase, RolloutStep};
use dchat_operator::labels::{
    HIBERNATION_ANNOTATION, RECONCILE_ANNOTATION, RESTARTED_AT_ANNOTATION,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};

use crate::support::kubelet::{default_fate, image_tag, job_name, Fate};
use crate::support::{condition, condition_status, observed, wait_for, Env};

/// Short windows, so a rollout takes tens of seconds.
const FAST: &str =
    "rollout: {postPromotionWindow: 5s, scaleDownDelay: 3s, validation: {readyTimeout: 90s}}";

fn step(c: &DchatCluster) -> Option<RolloutStep> {
    c.status.as_ref()?.rollout.as_ref().map(|r| r.step)
}

fn running_on(version: &'static str) -> impl Fn(&DchatCluster) -> bool {
    move |c| {
        observed(c)
            && c.status.as_ref().is_some_and(|s| {
                s.phase == Phase::Running && s.active_version.as_deref() == Some(version)
            })
    }
}

fn paused(c: &DchatCluster) -> bool {
    condition_status(c, "Paused") == "True"
}

async fn annotate(env: &Env, key: &str, value: Option<&str>) {
    env.clusters()
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .expect("annotating the DchatCluster");
}

async fn replicas(env: &Env, name: &str) -> Option<i32> {
    env.get::<StatefulSet>(name).await?.spec?.replicas
}

/// How often an Event about the DchatCluster with `reason` was published: a repeat is
/// counted in its first Event's series, not written again.
async fn occurrences(env: &Env, reason: &str) -> i32 {
    env.events(reason)
        .await
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("DchatCluster"))
        .map(|e| e.series.map_or(1, |series| series.count))
        .sum()
}

/// The PersistentVolumeClaims of the namespace: (name, uid).
async fn claims(env: &Env) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env
        .api::<PersistentVolumeClaim>()
        .list(&ListParams::default())
        .await
        .expect("listing claims")
        .items
        .into_iter()
        .map(|c| {
            (
                c.metadata.name.unwrap_or_default(),
                c.metadata.uid.unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Pause by annotation: a spec change and later reconciles write no child; removing
/// the annotation applies the change (a blue-green rollout to the new version). One
/// Event for the pause, one for the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_cluster_is_not_changed_and_resumes_with_the_change() {
    let Some(env) = Env::shared("day2-pause").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    let spec = |version: &str, replicas: i32| {
        format!(
            "version: '{version}'\nreplicas: {replicas}\ndatabase: {{secretRef: {{name: dchat-db}}}}\n\
             disruptionBudget: {{minAvailable: 1}}\n{FAST}"
        )
    };
    env.apply_cluster("chat", &spec("1.0", 2)).await.unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;

    annotate(&env, RECONCILE_ANNOTATION, Some("paused")).await;
    let cluster = env.wait_cluster("chat", "Paused", paused).await;
    let p = condition(&cluster, "Paused").unwrap();
    assert_eq!(p.reason, "PausedByAnnotation");
    let children = env.children("chat").await;

    // A new version and size while paused: the reconcile that saw it wrote only the
    // status (the Paused condition now describes the new generation).
    env.apply_cluster("chat", &spec("1.1", 3)).await.unwrap();
    let cluster = env
        .wait_cluster("chat", "the pause to cover the new generation", |c| {
            condition(c, "Paused").and_then(|p| p.observed_generation) == c.metadata.generation
        })
        .await;
    let status = cluster.status.clone().unwrap();
    assert!(status.observed_generation < cluster.metadata.generation);
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    assert_eq!(env.children("chat").await, children, "a child was written");
    // More reconciles (a poke, a StatefulSet event) change nothing either.
    for round in 0..2 {
        let before = operator.reconciles_finished();
        env.poke("chat", &format!("paused-{round}")).await;
        operator.wait_reconciled_after(before).await;
        assert_eq!(env.children("chat").await, children, "round {round}");
    }
    assert!(env.get::<StatefulSet>("chat-green").await.is_none());

    annotate(&env, RECONCILE_ANNOTATION, None).await;
    let cluster = env
        .wait_cluster("chat", "Running 1.1 after the resume", running_on("1.1"))
        .await;
    assert!(condition(&cluster, "Paused").is_none());
    assert_eq!(cluster.status.unwrap().ready_replicas, 3);
    assert_eq!(occurrences(&env, "Paused").await, 1, "one Event per pause");
    assert_eq!(
        occurrences(&env, "Resumed").await,
        1,
        "one Event per resume"
    );
    operator.assert_no_refusals();
}

/// A rollout paused (spec.paused) in Preparing for longer than its readyTimeout and
/// progressDeadline resumes at Preparing and completes: the time paused does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_paused_past_its_deadlines_resumes_and_completes() {
    let Some(env) = Env::shared("day2-pause-rollout").await else {
        return;
    };
    // The new relays stay Pending until released.
    let release = Arc::new(AtomicBool::new(false));
    let flag = release.clone();
    env.kubelet.set_policy(move |pod| {
        if job_name(pod).is_none()
            && image_tag(pod).as_deref() == Some("1.1")
            && !flag.load(Ordering::Relaxed)
        {
            Fate::Pending
        } else {
            default_fate(pod)
        }
    });
    let operator = env.operator().await;
    let spec = |version: &str, paused: bool| {
        format!(
            "version: '{version}'\npaused: {paused}\n\
             rollout: {{postPromotionWindow: 5s, scaleDownDelay: 3s, progressDeadline: 12s, validation: {{readyTimeout: 12s}}}}"
        )
    };
    env.apply_cluster("chat", &spec("1.0", false))
        .await
        .unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    env.apply_cluster("chat", &spec("1.1", false))
        .await
        .unwrap();
    env.wait_cluster("chat", "Preparing", |c| {
        step(c) == Some(RolloutStep::Preparing)
    })
    .await;
    env.apply_cluster("chat", &spec("1.1", true)).await.unwrap();
    env.wait_cluster("chat", "Paused", paused).await;

    // Paused for longer than both deadlines (the scenario is time passing, not a wait
    // for something to happen).
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The new relay becomes ready while paused: the operator looks and does not move.
    release.store(true, Ordering::Relaxed);
    wait_for("green ready", || async {
        let sts = env.get::<StatefulSet>("chat-green").await?;
        (sts.status?.ready_replicas == Some(1)).then_some(())
    })
    .await;
    let before = operator.reconciles_finished();
    env.poke("chat", "while-paused").await;
    operator.wait_reconciled_after(before).await;
    assert_eq!(
        step(&env.cluster("chat").await),
        Some(RolloutStep::Preparing)
    );

    env.apply_cluster("chat", &spec("1.1", false))
        .await
        .unwrap();
    let cluster = env
        .wait_cluster("chat", "Running 1.1", |c| {
            running_on("1.1")(c) || step(c) == Some(RolloutStep::Failed)
        })
        .await;
    let rollout = cluster.status.as_ref().unwrap().rollout.clone().unwrap();
    assert_ne!(rollout.step, RolloutStep::Failed, "{}", rollout.message);
    assert!(
        rollout.paused_seconds.unwrap_or(0) >= 15,
        "{:?}",
        rollout.paused_seconds
    );
    env.wait_cluster("chat", "Complete", |c| {
        step(c) == Some(RolloutStep::Complete)
    })
    .await;
    operator.assert_no_refusals();
}

/// Hibernation of an autoscaled cluster with a disruption budget: the real StatefulSet
/// controller takes the relays to zero (the budget does not block a scale-down), the
/// HPA goes, claims, Services and the budget stay; the wake brings back the count the
/// HPA had, then the HPA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernation_scales_to_zero_keeps_the_rest_and_wakes_to_the_same_size() {
    let Some(env) = Env::shared("day2-hibernate").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    env.apply_cluster(
        "chat",
        "version: '1.0'\nreplicas: 2\ndatabase: {secretRef: {name: dchat-db}}\n\
         autoscaling: {enabled: true, minReplicas: 2, maxReplicas: 6}\n\
         disruptionBudget: {minAvailable: 1}",
    )
    .await
    .unwrap();
    env.wait_cluster("chat", "Running with 2 relays", |c| {
        running_on("1.0")(c) && c.status.as_ref().is_some_and(|s| s.ready_replicas == 2)
    })
    .await;
    // The HPA scaled out to 3 (through /scale, as it does).
    env.api::<StatefulSet>()
        .patch_scale(
            "chat-blue",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    env.wait_cluster("chat", "3 relays ready", |c| {
        c.status.as_ref().is_some_and(|s| s.ready_replicas == 3)
    })
    .await;
    let volumes = wait_for("three claims", || async {
        let c = claims(&env).await;
        (c.len() == 3).then_some(c)
    })
    .await;
    let sts_uid = env
        .get::<StatefulSet>("chat-blue")
        .await
        .unwrap()
        .metadata
        .uid;
    let claim_templates = env
        .get::<StatefulSet>("chat-blue")
        .await
        .unwrap()
        .spec
        .unwrap()
        .volume_claim_templates;

    annotate(&env, HIBERNATION_ANNOTATION, Some("on")).await;
    let cluster = env
        .wait_cluster("chat", "Hibernated", |c| {
            condition_status(c, "Hibernated") == "True"
        })
        .await;
    let status = cluster.status.unwrap();
    assert_eq!(status.phase, Phase::Hibernating);
    assert_eq!(status.hibernation.as_ref().map(|h| h.replicas), Some(3));
    assert_eq!(replicas(&env, "chat-blue").await, Some(0));
    wait_for("no relay pod", || async {
        let pods = env.api::<Pod>().list(&ListParams::default()).await.ok()?;
        pods.items.is_empty().then_some(())
    })
    .await;
    assert!(env.get::<HorizontalPodAutoscaler>("chat").await.is_none());
    assert!(env.get::<PodDisruptionBudget>("chat").await.is_some());
    for service in ["chat", "chat-preview", "chat-blue-headless"] {
        assert!(env.get::<Service>(service).await.is_some(), "{service}");
    }
    assert_eq!(claims(&env).await, volumes, "every claim kept");
    let sts = env.get::<StatefulSet>("chat-blue").await.unwrap();
    assert_eq!(
        sts.metadata.uid, sts_uid,
        "the StatefulSet is not recreated"
    );
    assert_eq!(sts.spec.unwrap().volume_claim_templates, claim_templates);

    annotate(&env, HIBERNATION_ANNOTATION, Some("off")).await;
    let cluster = env
        .wait_cluster("chat", "awake with 3 relays", |c| {
            running_on("1.0")(c)
                && c.status
                    .as_ref()
                    .is_some_and(|s| s.ready_replicas == 3 && s.hibernation.is_none())
        })
        .await;
    assert!(condition(&cluster, "Hibernated").is_none());
    let hpa = wait_for("the HPA back", || async {
        env.get::<HorizontalPodAutoscaler>("chat").await
    })
    .await;
    assert_eq!(hpa.spec.unwrap().min_replicas, Some(2));
    assert_eq!(replicas(&env, "chat-blue").await, Some(3));
    assert_eq!(claims(&env).await, volumes, "the same claims serve again");
    assert_eq!(
        env.get::<StatefulSet>("chat-blue")
            .await
            .unwrap()
            .metadata
            .uid,
        sts_uid
    );
    operator.assert_no_refusals();
}

/// Hibernation on the embedded store keeps the relay's volume: the same claim (by UID)
/// and claim template before and after, so the store a woken relay opens is the one it
/// closed (relay/tests/relay_process.rs shows such a relay delivers every stored message
/// after a SIGTERM and a restart on the same data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernation_on_the_embedded_store_keeps_the_volume() {
    let Some(env) = Env::shared("day2-hibernate-embedded").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_cluster("chat", &format!("version: '1.0'\nhibernate: false\n{FAST}"))
        .await
        .unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    let volumes = wait_for("the relay's claim", || async {
        let c = claims(&env).await;
        (c.len() == 1).then_some(c)
    })
    .await;
    let before = env.get::<StatefulSet>("chat-blue").await.unwrap();

    env.apply_cluster("chat", &format!("version: '1.0'\nhibernate: true\n{FAST}"))
        .await
        .unwrap();
    env.wait_cluster("chat", "Hibernated", |c| {
        condition_status(c, "Hibernated") == "True"
    })
    .await;
    assert_eq!(claims(&env).await, volumes);
    env.apply_cluster("chat", &format!("version: '1.0'\nhibernate: false\n{FAST}"))
        .await
        .unwrap();
    env.wait_cluster("chat", "awake", |c| {
        running_on("1.0")(c) && c.status.as_ref().is_some_and(|s| s.hibernation.is_none())
    })
    .await;
    let after = env.get::<StatefulSet>("chat-blue").await.unwrap();
    assert_eq!(after.metadata.uid, before.metadata.uid);
    assert_eq!(
        after.spec.unwrap().volume_claim_templates,
        before.spec.unwrap().volume_claim_templates
    );
    assert_eq!(
        claims(&env).await,
        volumes,
        "the woken relay mounts the same claim"
    );
    operator.assert_no_refusals();
}

/// A restart request replaces the relays through a blue-green rollout of the same
/// version (on the embedded store, with the handover Job); the same value again, in
/// another spelling, restarts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_replaces_the_relays_once_per_value() {
    let Some(env) = Env::shared("day2-restart").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_cluster("chat", &format!("version: '1.0'\n{FAST}"))
        .await
        .unwrap();
    env.wait_cluster("chat", "Running 1.0", running_on("1.0"))
        .await;
    let old_pods: Vec<String> = env
        .api::<Pod>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();

    annotate(&env, RESTARTED_AT_ANNOTATION, Some("2026-12-06T10:00:00Z")).await;
    let cluster = env
        .wait_cluster("chat", "restarted into green", |c| {
            step(c) == Some(RolloutStep::Complete)
                && c.status
                    .as_ref()
                    .is_some_and(|s| s.active_slot.as_str() == "green")
        })
        .await;
    let status = cluster.status.unwrap();
    assert_eq!(status.active_version.as_deref(), Some("1.0"));
    assert_eq!(
        status.restarted_at.map(|t| t.0.as_second()),
        Some(
            "2026-12-06T10:00:00Z"
                .parse::<k8s_openapi::jiff::Timestamp>()
                .unwrap()
                .as_second()
        )
    );
    let rollout = status.rollout.unwrap();
    assert_eq!(rollout.from_version.as_deref(), Some("1.0"));
    wait_for("blue at zero", || async {
        (replicas(&env, "chat-blue").await == Some(0)).then_some(())
    })
    .await;
    let new_pods = wait_for("green's relay", || async {
        let pods = env.api::<Pod>().list(&ListParams::default()).await.ok()?;
        let relays: Vec<Pod> = pods
            .items
            .into_iter()
            .filter(|p| job_name(p).is_none())
            .collect();
        (relays.len() == 1).then_some(relays)
    })
    .await;
    let pod = &new_pods[0];
    assert!(
        !old_pods.contains(pod.metadata.uid.as_ref().unwrap()),
        "a new relay"
    );
    assert_eq!(
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RESTARTED_AT_ANNOTATION))
            .map(String::as_str),
        Some("2026-12-06T10:00:00Z")
    );
    assert_eq!(occurrences(&env, "RestartRequested").await, 1);

    // The same time again, spelled differently: no second restart.
    annotate(
        &env,
        RESTARTED_AT_ANNOTATION,
        Some("2026-12-06T11:00:00+01:00"),
    )
    .await;
    let before = operator.reconciles_finished();
    env.poke("chat", "same-restart").await;
    operator.wait_reconciled_after(before).await;
    let cluster = env.cluster("chat").await;
    let again = cluster.status.unwrap().rollout.unwrap();
    assert_eq!(again.step, RolloutStep::Complete);
    assert_eq!(again.started_at, rollout.started_at, "no new rollout");
    operator.assert_no_refusals();
}

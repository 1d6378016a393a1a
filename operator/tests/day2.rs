//! Day-2 scenarios on the in-memory Kubernetes API: pause and resume (also in the middle
//! of a rollout), hibernate and wake (with and without autoscaling, and in the middle of a
//! rollout), declarative restarts, and bad annotation values. The test plays the
//! StatefulSet controller, the kubelet and the Job controller and moves a manual clock;
//! every reconcile runs on a fresh operator context (an operator restart before each
//! step), so everything must come from status.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dchat_operator::api::{DchatCluster, DchatClusterStatus, Phase, RolloutStep, Slot};
use dchat_operator::controller::{Context, ManualClock, HANDOVER_MANAGER};
use dchat_operator::labels::{
    HIBERNATION_ANNOTATION, RECONCILE_ANNOTATION, RESTARTED_AT_ANNOTATION,
};
use dchat_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use serde_json::json;
use support::Harness;

const MIN: Duration = Duration::from_secs(60);

/// Three relays on PostgreSQL, a disruption budget that keeps two, ten-minute windows.
const V1: &str = r#"
version: '1.0.0'
replicas: 3
database: {secretRef: {name: dchat-db}}
disruptionBudget: {minAvailable: 2}
rollout: {postPromotionWindow: 10m, scaleDownDelay: 15m, progressDeadline: 15m, validation: {readyTimeout: 10m}}
"#;

/// The same with autoscaling between 2 and 6 relays.
const AUTOSCALED: &str = r#"
version: '1.0.0'
replicas: 2
database: {secretRef: {name: dchat-db}}
autoscaling: {enabled: true, minReplicas: 2, maxReplicas: 6}
rollout: {postPromotionWindow: 10m, scaleDownDelay: 15m}
"#;

fn with(spec: &str, extra: &str) -> String {
    format!("{spec}\n{extra}\n")
}

fn with_version(spec: &str, version: &str) -> String {
    spec.replace("version: '1.0.0'", &format!("version: '{version}'"))
}

struct Scenario {
    h: Harness,
    clock: Arc<ManualClock>,
}

impl Scenario {
    /// A cluster serving `spec` (version 1.0.0) from blue, every relay ready, settled.
    async fn serving(spec: &str) -> Self {
        let h = Harness::new(false).await;
        let clock = Arc::new(ManualClock::new(
            Timestamp::from_second(1_800_000_000).unwrap(),
        ));
        let s = Self { h, clock };
        s.h.create_cluster("chat", spec).await;
        s.reconcile().await;
        s.sts_ready("chat-blue").await;
        for _ in 0..3 {
            s.reconcile().await;
        }
        assert_eq!(s.status().await.phase, Phase::Running);
        s
    }

    /// One reconcile by a freshly started operator; what it asked of the controller.
    async fn reconcile(&self) -> Action {
        let ctx = Context::new(
            self.h.client.clone(),
            Arc::new(Metrics::new()),
            Some("restarted".into()),
        )
        .with_clock(self.clock.clone())
        .with_capabilities(self.h.capabilities.clone());
        let cluster = self.h.cluster("chat").await;
        let action = dchat_operator::controller::reconcile(Arc::new(cluster), Arc::new(ctx))
            .await
            .unwrap();
        self.drop_released_status_fields().await;
        action
    }

    /// Plays the part of server-side apply the in-memory API lacks: it merges an apply
    /// where the API server replaces what the field manager owns, so a status field the
    /// operator stopped sending stays. `status.hibernation` is sent exactly while the
    /// `Hibernated` condition is; without it, the API server would have removed the
    /// record (`operator/tests/envtest/day2.rs` checks that on a real one).
    async fn drop_released_status_fields(&self) {
        let status = self.status().await;
        if status.hibernation.is_some()
            && !status.conditions.iter().any(|c| c.type_ == "Hibernated")
        {
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "remove", "path": "/status/hibernation"}
            ]))
            .unwrap();
            self.h
                .clusters()
                .patch_status("chat", &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
                .unwrap();
        }
    }

    /// Reconciles until a reconcile writes nothing (at most 5 times).
    async fn settle(&self) {
        for _ in 0..5 {
            self.h.reset_calls();
            self.reconcile().await;
            if self.h.writes().is_empty() {
                return;
            }
        }
        panic!("did not settle: {:?}", self.h.writes());
    }

    async fn cluster(&self) -> DchatCluster {
        self.h.cluster("chat").await
    }

    async fn status(&self) -> DchatClusterStatus {
        self.cluster().await.status.unwrap()
    }

    async fn condition(&self, type_: &str) -> Option<Condition> {
        self.status()
            .await
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
    }

    async fn step(&self) -> Option<RolloutStep> {
        self.status().await.rollout.map(|r| r.step)
    }

    async fn sts(&self, name: &str) -> StatefulSet {
        self.h.api::<StatefulSet>().get(name).await.unwrap()
    }

    async fn replicas(&self, name: &str) -> i32 {
        self.sts(name).await.spec.unwrap().replicas.unwrap_or(1)
    }

    async fn pod_annotation(&self, name: &str, key: &str) -> Option<String> {
        self.sts(name)
            .await
            .spec?
            .template
            .metadata?
            .annotations?
            .get(key)
            .cloned()
    }

    /// Plays the StatefulSet controller: every desired pod exists and is ready.
    async fn sts_ready(&self, name: &str) {
        let replicas = self.replicas(name).await;
        self.h.set_statefulset_status(name, replicas).await;
    }

    /// Plays the kubelet: three healthy relay pods of `slot`.
    async fn healthy_pods(&self, slot: Slot) {
        for index in 0..3 {
            let name = format!("chat-{slot}-{index}");
            let pod: Pod = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": support::NS,
                    "labels": {
                        "app.kubernetes.io/name": "dchat-relay",
                        "app.kubernetes.io/instance": "chat",
                        "dchat.network/slot": slot.as_str(),
                        "controller-revision-hash": "rev-1",
                    },
                },
                "spec": {"containers": [{"name": "relay", "image": "x"}]},
                "status": {"containerStatuses": [{
                    "name": "relay", "image": "x", "imageID": "", "ready": true,
                    "restartCount": 0, "state": {"running": {}}, "lastState": {},
                }]},
            }))
            .unwrap();
            let api = self.h.api::<Pod>();
            if api.get_opt(&name).await.unwrap().is_none() {
                api.create(&PostParams::default(), &pod).await.unwrap();
            }
        }
    }

    /// Plays the Job controller: the smoke Job of the rollout in flight succeeded.
    async fn pass_smoke(&self) {
        let jobs = self.h.api::<Job>().list(&Default::default()).await.unwrap();
        for job in jobs.items {
            let name = job.metadata.name.unwrap();
            if !name.contains("-smoke-") {
                continue;
            }
            let status = json!({"status": {
                "succeeded": 1,
                "conditions": [{"type": "Complete", "status": "True", "reason": "Completed"}],
            }});
            self.h
                .api::<Job>()
                .patch(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
    }

    /// Sets (or with `None` removes) an annotation of the DchatCluster.
    async fn annotate(&self, key: &str, value: Option<&str>) {
        let patch = json!({"metadata": {"annotations": {key: value}}});
        self.h
            .clusters()
            .patch("chat", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Drives a rollout from Preparing through validation to Complete.
    async fn finish_rollout(&self, to: Slot) {
        let name = format!("chat-{to}");
        self.sts_ready(&name).await;
        self.healthy_pods(to).await;
        self.reconcile().await;
        assert_eq!(self.step().await, Some(RolloutStep::Validating));
        self.reconcile().await;
        self.pass_smoke().await;
        self.clock.advance(MIN);
        self.reconcile().await;
        assert_eq!(self.step().await, Some(RolloutStep::Promoted));
        assert_eq!(self.status().await.active_slot, to);
        self.clock.advance(10 * MIN);
        self.reconcile().await;
        assert_eq!(self.step().await, Some(RolloutStep::ScalingDown));
        self.clock.advance(5 * MIN);
        self.reconcile().await;
        assert_eq!(self.step().await, Some(RolloutStep::Complete));
    }

    /// The requests that changed something other than the DchatCluster's own status
    /// and its Events (named `chat.<id>`).
    fn child_writes(&self) -> Vec<support::Call> {
        self.h
            .writes()
            .into_iter()
            .filter(|c| !(c.verb == "patch_status" && c.target == "chat"))
            .filter(|c| !(c.verb == "create" && c.target.starts_with("chat.")))
            .collect()
    }
}

#[tokio::test]
async fn a_paused_cluster_gets_no_write_and_no_read_and_resumes_with_the_change() {
    let s = Scenario::serving(V1).await;
    let before = s.sts("chat-blue").await;

    s.annotate(RECONCILE_ANNOTATION, Some("paused")).await;
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(
        s.child_writes(),
        vec![],
        "only the status says it is paused"
    );
    let paused = s.condition("Paused").await.expect("a Paused condition");
    assert_eq!(
        (paused.status.as_str(), paused.reason.as_str()),
        ("True", "PausedByAnnotation")
    );
    let progressing = s.condition("Progressing").await.unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "Paused")
    );

    // A new version and size while paused: nothing happens, not even a read of the
    // children.
    s.h.update_spec(
        "chat",
        &with_version(&V1.replace("replicas: 3", "replicas: 4"), "1.1.0"),
    )
    .await;
    s.clock.advance(30 * MIN);
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(s.child_writes(), vec![]);
    assert!(
        s.h.all_calls().iter().all(|c| c.verb != "list"),
        "a paused cluster is not observed: {:?}",
        s.h.all_calls()
    );
    assert_eq!(s.sts("chat-blue").await.spec, before.spec);
    assert!(!s.h.exists::<StatefulSet>("chat-green").await);
    let cluster = s.cluster().await;
    let status = cluster.status.clone().unwrap();
    assert!(
        status.observed_generation < cluster.metadata.generation,
        "the new generation is not acted on: {:?} < {:?}",
        status.observed_generation,
        cluster.metadata.generation
    );
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    // Paused and unchanged: no status write either.
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(s.h.writes(), vec![]);

    // Resumed: the change rolls out.
    s.annotate(RECONCILE_ANNOTATION, None).await;
    s.reconcile().await;
    assert!(s.condition("Paused").await.is_none());
    let cluster = s.cluster().await;
    let status = cluster.status.clone().unwrap();
    assert_eq!(status.observed_generation, cluster.metadata.generation);
    let rollout = status.rollout.unwrap();
    assert_eq!(
        (
            rollout.step,
            rollout.target_version.as_str(),
            rollout.replicas
        ),
        (RolloutStep::Preparing, "1.1.0", 4)
    );
    assert_eq!(rollout.paused_seconds, None, "no rollout was in flight");
    assert_eq!(s.replicas("chat-green").await, 4);
}

#[tokio::test]
async fn spec_paused_pauses_too_and_a_new_cluster_paused_from_the_start_creates_nothing() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", &with(V1, "paused: true")).await;
    h.reconcile("chat").await.unwrap();
    assert!(!h.exists::<StatefulSet>("chat-blue").await);
    assert!(!h.exists::<Service>("chat").await);
    let cluster = h.cluster("chat").await;
    assert!(
        cluster
            .metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"dchat.network/cleanup".to_string()),
        "the finalizer is there, so a delete still cleans up"
    );
    let status = cluster.status.unwrap();
    assert_eq!(status.phase, Phase::Pending);
    let paused = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Paused")
        .unwrap();
    assert_eq!(paused.reason, "PausedBySpec");

    h.update_spec("chat", V1).await;
    h.reconcile("chat").await.unwrap();
    assert!(h.exists::<StatefulSet>("chat-blue").await);
}

#[tokio::test]
async fn deleting_a_paused_cluster_still_cleans_up() {
    let s = Scenario::serving(V1).await;
    s.annotate(RECONCILE_ANNOTATION, Some("paused")).await;
    s.reconcile().await;
    let mut deleting = s.cluster().await;
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
    );
    dchat_operator::controller::reconcile(Arc::new(deleting), s.h.ctx.clone())
        .await
        .unwrap();
    assert!(!s.h.exists::<StatefulSet>("chat-blue").await);
    assert!(s
        .cluster()
        .await
        .metadata
        .finalizers
        .unwrap_or_default()
        .is_empty());
}

#[tokio::test]
async fn a_rollout_paused_for_an_hour_resumes_at_its_step_and_completes() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    assert_eq!(s.step().await, Some(RolloutStep::Preparing));
    // One relay of three up when the pause begins.
    s.h.set_statefulset_status("chat-green", 1).await;
    s.clock.advance(2 * MIN);
    s.reconcile().await;

    s.h.update_spec("chat", &with(&with_version(V1, "1.1.0"), "paused: true"))
        .await;
    s.reconcile().await;
    assert_eq!(s.condition("Paused").await.unwrap().reason, "PausedBySpec");
    // An hour passes: far beyond readyTimeout (10m) and progressDeadline (15m).
    s.clock.advance(60 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, Some(RolloutStep::Preparing));

    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::Preparing, "{}", rollout.message);
    assert_eq!(rollout.paused_seconds, Some(3600));
    assert!(s.condition("Paused").await.is_none());
    // The step's own time still counts: the rollout goes on from where it stood.
    s.finish_rollout(Slot::Green).await;
    let status = s.status().await;
    assert_eq!(status.active_version.as_deref(), Some("1.1.0"));
    assert_eq!(status.active_slot, Slot::Green);
    s.settle().await;
    assert_eq!(s.status().await.phase, Phase::Running);
}

#[tokio::test]
async fn hibernation_keeps_volumes_and_services_and_wakes_at_the_same_size() {
    let s = Scenario::serving(V1).await;
    let claims_before = s
        .sts("chat-blue")
        .await
        .spec
        .unwrap()
        .volume_claim_templates;

    s.h.update_spec("chat", &with(V1, "hibernate: true")).await;
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(s.replicas("chat-blue").await, 0);
    assert!(!s.h.exists::<StatefulSet>("chat-green").await);
    let status = s.status().await;
    assert_eq!(status.phase, Phase::Hibernating);
    assert_eq!(status.hibernation.as_ref().map(|h| h.replicas), Some(3));
    let hibernated = s.condition("Hibernated").await.unwrap();
    assert_eq!(
        (hibernated.status.as_str(), hibernated.reason.as_str()),
        ("False", "Hibernating"),
        "the pods are still stopping"
    );
    // Kept: the Services (client, preview, headless), the budget, the config, the
    // claim templates.
    for service in [
        "chat",
        "chat-preview",
        "chat-blue-headless",
        "chat-green-headless",
    ] {
        assert!(s.h.exists::<Service>(service).await, "{service}");
    }
    assert!(s.h.exists::<PodDisruptionBudget>("chat").await);
    assert!(s.h.exists::<ConfigMap>("chat-config").await);
    assert_eq!(
        s.sts("chat-blue")
            .await
            .spec
            .unwrap()
            .volume_claim_templates,
        claims_before
    );
    assert!(
        s.h.writes().iter().all(|c| c.verb != "delete"),
        "nothing is deleted: {:?}",
        s.h.writes()
    );

    // The pods are gone: hibernated, and quiet.
    s.h.set_statefulset_status("chat-blue", 0).await;
    s.reconcile().await;
    let hibernated = s.condition("Hibernated").await.unwrap();
    assert_eq!(
        (hibernated.status.as_str(), hibernated.reason.as_str()),
        ("True", "Hibernated")
    );
    s.settle().await;
    s.clock.advance(600 * MIN);
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(
        s.h.writes(),
        vec![],
        "a hibernated cluster is not written to"
    );

    // Wake.
    s.h.update_spec("chat", V1).await;
    s.reconcile().await;
    assert_eq!(s.replicas("chat-blue").await, 3);
    let status = s.status().await;
    assert_eq!(status.phase, Phase::Provisioning);
    assert!(
        status.hibernation.is_some(),
        "kept until every relay is back"
    );
    assert_eq!(s.condition("Hibernated").await.unwrap().reason, "Waking");
    s.sts_ready("chat-blue").await;
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.hibernation, None);
    assert!(s.condition("Hibernated").await.is_none());
    assert_eq!(
        s.sts("chat-blue")
            .await
            .spec
            .unwrap()
            .volume_claim_templates,
        claims_before
    );
    s.settle().await;
}

#[tokio::test]
async fn a_cluster_created_hibernated_starts_nothing_and_wakes_to_its_spec() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", &with(V1, "hibernate: true")).await;
    h.reconcile("chat").await.unwrap();
    let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(0));
    let status = h.cluster("chat").await.status.unwrap();
    assert_eq!(status.phase, Phase::Hibernating);
    assert_eq!(status.hibernation.map(|h| h.replicas), Some(3));
    assert_eq!(status.active_version, None, "never served");

    h.update_spec("chat", V1).await;
    h.reconcile("chat").await.unwrap();
    let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
    assert_eq!(sts.spec.unwrap().replicas, Some(3));
    h.set_statefulset_status("chat-blue", 3).await;
    h.reconcile("chat").await.unwrap();
    let status = h.cluster("chat").await.status.unwrap();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
}

#[tokio::test]
async fn an_autoscaled_cluster_hibernates_without_its_hpa_and_wakes_to_the_hpa_size() {
    let s = Scenario::serving(AUTOSCALED).await;
    s.settle().await;
    assert!(s.h.exists::<HorizontalPodAutoscaler>("chat").await);
    // The HPA scaled out to 5.
    s.h.api::<StatefulSet>()
        .patch(
            "chat-blue",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    s.h.set_statefulset_status("chat-blue", 5).await;
    s.settle().await;

    s.annotate(HIBERNATION_ANNOTATION, Some("on")).await;
    s.reconcile().await;
    assert_eq!(s.replicas("chat-blue").await, 0);
    assert!(
        !s.h.exists::<HorizontalPodAutoscaler>("chat").await,
        "an HPA would not scale a StatefulSet at zero; it goes"
    );
    let status = s.status().await;
    assert_eq!(status.phase, Phase::Hibernating);
    assert_eq!(status.hibernation.as_ref().map(|h| h.replicas), Some(5));
    assert!(s
        .condition("Hibernated")
        .await
        .unwrap()
        .message
        .contains("dchat.network/hibernation=on"));
    s.h.set_statefulset_status("chat-blue", 0).await;
    s.settle().await;

    // Wake: five relays at a fixed count, no HPA until they are all ready.
    s.annotate(HIBERNATION_ANNOTATION, Some("off")).await;
    s.reconcile().await;
    assert_eq!(s.replicas("chat-blue").await, 5);
    assert!(!s.h.exists::<HorizontalPodAutoscaler>("chat").await);
    s.sts_ready("chat-blue").await;
    let woke = s.reconcile().await;
    assert_eq!(s.status().await.phase, Phase::Running);
    // The HPA is back on the next reconcile, which the wake asked for at once (its own
    // status write starts none), and takes the count over without a dip.
    assert_eq!(woke, Action::requeue(Duration::ZERO));
    s.reconcile().await;
    let hpa =
        s.h.api::<HorizontalPodAutoscaler>()
            .get("chat")
            .await
            .unwrap();
    let spec = hpa.spec.unwrap();
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 6));
    assert_eq!(s.replicas("chat-blue").await, 5);
    let managers: Vec<String> = s
        .sts("chat-blue")
        .await
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&HANDOVER_MANAGER.to_string()),
        "{managers:?}"
    );
    s.settle().await;
    assert_eq!(s.replicas("chat-blue").await, 5);
}

#[tokio::test]
async fn hibernating_before_the_switch_cancels_the_rollout_which_runs_again_after_the_wake() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    assert_eq!(s.step().await, Some(RolloutStep::Preparing));
    assert_eq!(s.replicas("chat-green").await, 3);

    s.annotate(HIBERNATION_ANNOTATION, Some("on")).await;
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.clone().unwrap();
    assert_eq!(rollout.step, RolloutStep::Cancelled);
    assert_eq!(rollout.reason.as_deref(), Some("Hibernated"));
    assert_eq!(rollout.failed_template_hash, None);
    assert_eq!(status.phase, Phase::Hibernating);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(s.replicas("chat-blue").await, 0);
    assert_eq!(s.replicas("chat-green").await, 0);
    // The serving slot keeps the template it ran.
    assert_eq!(
        s.sts("chat-blue")
            .await
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .image,
        Some("ghcr.io/dchat/relay:1.0.0".into())
    );
    s.h.set_statefulset_status("chat-blue", 0).await;
    s.h.set_statefulset_status("chat-green", 0).await;
    s.settle().await;
    assert_eq!(
        s.step().await,
        Some(RolloutStep::Cancelled),
        "nothing starts"
    );

    // Wake: version 1.0.0 comes back first; then 1.1.0 rolls out into green.
    s.annotate(HIBERNATION_ANNOTATION, None).await;
    s.reconcile().await;
    assert_eq!(s.replicas("chat-blue").await, 3);
    assert_eq!(s.replicas("chat-green").await, 0);
    assert_eq!(s.step().await, Some(RolloutStep::Cancelled));
    s.sts_ready("chat-blue").await;
    s.reconcile().await;
    assert_eq!(s.status().await.hibernation, None);
    s.reconcile().await;
    assert_eq!(s.step().await, Some(RolloutStep::Preparing));
    s.finish_rollout(Slot::Green).await;
    assert_eq!(s.status().await.active_version.as_deref(), Some("1.1.0"));
}

#[tokio::test]
async fn a_restart_is_a_blue_green_rollout_of_the_same_version_once_per_value() {
    let s = Scenario::serving(V1).await;
    let first = "2026-12-06T10:00:00Z";

    s.annotate(RESTARTED_AT_ANNOTATION, Some(first)).await;
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.clone().unwrap();
    assert_eq!(
        (rollout.step, rollout.slot, rollout.target_version.as_str()),
        (RolloutStep::Preparing, Slot::Green, "1.0.0")
    );
    assert_eq!(rollout.from_version.as_deref(), Some("1.0.0"));
    assert_eq!(
        status.restarted_at.map(|t| t.0),
        Some(first.parse::<Timestamp>().unwrap())
    );
    assert_eq!(
        s.pod_annotation("chat-green", RESTARTED_AT_ANNOTATION)
            .await
            .as_deref(),
        Some(first)
    );
    assert_eq!(
        s.pod_annotation("chat-blue", RESTARTED_AT_ANNOTATION).await,
        None,
        "the serving relays are not touched before the switch"
    );
    assert_eq!(s.replicas("chat-blue").await, 3, "no capacity lost");
    s.finish_rollout(Slot::Green).await;
    assert_eq!(s.status().await.active_slot, Slot::Green);
    assert_eq!(s.replicas("chat-blue").await, 0);
    s.settle().await;

    // The same value again (re-applied by GitOps, say, in another spelling): nothing.
    s.annotate(RESTARTED_AT_ANNOTATION, Some("2026-12-06T11:00:00+01:00"))
        .await;
    s.settle().await;
    assert_eq!(s.step().await, Some(RolloutStep::Complete));
    assert_eq!(s.status().await.active_slot, Slot::Green);
    // An older value: ignored (an Event says so, nothing else is written).
    s.annotate(RESTARTED_AT_ANNOTATION, Some("2026-12-01T00:00:00Z"))
        .await;
    for _ in 0..2 {
        s.h.reset_calls();
        s.reconcile().await;
        assert_eq!(s.child_writes(), vec![]);
    }
    assert_eq!(s.step().await, Some(RolloutStep::Complete));
    // Removing the request: nothing either; the template keeps the last restart.
    s.annotate(RESTARTED_AT_ANNOTATION, None).await;
    s.settle().await;
    assert_eq!(
        s.pod_annotation("chat-green", RESTARTED_AT_ANNOTATION)
            .await
            .as_deref(),
        Some(first)
    );

    // A newer value through the spec: the relays restart again, into blue.
    s.h.update_spec("chat", &with(V1, "restartedAt: '2026-12-07T08:00:00Z'"))
        .await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(
        (rollout.step, rollout.slot),
        (RolloutStep::Preparing, Slot::Blue)
    );
}

#[tokio::test]
async fn a_bad_annotation_value_is_an_invalid_spec_and_changes_nothing() {
    for (key, value, says) in [
        (RECONCILE_ANNOTATION, "pause", "\"paused\""),
        (HIBERNATION_ANNOTATION, "true", "\"on\""),
        (RESTARTED_AT_ANNOTATION, "now", "RFC 3339"),
    ] {
        let s = Scenario::serving(V1).await;
        s.annotate(key, Some(value)).await;
        s.h.reset_calls();
        let cluster = s.cluster().await;
        let result =
            dchat_operator::controller::reconcile(Arc::new(cluster), s.h.ctx.clone()).await;
        assert!(result.is_err(), "{key}={value}");
        assert_eq!(s.child_writes(), vec![], "{key}={value}");
        let status = s.status().await;
        assert_eq!(status.phase, Phase::Failed, "{key}={value}");
        let degraded = s.condition("Degraded").await.unwrap();
        assert_eq!(degraded.reason, "InvalidSpec");
        assert!(
            degraded.message.contains(key) && degraded.message.contains(says),
            "{}",
            degraded.message
        );
        assert_eq!(s.replicas("chat-blue").await, 3);
    }
}

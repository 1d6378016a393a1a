//! Blue-green rollout scenarios on the in-memory Kubernetes API: the test plays the
//! StatefulSet controller, the kubelet (pod restarts, crash loops) and the Job
//! controller, moves a manual clock, and checks what the operator did after every
//! reconcile. Every reconcile runs on a fresh operator context — an operator restart
//! before each step — so the rollout can only progress from what status recorded.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dchat_operator::api::{DchatCluster, Phase, RolloutStep, Slot};
use dchat_operator::controller::{Context, ManualClock};
use dchat_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Container, Pod, Secret, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::Harness;

const MIN: Duration = Duration::from_secs(60);

const V1: &str = r#"
version: '1.0.0'
replicas: 3
database: {secretRef: {name: dchat-db}}
rollout: {postPromotionWindow: 10m, scaleDownDelay: 15m, progressDeadline: 15m, validation: {readyTimeout: 10m}}
"#;

fn with_version(spec: &str, version: &str) -> String {
    spec.replace("version: '1.0.0'", &format!("version: '{version}'"))
}

struct Scenario {
    h: Harness,
    clock: Arc<ManualClock>,
}

impl Scenario {
    /// A cluster serving `spec` (version 1.0.0) from blue, all relays ready, settled.
    async fn serving(spec: &str) -> Self {
        Self::serving_with_secret(spec, None).await
    }

    /// As [`Scenario::serving`], with the database Secret `dchat-db` holding `password`.
    async fn serving_with_secret(spec: &str, password: Option<&str>) -> Self {
        let h = Harness::new(false).await;
        let clock = Arc::new(ManualClock::new(
            Timestamp::from_second(1_800_000_000).unwrap(),
        ));
        let s = Self { h, clock };
        if let Some(password) = password {
            s.set_db_password(password).await;
        }
        s.h.create_cluster("chat", spec).await;
        s.reconcile().await;
        s.sts_ready("chat-blue").await;
        for _ in 0..3 {
            s.reconcile().await;
        }
        let status = s.status().await;
        assert_eq!(status.phase, Phase::Running);
        assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
        s
    }

    /// Creates or replaces the database Secret `dchat-db`.
    async fn set_db_password(&self, password: &str) {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "dchat-db", "namespace": support::NS},
            "stringData": {},
            "data": {
                "host": "ZGI=", "port": "NTQzMg==", "name": "ZGNoYXQ=", "username": "ZGNoYXQ=",
                "password": k8s_openapi::ByteString(password.as_bytes().to_vec()),
            },
        }))
        .unwrap();
        let api = self.h.api::<Secret>();
        if api.get_opt("dchat-db").await.unwrap().is_some() {
            api.delete("dchat-db", &Default::default()).await.unwrap();
        }
        api.create(&PostParams::default(), &secret).await.unwrap();
    }

    fn pod_annotation(sts: &StatefulSet, key: &str) -> Option<String> {
        sts.spec
            .as_ref()?
            .template
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get(key)
            .cloned()
    }

    /// One reconcile by a freshly started operator.
    async fn reconcile(&self) {
        let ctx = Context::new(
            self.h.client.clone(),
            Arc::new(Metrics::new()),
            Some("restarted".into()),
        )
        .with_clock(self.clock.clone())
        .with_capabilities(self.h.capabilities.clone());
        let cluster = self.h.cluster("chat").await;
        dchat_operator::controller::reconcile(Arc::new(cluster), Arc::new(ctx))
            .await
            .unwrap();
    }

    async fn status(&self) -> dchat_operator::api::DchatClusterStatus {
        self.h.cluster("chat").await.status.unwrap()
    }

    async fn step(&self) -> RolloutStep {
        self.status().await.rollout.expect("a rollout").step
    }

    async fn sts(&self, name: &str) -> StatefulSet {
        self.h.api::<StatefulSet>().get(name).await.unwrap()
    }

    /// `spec.replicas`, defaulted to 1 as the API server would.
    async fn replicas(&self, name: &str) -> i32 {
        self.sts(name).await.spec.unwrap().replicas.unwrap_or(1)
    }

    /// The relay container of a StatefulSet's pod template.
    async fn relay_container(&self, name: &str) -> Container {
        let pod = self.sts(name).await.spec.unwrap().template.spec.unwrap();
        pod.containers.into_iter().next().unwrap()
    }

    async fn image(&self, name: &str) -> String {
        self.relay_container(name).await.image.unwrap()
    }

    async fn selects(&self, service: &str) -> String {
        let svc = self.h.api::<Service>().get(service).await.unwrap();
        svc.spec.unwrap().selector.unwrap()["dchat.network/slot"].clone()
    }

    /// Plays the StatefulSet controller: all desired pods exist and are ready.
    async fn sts_ready(&self, name: &str) {
        let replicas = self.replicas(name).await;
        self.h.set_statefulset_status(name, replicas).await;
    }

    /// Plays the kubelet: pod `index` of a slot, on the current revision, with its
    /// relay container in `state` after `restarts` restarts.
    async fn pod(&self, slot: Slot, index: i32, restarts: i32, waiting: Option<&str>) {
        let name = format!("chat-{slot}-{index}");
        let state = match waiting {
            Some(reason) => json!({"waiting": {"reason": reason}}),
            None => json!({"running": {}}),
        };
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
                "name": "relay", "image": "x", "imageID": "", "ready": waiting.is_none(),
                "restartCount": restarts, "state": state,
                "lastState": if restarts > 0 {
                    json!({"terminated": {"exitCode": 101, "reason": "Error"}})
                } else { json!({}) },
            }]},
        }))
        .unwrap();
        let api = self.h.api::<Pod>();
        if api.get_opt(&name).await.unwrap().is_some() {
            api.delete(&name, &Default::default()).await.unwrap();
        }
        api.create(&PostParams::default(), &pod).await.unwrap();
    }

    async fn healthy_pods(&self, slot: Slot) {
        for i in 0..3 {
            self.pod(slot, i, 0, None).await;
        }
    }

    /// The smoke Job the operator created for the rollout in flight.
    async fn smoke_job(&self) -> Job {
        let jobs = self.h.api::<Job>().list(&Default::default()).await.unwrap();
        assert_eq!(jobs.items.len(), 1, "one smoke Job");
        jobs.items.into_iter().next().unwrap()
    }

    /// The handover Job, if the operator created one.
    async fn handover_job(&self) -> Option<Job> {
        let jobs = self.h.api::<Job>().list(&Default::default()).await.unwrap();
        jobs.items.into_iter().find(|j| {
            j.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.contains("-handover-"))
        })
    }

    /// Plays the Job controller for the smoke Job.
    async fn finish_smoke(&self, ok: bool) {
        let name = self.smoke_job().await.metadata.name.unwrap();
        self.finish_job(&name, ok).await;
    }

    /// Plays the Job controller.
    async fn finish_job(&self, name: &str, ok: bool) {
        let (type_, reason) = if ok {
            ("Complete", "Completed")
        } else {
            ("Failed", "BackoffLimitExceeded")
        };
        let status = json!({"status": {
            "succeeded": if ok { 1 } else { 0 },
            "failed": if ok { 0 } else { 2 },
            "conditions": [{"type": type_, "status": "True", "reason": reason}],
        }});
        self.h
            .api::<Job>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    async fn annotate(&self, key: &str) {
        let patch = json!({"metadata": {"annotations": {key: "true"}}});
        self.h
            .clusters()
            .patch("chat", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    async fn annotations(&self) -> Vec<String> {
        let cluster: DchatCluster = self.h.cluster("chat").await;
        cluster
            .metadata
            .annotations
            .unwrap_or_default()
            .into_keys()
            .collect()
    }

    /// Starts the rollout to 1.1.0 and drives it through validation to the switch.
    async fn promote_v2(&self) {
        self.promote_to(&with_version(V1, "1.1.0")).await;
    }

    /// Applies `spec` (a new version of the serving one) and drives the rollout to the
    /// switch.
    async fn promote_to(&self, spec: &str) {
        self.h.update_spec("chat", spec).await;
        self.reconcile().await;
        assert_eq!(self.step().await, RolloutStep::Preparing);
        self.sts_ready("chat-green").await;
        self.healthy_pods(Slot::Green).await;
        self.reconcile().await;
        assert_eq!(self.step().await, RolloutStep::Validating);
        self.reconcile().await;
        self.finish_smoke(true).await;
        self.clock.advance(MIN);
        self.reconcile().await;
        assert_eq!(self.step().await, RolloutStep::Promoted);
    }
}

#[tokio::test]
async fn full_rollout_validates_switches_watches_and_scales_down() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;

    // Prepare: green gets the new template at blue's size; blue and traffic untouched.
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.clone().unwrap();
    assert_eq!(rollout.step, RolloutStep::Preparing);
    assert_eq!(rollout.slot, Slot::Green);
    assert_eq!(rollout.target_version, "1.1.0");
    assert_eq!(rollout.from_version.as_deref(), Some("1.0.0"));
    assert_eq!(status.phase, Phase::Progressing);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(s.image("chat-green").await, "ghcr.io/dchat/relay:1.1.0");
    assert_eq!(s.replicas("chat-green").await, 3);
    assert_eq!(s.image("chat-blue").await, "ghcr.io/dchat/relay:1.0.0");
    assert_eq!(s.selects("chat").await, "blue");
    assert_eq!(s.selects("chat-preview").await, "green");
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .unwrap();
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "Preparing")
    );

    // Not ready yet: stays preparing.
    s.clock.advance(MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Preparing);

    // Ready: smoke test Job against the preview Service.
    s.sts_ready("chat-green").await;
    s.healthy_pods(Slot::Green).await;
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Validating);
    s.reconcile().await;
    let job = s.smoke_job().await;
    let job_name = job.metadata.name.clone().unwrap();
    let command = job.spec.unwrap().template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(command[2], "ws://chat-preview.apps.svc:7070/v1/ws");
    // A restarted operator finds the same Job and does not create another, reading it
    // once per reconcile.
    s.h.reset_calls();
    s.reconcile().await;
    assert!(!s.h.writes().iter().any(|c| c.verb == "create"));
    let job_reads =
        s.h.all_calls()
            .into_iter()
            .filter(|c| c.verb == "get" && c.target == job_name)
            .count();
    assert_eq!(job_reads, 1, "the smoke Job read once by the reconcile");
    assert_eq!(s.selects("chat").await, "blue");

    // Smoke passed: the switch, in one apply.
    s.finish_smoke(true).await;
    s.clock.advance(MIN);
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.rollout.as_ref().unwrap().step, RolloutStep::Promoted);
    assert_eq!(status.active_slot, Slot::Green);
    assert_eq!(status.active_version.as_deref(), Some("1.1.0"));
    assert_eq!(s.selects("chat").await, "green");
    assert_eq!(s.selects("chat-preview").await, "blue");
    assert_eq!(s.replicas("chat-blue").await, 3, "old slot stays warm");
    assert_eq!(s.image("chat-blue").await, "ghcr.io/dchat/relay:1.0.0");

    // Window passes, then the scale-down delay: blue goes to zero (kept, not deleted).
    s.clock.advance(10 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::ScalingDown);
    assert_eq!(s.replicas("chat-blue").await, 3);
    assert_eq!(s.status().await.phase, Phase::Running);
    s.clock.advance(5 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Complete);
    assert_eq!(s.replicas("chat-blue").await, 0);
    assert_eq!(s.image("chat-blue").await, "ghcr.io/dchat/relay:1.0.0");
    let status = s.status().await;
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(
        status.active_template_hash,
        status
            .rollout
            .as_ref()
            .map(|r| r.target_template_hash.clone())
    );

    // Settled: a further reconcile, hours later, writes nothing.
    s.clock.advance(600 * MIN);
    s.reconcile().await;
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(s.h.writes(), vec![], "a settled cluster is not written to");

    // The next version rolls out the other way, into blue.
    s.h.update_spec("chat", &with_version(V1, "1.2.0")).await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(
        (rollout.slot, rollout.step),
        (Slot::Blue, RolloutStep::Preparing)
    );
    assert_eq!(s.replicas("chat-blue").await, 3);
    assert_eq!(s.image("chat-blue").await, "ghcr.io/dchat/relay:1.2.0");
    assert_eq!(s.selects("chat").await, "green");
}

#[tokio::test]
async fn crash_looping_relay_fails_validation_without_a_switch_and_is_not_retried() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    // One relay became Ready once, then crash-loops.
    s.sts_ready("chat-green").await;
    s.healthy_pods(Slot::Green).await;
    s.pod(Slot::Green, 1, 3, Some("CrashLoopBackOff")).await;
    s.reconcile().await;

    let status = s.status().await;
    let rollout = status.rollout.clone().unwrap();
    assert_eq!(rollout.step, RolloutStep::Failed);
    assert_eq!(rollout.reason.as_deref(), Some("PodFailing"));
    assert!(
        rollout.message.contains("chat-green-1") && rollout.message.contains("CrashLoopBackOff"),
        "{}",
        rollout.message
    );
    assert!(
        rollout.message.contains("last exit 101"),
        "{}",
        rollout.message
    );
    assert_eq!(status.phase, Phase::RolledBack);
    assert_eq!(status.active_slot, Slot::Blue);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(s.selects("chat").await, "blue");
    assert_eq!(
        s.replicas("chat-green").await,
        3,
        "failed slot kept for inspection"
    );
    s.clock.advance(15 * MIN);
    s.reconcile().await;
    assert_eq!(s.replicas("chat-green").await, 0, "then scaled down");
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RolloutFailed")
    );
    assert!(status
        .conditions
        .iter()
        .any(|c| c.type_ == "Stalled" && c.status == "True"));

    // No flapping: time passes, nothing is retried and nothing is written.
    s.clock.advance(120 * MIN);
    s.reconcile().await;
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(s.h.writes(), vec![]);
    assert_eq!(s.step().await, RolloutStep::Failed);
    assert_eq!(s.replicas("chat-green").await, 0);

    // A new spec is a new rollout.
    s.h.update_spec("chat", &with_version(V1, "1.1.1")).await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(
        (rollout.step, rollout.target_version.as_str()),
        (RolloutStep::Preparing, "1.1.1")
    );
    assert_eq!(s.replicas("chat-green").await, 3);
}

#[tokio::test]
async fn failed_smoke_test_and_ready_timeout_fail_validation() {
    // Smoke test fails.
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    s.sts_ready("chat-green").await;
    s.reconcile().await;
    s.reconcile().await;
    s.finish_smoke(false).await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::Failed);
    assert_eq!(rollout.reason.as_deref(), Some("SmokeTestFailed"));
    assert!(
        rollout.message.contains("kubectl logs job/chat-smoke-"),
        "{}",
        rollout.message
    );
    assert_eq!(s.selects("chat").await, "blue");

    // Relays never ready: readyTimeout.
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    s.h.set_statefulset_status("chat-green", 2).await;
    s.clock.advance(9 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Preparing);
    s.clock.advance(2 * MIN);
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::Failed);
    assert_eq!(rollout.reason.as_deref(), Some("ReadyTimeout"));
    assert!(
        rollout.message.contains("2/3 relays"),
        "{}",
        rollout.message
    );
}

#[tokio::test]
async fn smoke_test_that_never_finishes_hits_the_progress_deadline() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    s.sts_ready("chat-green").await;
    s.reconcile().await;
    s.clock.advance(14 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Validating);
    s.clock.advance(2 * MIN);
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::Failed);
    assert_eq!(rollout.reason.as_deref(), Some("ProgressDeadlineExceeded"));
    assert_ne!(status.phase, Phase::Progressing);
}

#[tokio::test]
async fn failure_inside_the_window_rolls_back_to_the_warm_old_slot() {
    let s = Scenario::serving(V1).await;
    s.promote_v2().await;
    assert_eq!(s.selects("chat").await, "green");

    s.clock.advance(3 * MIN);
    s.pod(Slot::Green, 2, 1, None).await;
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.clone().unwrap();
    assert_eq!(rollout.step, RolloutStep::RolledBack);
    assert_eq!(rollout.reason.as_deref(), Some("PodRestarted"));
    assert_eq!(rollout.rolled_back_from.as_deref(), Some("1.1.0"));
    assert_eq!(status.phase, Phase::RolledBack);
    assert_eq!(status.active_slot, Slot::Blue);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(s.selects("chat").await, "blue");
    assert_eq!(s.image("chat-blue").await, "ghcr.io/dchat/relay:1.0.0");
    assert_eq!(s.replicas("chat-blue").await, 3);
    assert_eq!(
        s.replicas("chat-green").await,
        3,
        "failed slot kept for inspection"
    );

    // The failed template is not tried again.
    s.clock.advance(60 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::RolledBack);
    assert_eq!(s.selects("chat").await, "blue");
    assert_eq!(s.replicas("chat-green").await, 0);
}

/// A stand-in for Prometheus' `/api/v1/query`: answers every query with the current
/// value and remembers the queries it got.
struct FakePrometheus {
    url: String,
    value: Arc<std::sync::Mutex<String>>,
    queries: Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakePrometheus {
    async fn start() -> Self {
        use axum::extract::{Query, State};
        type Shared = (
            Arc<std::sync::Mutex<String>>,
            Arc<std::sync::Mutex<Vec<String>>>,
        );
        let value = Arc::new(std::sync::Mutex::new("0".to_string()));
        let queries = Arc::new(std::sync::Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route(
                "/api/v1/query",
                axum::routing::get(
                    |State((value, queries)): State<Shared>,
                     Query(params): Query<std::collections::HashMap<String, String>>| async move {
                        queries.lock().unwrap().push(params["query"].clone());
                        let v = value.lock().unwrap().clone();
                        axum::Json(json!({"status": "success", "data": {"resultType": "vector",
                            "result": [{"metric": {}, "value": [1_800_000_000, v]}]}}))
                    },
                ),
            )
            .with_state((value.clone(), queries.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            value,
            queries,
        }
    }

    fn set(&self, value: &str) {
        *self.value.lock().unwrap() = value.to_string();
    }
}

#[tokio::test]
async fn analysis_query_above_its_threshold_rolls_back_inside_the_window() {
    let prometheus = FakePrometheus::start().await;
    let spec = V1.replace(
        "progressDeadline: 15m,",
        &format!(
            "progressDeadline: 15m, analysis: {{prometheusUrl: '{}', failAbove: 1, query: 'sum(rate(dchat_rejected_frames_total{{namespace=\"{{{{namespace}}}}\",pod=~\"{{{{cluster}}}}-{{{{slot}}}}-.*\"}}[1m]))'}},",
            prometheus.url
        ),
    );
    let s = Scenario::serving(&spec).await;
    assert!(
        prometheus.queries.lock().unwrap().is_empty(),
        "no queries outside a window"
    );
    s.promote_to(&with_version(&spec, "1.1.0")).await;
    assert!(
        prometheus.queries.lock().unwrap().is_empty(),
        "no queries before the switch"
    );

    // Inside the window, at the threshold: keeps watching, with the query filled in.
    prometheus.set("1");
    s.clock.advance(MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Promoted);
    let last = prometheus.queries.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        last,
        r#"sum(rate(dchat_rejected_frames_total{namespace="apps",pod=~"chat-green-.*"}[1m]))"#
    );

    // Above it: automatic rollback to the warm old slot.
    prometheus.set("3.5");
    s.clock.advance(MIN);
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::RolledBack);
    assert_eq!(rollout.reason.as_deref(), Some("AnalysisFailed"));
    assert!(
        rollout.message.contains("returned 3.5, above 1"),
        "{}",
        rollout.message
    );
    assert_eq!(status.active_slot, Slot::Blue);
    assert_eq!(s.selects("chat").await, "blue");
}

#[tokio::test]
async fn unreachable_prometheus_does_not_roll_back_on_its_own() {
    let spec = V1.replace(
        "progressDeadline: 15m,",
        "progressDeadline: 15m, analysis: {prometheusUrl: 'http://127.0.0.1:1', failAbove: 1, query: 'up'},",
    );
    let s = Scenario::serving(&spec).await;
    s.promote_to(&with_version(&spec, "1.1.0")).await;
    s.clock.advance(MIN);
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::Promoted);
    assert!(
        rollout.message.contains("analysis inconclusive: "),
        "{}",
        rollout.message
    );
    s.clock.advance(10 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::ScalingDown);
}

#[tokio::test]
async fn manual_promotion_waits_for_the_annotation() {
    let spec = V1.replace("rollout: {", "rollout: {autoPromote: false, ");
    let s = Scenario::serving(&spec).await;
    s.h.update_spec("chat", &with_version(&spec, "1.1.0")).await;
    s.reconcile().await;
    s.sts_ready("chat-green").await;
    s.healthy_pods(Slot::Green).await;
    s.reconcile().await;
    s.reconcile().await;
    s.finish_smoke(true).await;
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.phase, Phase::AwaitingPromotion);
    assert_eq!(status.rollout.unwrap().step, RolloutStep::AwaitingPromotion);

    // Waiting costs no deadline.
    s.clock.advance(24 * 60 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::AwaitingPromotion);
    assert_eq!(s.selects("chat").await, "blue");

    s.annotate("dchat.network/promote").await;
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.rollout.unwrap().step, RolloutStep::Promoted);
    assert_eq!(status.active_slot, Slot::Green);
    assert_eq!(s.selects("chat").await, "green");
    assert!(
        !s.annotations()
            .await
            .contains(&"dchat.network/promote".to_string()),
        "handled annotation is removed"
    );
}

#[tokio::test]
async fn abort_after_the_switch_returns_traffic_and_is_not_retried() {
    let s = Scenario::serving(V1).await;
    s.promote_v2().await;
    s.annotate("dchat.network/abort").await;
    s.reconcile().await;
    let status = s.status().await;
    let rollout = status.rollout.clone().unwrap();
    assert_eq!(rollout.step, RolloutStep::Aborted);
    assert_eq!(rollout.rolled_back_from.as_deref(), Some("1.1.0"));
    assert_eq!(status.phase, Phase::RolledBack);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(s.selects("chat").await, "blue");
    assert_eq!(
        s.replicas("chat-green").await,
        3,
        "aborted slot kept for inspection"
    );
    s.clock.advance(15 * MIN);
    s.reconcile().await;
    assert_eq!(s.replicas("chat-green").await, 0);
    assert!(!s
        .annotations()
        .await
        .contains(&"dchat.network/abort".to_string()));
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Aborted);
}

#[tokio::test]
async fn abort_before_the_switch_keeps_traffic_where_it_is() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    s.annotate("dchat.network/abort").await;
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.rollout.unwrap().step, RolloutStep::Aborted);
    assert_eq!(status.active_slot, Slot::Blue);
    assert_eq!(s.replicas("chat-green").await, 3);
    s.clock.advance(15 * MIN);
    s.reconcile().await;
    assert_eq!(s.replicas("chat-green").await, 0);
    assert_eq!(s.selects("chat").await, "blue");
}

#[tokio::test]
async fn new_spec_supersedes_the_rollout_in_flight() {
    let s = Scenario::serving(V1).await;
    s.h.update_spec("chat", &with_version(V1, "1.1.0")).await;
    s.reconcile().await;
    s.sts_ready("chat-green").await;
    s.reconcile().await;
    s.reconcile().await;
    let first_job = s.smoke_job().await.metadata.name.unwrap();
    assert_eq!(s.step().await, RolloutStep::Validating);

    s.clock.advance(MIN);
    s.h.update_spec("chat", &with_version(V1, "1.2.0")).await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(
        (rollout.step, rollout.slot, rollout.target_version.as_str()),
        (RolloutStep::Preparing, Slot::Green, "1.2.0")
    );
    assert_eq!(s.image("chat-green").await, "ghcr.io/dchat/relay:1.2.0");
    assert_eq!(s.selects("chat").await, "blue");
    // The new attempt gets its own smoke test.
    s.sts_ready("chat-green").await;
    s.reconcile().await;
    s.reconcile().await;
    let jobs = s.h.api::<Job>().list(&Default::default()).await.unwrap();
    let names: Vec<String> = jobs
        .items
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&first_job));

    // Going back to the serving version before the switch cancels the rollout.
    s.h.update_spec("chat", V1).await;
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.rollout.unwrap().step, RolloutStep::Cancelled);
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(s.replicas("chat-green").await, 0);
}

#[tokio::test]
async fn autoscaled_cluster_holds_scale_and_retargets_the_hpa() {
    let spec = r#"
version: '1.0.0'
replicas: 3
database: {secretRef: {name: dchat-db}}
autoscaling: {enabled: true, minReplicas: 3, maxReplicas: 10}
rollout: {smokeTest: false}
"#
    .replace(
        "rollout: {smokeTest: false}",
        "rollout: {validation: {smokeTest: false}}",
    );
    let s = Scenario::serving(&spec).await;
    // The HPA grew blue to 5 relays.
    s.h.api::<StatefulSet>()
        .patch(
            "chat-blue",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    s.h.set_statefulset_status("chat-blue", 5).await;
    s.h.update_spec("chat", &with_version(&spec, "1.1.0")).await;
    s.reconcile().await;
    assert_eq!(
        s.replicas("chat-green").await,
        5,
        "new slot at the HPA's count"
    );
    let hpa =
        s.h.api::<HorizontalPodAutoscaler>()
            .get("chat")
            .await
            .unwrap();
    let hpa_spec = hpa.spec.unwrap();
    assert_eq!((hpa_spec.min_replicas, hpa_spec.max_replicas), (Some(5), 5));
    assert_eq!(hpa_spec.scale_target_ref.name, "chat-blue");

    s.sts_ready("chat-green").await;
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Promoted);
    let hpa =
        s.h.api::<HorizontalPodAutoscaler>()
            .get("chat")
            .await
            .unwrap();
    assert_eq!(hpa.spec.unwrap().scale_target_ref.name, "chat-green");
    assert_eq!(s.replicas("chat-blue").await, 5);

    // After the window the HPA is free again.
    s.clock.advance(11 * MIN);
    s.reconcile().await;
    let hpa =
        s.h.api::<HorizontalPodAutoscaler>()
            .get("chat")
            .await
            .unwrap();
    let hpa_spec = hpa.spec.unwrap();
    assert_eq!(
        (hpa_spec.min_replicas, hpa_spec.max_replicas),
        (Some(3), 10)
    );
}

#[tokio::test]
async fn every_step_is_recorded_as_an_event() {
    use k8s_openapi::api::events::v1::Event;
    let s = Scenario::serving(V1).await;
    s.promote_v2().await;
    s.pod(Slot::Green, 0, 0, Some("CrashLoopBackOff")).await;
    s.reconcile().await;
    let events = s.h.api::<Event>().list(&Default::default()).await.unwrap();
    let seen: Vec<(String, String, String)> = events
        .items
        .into_iter()
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect();
    for (reason, type_) in [
        ("RolloutStarted", "Normal"),
        ("Validating", "Normal"),
        ("Promoted", "Normal"),
        ("RolledBack", "Warning"),
    ] {
        assert!(
            seen.iter().any(|(r, t, _)| r == reason && t == type_),
            "no {type_} {reason} Event in {seen:?}"
        );
    }
    let rolled_back = seen.iter().find(|(r, _, _)| r == "RolledBack").unwrap();
    assert!(
        rolled_back.2.contains("CrashLoopBackOff"),
        "{}",
        rolled_back.2
    );
}

#[tokio::test]
async fn changed_database_credentials_roll_out_blue_green() {
    let s = Scenario::serving_with_secret(V1, Some("first")).await;
    let blue = s.sts("chat-blue").await;
    let first = Scenario::pod_annotation(&blue, "dchat.network/secret-hash").unwrap();
    assert!(!first.contains("first"), "only a digest is written");
    s.h.reset_calls();
    s.reconcile().await;
    assert_eq!(s.h.writes(), vec![], "an unchanged Secret is no change");

    s.set_db_password("rotated").await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(
        (rollout.step, rollout.slot),
        (RolloutStep::Preparing, Slot::Green)
    );
    assert_eq!(
        rollout.target_version, "1.0.0",
        "same version, new credentials"
    );
    let green = s.sts("chat-green").await;
    let second = Scenario::pod_annotation(&green, "dchat.network/secret-hash").unwrap();
    assert_ne!(first, second);
    // The serving slot keeps the pods (and credentials) it has until the switch.
    let blue = s.sts("chat-blue").await;
    assert_eq!(
        Scenario::pod_annotation(&blue, "dchat.network/secret-hash"),
        Some(first)
    );
    assert_eq!(s.selects("chat").await, "blue");
}

#[tokio::test]
async fn embedded_store_rollout_hands_stored_messages_over_before_scale_down() {
    // One relay, no database: the old relay's stored messages live on its own volume,
    // so before blue goes to zero a Job runs `dchat handover` from blue to green.
    let spec = "version: '1.0.0'\nrollout: {validation: {smokeTest: false}, postPromotionWindow: 1m, scaleDownDelay: 1m}";
    let s = Scenario::serving(spec).await;

    // The relays' admin token: created once, random, referenced by the relay pods.
    let token_of = || async {
        let secret = s.h.api::<Secret>().get("chat-admin-token").await.unwrap();
        let data = secret.data.or(None);
        let from_string = secret.string_data.unwrap_or_default().get("token").cloned();
        data.and_then(|d| {
            d.get("token")
                .map(|v| String::from_utf8(v.0.clone()).unwrap())
        })
        .or(from_string)
        .expect("token key")
    };
    let token = token_of().await;
    assert_eq!(token.len(), 64, "256-bit hex token");
    let env = s.relay_container("chat-blue").await.env.unwrap();
    let admin = env.iter().find(|e| e.name == "DCHAT_ADMIN_TOKEN").unwrap();
    let key_ref = admin.value_from.clone().unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (key_ref.name.as_str(), key_ref.key.as_str()),
        ("chat-admin-token", "token")
    );
    s.reconcile().await;
    assert_eq!(token_of().await, token, "the token is never rewritten");

    s.h.update_spec("chat", &with_version(spec, "1.1.0")).await;
    s.reconcile().await;
    assert_eq!(s.replicas("chat-green").await, 1);
    s.sts_ready("chat-green").await;
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Promoted);
    assert!(
        s.handover_job().await.is_none(),
        "no handover inside the window"
    );

    // Window and delay passed: the handover runs first; blue stays up meanwhile.
    s.clock.advance(2 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::ScalingDown);
    assert_eq!(s.replicas("chat-blue").await, 1);
    let job = s.handover_job().await.expect("handover Job created");
    let command = job.spec.unwrap().template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(
        command[1..6],
        [
            "handover",
            "--from",
            "http://chat-blue-0.chat-blue-headless.apps.svc:9090",
            "--to",
            "http://chat-green-0.chat-green-headless.apps.svc:9090"
        ]
    );
    let job_name = job.metadata.name.unwrap();
    assert!(s
        .status()
        .await
        .rollout
        .unwrap()
        .message
        .contains(&job_name));

    // A failed handover keeps blue (and its messages) up and says how to retry.
    s.finish_job(&job_name, false).await;
    s.clock.advance(MIN);
    s.reconcile().await;
    let status = s.status().await;
    assert_eq!(status.phase, Phase::Degraded);
    let rollout = status.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::HandoverFailed);
    assert!(
        rollout
            .message
            .contains(&format!("kubectl delete job {job_name}")),
        "{}",
        rollout.message
    );
    assert_eq!(status.active_version.as_deref(), Some("1.1.0"));
    assert_eq!(s.selects("chat").await, "green");
    assert_eq!(s.replicas("chat-blue").await, 1);
    s.reconcile().await;
    assert_eq!(
        s.replicas("chat-blue").await,
        1,
        "kept while the failed Job exists"
    );

    // Deleting the failed Job retries; success scales blue to zero.
    s.h.api::<Job>()
        .delete(&job_name, &Default::default())
        .await
        .unwrap();
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::ScalingDown);
    assert!(s.handover_job().await.is_some(), "Job created again");
    assert_eq!(s.replicas("chat-blue").await, 1);
    s.finish_job(&job_name, true).await;
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Complete);
    assert_eq!(s.status().await.phase, Phase::Running);
    let blue = s.sts("chat-blue").await.spec.unwrap();
    assert_eq!(blue.replicas, Some(0));
    // The volume stays (retained on scale-down) though its messages moved on.
    let retention = blue.persistent_volume_claim_retention_policy.unwrap();
    assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
}

#[tokio::test]
async fn embedded_store_rollback_hands_the_failed_slots_messages_back() {
    let spec = "version: '1.0.0'\nrollout: {validation: {smokeTest: false}, postPromotionWindow: 10m, scaleDownDelay: 5m}";
    let s = Scenario::serving(spec).await;
    s.h.update_spec("chat", &with_version(spec, "1.1.0")).await;
    s.reconcile().await;
    s.sts_ready("chat-green").await;
    s.pod(Slot::Green, 0, 0, None).await;
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Promoted);

    // Users wrote to green for a few minutes; then its relay restarts: rollback.
    s.clock.advance(3 * MIN);
    s.pod(Slot::Green, 0, 1, None).await;
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::RolledBack);
    assert_eq!(s.selects("chat").await, "blue");
    assert!(
        s.handover_job().await.is_none(),
        "kept for inspection first"
    );

    // After the inspection delay green hands its messages back to blue, then goes.
    s.clock.advance(6 * MIN);
    s.reconcile().await;
    let job = s.handover_job().await.expect("handback Job");
    let command = job.spec.unwrap().template.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap();
    assert_eq!(
        command[3],
        "http://chat-green-0.chat-green-headless.apps.svc:9090"
    );
    assert_eq!(
        command[5],
        "http://chat-blue-0.chat-blue-headless.apps.svc:9090"
    );
    assert_eq!(s.replicas("chat-green").await, 1, "kept until handed back");
    s.finish_job(&job.metadata.name.unwrap(), true).await;
    s.reconcile().await;
    let rollout = s.status().await.rollout.unwrap();
    assert_eq!(rollout.step, RolloutStep::RolledBack);
    assert_eq!(
        rollout.handback,
        Some(dchat_operator::api::HandoverOutcome::Succeeded)
    );
    assert!(
        rollout.message.contains("handed back to slot blue"),
        "{}",
        rollout.message
    );
    assert_eq!(s.replicas("chat-green").await, 0);
    // Settled: the finished Job is not looked at again, nothing is re-run.
    s.h.api::<Job>()
        .delete(
            &s.handover_job().await.unwrap().metadata.name.unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
    s.clock.advance(60 * MIN);
    s.reconcile().await;
    assert!(s.handover_job().await.is_none());
    assert_eq!(s.replicas("chat-green").await, 0);
}

#[tokio::test]
async fn shared_database_rollout_needs_no_handover_or_admin_token() {
    let s = Scenario::serving(V1).await;
    s.promote_v2().await;
    s.clock.advance(30 * MIN);
    s.reconcile().await;
    assert_eq!(s.step().await, RolloutStep::Complete);
    assert!(s.handover_job().await.is_none());
    assert!(s
        .h
        .api::<Secret>()
        .get_opt("chat-admin-token")
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.replicas("chat-blue").await, 0);
}

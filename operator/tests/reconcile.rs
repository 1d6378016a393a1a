//! Reconcile scenarios on an in-memory Kubernetes API.

mod support;

use std::time::Duration;

use dchat_operator::api::Phase;
use dchat_operator::build::{PrometheusRule, ServiceMonitor};
use dchat_operator::controller::{error_policy, HANDOVER_MANAGER};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::Action;
use std::sync::Arc;
use support::Harness;

const DEV: &str = "version: '1.0.0'";
const PROD: &str = r#"
version: '1.0.0'
replicas: 3
database: {secretRef: {name: dchat-db}}
disruptionBudget: {minAvailable: 2}
"#;

fn condition(cluster: &dchat_operator::api::DchatCluster, type_: &str) -> (String, String, String) {
    let c = cluster
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn create_builds_every_child_and_writes_status() {
    let h = Harness::new(true).await;
    h.create_cluster("chat", PROD).await;
    h.reconcile("chat").await.unwrap();

    let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
    let spec = sts.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let container = &spec.template.spec.unwrap().containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("ghcr.io/dchat/relay:1.0.0")
    );
    assert!(!h.exists::<StatefulSet>("chat-green").await);

    let services = h.api::<Service>();
    let client = services.get("chat").await.unwrap();
    assert_eq!(
        client.spec.unwrap().selector.unwrap()["dchat.network/slot"],
        "blue"
    );
    let preview = services.get("chat-preview").await.unwrap();
    assert_eq!(
        preview.spec.unwrap().selector.unwrap()["dchat.network/slot"],
        "green"
    );
    for name in ["chat-blue-headless", "chat-green-headless"] {
        assert!(services.get_opt(name).await.unwrap().is_some(), "{name}");
    }
    assert!(h.exists::<ConfigMap>("chat-config").await);
    assert!(h.exists::<ServiceAccount>("chat-relay").await);
    assert!(h.exists::<NetworkPolicy>("chat").await);
    let pdb = h.api::<PodDisruptionBudget>().get("chat").await.unwrap();
    assert_eq!(
        pdb.spec.unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
    );
    assert!(!h.exists::<HorizontalPodAutoscaler>("chat").await);
    assert!(!h.exists::<Ingress>("chat").await);
    assert!(h.exists::<ServiceMonitor>("chat").await);
    assert!(h.exists::<PrometheusRule>("chat").await);

    let owner = &sts.metadata.owner_references.unwrap()[0];
    assert_eq!(owner.kind, "DchatCluster");
    assert_eq!(owner.name, "chat");

    let cluster = h.cluster("chat").await;
    assert!(cluster
        .metadata
        .finalizers
        .clone()
        .unwrap()
        .contains(&"dchat.network/cleanup".to_string()));
    let status = cluster
        .status
        .clone()
        .expect("status written on first reconcile");
    assert_eq!(status.phase, Phase::Provisioning);
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(condition(&cluster, "Ready").0, "False");
    assert_eq!(condition(&cluster, "Progressing").0, "True");
    assert_eq!(condition(&cluster, "Degraded").0, "False");
}

#[tokio::test]
async fn ready_relays_make_the_cluster_running() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", PROD).await;
    h.reconcile("chat").await.unwrap();
    h.set_statefulset_status("chat-blue", 3).await;
    h.reconcile("chat").await.unwrap();
    let cluster = h.cluster("chat").await;
    let status = cluster.status.clone().unwrap();
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));
    assert_eq!(status.ready.as_deref(), Some("3/3"));
    assert_eq!(status.ready_replicas, 3);
    assert_eq!(
        condition(&cluster, "Ready"),
        (
            "True".into(),
            "AllRelaysReady".into(),
            "3/3 relays ready".into()
        )
    );
}

#[tokio::test]
async fn unchanged_cluster_reconcile_sends_zero_writes() {
    let h = Harness::new(true).await;
    h.create_cluster("chat", PROD).await;
    h.reconcile("chat").await.unwrap();
    h.set_statefulset_status("chat-blue", 3).await;
    h.settle("chat").await;

    h.reset_calls();
    h.reconcile("chat").await.unwrap();
    let calls = h.all_calls();
    let count = |verb: &str| calls.iter().filter(|c| c.verb == verb).count();
    assert_eq!(
        h.writes(),
        vec![],
        "an unchanged cluster must not be written to"
    );
    assert_eq!(
        count("patch") + count("patch_status") + count("create") + count("delete"),
        0
    );
    assert!(
        count("list") >= 10,
        "children are observed with one list per kind: {calls:?}"
    );
}

#[tokio::test]
async fn spec_change_updates_children() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", DEV).await;
    h.settle("chat").await;
    h.update_spec("chat", "version: '1.1.0'\nrelay: {logLevel: debug}")
        .await;
    h.reconcile("chat").await.unwrap();
    let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
    let template = sts.spec.unwrap().template;
    assert_eq!(
        template.spec.unwrap().containers[0].image.as_deref(),
        Some("ghcr.io/dchat/relay:1.1.0")
    );
    let cm = h.api::<ConfigMap>().get("chat-config").await.unwrap();
    assert_eq!(cm.data.unwrap()["RUST_LOG"], "debug");
    assert!(h
        .writes()
        .iter()
        .any(|c| c.verb == "patch" && c.target == "chat-blue"));
}

#[tokio::test]
async fn setting_change_rewrites_only_what_depends_on_it() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", DEV).await;
    h.settle("chat").await;
    h.update_spec("chat", "version: '1.0.0'\nrelay: {maxMessageBytes: 65536}")
        .await;
    h.reset_calls();
    h.reconcile("chat").await.unwrap();
    let patched: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|c| c.verb == "patch")
        .map(|c| c.target)
        .collect();
    // The ConfigMap, and the StatefulSet whose pods carry the config hash; nothing else.
    assert_eq!(patched, vec!["chat-config", "chat-blue"]);
    let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
    let hash = sts
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()["dchat.network/config-hash"]
        .clone();
    let cm = h.api::<ConfigMap>().get("chat-config").await.unwrap();
    assert_eq!(hash, dchat_operator::build::config_hash(&cm));
}

/// `spec.replicas` is the starting size with autoscaling: the StatefulSet is created at
/// it (within the bounds), under the handover manager, so the HPA owns the count at once.
#[tokio::test]
async fn an_autoscaled_cluster_starts_at_spec_replicas() {
    let h = Harness::new(false).await;
    h.create_cluster(
        "chat",
        "version: '1.0.0'\nreplicas: 5\ndatabase: {secretRef: {name: dchat-db}}\nautoscaling: {enabled: true, minReplicas: 3, maxReplicas: 10}",
    )
    .await;
    h.reconcile("chat").await.unwrap();
    let api = h.api::<StatefulSet>();
    let sts = api.get("chat-blue").await.unwrap();
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(5));
    let owners_of_replicas: Vec<String> = sts
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(owners_of_replicas, vec![HANDOVER_MANAGER.to_string()]);

    // The HPA's count stands: later reconciles neither write it back nor hand it over.
    api.patch(
        "chat-blue",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": 7}})),
    )
    .await
    .unwrap();
    h.set_statefulset_status("chat-blue", 7).await;
    h.reset_calls();
    h.settle("chat").await;
    assert_eq!(
        api.get("chat-blue").await.unwrap().spec.unwrap().replicas,
        Some(7)
    );
    assert!(
        !h.writes()
            .iter()
            .any(|c| c.verb == "patch" && c.target == "chat-blue"),
        "{:?}",
        h.writes()
    );

    // Starting at one relay, the API server's default, takes no second write.
    h.create_cluster(
        "solo",
        "version: '1.0.0'\nreplicas: 1\ndatabase: {secretRef: {name: dchat-db}}\nautoscaling: {enabled: true, minReplicas: 1, maxReplicas: 3}",
    )
    .await;
    h.reset_calls();
    h.reconcile("solo").await.unwrap();
    let patches = h
        .writes()
        .into_iter()
        .filter(|c| c.verb == "patch" && c.target == "solo-blue")
        .count();
    assert_eq!(patches, 1, "{:?}", h.writes());
}

#[tokio::test]
async fn autoscaling_toggle_creates_hpa_and_hands_over_replicas() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", PROD).await;
    h.set_statefulset_status_after_reconcile("chat").await;

    h.update_spec(
        "chat",
        "version: '1.0.0'\nreplicas: 3\ndatabase: {secretRef: {name: dchat-db}}\nautoscaling: {enabled: true, minReplicas: 3, maxReplicas: 8}",
    )
    .await;
    h.reset_calls();
    h.reconcile("chat").await.unwrap();
    let hpa = h
        .api::<HorizontalPodAutoscaler>()
        .get("chat")
        .await
        .unwrap();
    let spec = hpa.spec.unwrap();
    assert_eq!(spec.scale_target_ref.name, "chat-blue");
    assert_eq!(spec.max_replicas, 8);
    let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
    assert_eq!(
        sts.spec.as_ref().unwrap().replicas,
        Some(3),
        "no dip while handing over"
    );
    let managers: Vec<String> = sts
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&HANDOVER_MANAGER.to_string()),
        "{managers:?}"
    );
    let patches: Vec<String> = h
        .writes()
        .into_iter()
        .filter(|c| c.verb == "patch" && c.target == "chat-blue")
        .map(|c| c.target)
        .collect();
    assert_eq!(
        patches.len(),
        2,
        "handover apply, then the operator's apply without replicas"
    );

    // The HPA now owns the count: scaling it does not make the operator write it back.
    let api = h.api::<StatefulSet>();
    api.patch(
        "chat-blue",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": 6}})),
    )
    .await
    .unwrap();
    h.set_statefulset_status("chat-blue", 6).await;
    h.settle("chat").await;
    assert_eq!(
        api.get("chat-blue").await.unwrap().spec.unwrap().replicas,
        Some(6)
    );

    // Autoscaling off: the HPA goes and the operator sets the count again.
    h.update_spec("chat", PROD).await;
    h.reconcile("chat").await.unwrap();
    assert!(!h.exists::<HorizontalPodAutoscaler>("chat").await);
    assert_eq!(
        api.get("chat-blue").await.unwrap().spec.unwrap().replicas,
        Some(3)
    );
}

#[tokio::test]
async fn disabled_features_are_deleted() {
    let h = Harness::new(true).await;
    h.create_cluster(
        "chat",
        "version: '1.0.0'\ningress: {enabled: true, host: chat.example.com}",
    )
    .await;
    h.reconcile("chat").await.unwrap();
    assert!(h.exists::<Ingress>("chat").await);
    assert!(h.exists::<NetworkPolicy>("chat").await);

    h.update_spec(
        "chat",
        "version: '1.0.0'\ningress: {enabled: false}\nnetworkPolicy: {enabled: false}\nmonitoring: {serviceMonitor: false, prometheusRule: false}",
    )
    .await;
    h.reset_calls();
    h.reconcile("chat").await.unwrap();
    assert!(!h.exists::<Ingress>("chat").await);
    assert!(!h.exists::<NetworkPolicy>("chat").await);
    assert!(!h.exists::<ServiceMonitor>("chat").await);
    assert!(!h.exists::<PrometheusRule>("chat").await);
    let deletes = h
        .writes()
        .into_iter()
        .filter(|c| c.verb == "delete")
        .count();
    assert_eq!(deletes, 4);
    // What stays desired stays.
    assert!(h.exists::<StatefulSet>("chat-blue").await);
}

#[tokio::test]
async fn without_prometheus_operator_monitoring_is_skipped() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", DEV).await;
    h.reconcile("chat").await.unwrap();
    assert!(h.exists::<StatefulSet>("chat-blue").await);
    let cluster = h.cluster("chat").await;
    assert_eq!(condition(&cluster, "Degraded").0, "False");
}

#[tokio::test]
async fn objects_of_other_owners_are_left_alone() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", DEV).await;
    h.create_cluster("other", DEV).await;
    h.reconcile("chat").await.unwrap();
    h.reconcile("other").await.unwrap();
    h.update_spec("chat", "version: '1.0.0'\nnetworkPolicy: {enabled: false}")
        .await;
    h.reconcile("chat").await.unwrap();
    assert!(!h.exists::<NetworkPolicy>("chat").await);
    assert!(h.exists::<NetworkPolicy>("other").await);
}

#[tokio::test]
async fn delete_runs_the_finalizer() {
    use dchat_operator::controller::reconcile;
    let h = Harness::new(false).await;
    h.create_cluster("chat", DEV).await;
    h.reconcile("chat").await.unwrap();
    assert!(h.exists::<StatefulSet>("chat-blue").await);

    // What the API server does on `kubectl delete` of an object with finalizers: it
    // sets deletionTimestamp and keeps the object until the finalizers are gone.
    let mut deleting = h.cluster("chat").await;
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    h.reset_calls();
    reconcile(Arc::new(deleting), h.ctx.clone()).await.unwrap();
    let writes = h.writes();
    assert!(
        writes
            .iter()
            .any(|c| c.verb == "delete" && c.target == "chat-blue"),
        "{writes:?}"
    );
    assert!(!h.exists::<StatefulSet>("chat-blue").await);
    let after = h.cluster("chat").await;
    assert!(
        after.metadata.finalizers.unwrap_or_default().is_empty(),
        "finalizer removed"
    );
    assert!(
        writes
            .iter()
            .all(|c| c.verb != "patch" || c.target == "chat"),
        "nothing is applied while deleting: {writes:?}"
    );
}

#[tokio::test]
async fn injected_api_errors_are_returned_and_retried() {
    for code in [409u16, 500] {
        let h = Harness::new(false).await;
        h.create_cluster("chat", DEV).await;
        h.reconcile("chat").await.unwrap();
        h.update_spec("chat", "version: '2.0.0'").await;
        h.inject("patch", code, 1);
        let err = h
            .reconcile("chat")
            .await
            .expect_err("injected failure surfaces");
        let expected = if code == 409 {
            "conflict"
        } else {
            "api_server"
        };
        assert_eq!(err.metric_label(), expected, "{err}");
        let cluster = Arc::new(h.cluster("chat").await);
        assert_eq!(
            error_policy(cluster, &err, h.ctx.clone()),
            Action::requeue(Duration::from_secs(15))
        );
        // The retry succeeds and the change lands.
        h.reconcile("chat").await.unwrap();
        let sts = h.api::<StatefulSet>().get("chat-blue").await.unwrap();
        assert_eq!(
            sts.spec.unwrap().template.spec.unwrap().containers[0]
                .image
                .as_deref(),
            Some("ghcr.io/dchat/relay:2.0.0")
        );
    }
}

#[tokio::test]
async fn failed_apply_is_reported_in_status() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", DEV).await;
    h.reconcile("chat").await.unwrap();
    h.update_spec("chat", "version: '2.0.0'").await;
    h.inject("patch", 500, 1);
    h.reconcile("chat").await.unwrap_err();
    let cluster = h.cluster("chat").await;
    assert_eq!(cluster.status.as_ref().unwrap().phase, Phase::Degraded);
    let (status, reason, message) = condition(&cluster, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "ReconcileError")
    );
    assert!(message.contains("injected failure"), "{message}");
}

/// A reconcile that fails before it observes anything (here: listing children) still
/// shows in status in the same attempt: a new cluster gets a phase, an existing one
/// stops saying Ready, and observedGeneration names the spec that failed.
#[tokio::test]
async fn failures_before_observing_show_in_status_at_once() {
    let h = Harness::new(false).await;
    h.create_cluster("fresh", DEV).await;
    h.inject("list", 500, 1);
    h.reconcile("fresh").await.unwrap_err();
    let cluster = h.cluster("fresh").await;
    let status = cluster
        .status
        .as_ref()
        .expect("status written on the first attempt");
    assert_eq!(status.phase, Phase::Degraded);
    // (The in-memory API bumps generation for the finalizer patch; a real API server
    // does not. The envtest scenarios check the exact value there.)
    assert!(status.observed_generation.is_some());
    let (state, reason, message) = condition(&cluster, "Degraded");
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("True", "ReconcileError")
    );
    assert!(message.contains("listing"), "{message}");
    assert!(message.contains("injected failure"), "{message}");
    assert_eq!(condition(&cluster, "Ready").0, "Unknown");
    assert_eq!(condition(&cluster, "Reconciling").0, "True");

    // An existing, ready cluster: its old Ready=True must not survive a failing reconcile.
    h.create_cluster("chat", DEV).await;
    h.reconcile("chat").await.unwrap();
    h.set_statefulset_status("chat-blue", 1).await;
    h.settle("chat").await;
    assert_eq!(condition(&h.cluster("chat").await, "Ready").0, "True");
    h.update_spec("chat", "version: '2.0.0'").await;
    h.inject("list", 500, 1);
    h.reconcile("chat").await.unwrap_err();
    let cluster = h.cluster("chat").await;
    let status = cluster.status.as_ref().unwrap();
    assert_eq!(status.phase, Phase::Degraded);
    assert_eq!(status.observed_generation, cluster.metadata.generation);
    assert_eq!(condition(&cluster, "Ready").0, "Unknown");
    assert_eq!(condition(&cluster, "Degraded").0, "True");
    // It still knows what serves.
    assert_eq!(status.active_version.as_deref(), Some("1.0.0"));

    // The next successful reconcile clears it.
    h.reconcile("chat").await.unwrap();
    assert_eq!(condition(&h.cluster("chat").await, "Degraded").0, "False");
}

#[tokio::test]
async fn transport_timeouts_are_errors_not_panics() {
    use dchat_operator::controller::{reconcile, Context};
    let service = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
        Err::<http::Response<kube::client::Body>, _>(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request timed out",
        ))
    });
    let client = kube::Client::new(service, "apps");
    let ctx = Arc::new(Context::new(
        client,
        Arc::new(dchat_operator::metrics::Metrics::new()),
        None,
    ));
    let mut cluster =
        dchat_operator::api::DchatCluster::new("chat", serde_norway::from_str(DEV).unwrap());
    cluster.metadata.namespace = Some("apps".into());
    let err = reconcile(Arc::new(cluster.clone()), ctx.clone())
        .await
        .expect_err("no API server");
    assert_eq!(err.metric_label(), "transport", "{err}");
    assert!(matches!(
        error_policy(Arc::new(cluster), &err, ctx),
        a if a == Action::requeue(Duration::from_secs(15))
    ));
}

#[tokio::test]
async fn invalid_spec_is_stalled_with_a_message_and_waits() {
    let h = Harness::new(false).await;
    h.create_cluster(
        "chat",
        "version: '1.0.0'\nresources: {requests: {cpu: '2'}, limits: {cpu: '1'}}",
    )
    .await;
    let err = h.reconcile("chat").await.expect_err("invalid spec");
    assert!(err.is_invalid_spec());
    assert!(
        err.to_string().contains("spec.resources.limits.cpu"),
        "{err}"
    );
    let cluster = h.cluster("chat").await;
    assert_eq!(cluster.status.as_ref().unwrap().phase, Phase::Failed);
    let (status, reason, message) = condition(&cluster, "Degraded");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InvalidSpec"));
    assert!(
        message.contains("limit 1 is below the request 2"),
        "{message}"
    );
    assert_eq!(condition(&cluster, "Stalled").0, "True");
    assert!(!h.exists::<StatefulSet>("chat-blue").await);
    assert_eq!(
        error_policy(Arc::new(cluster), &err, h.ctx.clone()),
        Action::await_change()
    );
    let metrics = h.ctx.metrics.encode().unwrap();
    assert!(
        metrics.contains(r#"dchat_operator_reconcile_errors_total{category="invalid_spec"} 1"#),
        "{metrics}"
    );

    // Fixing the spec recovers.
    h.update_spec("chat", "version: '1.0.0'").await;
    h.reconcile("chat").await.unwrap();
    assert!(h.exists::<StatefulSet>("chat-blue").await);
    let cluster = h.cluster("chat").await;
    assert_eq!(condition(&cluster, "Degraded").0, "False");
    assert!(cluster
        .status
        .unwrap()
        .conditions
        .iter()
        .all(|c| c.type_ != "Stalled"));
}

//! The Argo CD health check shipped in docs/argocd-health.lua, run in a real Lua 5.1
//! interpreter (Argo CD uses gopher-lua, a Lua 5.1): first on hand-written statuses,
//! then on the statuses the operator itself writes at each rollout step.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dchat_operator::api::DchatCluster;
use dchat_operator::controller::{Context, ManualClock};
use dchat_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use mlua::{Lua, LuaSerdeExt, SerializeOptions, Table};
use serde_json::{json, Value};
use support::Harness;

fn script() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/argocd-health.lua");
    std::fs::read_to_string(path).expect("docs/argocd-health.lua is readable")
}

/// Runs the health check on `obj` as Argo CD does: `obj` global, returns a table.
fn health(obj: &Value) -> (String, String) {
    let lua = Lua::new();
    let options = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let value = lua.to_value_with(obj, options).unwrap();
    lua.globals().set("obj", value).unwrap();
    let result: Table = lua.load(script()).eval().unwrap();
    let status: String = result.get("status").unwrap();
    let message: String = result.get("message").unwrap_or_default();
    (status, message)
}

fn cluster(status: Value) -> Value {
    json!({
        "apiVersion": "dchat.network/v1alpha1",
        "kind": "DchatCluster",
        "metadata": {"name": "chat", "namespace": "apps", "generation": 2},
        "spec": {"version": "1.1.0"},
        "status": status,
    })
}

fn cond(type_: &str, status: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": "R", "message": message,
           "lastTransitionTime": "2026-11-26T10:00:00Z"})
}

#[test]
fn hand_written_statuses_map_to_argo_health() {
    let rows: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no status yet",
            json!({"apiVersion": "dchat.network/v1alpha1", "kind": "DchatCluster",
                   "metadata": {"name": "chat", "generation": 1}, "spec": {}}),
            "Progressing",
            "Waiting for dchat-operator",
        ),
        (
            "status of an older generation",
            cluster(json!({"observedGeneration": 1, "phase": "Running",
                           "conditions": [cond("Ready", "True", "3/3 relays ready")]})),
            "Progressing",
            "generation 2",
        ),
        (
            "running and ready",
            cluster(json!({"observedGeneration": 2, "phase": "Running",
                           "conditions": [cond("Ready", "True", "3/3 relays ready")]})),
            "Healthy",
            "3/3 relays ready",
        ),
        (
            "running but Ready false",
            cluster(json!({"observedGeneration": 2, "phase": "Running",
                           "conditions": [cond("Ready", "False", "2/3 relays ready")]})),
            "Progressing",
            "2/3",
        ),
        (
            "provisioning",
            cluster(json!({"observedGeneration": 2, "phase": "Provisioning",
                           "conditions": [cond("Progressing", "True", "starting relays: 0/3")]})),
            "Progressing",
            "starting relays",
        ),
        (
            "rollout validating",
            cluster(json!({"observedGeneration": 2, "phase": "Progressing",
                           "conditions": [cond("Progressing", "True", "smoke test against the preview Service")],
                           "rollout": {"step": "Validating", "message": "smoke test against the preview Service"}})),
            "Progressing",
            "smoke test",
        ),
        (
            "awaiting promotion",
            cluster(
                json!({"observedGeneration": 2, "phase": "AwaitingPromotion",
                           "conditions": [cond("Progressing", "True", "x")],
                           "rollout": {"step": "AwaitingPromotion", "message": "version 1.1.0 validated in slot green; waiting for promotion"}}),
            ),
            "Suspended",
            "waiting for promotion",
        ),
        (
            "rolled back",
            cluster(json!({"observedGeneration": 2, "phase": "RolledBack",
                           "conditions": [cond("Ready", "True", "3/3"), cond("Degraded", "True", "version 1.1.0 failed after the switch")],
                           "rollout": {"step": "RolledBack", "message": "m"}})),
            "Degraded",
            "failed after the switch",
        ),
        (
            "failed validation",
            cluster(json!({"observedGeneration": 2, "phase": "Degraded",
                           "conditions": [cond("Degraded", "True", "version 1.1.0 failed validation")]})),
            "Degraded",
            "failed validation",
        ),
        (
            "handover of the old slot's messages failed",
            cluster(json!({"observedGeneration": 2, "phase": "Degraded",
                           "conditions": [cond("Ready", "True", "1/1"), cond("Degraded", "True", "slot blue's stored messages could not be handed over")],
                           "rollout": {"step": "HandoverFailed", "message": "m"}})),
            "Degraded",
            "could not be handed over",
        ),
        (
            "invalid spec",
            cluster(json!({"observedGeneration": 2, "phase": "Failed",
                           "conditions": [cond("Degraded", "True", "spec.rollout.progressDeadline: bad")]})),
            "Degraded",
            "progressDeadline",
        ),
        (
            "paused, with a spec changed since",
            cluster(json!({"observedGeneration": 1, "phase": "Running",
                           "conditions": [cond("Ready", "True", "3/3"),
                                          cond("Paused", "True", "reconciliation paused by spec.paused")]})),
            "Suspended",
            "paused by spec.paused",
        ),
        (
            "hibernating",
            cluster(json!({"observedGeneration": 2, "phase": "Hibernating",
                           "conditions": [cond("Ready", "False", "x"),
                                          cond("Hibernated", "True", "hibernating as asked by spec.hibernate: no relay runs")]})),
            "Suspended",
            "no relay runs",
        ),
        (
            "waking",
            cluster(json!({"observedGeneration": 2, "phase": "Provisioning",
                           "conditions": [cond("Progressing", "True", "waking from hibernation: starting 3 relay(s)")]})),
            "Progressing",
            "waking",
        ),
        (
            "unknown phase from a newer operator",
            cluster(json!({"observedGeneration": 2, "phase": "Frozen"})),
            "Unknown",
            "Frozen",
        ),
    ];
    for (name, obj, want_status, want_message) in rows {
        let (status, message) = health(&obj);
        assert_eq!(status, want_status, "{name}: {message}");
        assert!(
            message.contains(want_message),
            "{name}: message {message:?} lacks {want_message:?}"
        );
    }
}

/// The operator's own status at each step, through the health check.
#[tokio::test]
async fn operator_statuses_through_a_rollout_map_to_argo_health() {
    let h = Harness::new(false).await;
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_second(1_800_000_000).unwrap(),
    ));
    let reconcile = || async {
        let ctx = Context::new(h.client.clone(), Arc::new(Metrics::new()), None)
            .with_clock(clock.clone())
            .with_capabilities(h.capabilities.clone());
        let cluster = h.cluster("chat").await;
        dchat_operator::controller::reconcile(Arc::new(cluster), Arc::new(ctx))
            .await
            .unwrap();
        let cluster: DchatCluster = h.cluster("chat").await;
        health(&serde_json::to_value(&cluster).unwrap())
    };
    let spec = "version: '1.0.0'\nreplicas: 2\ndatabase: {secretRef: {name: db}}\nrollout: {autoPromote: false, validation: {smokeTest: false}}";
    h.create_cluster("chat", spec).await;
    assert_eq!(reconcile().await.0, "Progressing");
    h.set_statefulset_status("chat-blue", 2).await;
    assert_eq!(reconcile().await.0, "Healthy");

    h.update_spec("chat", &spec.replace("1.0.0", "1.1.0")).await;
    let (status, message) = reconcile().await;
    assert_eq!(status, "Progressing", "{message}");
    h.set_statefulset_status("chat-green", 2).await;
    let (status, message) = reconcile().await;
    assert_eq!(status, "Suspended", "{message}");
    assert!(message.contains("dchat.network/promote"), "{message}");

    // Promote, then a relay of the new slot loses readiness inside the window.
    h.clusters()
        .patch(
            "chat",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"dchat.network/promote": "true"}}})),
        )
        .await
        .unwrap();
    let (status, message) = reconcile().await;
    assert_eq!(status, "Progressing", "{message}");
    clock.advance(Duration::from_secs(60));
    h.set_statefulset_status("chat-green", 1).await;
    let (status, message) = reconcile().await;
    assert_eq!(status, "Degraded", "{message}");
    assert!(message.contains("failed after the switch"), "{message}");
    let green: StatefulSet = h.api().get("chat-green").await.unwrap();
    assert_eq!(
        green.spec.unwrap().replicas,
        Some(2),
        "the failed slot is kept for inspection"
    );
}

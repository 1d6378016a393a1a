//! Objects of a cluster in the middle of a rollout, as the API server returns them, for
//! the status tests.

use serde_json::{json, Value};

use super::{Section, Snapshot};
use crate::view::ClusterView;

/// "Now" in the fixtures: three minutes after the rollout started.
pub const NOW: &str = "2026-11-01T10:03:00Z";

/// DchatCluster prod/chat rolling out 1.1 to slot green, now validating.
pub fn cluster() -> Value {
    let mut raw = crate::view::tests::running();
    raw["metadata"]["generation"] = json!(5);
    raw["spec"]["version"] = json!("1.1");
    let status = &mut raw["status"];
    status["observedGeneration"] = json!(5);
    status["phase"] = json!("Progressing");
    status["conditions"][1] = json!({
        "type": "Progressing", "status": "True", "reason": "RollingUpdate",
        "message": "rolling out 1.1 to slot green", "lastTransitionTime": "2026-11-01T10:00:00Z"
    });
    status["rollout"] = json!({
        "targetVersion": "1.1", "targetTemplateHash": "cccc3333dddd4444", "slot": "green",
        "fromVersion": "1.0", "fromTemplateHash": "aaaa1111bbbb2222", "replicas": 3,
        "step": "Validating", "reason": "Validating",
        "message": "smoke test chat-smoke-cccc3333 running against chat-preview",
        "startedAt": "2026-11-01T10:00:00Z", "stepStartedAt": "2026-11-01T10:02:00Z"
    });
    raw
}

fn statefulset(slot: &str, version: &str, hash: &str, ready: i32) -> Value {
    json!({
        "metadata": {"name": format!("chat-{slot}"), "namespace": "prod",
                      "annotations": {"dchat.network/template-hash": hash}},
        "spec": {"replicas": 3, "serviceName": format!("chat-{slot}-headless"), "selector": {},
                 "template": {"metadata": {"labels": {"app.kubernetes.io/version": version}},
                              "spec": {"containers": [{"name": "relay",
                                  "image": format!("ghcr.io/dchat/relay:{version}")}]}}},
        "status": {"replicas": 3, "readyReplicas": ready}
    })
}

fn event(reason: &str, kind: &str, at: &str, message: &str, count: i32) -> Value {
    json!({
        "metadata": {"name": format!("chat.{reason}"), "namespace": "prod"},
        "involvedObject": {"kind": "DchatCluster", "name": "chat", "namespace": "prod"},
        "reason": reason, "type": kind, "message": message, "count": count,
        "firstTimestamp": at, "lastTimestamp": at
    })
}

fn backup(name: &str, created: &str, status: Value) -> Value {
    json!({
        "apiVersion": "dchat.network/v1alpha1", "kind": "DchatBackup",
        "metadata": {"name": name, "namespace": "prod", "creationTimestamp": created,
                      "labels": {"dchat.network/cluster": "chat"}},
        "spec": {"cluster": {"name": "chat"}},
        "status": status
    })
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a fixture of the right shape")
}

/// Everything of the mid-rollout cluster.
pub fn snapshot() -> Snapshot {
    Snapshot {
        cluster: ClusterView::from_value(cluster()).expect("the fixture cluster"),
        statefulsets: Section::Shown(vec![
            typed(statefulset("blue", "1.0", "aaaa1111bbbb2222", 3)),
            typed(statefulset("green", "1.1", "cccc3333dddd4444", 3)),
        ]),
        autoscaler: Section::Shown(Some(typed(json!({
            "metadata": {"name": "chat", "namespace": "prod"},
            "spec": {"minReplicas": 3, "maxReplicas": 10,
                     "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "chat-blue"}},
            "status": {"currentReplicas": 3, "desiredReplicas": 3}
        })))),
        disruption_budget: Section::Shown(Some(typed(json!({
            "metadata": {"name": "chat", "namespace": "prod"},
            "spec": {"minAvailable": 2},
            "status": {"currentHealthy": 3, "desiredHealthy": 2, "disruptionsAllowed": 1,
                       "expectedPods": 3}
        })))),
        backups: Section::Shown(vec![
            typed(backup(
                "chat-20261101t000000z",
                "2026-11-01T00:00:00Z",
                json!({"phase": "Failed", "error": "upload: connection reset"}),
            )),
            typed(backup(
                "chat-20261101t060000z",
                "2026-11-01T06:00:00Z",
                json!({"phase": "Completed", "sizeBytes": 1572864,
                       "location": "s3://b/prod/chat/chat-20261101t060000z"}),
            )),
        ]),
        events: Section::Shown(vec![
            typed(event(
                "Validating",
                "Normal",
                "2026-11-01T10:02:00Z",
                "slot green is ready; running the smoke test",
                1,
            )),
            typed(event(
                "RolloutStarted",
                "Normal",
                "2026-11-01T10:00:00Z",
                "rolling out 1.1 to slot green",
                1,
            )),
            typed(event(
                "BackupFailed",
                "Warning",
                "2026-11-01T00:01:00Z",
                "chat-20261101t000000z: upload: connection reset",
                2,
            )),
        ]),
    }
}

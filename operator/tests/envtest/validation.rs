//! Scenario e: every CEL rule of the CRD rejects its bad spec at apply; a rule only the
//! operator can check gives Failed/Stalled.

use dchat_operator::api::{DchatCluster, Phase};
use kube::CustomResourceExt;

use crate::support::{condition, condition_status, observed, wait_for, Env};

/// One bad spec per CEL rule, and a phrase of the rule's message.
const CASES: &[(&str, &str)] = &[
    (
        "version: '1'\nreplicas: 2",
        "embedded storage (no spec.database) runs exactly one relay",
    ),
    (
        "version: '1'\nautoscaling: {enabled: true, minReplicas: 1, maxReplicas: 3}",
        "autoscaling needs shared storage",
    ),
    (
        "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\ndisruptionBudget: {minAvailable: 3}",
        "disruptionBudget.minAvailable must be less than the replica count",
    ),
    (
        "version: '1'\nreplicas: 6\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 2, maxReplicas: 5}",
        "spec.replicas must not exceed autoscaling.maxReplicas",
    ),
    (
        "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 5, maxReplicas: 4}",
        "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
    ),
    (
        "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 2, maxReplicas: 4, targetCPUUtilizationPercentage: null, targetMemoryUtilizationPercentage: null}",
        "autoscaling needs at least one target",
    ),
    (
        "version: '1'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\ndisruptionBudget: {minAvailable: 1, maxUnavailable: 1}",
        "set at most one of disruptionBudget.minAvailable and disruptionBudget.maxUnavailable",
    ),
    (
        "version: '1'\ningress: {enabled: true}",
        "ingress.host is required when ingress.enabled is true",
    ),
    (
        "version: '1'\nbackup: {destination: {s3: {bucket: bkt, region: eu-west-1, encryption: 'aws:kms'}}}",
        "destination.s3.kmsKeyId is required when encryption is aws:kms",
    ),
    (
        "version: '1'\nbootstrap: {recovery: {}}",
        "bootstrap.recovery needs exactly one of backup",
    ),
    (
        "version: '1'\nrollout: {autoPromote: true, autoPromoteAfter: 10m}",
        "rollout.autoPromoteAfter only applies when rollout.autoPromote is false",
    ),
];

fn cel_rules(schema: &serde_json::Value, out: &mut Vec<String>) {
    match schema {
        serde_json::Value::Object(map) => {
            if let Some(rules) = map
                .get("x-kubernetes-validations")
                .and_then(|v| v.as_array())
            {
                out.extend(
                    rules
                        .iter()
                        .filter_map(|r| r["message"].as_str().map(String::from)),
                );
            }
            map.values().for_each(|v| cel_rules(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| cel_rules(v, out)),
        _ => {}
    }
}

/// e. Each rule refuses its bad spec when applied (422, with the rule's message), and
/// every rule the CRD has is covered here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cel_rule_rejects_its_bad_spec() {
    let Some(env) = Env::shared("cel-rules").await else {
        return;
    };
    let mut messages = Vec::new();
    cel_rules(
        &serde_json::to_value(DchatCluster::crd()).unwrap(),
        &mut messages,
    );
    for message in &messages {
        assert!(
            CASES.iter().any(|(_, phrase)| message.contains(phrase)),
            "the CRD rule {message:?} has no case here"
        );
    }
    for (index, (spec, phrase)) in CASES.iter().enumerate() {
        let name = format!("bad-{index}");
        match env.apply_cluster(&name, spec).await {
            Ok(_) => panic!("accepted a spec that breaks {phrase:?}:\n{spec}"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{status:?}");
                assert!(
                    status.message.contains(phrase),
                    "{phrase:?} not in {}",
                    status.message
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// e. A rule the schema cannot express (a limit below its request) is the operator's:
/// the cluster is Failed and Stalled, naming the field, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_only_rule_gives_failed_and_stalled() {
    let Some(env) = Env::shared("operator-rule").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_cluster(
        "chat",
        "version: '1'\nresources: {requests: {cpu: '2'}, limits: {cpu: '1'}}",
    )
    .await
    .expect("the schema accepts it");
    let cluster = env
        .wait_cluster("chat", "Failed", |c| {
            observed(c) && c.status.as_ref().is_some_and(|s| s.phase == Phase::Failed)
        })
        .await;
    assert_eq!(condition_status(&cluster, "Stalled"), "True");
    let degraded = condition(&cluster, "Degraded").unwrap();
    assert_eq!(degraded.reason, "InvalidSpec");
    assert!(
        degraded.message.contains("spec.resources.limits.cpu"),
        "{}",
        degraded.message
    );
    assert!(env
        .children("chat")
        .await
        .iter()
        .all(|(kind, _, _)| kind != "StatefulSet"));
    let warnings = |events: Vec<k8s_openapi::api::events::v1::Event>| -> Vec<String> {
        events
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter_map(|e| e.note)
            .collect()
    };
    let first = wait_for("the Warning Event", || async {
        Some(warnings(env.events("Failed").await)).filter(|w| w.len() == 1)
    })
    .await;
    assert!(first[0].contains("spec.resources.limits.cpu"), "{first:?}");

    // A second, different mistake while the cluster stays Failed is a Warning of its own.
    env.apply_cluster(
        "chat",
        "version: '1'\nresources: {requests: {cpu: '2'}, limits: {cpu: '1'}}\n\
         relay: {drainTimeout: 2h}",
    )
    .await
    .expect("the schema accepts it");
    let both = wait_for("a second Warning Event", || async {
        Some(warnings(env.events("Failed").await)).filter(|w| w.len() == 2)
    })
    .await;
    assert!(
        both.iter().any(|n| n.contains("spec.relay.drainTimeout")),
        "{both:?}"
    );
    operator.assert_no_refusals();
}

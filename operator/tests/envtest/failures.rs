//! Defect 2: a failing reconcile shows in status within one attempt, on a new cluster and
//! on one that was Ready. The failure here is a real one: an install whose ClusterRole
//! lacks the PodDisruptionBudget rule (an operator upgraded without its RBAC).

use dchat_operator::api::Phase;

use crate::support::{condition, condition_status, observed, Env};

fn without_pdb_rule(rule: &serde_json::Value) -> bool {
    !rule["resources"]
        .as_array()
        .is_some_and(|r| r.iter().any(|r| r == "poddisruptionbudgets"))
}

fn shows_forbidden(c: &dchat_operator::api::DchatCluster) -> bool {
    observed(c)
        && c.status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Degraded)
        && condition(c, "Degraded").is_some_and(|d| {
            d.status == "True"
                && d.message.contains("PodDisruptionBudget")
                && d.message.contains("forbidden")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_reconciles_show_in_status() {
    let Some(env) = Env::shared("failing-reconciles").await else {
        return;
    };
    // A new cluster: never an empty phase.
    let restricted = env.operator_with_rules(without_pdb_rule).await;
    env.apply_cluster("fresh", "version: '1'").await.unwrap();
    let cluster = env
        .wait_cluster("fresh", "Degraded with the error", shows_forbidden)
        .await;
    assert_eq!(
        condition_status(&cluster, "Stalled"),
        "True",
        "a refusal needs a person"
    );
    assert_eq!(condition_status(&cluster, "Ready"), "Unknown");
    assert!(
        condition(&cluster, "Degraded")
            .unwrap()
            .message
            .contains("listing"),
        "{:?}",
        cluster.status
    );
    assert!(
        !restricted.refusals.all().is_empty(),
        "the refusals were real"
    );
    drop(restricted);

    // A cluster that was Ready: the correct RBAC first...
    let operator = env.operator().await;
    env.apply_cluster("chat", "version: '1'").await.unwrap();
    env.wait_cluster("chat", "Running", |c| {
        observed(c) && c.status.as_ref().is_some_and(|s| s.phase == Phase::Running)
    })
    .await;
    assert_eq!(
        condition_status(&env.cluster("chat").await, "Ready"),
        "True"
    );
    operator.assert_no_refusals();
    operator.stop().await.expect("a clean stop");

    // ...then the outdated one, and a spec change: the old Ready=True must not stay.
    let restricted = env.operator_with_rules(without_pdb_rule).await;
    env.apply_cluster("chat", "version: '1'\nrelay: {logLevel: debug}")
        .await
        .unwrap();
    let cluster = env
        .wait_cluster("chat", "Degraded with the error", shows_forbidden)
        .await;
    assert_eq!(condition_status(&cluster, "Ready"), "Unknown");
    assert_eq!(
        cluster.status.as_ref().unwrap().active_version.as_deref(),
        Some("1"),
        "what serves is still known"
    );
    drop(restricted);
}

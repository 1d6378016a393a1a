//! Scenario j: deleting a DchatCluster removes its children and the finalizer completes.

use kube::api::DeleteParams;

use crate::support::{wait_for, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cluster_removes_its_children() {
    let Some(env) = Env::shared("deletion").await else {
        return;
    };
    let operator = env.operator().await;
    env.dev_cluster_running().await;
    assert!(env.children("dchat-dev").await.len() >= 6);

    env.clusters()
        .delete("dchat-dev", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the DchatCluster gone (finalizer done)", || async {
        env.clusters()
            .get_opt("dchat-dev")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // The StatefulSets go first (deleted by the operator), the rest through garbage
    // collection of their owner references.
    wait_for("every child gone", || async {
        env.children("dchat-dev").await.is_empty().then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

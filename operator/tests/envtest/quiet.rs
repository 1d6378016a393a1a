//! Scenario d: an unchanged cluster gets no writes: no resourceVersion moves, and the
//! operator's own request counter shows no write request (a server-side apply that
//! changes nothing leaves the resourceVersion alone, so only the counter sees it). Nor
//! does it list its children: a reconcile reads them from the controller's caches.

use crate::support::Env;

/// d. Three reconciles caused by metadata-only changes leave the resourceVersion of every
/// child, and of the DchatCluster apart from the change itself, as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_cluster_gets_no_writes() {
    let Some(env) = Env::shared("quiet").await else {
        return;
    };
    let operator = env.operator().await;
    let settled = env.dev_cluster_running().await;
    // Let the last status write and the StatefulSet controller settle: one reconcile
    // that changes nothing.
    let before = operator.reconciles_finished();
    env.poke("dchat-dev", "settle").await;
    operator.wait_reconciled_after(before).await;
    let children = env.children("dchat-dev").await;
    assert!(children.len() >= 6, "{children:?}");
    let status = env.cluster("dchat-dev").await.status;
    assert_eq!(
        status.as_ref().map(|s| s.phase),
        settled.status.as_ref().map(|s| s.phase)
    );

    let writes = operator.writes();
    let lists = operator.lists();
    for round in 0..3 {
        let before = operator.reconciles_finished();
        let version = env.poke("dchat-dev", &format!("round-{round}")).await;
        operator.wait_reconciled_after(before).await;
        let cluster = env.cluster("dchat-dev").await;
        assert_eq!(
            cluster.metadata.resource_version.as_deref(),
            Some(version.as_str()),
            "round {round}: the operator wrote the DchatCluster (status or metadata)"
        );
        assert_eq!(cluster.status, status, "round {round}: status changed");
        assert_eq!(
            env.children("dchat-dev").await,
            children,
            "round {round}: a child was written"
        );
        assert_eq!(
            operator.writes(),
            writes,
            "round {round}: the operator sent write requests"
        );
        assert_eq!(
            operator.lists(),
            lists,
            "round {round}: the reconcile listed instead of reading its caches"
        );
    }
    operator.assert_no_refusals();
}

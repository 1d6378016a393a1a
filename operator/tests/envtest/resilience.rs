//! Scenarios h and i: the API server stopped under a running operator, and two operator
//! replicas with leader election.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;

use crate::support::operator::Replica;
use crate::support::rbac::RELEASE_NAMESPACE;
use crate::support::{observed, wait_for, Env};

async fn log_level_applied(env: &Env, configmap: &str, level: &str) {
    let configmaps: Api<ConfigMap> = env.api();
    wait_for(&format!("RUST_LOG={level} in {configmap}"), || async {
        let cm = configmaps.get_opt(configmap).await.ok().flatten()?;
        (cm.data?.get("RUST_LOG")? == level).then_some(())
    })
    .await;
}

/// h. The API server (with etcd and the controller-manager) stops for 20 s while the
/// operator runs; it recovers by itself and the next change reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_recovers_from_an_api_server_outage() {
    let Some(env) = Env::private("api-outage").await else {
        return;
    };
    let mut operator = env.operator().await;
    env.dev_cluster_running().await;

    tokio::task::block_in_place(|| env.plane().down());
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        operator.has_exited().is_none(),
        "the operator gave up during the outage"
    );
    tokio::task::block_in_place(|| env.plane().up());
    // A restarted API server answers 403 for a moment until its RBAC caches are filled
    // (seen as a refused discovery `GET /apis`); that is the server, not a missing rule.
    // A missing rule refuses the reconcile of the change below again, so it still fails.
    wait_for("the operator's requests authorized again", || async {
        let before = operator.refusals.all().len();
        tokio::time::sleep(Duration::from_secs(3)).await;
        (operator.refusals.all().len() == before).then_some(())
    })
    .await;
    operator.refusals.clear();

    env.apply_cluster(
        "dchat-dev",
        "version: '0.1.0'\nmonitoring: {serviceMonitor: false, prometheusRule: false}\nrelay: {logLevel: warn}",
    )
    .await
    .expect("the API server is back");
    log_level_applied(&env, "dchat-dev-config", "warn").await;
    env.wait_cluster("dchat-dev", "the change observed", observed)
        .await;
    assert!(operator.has_exited().is_none());
    operator.assert_no_refusals();
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// i. Two replicas with leader election: one reconciles; killed, the other takes over
/// within the lease duration and reconciles the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_takes_over_within_the_lease_duration() {
    let Some(env) = Env::shared("leader-election").await else {
        return;
    };
    let lease = env.ns.clone();
    let replica = |identity: &str| Replica {
        namespace: env.ns.clone(),
        identity: identity.to_string(),
        lease: Some(lease.clone()),
    };
    let a = env.operator_with(replica("replica-a")).await;
    let b = env.operator_with(replica("replica-b")).await;
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), RELEASE_NAMESPACE);
    let first = wait_for("a leader", || holder(&leases, &lease)).await;
    env.dev_cluster_running().await;
    let (leader, standby) = if first == "replica-a" { (a, b) } else { (b, a) };
    assert!(leader.reconciles() > 0);
    assert_eq!(standby.reconciles(), 0, "the standby reconciled");

    leader.assert_no_refusals();
    leader.kill();
    let killed = Instant::now();
    let next = wait_for("a new leader", || async {
        holder(&leases, &lease).await.filter(|h| *h != first)
    })
    .await;
    let takeover = killed.elapsed();
    assert_ne!(next, first);
    // The lease lasts 15 s after the last renewal (at most 5 s before the kill); the
    // standby tries every 3 s.
    assert!(
        takeover <= dchat_operator::runner::LEASE_DURATION + Duration::from_secs(4),
        "took over after {takeover:?}"
    );
    env.apply_cluster(
        "dchat-dev",
        "version: '0.1.0'\nmonitoring: {serviceMonitor: false, prometheusRule: false}\nrelay: {logLevel: warn}",
    )
    .await
    .unwrap();
    log_level_applied(&env, "dchat-dev-config", "warn").await;
    assert!(standby.reconciles() > 0, "the new leader reconciles");
    standby.assert_no_refusals();
}

//! Leader election against the in-memory API: one holder at a time, renewal, takeover of
//! an expired lease, release on shutdown.

use std::time::Duration;

use dchat_operator::leader::LeaderElector;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube_fake_client::ClientBuilder;

fn elector(client: &kube::Client, identity: &str) -> LeaderElector {
    LeaderElector::new(
        client.clone(),
        "ops",
        "dchat-operator-leader",
        identity,
        Duration::from_secs(15),
    )
}

#[tokio::test]
async fn one_leader_at_a_time_with_takeover_and_release() {
    let client = ClientBuilder::new().build().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ops");
    let a = elector(&client, "pod-a");
    let b = elector(&client, "pod-b");

    assert!(a.try_acquire().await.unwrap(), "free lease is taken");
    assert!(
        !b.try_acquire().await.unwrap(),
        "a live lease of another is respected"
    );
    assert!(a.try_acquire().await.unwrap(), "the holder renews");
    let lease = leases.get("dchat-operator-leader").await.unwrap();
    let spec = lease.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-a"));
    assert_eq!(spec.lease_duration_seconds, Some(15));
    assert_eq!(spec.lease_transitions, Some(0));

    // pod-a stops renewing: its last renewal is older than the lease duration.
    let mut stale = lease;
    let long_ago =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60);
    stale.spec.as_mut().unwrap().renew_time = Some(MicroTime(long_ago));
    leases
        .replace("dchat-operator-leader", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert!(
        b.try_acquire().await.unwrap(),
        "an expired lease is taken over"
    );
    let spec = leases
        .get("dchat-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("pod-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    assert!(
        !a.try_acquire().await.unwrap(),
        "the old holder does not come back"
    );

    b.release().await;
    let spec = leases
        .get("dchat-operator-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(spec.holder_identity, None);
    assert!(
        a.try_acquire().await.unwrap(),
        "a released lease is free at once"
    );
}

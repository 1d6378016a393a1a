//! Which changes of a child start a reconcile (`controller/triggers.rs`): a child someone
//! deleted, or whose spec someone edited, is put back at once. The wait is shorter than
//! the 5-minute resync, so only the child's own watch event can have started the repair.

use dchat_operator::api::Phase;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::ResourceExt;

use crate::support::{observed, wait_for, Env};

/// The name of the cluster's first child of `kind`.
async fn child(env: &Env, kind: &str) -> String {
    env.children("dchat-dev")
        .await
        .into_iter()
        .find(|(k, _, _)| k == kind)
        .map(|(_, name, _)| name)
        .unwrap_or_else(|| panic!("dchat-dev has no {kind}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_edited_child_is_put_back_without_waiting_for_the_resync() {
    let Some(env) = Env::shared("triggers").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/dev.yaml").await;
    env.wait_cluster("dchat-dev", "Running", |c| {
        observed(c) && c.status.as_ref().is_some_and(|s| s.phase == Phase::Running)
    })
    .await;

    // A spec edit of a kind with a generation (its status-only changes start nothing).
    let policy_name = child(&env, "NetworkPolicy").await;
    let policy: NetworkPolicy = env.get(&policy_name).await.expect("the NetworkPolicy");
    let wanted = policy.spec.clone().expect("a NetworkPolicy spec").ingress;
    assert!(wanted.as_ref().is_some_and(|rules| !rules.is_empty()));
    let edited = env
        .api::<NetworkPolicy>()
        .patch(
            &policy_name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ingress": []}})),
        )
        .await
        .expect("editing the NetworkPolicy");
    assert_ne!(edited.metadata.generation, policy.metadata.generation);
    wait_for("the NetworkPolicy's ingress rules put back", || async {
        let live: NetworkPolicy = env.get(&policy_name).await?;
        (live.spec?.ingress == wanted).then_some(())
    })
    .await;

    // A deletion of a kind without a generation.
    let service_name = child(&env, "Service").await;
    let service: Service = env.get(&service_name).await.expect("the Service");
    env.api::<Service>()
        .delete(&service_name, &DeleteParams::default())
        .await
        .expect("deleting the Service");
    wait_for("the deleted Service created again", || async {
        let live: Service = env.get(&service_name).await?;
        (live.uid() != service.uid()).then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

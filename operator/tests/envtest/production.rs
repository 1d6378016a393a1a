//! Scenario c: `examples/production.yaml` with its Secret.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams};

use crate::support::{ready_with, wait_for, Env};

/// c. Three relays, the HPA, PDB, Ingress and NetworkPolicy; a scale through the `/scale`
/// subresource (what the HPA does) is not reverted by the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_example_runs_the_full_fleet_and_leaves_scale_to_the_hpa() {
    let Some(env) = Env::shared("production-example").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    env.apply_file("examples/production.yaml").await;
    // The HPA (kube-controller-manager's, without metrics) raises the StatefulSet to
    // its minReplicas, 3.
    let cluster = env
        .wait_cluster("dchat", "3 relays Running", ready_with(3))
        .await;
    assert_eq!(
        cluster.status.as_ref().unwrap().ready.as_deref(),
        Some("3/3")
    );

    let hpa: HorizontalPodAutoscaler = env.get("dchat").await.expect("the HPA");
    let spec = hpa.spec.unwrap();
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(3), 10));
    assert_eq!(spec.scale_target_ref.name, "dchat-blue");
    let pdb: PodDisruptionBudget = env.get("dchat").await.expect("the PDB");
    assert_eq!(
        pdb.spec.unwrap().min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
    );
    let ingresses = env
        .api::<Ingress>()
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(ingresses.items.len(), 1);
    let rules = ingresses.items[0]
        .spec
        .clone()
        .unwrap()
        .rules
        .unwrap_or_default();
    assert_eq!(rules[0].host.as_deref(), Some("relay.example.com"));
    env.get::<NetworkPolicy>("dchat")
        .await
        .expect("the NetworkPolicy");

    // What the HPA does when load rises: /scale of the serving StatefulSet.
    let statefulsets = env.api::<StatefulSet>();
    statefulsets
        .patch_scale(
            "dchat-blue",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 4}})),
        )
        .await
        .expect("scaling through /scale");
    for poke in 0..3 {
        let before = operator.reconciles_finished();
        env.poke("dchat", &poke.to_string()).await;
        operator.wait_reconciled_after(before).await;
    }
    let sts = statefulsets.get("dchat-blue").await.unwrap();
    assert_eq!(
        sts.spec.unwrap().replicas,
        Some(4),
        "the operator reverted the scale"
    );
    env.wait_cluster("dchat", "4 relays Running", ready_with(4))
        .await;
    wait_for("the StatefulSet still at 4", || async {
        let sts = statefulsets.get("dchat-blue").await.ok()?;
        (sts.spec?.replicas == Some(4)).then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

/// `spec.replicas` is the starting size of an autoscaled cluster on the real API server:
/// the StatefulSet is created at it, and only the handover manager owns the count, so
/// the HPA's scale writes are never fought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaled_cluster_starts_at_spec_replicas_and_the_hpa_owns_the_count() {
    let Some(env) = Env::shared("autoscaled-start").await else {
        return;
    };
    let _operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    // Between the bounds and away from both, so neither the API server's default (1)
    // nor the HPA (which, without metrics, keeps a count within them) gives 4.
    env.apply_cluster(
        "chat",
        "version: '1.0'\nreplicas: 4\ndatabase: {secretRef: {name: dchat-db}}\n\
         autoscaling: {enabled: true, minReplicas: 2, maxReplicas: 6}",
    )
    .await
    .unwrap();
    let sts = wait_for("the StatefulSet at 4 relays", || async {
        env.get::<StatefulSet>("chat-blue")
            .await
            .filter(|s| s.spec.as_ref().and_then(|s| s.replicas) == Some(4))
    })
    .await;
    let owners: Vec<String> = sts
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
    assert_eq!(
        owners,
        vec![dchat_operator::controller::HANDOVER_MANAGER.to_string()]
    );
    env.wait_cluster("chat", "4 relays Running", ready_with(4))
        .await;
}

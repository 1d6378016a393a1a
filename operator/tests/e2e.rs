//! End-to-end test against a real cluster (KUBECONFIG): installs the CRD, runs the
//! controller in-process, applies `examples/dev.yaml` into a fresh namespace, and waits for
//! the StatefulSet, the Services and a truthful status. Run with
//! `cargo test -p dchat-operator --test e2e -- --ignored` (CI: .github/workflows/e2e.yml).

use std::sync::Arc;
use std::time::Duration;

use dchat_operator::api::{DchatCluster, Phase};
use dchat_operator::controller;
use dchat_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt};

const TIMEOUT: Duration = Duration::from_secs(180);

async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster in KUBECONFIG"]
async fn dev_example_comes_up_on_a_real_cluster() {
    dchat_operator::runner::install_crypto_provider();
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG points at a cluster");
    let apply = PatchParams::apply("dchat-e2e").force();

    // The CRD exactly as generated, accepted by the API server.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DchatCluster::crd();
    let crd_name = crd.metadata.name.clone().unwrap();
    crds.patch(&crd_name, &apply, &Patch::Apply(&crd))
        .await
        .expect("the API server accepts the generated CRD");
    tokio::time::timeout(
        TIMEOUT,
        await_condition(crds.clone(), &crd_name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watching the CRD");

    let namespace = format!("dchat-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &namespace,
            &apply,
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
            })),
        )
        .await
        .unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controller::run(
        client.clone(),
        Some(namespace.clone()),
        Arc::new(Metrics::new()),
        Some("e2e".into()),
        controller::DISCOVERY_INTERVAL,
        async move {
            let _ = stop_rx.await;
        },
    ));

    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/dev.yaml"))
            .unwrap();
    let mut document: serde_json::Value = serde_norway::from_str(&text).unwrap();
    document["metadata"]["namespace"] = serde_json::json!(namespace);
    let clusters: Api<DchatCluster> = Api::namespaced(client.clone(), &namespace);
    clusters
        .patch("dchat-dev", &apply, &Patch::Apply(&document))
        .await
        .expect("the API server accepts examples/dev.yaml");

    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let sts = wait_for("StatefulSet dchat-dev-blue", || async {
        statefulsets.get_opt("dchat-dev-blue").await.ok().flatten()
    })
    .await;
    let spec = sts.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some("ghcr.io/dchat/relay:0.1.0")
    );
    // Embedded store: the relays' admin token Secret, owned by the cluster, referenced
    // by the relay container (the rollout's handover Job uses it).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let token = wait_for("Secret dchat-dev-admin-token", || async {
        secrets
            .get_opt("dchat-dev-admin-token")
            .await
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(
        token.data.unwrap_or_default()["token"].0.len(),
        64,
        "a 256-bit hex token"
    );
    assert_eq!(
        token.metadata.owner_references.unwrap_or_default()[0].kind,
        "DchatCluster"
    );
    let env = sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter().any(|e| e.name == "DCHAT_ADMIN_TOKEN"),
        "relay reads the admin token"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    for name in [
        "dchat-dev",
        "dchat-dev-preview",
        "dchat-dev-blue-headless",
        "dchat-dev-green-headless",
    ] {
        wait_for(name, || async {
            services.get_opt(name).await.ok().flatten()
        })
        .await;
    }

    let cluster = wait_for("status with observedGeneration", || async {
        let cluster = clusters.get("dchat-dev").await.ok()?;
        let status = cluster.status.as_ref()?;
        (status.observed_generation == cluster.metadata.generation).then_some(cluster)
    })
    .await;
    let status = cluster.status.unwrap();
    assert!(
        matches!(
            status.phase,
            Phase::Provisioning | Phase::Running | Phase::Degraded
        ),
        "phase {:?}",
        status.phase
    );
    for type_ in ["Ready", "Progressing", "Degraded"] {
        assert!(
            status.conditions.iter().any(|c| c.type_ == type_),
            "{type_} missing"
        );
    }
    assert_eq!(status.active_slot.as_str(), "blue");
    assert!(cluster
        .metadata
        .finalizers
        .unwrap_or_default()
        .contains(&"dchat.network/cleanup".to_string()));

    // Deletion runs the finalizer and the object goes away.
    clusters
        .delete("dchat-dev", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("DchatCluster deleted", || async {
        match clusters.get_opt("dchat-dev").await {
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), controller).await;
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
}

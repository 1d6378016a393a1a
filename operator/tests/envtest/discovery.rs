//! Scenarios a and b: a cluster without the Prometheus Operator, and its CRDs installed
//! and removed while the operator runs.

use dchat_operator::build::{PrometheusRule, ServiceMonitor};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

use crate::support::{
    condition, condition_status, observed, running, wait_for, Env, TIMEOUT, USER,
};

/// a. `examples/dev.yaml` on a cluster without monitoring CRDs becomes Running with a
/// truthful status; a cluster that asks for monitoring there says once, without an
/// error, that the objects cannot exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_example_runs_without_monitoring_crds() {
    let Some(env) = Env::shared("dev-without-monitoring").await else {
        return;
    };
    let operator = env.operator().await;
    let cluster = env.dev_cluster_running().await;
    let status = cluster.status.clone().unwrap();
    assert_eq!(status.active_version.as_deref(), Some("0.1.0"));
    assert_eq!(status.active_slot.as_str(), "blue");
    assert_eq!(status.ready.as_deref(), Some("1/1"));
    assert_eq!(condition_status(&cluster, "Ready"), "True");
    assert_eq!(condition_status(&cluster, "Degraded"), "False");
    assert!(
        condition(&cluster, "Monitoring").is_none(),
        "monitoring is off"
    );

    // The finalizer is written under the operator's field manager.
    let managers: Vec<(String, String)> = cluster
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.fields_v1
                    .as_ref()
                    .map(|f| f.0.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers
            .iter()
            .any(|(m, fields)| m == "dchat-operator" && fields.contains("f:finalizers")),
        "{managers:?}"
    );
    assert!(
        managers
            .iter()
            .all(|(m, _)| !m.is_empty() && m != "unknown"),
        "{managers:?}"
    );

    // A cluster that asks for a ServiceMonitor and PrometheusRule (the default).
    env.apply_cluster("monitored", "version: '0.1.0'")
        .await
        .unwrap();
    let cluster = env.wait_cluster("monitored", "Running", running).await;
    let monitoring = condition(&cluster, "Monitoring").expect("a Monitoring condition");
    assert_eq!(monitoring.status, "False");
    assert_eq!(monitoring.reason, "PrometheusOperatorNotInstalled");
    assert_eq!(condition_status(&cluster, "Degraded"), "False");

    // Said once: more reconciles add no second Event.
    for poke in 0..3 {
        let before = operator.reconciles();
        env.clusters()
            .patch(
                "monitored",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"test/poke": poke.to_string()}}})),
            )
            .await
            .unwrap();
        wait_for("a reconcile of the poked cluster", || async {
            (operator.reconciles() > before).then_some(())
        })
        .await;
    }
    let said: Vec<Event> = env
        .events("PrometheusOperatorNotInstalled")
        .await
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("monitored"))
        .collect();
    assert_eq!(said.len(), 1, "{said:#?}");
    assert!(said[0].series.is_none(), "repeated: {:?}", said[0].series);
    operator.assert_no_refusals();
}

async fn install_monitoring_crds(env: &Env) -> Vec<String> {
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    let text = include_str!("fixtures/monitoring-crds.yaml");
    let mut names = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let crd: CustomResourceDefinition = serde::Deserialize::deserialize(document).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply(USER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        tokio::time::timeout(
            TIMEOUT,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established")
        .unwrap();
        names.push(name);
    }
    names
}

/// b. The Prometheus Operator's CRDs installed while the operator runs: the ServiceMonitor
/// and PrometheusRule appear without a restart. Removed again: the operator carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_objects_follow_the_crds_without_a_restart() {
    let Some(env) = Env::private("monitoring-crds-later").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_cluster("chat", "version: '0.1.0'").await.unwrap();
    env.wait_cluster("chat", "Running without monitoring", |c| {
        running(c) && condition_status(c, "Monitoring") == "False"
    })
    .await;

    let crd_names = install_monitoring_crds(&env).await;
    let monitors: Api<ServiceMonitor> = env.api();
    let rules: Api<PrometheusRule> = env.api();
    wait_for("the ServiceMonitor", || async {
        monitors.get_opt("chat").await.ok().flatten()
    })
    .await;
    wait_for("the PrometheusRule", || async {
        rules.get_opt("chat").await.ok().flatten()
    })
    .await;
    env.wait_cluster("chat", "Monitoring True", |c| {
        condition_status(c, "Monitoring") == "True" && condition_status(c, "Degraded") == "False"
    })
    .await;

    // Watched and cached once served: further reconciles list neither kind, and the
    // cached objects compare equal to the desired ones (nothing is applied again).
    let lists = operator.lists();
    let writes = operator.writes();
    for round in 0..3 {
        let before = operator.reconciles_finished();
        env.poke("chat", &format!("round-{round}")).await;
        operator.wait_reconciled_after(before).await;
    }
    assert_eq!(
        operator.lists(),
        lists,
        "a reconcile listed instead of reading the caches"
    );
    assert_eq!(operator.writes(), writes, "a reconcile wrote");
    // Deleted by someone else: put back by the reconcile its watch starts, not at the
    // next resync (5 minutes, longer than the wait).
    let uid = monitors.get("chat").await.unwrap().metadata.uid;
    monitors
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the ServiceMonitor put back", || async {
        let monitor = monitors.get_opt("chat").await.ok().flatten()?;
        (monitor.metadata.uid != uid).then_some(())
    })
    .await;

    // The CRDs go away again: no error, and the next change still reconciles.
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    for name in &crd_names {
        crds.delete(name, &DeleteParams::default()).await.unwrap();
    }
    wait_for("the CRDs gone", || async {
        let mut gone = true;
        for name in &crd_names {
            gone &= crds.get_opt(name).await.ok().flatten().is_none();
        }
        gone.then_some(())
    })
    .await;
    env.wait_cluster("chat", "Monitoring False again", |c| {
        condition_status(c, "Monitoring") == "False"
    })
    .await;
    env.apply_cluster("chat", "version: '0.1.0'\nrelay: {logLevel: debug}")
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = env.api();
    wait_for("the ConfigMap with the new log level", || async {
        let cm = configmaps.get_opt("chat-config").await.ok().flatten()?;
        (cm.data?.get("RUST_LOG")? == "debug").then_some(())
    })
    .await;
    let cluster = env.wait_cluster("chat", "reconciled", observed).await;
    assert_ne!(
        condition_status(&cluster, "Degraded"),
        "True",
        "{:?}",
        cluster.status
    );
    operator.assert_no_refusals();
}

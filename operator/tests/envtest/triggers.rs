//! Which changes start a reconcile (`controller/triggers.rs`): a child someone deleted, or
//! whose spec someone edited, is put back at once (the wait is shorter than the 5-minute
//! resync, so only the child's own watch event can have started the repair); a write of a
//! DchatCluster's status alone starts none; of a Job, only its end; the echo of the
//! operator's own write, none.

use dchat_operator::api::Phase;
use std::sync::Arc;

use dchat_operator::controller::triggers::{
    autoscaler_changes, child_changes, cluster_changes, job_changes,
};
use dchat_operator::controller::OwnWrites;
use futures::{Stream, StreamExt};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::ResourceExt;

use crate::support::kubelet::{job_name, Fate};
use crate::support::{ready_with, wait_for, Env, TIMEOUT};

/// The name of the cluster's first child of `kind`.
async fn child(env: &Env, kind: &str) -> String {
    env.children("dchat-dev")
        .await
        .into_iter()
        .find(|(k, _, _)| k == kind)
        .map(|(_, name, _)| name)
        .unwrap_or_else(|| panic!("dchat-dev has no {kind}"))
}

/// Empties the ingress rules of `dchat-dev`'s NetworkPolicy (a spec edit: its generation
/// moves) and waits until the operator has put them back.
async fn edit_policy_and_await_it_put_back(env: &Env) {
    let policy_name = child(env, "NetworkPolicy").await;
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_edited_child_is_put_back_without_waiting_for_the_resync() {
    let Some(env) = Env::shared("triggers").await else {
        return;
    };
    let operator = env.operator().await;
    env.dev_cluster_running().await;

    // A spec edit of a kind with a generation (its status-only changes start nothing).
    edit_policy_and_await_it_put_back(&env).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_autoscaler_spec_is_put_back_without_waiting_for_the_resync() {
    let Some(env) = Env::shared("autoscaler-trigger").await else {
        return;
    };
    let operator = env.operator().await;
    env.apply_file("examples/database-secret.yaml").await;
    env.apply_file("examples/production.yaml").await;
    env.wait_cluster("dchat", "3 relays Running", ready_with(3))
        .await;
    let before = operator.reconciles_finished();
    env.poke("dchat", "settled").await;
    operator.wait_reconciled_after(before).await;
    let hpa: HorizontalPodAutoscaler = env.get("dchat").await.expect("the HPA");
    let wanted = hpa.spec.as_ref().expect("an HPA spec").max_replicas;
    env.api::<HorizontalPodAutoscaler>()
        .patch(
            "dchat",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"maxReplicas": wanted + 1}})),
        )
        .await
        .expect("editing the HPA");
    wait_for("the HPA's maxReplicas put back", || async {
        let live: HorizontalPodAutoscaler = env.get("dchat").await?;
        (live.spec?.max_replicas == wanted).then_some(())
    })
    .await;
    operator.assert_no_refusals();
}

/// The next object a filtered watch passes on.
async fn next_change<K>(
    changes: &mut (impl Stream<Item = Result<K, watcher::Error>> + Unpin),
) -> K {
    tokio::time::timeout(TIMEOUT, changes.next())
        .await
        .expect("a change within the timeout")
        .expect("the watch goes on")
        .expect("a watch event")
}

/// The HorizontalPodAutoscaler watch filtered as the controller filters it: an HPA has
/// no generation, yet a write of its status alone (what the autoscaler does on every
/// sync) is not passed on, and an edit of its spec is. Watch events come in the order of
/// the writes, so had the status write been passed on, it would have come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_status_write_is_not_passed_on_and_a_spec_edit_is() {
    let Some(env) = Env::shared("autoscaler-changes").await else {
        return;
    };
    let hpas = env.api::<HorizontalPodAutoscaler>();
    let selector = format!(
        "app.kubernetes.io/managed-by={}",
        dchat_operator::labels::MANAGED_BY
    );
    env.apply(&serde_json::json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe", "labels": {"app.kubernetes.io/managed-by": dchat_operator::labels::MANAGED_BY}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "absent"},
            "minReplicas": 1, "maxReplicas": 3,
        },
    }))
    .await
    .expect("creating the HPA");
    let config = watcher::Config::default().labels(&selector);
    let mut changes = Box::pin(autoscaler_changes(
        watcher(hpas.clone(), config),
        Default::default(),
    ));
    let created = next_change(&mut changes).await;
    assert_eq!(created.metadata.generation, None, "HPAs have no generation");

    let write_status = |desired: i32| {
        let hpas = hpas.clone();
        async move {
            hpas.patch_status(
                "probe",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"desiredReplicas": desired}})),
            )
            .await
            .expect("writing the HPA's status")
        }
    };
    write_status(2).await;
    let edited = hpas
        .patch(
            "probe",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"maxReplicas": 4}})),
        )
        .await
        .expect("editing the HPA");
    let next = next_change(&mut changes).await;
    assert_eq!(
        next.metadata.resource_version, edited.metadata.resource_version,
        "the status write was passed on, or the spec edit was not"
    );
    assert_eq!(next.spec.map(|s| s.max_replicas), Some(4));
}

/// The DchatCluster watch filtered as the controller filters it: a write of status alone
/// (what every reconcile does) is not passed on; the annotation written after it is, with
/// the status in the object. Watch events come in the order of the writes, so had the
/// status write been passed on, it would have come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_write_alone_starts_no_reconcile_of_a_cluster() {
    let Some(env) = Env::shared("cluster-trigger").await else {
        return;
    };
    // No operator: the test writes the status itself.
    env.apply_file("examples/dev.yaml").await;
    let clusters = env.clusters();
    let config = watcher::Config::default().fields("metadata.name=dchat-dev");
    let mut changes = Box::pin(cluster_changes(
        watcher(clusters.clone(), config),
        Default::default(),
    ));
    let created = next_change(&mut changes).await;
    assert!(created.status.is_none(), "{:?}", created.status);

    for (round, phase) in [Phase::Provisioning, Phase::Running]
        .into_iter()
        .enumerate()
    {
        clusters
            .patch_status(
                "dchat-dev",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"phase": phase}})),
            )
            .await
            .expect("writing the status");
        let poked = env.poke("dchat-dev", &format!("round-{round}")).await;
        let next = next_change(&mut changes).await;
        assert_eq!(
            next.metadata.resource_version.as_deref(),
            Some(poked.as_str()),
            "round {round}: the status write was passed on"
        );
        assert_eq!(next.status.map(|s| s.phase), Some(phase), "round {round}");
    }
}

/// The Job watch filtered as the controllers filter it: the Job's creation (the
/// operator's own) and the Job controller's updates of the running Job (its start, its Pod
/// active and then ready, in the real controller-manager) are not passed on; its end is.
/// Watch events come in the order of the writes, so had the creation or a progress update
/// been passed on, it would have come before the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_progress_is_not_passed_on_and_its_end_is() {
    let Some(env) = Env::shared("job-changes").await else {
        return;
    };
    // Its Pod stays Pending until the Job has been seen running.
    env.kubelet.set_policy(|_| Fate::Pending);
    let jobs = env.api::<Job>();
    let selector = format!(
        "app.kubernetes.io/managed-by={}",
        dchat_operator::labels::MANAGED_BY
    );
    let config = watcher::Config::default().labels(&selector);
    let mut changes = Box::pin(job_changes(watcher(jobs.clone(), config)));
    let first = tokio::spawn(async move { next_change(&mut changes).await });
    let created = env
        .apply(&serde_json::json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "probe", "labels": {"app.kubernetes.io/managed-by": dchat_operator::labels::MANAGED_BY}},
            "spec": {
                "backoffLimit": 0,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "probe", "image": "busybox:1.36"}],
                }},
            },
        }))
        .await
        .expect("creating the Job");

    // The Job controller records its Pod running and ready, then its end.
    env.kubelet.set_policy(|pod| match job_name(pod) {
        Some(_) => Fate::Ready,
        None => Fate::Pending,
    });
    let running = wait_for("the Job's Pod ready", || async {
        let job: Job = env.get("probe").await?;
        let status = job.status.as_ref()?;
        (status.active == Some(1) && status.ready == Some(1)).then_some(job)
    })
    .await;
    assert_ne!(
        running.metadata.resource_version, created.metadata.resource_version,
        "the Job's status was updated"
    );
    assert!(
        !first.is_finished(),
        "the Job's creation or progress was passed on"
    );
    env.kubelet.set_policy(|pod| match job_name(pod) {
        Some(_) => Fate::Succeed,
        None => Fate::Pending,
    });
    let next = first.await.expect("the watch task");
    assert_eq!(next.name_any(), "probe");
    let status = next.status.unwrap_or_default();
    let ended = status.succeeded.unwrap_or(0) > 0
        || status.conditions.iter().flatten().any(|c| {
            c.status == "True" && ["SuccessCriteriaMet", "Complete"].contains(&c.type_.as_str())
        });
    assert!(
        ended,
        "the Job's creation or a progress update was passed on: {status:?}"
    );
}

/// A child watch filtered as the controller filters it, with the writes recorded as the
/// operator records its own: the echoes of its writes are not passed on, someone else's
/// edits between them are. Watch events come in the order of the
/// writes, so had an echo been passed on, it would have come first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_the_operators_own_write_is_not_passed_on_and_someone_elses_edit_is() {
    let Some(env) = Env::shared("own-writes").await else {
        return;
    };
    let own = Arc::new(OwnWrites::default());
    let managed = dchat_operator::labels::MANAGED_BY;
    let config = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={managed},probe=own-writes"
    ));
    let mut changes = Box::pin(child_changes(
        watcher(env.api::<ConfigMap>(), config),
        false,
        own.clone(),
    ));
    let config_map = |value: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "probe", "labels": {
                "app.kubernetes.io/managed-by": managed, "probe": "own-writes",
            }},
            "data": {"value": value},
        })
    };
    let write = |value: &'static str| {
        let (env, own, object) = (&env, own.clone(), config_map(value));
        async move {
            let written = env.apply(&object).await.expect("writing the ConfigMap");
            own.record(&written.metadata);
            written
        }
    };
    let someone_edits = |value: &'static str| {
        let configmaps = env.api::<ConfigMap>();
        async move {
            configmaps
                .patch(
                    "probe",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"data": {"value": value}})),
                )
                .await
                .expect("someone else editing the ConfigMap")
        }
    };
    // Someone creates it; the watch starts with it.
    env.apply(&config_map("0"))
        .await
        .expect("creating the ConfigMap");
    let _ = next_change(&mut changes).await;
    for round in ["first", "second"] {
        let ours = write("1").await;
        let theirs = someone_edits("edited").await;
        let next = next_change(&mut changes).await;
        assert_eq!(
            next.metadata.resource_version, theirs.metadata.resource_version,
            "the echo of the operator's write ({round}, at {:?}) was passed on",
            ours.metadata.resource_version
        );
    }
    assert_eq!(own.pending(), 0, "every write's echo recognised");
}

/// The operator, end to end: a child someone edited is put back by one reconcile, and the
/// echo of that put-back starts no second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn putting_back_an_edited_child_takes_one_reconcile() {
    let Some(env) = Env::shared("own-write-echo").await else {
        return;
    };
    let operator = env.operator().await;
    env.dev_cluster_running().await;
    // Let the last status write and the StatefulSet controller settle.
    let before = operator.reconciles_finished();
    env.poke("dchat-dev", "settle").await;
    operator.wait_reconciled_after(before).await;
    tokio::time::sleep(QUIET).await;

    let before = operator.reconciles_finished();
    edit_policy_and_await_it_put_back(&env).await;
    operator.wait_reconciled_after(before).await;
    // The echo arrives within milliseconds of the put-back; a reconcile it started would
    // follow the one-second debounce.
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        operator.reconciles_finished(),
        before + 1,
        "the echo of the put-back started a reconcile"
    );
    operator.assert_no_refusals();
}

/// Longer than the controller's debounce (1 s) and a reconcile of a settled cluster.
const QUIET: std::time::Duration = std::time::Duration::from_secs(4);

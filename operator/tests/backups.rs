//! Backups on the in-memory API: exact requests of the schedule (one catch-up, then
//! nothing), a backup's Job and status, and retention's marking and deletion.

mod support;

use std::sync::Arc;
use std::time::Duration;

use dchat_operator::api::{BackupPhase, DchatBackup};
use dchat_operator::controller::{backups, Context, ManualClock};
use dchat_operator::metrics::Metrics;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;
use support::{Harness, NS};

const SPEC: &str = "version: '1.0.0'\nbackup: {destination: {s3: {bucket: bkt, region: eu-west-1}}, schedule: '0 * * * *', retention: {maxAge: 1d, minKeep: 1}}";

fn context(h: &Harness, clock: Arc<ManualClock>) -> Arc<Context> {
    Arc::new(
        Context::new(
            h.client.clone(),
            Arc::new(Metrics::new()),
            Some("test".into()),
        )
        .with_clock(clock)
        .with_capabilities(h.capabilities.clone()),
    )
}

async fn reconcile(h: &Harness, ctx: &Arc<Context>) {
    let cluster = h.cluster("chat").await;
    dchat_operator::controller::reconcile(Arc::new(cluster), ctx.clone())
        .await
        .unwrap();
}

fn backups_api(h: &Harness) -> Api<DchatBackup> {
    Api::namespaced(h.client.clone(), NS)
}

/// Hours after the cluster's creation: the schedule fires once for the latest missed
/// hour, then sends nothing until the next hour.
#[tokio::test]
async fn the_schedule_catches_up_once_and_then_writes_nothing() {
    let h = Harness::new(false).await;
    let cluster = h.create_cluster("chat", SPEC).await;
    let created = cluster.metadata.creation_timestamp.unwrap().0;
    let clock = Arc::new(ManualClock::new(created));
    let ctx = context(&h, clock.clone());
    reconcile(&h, &ctx).await;
    h.set_statefulset_status("chat-blue", 1).await;
    for _ in 0..3 {
        reconcile(&h, &ctx).await;
    }
    assert!(backups_api(&h)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .is_empty());

    // Five hours later (the operator was down): one backup, for the latest hour. The
    // clock stops five minutes into an hour, so the minute later below stays in it
    // whatever the wall-clock minute the cluster was created at.
    let into_the_hour = created.as_second().rem_euclid(3600).unsigned_abs();
    clock.advance(Duration::from_secs(5 * 3600 + 300 - into_the_hour));
    reconcile(&h, &ctx).await;
    let list = backups_api(&h)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(
        list.len(),
        1,
        "{:?}",
        list.iter().map(|b| b.name_any()).collect::<Vec<_>>()
    );
    let backup = &list[0];
    assert!(backup.name_any().starts_with("chat-"));
    assert!(backup.owner_references().is_empty());
    let status = h.cluster("chat").await.status.unwrap().backup.unwrap();
    assert!(status.last_schedule_time.is_some() && status.next_scheduled_at.is_some());

    // Within the same hour: nothing new, and no write at all.
    clock.advance(Duration::from_secs(60));
    h.reset_calls();
    reconcile(&h, &ctx).await;
    assert_eq!(
        backups_api(&h)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let writes = h.writes();
    assert!(writes.is_empty(), "{writes:?}");
}

/// A backup's reconcile: finalizer first, then its Job (as the relays' identity) and
/// Running; the Job's manifest makes it Completed.
#[tokio::test]
async fn a_backup_runs_its_job_and_completes_from_the_manifest() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", SPEC).await;
    h.reconcile("chat").await.unwrap();
    h.set_statefulset_status("chat-blue", 1).await;
    h.settle("chat").await;
    let api = backups_api(&h);
    let backup: DchatBackup = serde_json::from_value(serde_json::json!({
        "apiVersion": "dchat.network/v1alpha1", "kind": "DchatBackup",
        "metadata": {"name": "manual", "namespace": NS},
        "spec": {"cluster": {"name": "chat"}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &backup).await.unwrap();
    for _ in 0..2 {
        let b = api.get("manual").await.unwrap();
        backups::reconcile(Arc::new(b), h.ctx.clone())
            .await
            .unwrap();
    }
    let b = api.get("manual").await.unwrap();
    assert!(b
        .finalizers()
        .contains(&"dchat.network/backup-data".to_string()));
    let status = b.status.clone().unwrap();
    assert_eq!(status.phase, BackupPhase::Running);
    let job_name = status.job_name.unwrap();
    let jobs: Api<Job> = Api::namespaced(h.client.clone(), NS);
    let job = jobs.get(&job_name).await.unwrap();
    let pod = job.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("chat-relay"));
    assert!(pod.containers[0]
        .command
        .clone()
        .unwrap()
        .join(" ")
        .contains("backup create"));

    // The Job succeeds (the in-memory API has no controllers: set its condition), and its
    // pod's termination message carries the manifest.
    let mut done = job.clone();
    done.status = Some(
        serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Complete", "status": "True"}]
        }))
        .unwrap(),
    );
    jobs.replace_status(&job_name, &PostParams::default(), &done)
        .await
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(h.client.clone(), NS);
    pods.create(&PostParams::default(), &serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{job_name}-x"), "namespace": NS,
                     "labels": {"batch.kubernetes.io/job-name": job_name}},
        "spec": {"containers": [{"name": "backup", "image": "x"}]},
        "status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "backup", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": "{\"location\":\"s3://bkt/apps/chat/manual/data.dchat\",\"sizeBytes\":10,\"sha256\":\"ab\",\"counts\":{\"messages\":1}}"}}
        }]}
    })).unwrap()).await.unwrap();
    let b = api.get("manual").await.unwrap();
    backups::reconcile(Arc::new(b), h.ctx.clone())
        .await
        .unwrap();
    let status = api.get("manual").await.unwrap().status.unwrap();
    assert_eq!(status.phase, BackupPhase::Completed, "{status:?}");
    assert_eq!(status.size_bytes, Some(10));
}

/// A backup that may not start yet shows `Pending` and why (`kubectl get dchatbackup`),
/// written once while the wait lasts.
#[tokio::test]
async fn a_waiting_backup_shows_pending_and_why() {
    let h = Harness::new(false).await;
    h.create_cluster("chat", SPEC).await;
    h.reconcile("chat").await.unwrap();
    // No relay is ready: the cluster does not serve yet.
    let api = backups_api(&h);
    let backup: DchatBackup = serde_json::from_value(serde_json::json!({
        "apiVersion": "dchat.network/v1alpha1", "kind": "DchatBackup",
        "metadata": {"name": "early", "namespace": NS},
        "spec": {"cluster": {"name": "chat"}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &backup).await.unwrap();
    for _ in 0..2 {
        let b = api.get("early").await.unwrap();
        backups::reconcile(Arc::new(b), h.ctx.clone())
            .await
            .unwrap();
    }
    let status = api.get("early").await.unwrap().status.expect("a status");
    assert_eq!(status.phase, BackupPhase::Pending);
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Pending")
    );
    assert_eq!(ready.message, "waiting for the cluster to serve");

    // Still waiting: nothing more is written.
    h.reset_calls();
    let b = api.get("early").await.unwrap();
    backups::reconcile(Arc::new(b), h.ctx.clone())
        .await
        .unwrap();
    let writes: Vec<_> = h
        .writes()
        .into_iter()
        .filter(|c| c.target == "early")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

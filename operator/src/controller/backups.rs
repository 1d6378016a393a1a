//! Effects of the DchatBackup controller: observe a backup, its cluster, its Job and the
//! cluster's other backups; let [`crate::backup::lifecycle`] decide; create the Job,
//! write status, record Events. Deleting a backup whose data goes with it runs the
//! delete Job first (its finalizer).

use std::sync::Arc;
use std::time::Duration;

use crate::events::EventType;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, info_span, warn, Instrument};

use super::error::kube_error;
use super::finalizer::{add_finalizer_to, remove_finalizer_from};
use super::report::publish_about;
use super::{Context, Error};
use crate::api::{BackupPhase, DchatBackup, DchatBackupStatus, DchatCluster};
use crate::backup::job::{self, CreateRequest, DeleteRequest};
use crate::backup::lifecycle::{
    self, deletes_data, failure_message, JobOutcome, Observed, Step, FINALIZER,
};
use crate::job_end;
use crate::labels::FIELD_MANAGER;

/// How often a waiting backup (Job running, another backup first) is looked at.
const POLL: Duration = Duration::from_secs(10);

/// Reconciles one DchatBackup: the entry point its controller calls.
pub async fn reconcile(backup: Arc<DchatBackup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = backup
        .namespace()
        .ok_or_else(|| Error::NoNamespace(backup.name_any()))?;
    let span = info_span!("reconcile_backup", backup = %backup.name_any(), namespace = %namespace);
    async {
        let ours = backup.finalizers().iter().position(|f| f == FINALIZER);
        match (backup.meta().deletion_timestamp.is_some(), ours) {
            (true, Some(index)) => delete(&backup, &ctx, &namespace, index).await,
            (true, None) => Ok(Action::await_change()),
            (false, None) => {
                add_finalizer_to(backup.as_ref(), &ctx, &namespace, FINALIZER).await?;
                Ok(Action::requeue(Duration::from_millis(1)))
            }
            (false, Some(_)) => advance(&backup, &ctx, &namespace).await,
        }
    }
    .instrument(span)
    .await
}

/// Error policy of the backup controller: retry after a delay.
pub fn error_policy(backup: Arc<DchatBackup>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(backup = %backup.name_any(), %error, "backup reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

async fn advance(backup: &DchatBackup, ctx: &Context, namespace: &str) -> Result<Action, Error> {
    let clusters: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let cluster_name = &backup.spec.cluster.name;
    let cluster = clusters.get_opt(cluster_name).await.map_err(kube_error(
        "reading",
        "DchatCluster",
        namespace,
        cluster_name,
    ))?;
    let status = backup.status.clone().unwrap_or_default();
    let job = match (&status.phase, &status.job_name) {
        (BackupPhase::Running, Some(name)) => job_outcome(ctx, namespace, name).await?,
        _ => JobOutcome::Absent,
    };
    let another_first = if status.phase == BackupPhase::Pending {
        another_first(backup, ctx, namespace).await?
    } else {
        false
    };
    let now = ctx.clock.now();
    let step = lifecycle::decide(&Observed {
        backup,
        cluster: cluster.as_ref(),
        job,
        another_first,
        now,
    });
    match step {
        Step::Idle => Ok(Action::await_change()),
        Step::Wait(why) => {
            tracing::debug!(%why, "backup waits");
            if let Some(next) = lifecycle::waiting(backup, &why, now) {
                write_status(backup, ctx, namespace, &next).await?;
            }
            Ok(Action::requeue(POLL))
        }
        Step::Start => {
            let Some(cluster) = cluster.as_ref() else {
                return Ok(Action::requeue(POLL));
            };
            let served = cluster.status.clone().unwrap_or_default();
            let version = served
                .active_version
                .clone()
                .unwrap_or_else(|| cluster.spec.version.clone());
            let Some(job) = job::create_job(&CreateRequest {
                cluster,
                backup,
                version: &version,
                slot: served.active_slot,
            }) else {
                return Ok(Action::requeue(POLL));
            };
            let job_name = job.metadata.name.clone().unwrap_or_default();
            create_job(ctx, namespace, &job).await?;
            info!(job = %job_name, "backup Job created");
            write_status(
                backup,
                ctx,
                namespace,
                &lifecycle::running(status, job_name.clone(), now),
            )
            .await?;
            publish_about(
                ctx,
                &backup.object_ref(&()),
                EventType::Normal,
                "Started",
                format!("Job {job_name} backs up DchatCluster {cluster_name}"),
            )
            .await;
            Ok(Action::requeue(POLL))
        }
        Step::Finish(next) => {
            write_status(backup, ctx, namespace, &next).await?;
            let took = next
                .started_at
                .as_ref()
                .zip(next.completed_at.as_ref())
                .map(|(a, b)| b.0.duration_since(a.0).unsigned_abs());
            ctx.metrics.record_backup(
                &format!("{namespace}/{cluster_name}"),
                next.phase == BackupPhase::Completed,
                took,
            );
            let (type_, reason, note) = match next.phase {
                BackupPhase::Completed => (
                    EventType::Normal,
                    "Completed",
                    format!(
                        "{} bytes written to {}",
                        next.size_bytes.unwrap_or_default(),
                        next.location.clone().unwrap_or_default()
                    ),
                ),
                _ => (
                    EventType::Warning,
                    "Failed",
                    next.error.clone().unwrap_or_default(),
                ),
            };
            publish_about(ctx, &backup.object_ref(&()), type_, reason, note.clone()).await;
            // The cluster shows its backups too.
            if let Some(cluster) = cluster.as_ref() {
                publish_about(
                    ctx,
                    &cluster.object_ref(&()),
                    type_,
                    &format!("Backup{reason}"),
                    format!("DchatBackup {}: {note}", backup.name_any()),
                )
                .await;
            }
            Ok(Action::await_change())
        }
    }
}

/// Whether another backup of the same cluster runs, or waits and was created first.
async fn another_first(
    backup: &DchatBackup,
    ctx: &Context,
    namespace: &str,
) -> Result<bool, Error> {
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let list = api.list(&ListParams::default()).await.map_err(kube_error(
        "listing",
        "DchatBackup",
        namespace,
        "",
    ))?;
    let key = |b: &DchatBackup| {
        (
            b.meta().creation_timestamp.clone().map(|t| t.0),
            b.name_any(),
        )
    };
    let mine = key(backup);
    Ok(list.items.iter().any(|other| {
        other.name_any() != backup.name_any()
            && other.spec.cluster.name == backup.spec.cluster.name
            && other.meta().deletion_timestamp.is_none()
            && match lifecycle::phase(other) {
                BackupPhase::Running => true,
                BackupPhase::Pending => key(other) < mine,
                _ => false,
            }
    }))
}

/// How a Job stands, with its pod's termination message.
pub(super) async fn job_outcome(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<JobOutcome, Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(job) = jobs
        .get_opt(name)
        .await
        .map_err(kube_error("reading", "Job", namespace, name))?
    else {
        return Ok(JobOutcome::Absent);
    };
    let complete = job_end::true_condition(&job, &job_end::SUCCEEDED);
    let failed = job_end::true_condition(&job, &job_end::FAILED);
    if complete.is_none() && failed.is_none() {
        return Ok(JobOutcome::Running);
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={name}")))
        .await
        .map_err(kube_error("listing", "Pod", namespace, ""))?;
    let wanted = if complete.is_some() {
        "Succeeded"
    } else {
        "Failed"
    };
    let message = list
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(wanted))
        .filter_map(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        })
        .next_back();
    Ok(match complete {
        Some(_) => JobOutcome::Succeeded(message),
        None => JobOutcome::Failed(failure_message(
            message.as_deref(),
            failed.as_ref().and_then(|c| c.message.as_deref()),
        )),
    })
}

async fn create_job(ctx: &Context, namespace: &str, job: &Job) -> Result<(), Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let name = job.metadata.name.clone().unwrap_or_default();
    match jobs.create(&PostParams::default(), job).await {
        Ok(_) => Ok(()),
        // Created by an earlier attempt whose status write was lost.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(kube_error("creating", "Job", namespace, &name)(e)),
    }
}

async fn write_status(
    backup: &DchatBackup,
    ctx: &Context,
    namespace: &str,
    status: &DchatBackupStatus,
) -> Result<(), Error> {
    if backup.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({
        "apiVersion": DchatBackup::api_version(&()),
        "kind": DchatBackup::kind(&()),
        "status": status,
    });
    api.patch_status(
        &backup.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_error(
        "updating status of",
        "DchatBackup",
        namespace,
        &backup.name_any(),
    ))?;
    Ok(())
}

/// A backup being deleted: its data first when it goes too, then the finalizer.
async fn delete(
    backup: &DchatBackup,
    ctx: &Context,
    namespace: &str,
    index: usize,
) -> Result<Action, Error> {
    let wrote_something = matches!(
        lifecycle::phase(backup),
        BackupPhase::Completed | BackupPhase::Failed | BackupPhase::Running
    );
    if !deletes_data(backup) || !wrote_something {
        remove_finalizer_from(backup, ctx, namespace, FINALIZER, index).await?;
        return Ok(Action::await_change());
    }
    let clusters: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let cluster_name = &backup.spec.cluster.name;
    let cluster = clusters.get_opt(cluster_name).await.map_err(kube_error(
        "reading",
        "DchatCluster",
        namespace,
        cluster_name,
    ))?;
    let version = cluster.as_ref().and_then(|c| {
        c.status
            .as_ref()
            .and_then(|s| s.active_version.clone())
            .or_else(|| Some(c.spec.version.clone()))
    });
    let delete_job = cluster
        .as_ref()
        .zip(version.as_deref())
        .and_then(|(cluster, version)| {
            job::delete_job(&DeleteRequest {
                cluster,
                backup,
                version,
            })
        });
    let Some(delete_job) = delete_job else {
        // Without the cluster there is no image, identity or destination to run with.
        publish_about(
            ctx,
            &backup.object_ref(&()),
            EventType::Warning,
            "DataKept",
            format!(
                "DchatCluster {cluster_name} (or its spec.backup) is gone, so the backup's data \
                 stays in the bucket; delete it with `dchat backup delete`"
            ),
        )
        .await;
        remove_finalizer_from(backup, ctx, namespace, FINALIZER, index).await?;
        return Ok(Action::await_change());
    };
    let name = delete_job.metadata.name.clone().unwrap_or_default();
    match job_outcome(ctx, namespace, &name).await? {
        JobOutcome::Absent => {
            create_job(ctx, namespace, &delete_job).await?;
            info!(job = %name, "backup data delete Job created");
            Ok(Action::requeue(POLL))
        }
        JobOutcome::Running => Ok(Action::requeue(POLL)),
        JobOutcome::Succeeded(_) => {
            publish_about(
                ctx,
                &backup.object_ref(&()),
                EventType::Normal,
                "DataDeleted",
                "the backup's S3 objects and RDS snapshot are deleted".into(),
            )
            .await;
            remove_finalizer_from(backup, ctx, namespace, FINALIZER, index).await?;
            Ok(Action::await_change())
        }
        JobOutcome::Failed(why) => {
            // The data may still be there: keep the object (and its finalizer) so the
            // failure stays visible; deleting the failed Job retries.
            let message =
                format!("deleting the backup's data failed: {why}; delete Job {name} to retry");
            let mut status = backup.status.clone().unwrap_or_default();
            if status.error.as_deref() != Some(message.as_str()) {
                status.error = Some(message.clone());
                write_status(backup, ctx, namespace, &status).await?;
                publish_about(
                    ctx,
                    &backup.object_ref(&()),
                    EventType::Warning,
                    "DeleteFailed",
                    message,
                )
                .await;
            }
            Ok(Action::requeue(Duration::from_secs(60)))
        }
    }
}

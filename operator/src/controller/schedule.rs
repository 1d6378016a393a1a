//! A cluster's side of backups, run in its reconcile when `spec.backup` is set: the
//! schedule creates DchatBackups, retention deletes them (and, through their finalizer,
//! their data), and what the backups say becomes `status.backup` and `BackupHealthy`.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::error::{is_not_found, kube_error, patch_params};
use super::report::publish;
use super::{Context, Error};
use crate::api::{
    ClusterBackupStatus, ClusterReference, DchatBackup, DchatBackupSpec, DchatCluster,
};
use crate::backup::cron::Cron;
use crate::backup::health::{self, Health};
use crate::backup::job::CLUSTER_LABEL;
use crate::backup::lifecycle::{self, PRUNE_ANNOTATION};
use crate::backup::retention::{self, BackupFacts};
use crate::backup::schedule::{self, ScheduleAction, ScheduleInput};
use crate::quantity::parse_duration;

/// What the backup side of a reconcile found and did.
#[derive(Clone, Debug, Default)]
pub(super) struct BackupReport {
    /// `status.backup`.
    pub status: Option<ClusterBackupStatus>,
    /// The `BackupHealthy` condition.
    pub health: Option<Health>,
    /// When to look again for the schedule.
    pub requeue: Option<Duration>,
}

/// Runs the schedule and retention of `cluster` and summarizes its backups.
pub(super) async fn reconcile_backups(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    now: Timestamp,
) -> Result<BackupReport, Error> {
    let Some(spec) = &cluster.spec.backup else {
        return Ok(BackupReport::default());
    };
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let mut backups: Vec<DchatBackup> = api
        .list(&ListParams::default())
        .await
        .map_err(kube_error("listing", "DchatBackup", namespace, ""))?
        .items
        .into_iter()
        .filter(|b| b.spec.cluster.name == cluster.name_any())
        .collect();

    // The schedule (validated before this runs; a bad expression never fires).
    let previous = cluster
        .status
        .as_ref()
        .and_then(|s| s.backup.clone())
        .unwrap_or_default();
    let mut last_schedule = previous.last_schedule_time.map(|t| t.0);
    let cron = spec
        .schedule
        .as_deref()
        .and_then(|s| s.parse::<Cron>().ok());
    let mut next = None;
    if let Some(cron) = &cron {
        let busy = backups.iter().any(|b| {
            matches!(
                lifecycle::phase(b),
                crate::api::BackupPhase::Pending | crate::api::BackupPhase::Running
            ) && b.meta().deletion_timestamp.is_none()
        });
        let since = cluster
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(now);
        let decision = schedule::plan(&ScheduleInput {
            cron,
            last_scheduled: last_schedule,
            since,
            now,
            busy,
            suspended: spec.suspend,
        });
        next = decision.next;
        match decision.action {
            ScheduleAction::Wait => {}
            ScheduleAction::Create(at) => {
                let created = create_scheduled(cluster, ctx, namespace, at).await?;
                backups.push(created);
                last_schedule = Some(at);
            }
            ScheduleAction::SkipBusy(at) => {
                publish(
                    ctx,
                    cluster,
                    EventType::Warning,
                    "BackupSkipped",
                    format!("the backup scheduled for {at} was skipped: another backup of this cluster is still running"),
                )
                .await;
                last_schedule = Some(at);
            }
        }
    }

    // Retention.
    let max_age = parse_duration(&spec.retention.max_age).unwrap_or(Duration::MAX);
    let min_keep = u32::try_from(spec.retention.min_keep).unwrap_or(1).max(1);
    let facts: Vec<BackupFacts> = backups
        .iter()
        .filter(|b| b.meta().deletion_timestamp.is_none())
        .map(|b| BackupFacts {
            name: b.name_any(),
            phase: lifecycle::phase(b),
            taken_at: b
                .status
                .as_ref()
                .and_then(|s| s.completed_at.as_ref())
                .or(b.meta().creation_timestamp.as_ref())
                .map(|t| t.0)
                .unwrap_or(now),
            // Without its finalizer the data would not go with the object; the backup
            // controller adds it first, and that change brings the cluster back here.
            in_use: !b.finalizers().iter().any(|f| f == lifecycle::FINALIZER),
        })
        .collect();
    let pruned = retention::prune(&facts, max_age, min_keep, now);
    for name in &pruned {
        prune(cluster, ctx, namespace, name).await?;
    }
    backups.retain(|b| !pruned.contains(&b.name_any()) && b.meta().deletion_timestamp.is_none());

    let requeue = next.map(|at| at.duration_since(now).unsigned_abs() + Duration::from_secs(1));
    let summary = health::summary(&backups, last_schedule, next);
    if let Some(when) = &summary.last_successful_backup_time {
        let size = backups
            .iter()
            .find(|b| summary.last_successful_backup.as_deref() == Some(b.name_any().as_str()))
            .and_then(|b| b.status.as_ref()?.size_bytes);
        ctx.metrics.set_last_backup(
            &format!("{namespace}/{}", cluster.name_any()),
            when.0.as_second(),
            size,
        );
    }
    Ok(BackupReport {
        status: Some(summary),
        health: Some(health::health(&backups, cron.as_ref(), now)),
        requeue,
    })
}

async fn create_scheduled(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    at: Timestamp,
) -> Result<DchatBackup, Error> {
    let name = schedule::backup_name(&cluster.name_any(), at);
    let mut backup = DchatBackup::new(
        &name,
        DchatBackupSpec {
            cluster: ClusterReference {
                name: cluster.name_any(),
            },
            deletion_policy: Default::default(),
        },
    );
    // No owner reference: backups outlive their cluster.
    backup.metadata.namespace = Some(namespace.to_string());
    backup.metadata.labels = Some(
        [
            (CLUSTER_LABEL.to_string(), cluster.name_any()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                crate::labels::MANAGED_BY.to_string(),
            ),
        ]
        .into(),
    );
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let created = match api.create(&PostParams::default(), &backup).await {
        Ok(created) => created,
        // Created by an earlier reconcile whose status write was lost.
        Err(kube::Error::Api(status)) if status.code == 409 => api
            .get(&name)
            .await
            .map_err(kube_error("reading", "DchatBackup", namespace, &name))?,
        Err(e) => return Err(kube_error("creating", "DchatBackup", namespace, &name)(e)),
    };
    info!(backup = %name, "scheduled backup created");
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "BackupScheduled",
        format!("DchatBackup {name} created for the schedule's run at {at}"),
    )
    .await;
    Ok(created)
}

/// Marks a backup for pruning (its data goes too) and deletes it.
async fn prune(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({"metadata": {"annotations": {PRUNE_ANNOTATION: "retention"}}});
    match api
        .patch(name, &patch_params(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => {
            return Err(kube_error(
                "marking for retention",
                "DchatBackup",
                namespace,
                name,
            )(e))
        }
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => return Ok(()),
        Err(e) => return Err(kube_error("deleting", "DchatBackup", namespace, name)(e)),
    }
    info!(backup = %name, "backup pruned by retention");
    publish(
        ctx,
        cluster,
        EventType::Normal,
        "BackupPruned",
        format!("DchatBackup {name} and its data deleted by retention"),
    )
    .await;
    Ok(())
}

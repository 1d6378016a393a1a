//! A cluster's side of backups, run in its reconcile when `spec.backup` is set: the
//! schedule creates DchatBackups, retention deletes them (and, through their finalizer,
//! their data), and what the backups say becomes `status.backup` and `BackupHealthy`.

use std::time::Duration;

use crate::events::EventType;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::backups::job_outcome;
use super::error::{is_not_found, kube_error, patch_params};
use super::report::publish;
use super::{Context, Error};
use crate::api::Verification;
use crate::api::{
    ClusterBackupStatus, ClusterReference, DchatBackup, DchatBackupSpec, DchatCluster,
};
use crate::backup::cron::Cron;
use crate::backup::health::{self, Health};
use crate::backup::job::CLUSTER_LABEL;
use crate::backup::lifecycle::JobOutcome;
use crate::backup::lifecycle::{self, PRUNE_ANNOTATION};
use crate::backup::retention::{self, BackupFacts};
use crate::backup::schedule::{self, ScheduleAction, ScheduleInput};
use crate::backup::verify;
use crate::quantity::parse_duration;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

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

/// Runs the schedule and retention of `cluster` and summarizes its backups. With
/// `relays_down` (hibernating or waking) the schedule holds, as if suspended, and its
/// interval does not make backups "too old": nothing changes the data meanwhile, and a
/// run missed is taken once the relays are back.
pub(super) async fn reconcile_backups(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    now: Timestamp,
    relays_down: bool,
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
    let mut last_schedule = previous.last_schedule_time.as_ref().map(|t| t.0);
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
            suspended: spec.suspend || relays_down,
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

    let mut requeue = next.map(|at| at.duration_since(now).unsigned_abs() + Duration::from_secs(1));
    let mut summary = health::summary(&backups, last_schedule, next);
    let drill = drill(cluster, ctx, namespace, &backups, &previous, now).await?;
    summary.last_verification = drill.last_verification;
    summary.last_verify_schedule_time = drill.last_schedule.map(Time);
    summary.verify_job = drill.job;
    requeue = [requeue, drill.requeue].into_iter().flatten().min();
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
    let health = health::health(
        &backups,
        cron.as_ref().filter(|_| !relays_down),
        summary.last_verification.as_ref(),
        now,
    );
    Ok(BackupReport {
        status: Some(summary),
        health: Some(health),
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

/// Where the restore drills stand after this reconcile.
struct Drill {
    last_verification: Option<Verification>,
    last_schedule: Option<Timestamp>,
    job: Option<String>,
    requeue: Option<Duration>,
}

/// Runs `spec.backup.verify`: finishes the drill in flight (its result into the cluster's
/// and the backup's status), or starts the next one when its schedule fires.
async fn drill(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    backups: &[DchatBackup],
    previous: &ClusterBackupStatus,
    now: Timestamp,
) -> Result<Drill, Error> {
    let mut out = Drill {
        last_verification: previous.last_verification.clone(),
        last_schedule: previous.last_verify_schedule_time.as_ref().map(|t| t.0),
        job: None,
        requeue: None,
    };
    let Some(spec) = cluster.spec.backup.as_ref().and_then(|b| b.verify.as_ref()) else {
        return Ok(out);
    };
    if let Some(job) = &previous.verify_job {
        let outcome = job_outcome(ctx, namespace, job).await?;
        // The drill's Job name comes from the backup and the scheduled time.
        let stamp = out
            .last_schedule
            .map(|t| t.strftime("%Y%m%dt%H%M%Sz").to_string())
            .unwrap_or_default();
        let backup = backups.iter().find(|b| {
            crate::backup::job::job_name(&format!("{}-{stamp}", b.name_any()), "verify") == *job
        });
        match (outcome, backup) {
            (JobOutcome::Running, _) => {
                out.job = Some(job.clone());
                out.requeue = Some(crate::rollout::POLL);
                return Ok(out);
            }
            (JobOutcome::Absent, _) | (_, None) => {}
            (outcome, Some(backup)) => {
                if let Some(result) = verify::verification(&backup.name_any(), &outcome, now) {
                    record_drill(cluster, ctx, namespace, backup, &result).await?;
                    out.last_verification = Some(result);
                }
            }
        }
    }
    let Ok(cron) = spec.schedule.parse::<Cron>() else {
        return Ok(out);
    };
    let since = cluster
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let decision = schedule::plan(&ScheduleInput {
        cron: &cron,
        last_scheduled: out.last_schedule,
        since,
        now,
        busy: false,
        suspended: cluster.spec.backup.as_ref().is_some_and(|b| b.suspend),
    });
    out.requeue = decision
        .next
        .map(|at| at.duration_since(now).unsigned_abs() + Duration::from_secs(1));
    let ScheduleAction::Create(at) = decision.action else {
        return Ok(out);
    };
    out.last_schedule = Some(at);
    let Some(backup) = verify::newest_completed(backups) else {
        publish(
            ctx,
            cluster,
            EventType::Warning,
            "VerificationSkipped",
            format!("the restore drill scheduled for {at} found no Completed backup"),
        )
        .await;
        return Ok(out);
    };
    let version = cluster
        .status
        .as_ref()
        .and_then(|s| s.active_version.clone())
        .unwrap_or_else(|| cluster.spec.version.clone());
    if let Some(job) = verify::verify_job(cluster, backup, &version, at) {
        let name = job.metadata.name.clone().unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(kube_error("creating", "Job", namespace, &name)(e)),
        }
        info!(job = %name, backup = %backup.name_any(), "restore drill started");
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "VerificationStarted",
            format!("restore drill of backup {} (Job {name})", backup.name_any()),
        )
        .await;
        out.job = Some(name);
        out.requeue = Some(crate::rollout::POLL);
    }
    Ok(out)
}

/// Writes a drill's result on the backup it restored, with an Event on the cluster.
async fn record_drill(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    backup: &DchatBackup,
    result: &Verification,
) -> Result<(), Error> {
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({
        "apiVersion": DchatBackup::api_version(&()),
        "kind": DchatBackup::kind(&()),
        "status": {"verification": result},
    });
    api.patch_status(
        &backup.name_any(),
        &kube::api::PatchParams::apply(crate::labels::FIELD_MANAGER_VERIFY).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_error(
        "recording the drill on",
        "DchatBackup",
        namespace,
        &backup.name_any(),
    ))?;
    let (type_, reason, note) = if result.passed {
        (
            EventType::Normal,
            "VerificationPassed",
            format!(
                "backup {} restored into a scratch store in {:.1} s and matched its manifest",
                result.backup,
                result.restore_seconds.unwrap_or_default()
            ),
        )
    } else {
        (
            EventType::Warning,
            "VerificationFailed",
            format!(
                "the restore drill of backup {} failed: {}",
                result.backup,
                result.error.as_deref().unwrap_or("no reason given")
            ),
        )
    };
    publish(ctx, cluster, type_, reason, note).await;
    Ok(())
}

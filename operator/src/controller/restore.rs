//! Effects of `spec.bootstrap.recovery`: read the named DchatBackup, run the restore Job
//! once the new relays are up, and tell the reconcile whether clients may come in.

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use tracing::info;

use super::backups::job_outcome;
use super::error::kube_error;
use super::status::SlotObservation;
use super::{Context, Error};
use crate::api::{DchatBackup, DchatCluster, RestorePhase, RestoreStatus, Slot};
use crate::backup::job::{restore_job, RestoreRequest};
use crate::backup::lifecycle::JobOutcome;
use crate::backup::restore::{self, RestorePlan};

/// What the restore step decided for this reconcile.
pub(super) struct RestoreReport {
    /// Whether clients may reach the relays (no restore pending).
    pub clients_admitted: bool,
    /// `status.restore`.
    pub status: Option<RestoreStatus>,
}

/// Runs the restore of a new cluster, if one is due.
pub(super) async fn reconcile_restore(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    slot: Slot,
    active: Option<&SlotObservation>,
) -> Result<RestoreReport, Error> {
    let previous = cluster.status.as_ref().and_then(|s| s.restore.clone());
    let reference = cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|b| b.recovery.as_ref())
        .and_then(|r| r.backup.as_ref());
    let referenced = match reference {
        Some(r) => Api::<DchatBackup>::namespaced(ctx.client.clone(), namespace)
            .get_opt(&r.name)
            .await
            .map_err(kube_error("reading", "DchatBackup", namespace, &r.name))?,
        None => None,
    };
    let now = ctx.clock.now();
    let (destination, path) = match restore::plan(cluster, referenced.as_ref()) {
        RestorePlan::NotNeeded => {
            return Ok(RestoreReport {
                clients_admitted: true,
                status: previous,
            })
        }
        RestorePlan::Impossible(why) => {
            return Ok(RestoreReport {
                clients_admitted: false,
                status: Some(RestoreStatus {
                    backup_path: previous.map(|p| p.backup_path).unwrap_or_default(),
                    phase: RestorePhase::Failed,
                    error: Some(why),
                    ..Default::default()
                }),
            })
        }
        RestorePlan::Restore {
            destination,
            backup_path,
        } => (destination, backup_path),
    };
    let version = cluster.spec.version.clone();
    let job = restore_job(&RestoreRequest {
        cluster,
        destination: &destination,
        backup_path: &path,
        version: &version,
        slot,
    });
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let outcome = job_outcome(ctx, namespace, &job_name).await?;
    // The relay it writes into must be up (embedded: its admin API; PostgreSQL: its
    // schema, which the relay creates at start).
    let relays_up = active.is_some_and(|a| a.ready > 0);
    if outcome == JobOutcome::Absent && relays_up {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => info!(job = %job_name, backup = %path, "restore Job created"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(kube_error("creating", "Job", namespace, &job_name)(e)),
        }
    }
    let next = restore::status(previous.as_ref(), &path, &job_name, &outcome, now);
    Ok(RestoreReport {
        clients_admitted: next.phase == RestorePhase::Completed,
        status: Some(next),
    })
}

//! The rollout's effects: reading what the state machine needs (pods, Jobs, analysis),
//! creating its Jobs and consuming the promote/abort annotations.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PostParams};
use kube::ResourceExt;
use serde_json::json;
use tracing::{debug, warn};

use super::error::{kube_error, patch_params};
use super::observe::{observe_pods, slot_state, LiveChildren};
use super::{Context, Error};
use crate::api::{DchatCluster, RolloutStep, Slot};
use crate::rollout::{
    smoke, Decision, Hibernation, JobState, PodHealth, Serving, Settings, Target, ABORT_ANNOTATION,
    PROMOTE_ANNOTATION,
};
use crate::{labels, rollout};

/// Longest wait for Prometheus to answer the rollout's analysis query.
pub(super) const ANALYSIS_TIMEOUT: Duration = Duration::from_secs(5);

/// What the spec asks of the rollout, besides what the controller observes.
pub(super) struct Asked<'a> {
    /// The parsed rollout settings.
    pub(super) settings: &'a Settings,
    /// Hash of the desired relay pod template.
    pub(super) desired_hash: &'a str,
    /// What hibernation asks of the plan.
    pub(super) hibernation: Hibernation,
}

/// What the rollout decided, and the names of its Jobs this reconcile read and found.
pub(super) struct Decided {
    /// The state machine's decision.
    pub(super) decision: Decision,
    /// Jobs read for the decision that exist: [`ensure_job`] need not look again.
    pub(super) existing_jobs: Vec<String>,
}

/// Observes what the rollout state machine needs and lets it decide.
pub(super) async fn decide_rollout(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    live: &LiveChildren,
    asked: Asked<'_>,
    now: Timestamp,
) -> Result<Decided, Error> {
    let Asked {
        settings,
        desired_hash,
        hibernation,
    } = asked;
    let previous = cluster.status.clone().unwrap_or_default();
    let serving = Serving {
        slot: previous.active_slot,
        version: previous.active_version.clone(),
        hash: previous.active_template_hash.clone(),
    };
    let desired = Target {
        version: cluster.spec.version.clone(),
        hash: desired_hash.to_string(),
    };
    let slot_live = |slot| live.get("StatefulSet", &labels::statefulset_name(cluster, slot));
    let in_flight = previous.rollout.as_ref().filter(|r| r.step.in_flight());
    // Pods and the smoke Job are read only while a rollout needs them, so a settled
    // cluster costs no extra requests.
    let mut pods = PodHealth::default();
    let mut smoke_state = JobState::Absent;
    let mut handover_state = JobState::Absent;
    let mut backup_state = JobState::Absent;
    let mut existing_jobs = Vec::new();
    if let Some(r) = previous.rollout.as_ref().filter(|r| {
        settings.handover
            && (matches!(
                r.step,
                RolloutStep::ScalingDown | RolloutStep::HandoverFailed
            ) || (matches!(r.step, RolloutStep::RolledBack | RolloutStep::Aborted)
                && r.rolled_back_from.is_some()
                && r.handback.is_none()))
    }) {
        let name = rollout::handover_job_name(&cluster.name_any(), r);
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        let job = jobs
            .get_opt(&name)
            .await
            .map_err(kube_error("reading", "Job", namespace, &name))?;
        handover_state = smoke::job_state(job.as_ref());
        if job.is_some() {
            existing_jobs.push(name);
        }
    }
    let mut analysis = None;
    if let (Some(r), Some(check)) = (in_flight, settings.analysis.as_ref()) {
        if r.step == RolloutStep::Promoted {
            let query = crate::analysis::render_query(
                &check.query,
                namespace,
                &cluster.name_any(),
                r.slot.as_str(),
                &r.target_version,
            );
            let reading =
                crate::analysis::instant_query(&check.prometheus_url, &query, ANALYSIS_TIMEOUT)
                    .await;
            match &reading {
                crate::analysis::Reading::Value(value) => {
                    debug!(value, fail_above = check.fail_above, "analysis query")
                }
                crate::analysis::Reading::Inconclusive(why) => {
                    warn!(why = %why, "analysis query inconclusive")
                }
            }
            analysis = Some(reading);
        }
    }
    if let Some(r) = in_flight {
        if r.step != RolloutStep::ScalingDown {
            pods = observe_pods(
                cluster,
                ctx,
                namespace,
                r.slot,
                slot_live(r.slot),
                &r.target_template_hash,
            )
            .await?;
        }
        if r.step == RolloutStep::Validating && settings.smoke_test {
            let name = rollout::smoke_job_name(&cluster.name_any(), r);
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
            let job = jobs
                .get_opt(&name)
                .await
                .map_err(kube_error("reading", "Job", namespace, &name))?;
            smoke_state = smoke::job_state(job.as_ref());
            if job.is_some() {
                existing_jobs.push(name);
            }
        }
        if r.step == RolloutStep::BackingUp {
            backup_state = prerollout_backup_state(
                ctx,
                namespace,
                &rollout::prerollout_backup_name(&cluster.name_any(), r),
            )
            .await?;
        }
    }
    let annotations = cluster.annotations();
    let cluster_name = cluster.name_any();
    let input = rollout::Input {
        cluster_name: &cluster_name,
        settings,
        desired: &desired,
        serving: &serving,
        rollout: previous.rollout.as_ref(),
        blue: slot_state(slot_live(Slot::Blue)),
        green: slot_state(slot_live(Slot::Green)),
        pods,
        smoke: smoke_state,
        handover: handover_state,
        backup: backup_state,
        analysis,
        promote: annotations.contains_key(PROMOTE_ANNOTATION),
        abort: annotations.contains_key(ABORT_ANNOTATION),
        hibernation,
        now,
    };
    Ok(Decided {
        decision: rollout::decide(&input),
        existing_jobs,
    })
}

/// Creates a rollout Job unless it exists; `true` when this call created it. Jobs are
/// created once and never updated: a Job's pod template is immutable, and each attempt
/// has its own name. A Job in `existing` (read by this reconcile) is not asked for
/// again; any other is created, an existing one answering with a conflict.
pub(super) async fn ensure_job(
    ctx: &Context,
    namespace: &str,
    job: &Job,
    existing: &[String],
) -> Result<bool, Error> {
    let name = job.name_any();
    if existing.contains(&name) {
        return Ok(false);
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    match jobs.create(&PostParams::default(), job).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(kube_error("creating", "Job", namespace, &name)(e)),
    }
}

/// Removes the promote/abort annotations the rollout handled (or found stale), after
/// status recorded what they did, so a lost write only repeats a no-op.
pub(super) async fn consume_annotations(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    decision: &Decision,
) -> Result<(), Error> {
    let annotations = cluster.annotations();
    let mut remove = serde_json::Map::new();
    if decision.consume_promote && annotations.contains_key(PROMOTE_ANNOTATION) {
        remove.insert(PROMOTE_ANNOTATION.into(), serde_json::Value::Null);
    }
    if decision.consume_abort && annotations.contains_key(ABORT_ANNOTATION) {
        remove.insert(ABORT_ANNOTATION.into(), serde_json::Value::Null);
    }
    if remove.is_empty() {
        return Ok(());
    }
    let api: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({"metadata": {"annotations": remove}});
    let (name, params, patch) = (cluster.name_any(), patch_params(), Patch::Merge(&patch));
    ctx.own_writes
        .track(namespace, &name, api.patch(&name, &params, &patch))
        .await
        .map_err(kube_error(
            "removing rollout annotations of",
            "DchatCluster",
            namespace,
            &name,
        ))?;
    Ok(())
}

/// The backup before a rollout's switch, as the state machine reads it.
async fn prerollout_backup_state(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<JobState, Error> {
    use crate::api::{BackupPhase, DchatBackup};
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let backup =
        api.get_opt(name)
            .await
            .map_err(kube_error("reading", "DchatBackup", namespace, name))?;
    Ok(match backup {
        None => JobState::Absent,
        Some(b) => {
            let status = b.status.unwrap_or_default();
            match status.phase {
                BackupPhase::Completed => JobState::Succeeded,
                BackupPhase::Failed => JobState::Failed(
                    status
                        .error
                        .unwrap_or_else(|| format!("DchatBackup {name} failed")),
                ),
                BackupPhase::Pending | BackupPhase::Running => JobState::Running,
            }
        }
    })
}

/// Creates the DchatBackup a rollout takes before its switch, unless it exists; `true`
/// when this call created it.
pub(super) async fn ensure_prerollout_backup(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<bool, Error> {
    use crate::api::{ClusterReference, DchatBackup, DchatBackupSpec};
    let api: Api<DchatBackup> = Api::namespaced(ctx.client.clone(), namespace);
    if api
        .get_opt(name)
        .await
        .map_err(kube_error("reading", "DchatBackup", namespace, name))?
        .is_some()
    {
        return Ok(false);
    }
    let mut backup = DchatBackup::new(
        name,
        DchatBackupSpec {
            cluster: ClusterReference {
                name: cluster.name_any(),
            },
            deletion_policy: Default::default(),
        },
    );
    backup.metadata.labels = Some(
        [(
            crate::backup::job::CLUSTER_LABEL.to_string(),
            cluster.name_any(),
        )]
        .into(),
    );
    match api.create(&PostParams::default(), &backup).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(kube_error("creating", "DchatBackup", namespace, name)(e)),
    }
}

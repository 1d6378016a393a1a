//! One reconcile of a live cluster: observe, validate, let the rollout decide, build the
//! desired children, apply them, and write status. A paused cluster stops at the first
//! step: only its status is written.

use std::sync::Arc;

use crate::events::EventType;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use kube::ResourceExt;
use tracing::info;

use super::children::{apply_children, ensure_admin_token};
use super::day2::{announce_restart, pause, resume};
use super::observe::{database_secret_hash, existing_claims, observe, slot_observation};
use super::report::{publish, report_failure, write_status};
use super::restore::reconcile_restore;
use super::rollout_effects::{
    consume_annotations, decide_rollout, ensure_job, ensure_prerollout_backup, Asked,
};
use super::schedule::{reconcile_backups, BackupReport};
use super::status::Observation;
use super::{status, Context, Error, RESYNC};
use crate::api::{validate, DchatCluster, RestorePhase, Slot};
use crate::build::{desired_children, BuildInputs, Child, SlotDeployment};
use crate::day2::{self, HibernationView, ServingRelays, Source};
use crate::rollout::{
    handover, smoke, Settings, Template, SECRET_HASH_ANNOTATION, TEMPLATE_HASH_ANNOTATION,
};
use crate::{labels, rollout};

/// Reconciles a cluster that is not being deleted: everything from observing its
/// children to writing its status.
pub(super) async fn sync(cluster: Arc<DchatCluster>, ctx: &Context) -> Result<Action, Error> {
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(cluster.name_any()))?;
    let now = ctx.clock.now();
    // A bad value of the reconcile annotation is reported below, like any invalid spec.
    if let Ok(Some(source)) = day2::paused(&cluster) {
        return pause(&cluster, ctx, &namespace, source, now).await;
    }
    let cluster = resume(cluster, ctx, now).await;
    // Every failure shows in status within this attempt: either in the status write
    // below (failures while applying) or through `report_failure` (everything else).
    macro_rules! reported {
        ($result:expr) => {
            match $result {
                Ok(value) => value,
                Err(error) => return Err(report_failure(&cluster, ctx, &namespace, error).await),
            }
        };
    }
    let previous = cluster.status.clone().unwrap_or_default();
    let active_slot = previous.active_slot;
    let served = reported!(ctx.served_kinds().await);
    let live = reported!(observe(&cluster, ctx, &namespace, served).await);
    let active_name = labels::statefulset_name(&cluster, active_slot);
    let active_live = live.get("StatefulSet", &active_name);
    let secret_hash = reported!(database_secret_hash(&cluster, ctx, &namespace).await);
    let desired_hash = rollout::combined_hash(&template_hash(&cluster), secret_hash.as_deref());
    let monitoring = status::monitoring(&cluster.spec.monitoring, live.served);

    let settings = validate(&cluster.spec)
        .map_err(|e| e.to_string())
        .and_then(|()| day2::check(&cluster).map_err(|e| e.to_string()))
        .and_then(|()| Settings::from_spec(&cluster.spec).map_err(|e| e.to_string()));
    let settings = match settings {
        Ok(settings) => settings,
        Err(message) => {
            let obs = Observation {
                invalid_spec: Some(message.clone()),
                rollout: previous.rollout.clone(),
                active_is_desired: false,
                monitoring,
                backup: previous.backup.clone(),
                ..observation(&cluster, active_slot, active_live, &desired_hash, now)
            };
            write_status(&cluster, ctx, &namespace, obs).await?;
            return Err(Error::InvalidSpec {
                cluster: status::display_name(&cluster),
                message,
            });
        }
    };

    // Validated above: the requests parse.
    let hibernate = day2::hibernation_requested(&cluster).ok().flatten();
    let restore_running = previous
        .restore
        .as_ref()
        .is_some_and(|r| r.phase == RestorePhase::Running);
    let hibernation = day2::hibernation_input(
        hibernate,
        previous.hibernation.as_ref(),
        &cluster.spec,
        restore_running,
    );
    let decided = reported!(
        decide_rollout(
            &cluster,
            ctx,
            &namespace,
            &live,
            Asked {
                settings: &settings,
                desired_hash: &desired_hash,
                hibernation,
            },
            now,
        )
        .await
    );
    let decision = decided.decision;
    let serving_slot = decision.serving.slot;
    let serving_before = slot_observation(live.get(
        "StatefulSet",
        &labels::statefulset_name(&cluster, serving_slot),
    ))
    .unwrap_or_default();
    let hibernation = day2::hibernation_view(
        hibernate,
        previous.hibernation.as_ref(),
        &decision.hibernation,
        restore_running,
        ServingRelays {
            desired: serving_before.desired,
            ready: serving_before.ready,
            rolled_out: serving_before.rolled_out,
            reported: previous.replicas,
        },
        &cluster.spec,
        now,
    );
    let woke = day2::wake_finished(&decision.hibernation, &hibernation);
    announce_restart(&cluster, ctx, hibernation.record().is_some()).await;
    let mut deployments = Vec::new();
    let mut kept = Vec::new();
    for plan in &decision.slots {
        let name = labels::statefulset_name(&cluster, plan.slot);
        let live_sts = live.get("StatefulSet", &name);
        match (plan.template, live_sts) {
            (Template::Keep, Some(_)) => kept.push((name, plan.replicas)),
            // Nothing to keep: an idle slot that never ran stays absent.
            (Template::Keep, None) if plan.slot != serving_slot => {}
            // The serving slot must exist; if someone deleted it, recreate it from the
            // spec rather than serve nothing.
            (Template::Keep, None) | (Template::Desired, _) => deployments.push(SlotDeployment {
                slot: plan.slot,
                replicas: plan.replicas,
                existing_claims: existing_claims(live_sts),
            }),
        }
    }
    let restore = reported!(
        reconcile_restore(
            &cluster,
            ctx,
            &namespace,
            serving_slot,
            slot_observation(live.get(
                "StatefulSet",
                &labels::statefulset_name(&cluster, serving_slot)
            ))
            .as_ref(),
        )
        .await
    );
    let inputs = BuildInputs {
        active_slot: serving_slot,
        slots: deployments,
        served: live.served,
        clients_admitted: restore.clients_admitted,
    };
    let mut desired = desired_children(&cluster, &inputs);
    if decision.hibernation.suspends_autoscaler() {
        desired.retain(|child| !matches!(child, Child::HorizontalPodAutoscaler(_)));
    }
    for child in &mut desired {
        match child {
            // Records which template a slot was given, so a rollout can tell the new
            // template from an old one that happens to be ready.
            Child::StatefulSet(sts) => {
                sts.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(TEMPLATE_HASH_ANNOTATION.to_string(), desired_hash.clone());
                // New database credentials are a new pod template.
                if let (Some(hash), Some(spec)) = (&secret_hash, sts.spec.as_mut()) {
                    spec.template
                        .metadata
                        .get_or_insert_with(Default::default)
                        .annotations
                        .get_or_insert_with(Default::default)
                        .insert(SECRET_HASH_ANNOTATION.to_string(), hash.clone());
                }
            }
            // The rollout holds the size before the switch and sets a floor after it.
            Child::HorizontalPodAutoscaler(hpa) => {
                if let (Some(bounds), Some(spec)) = (decision.hpa_bounds, hpa.spec.as_mut()) {
                    spec.min_replicas = Some(bounds.min);
                    spec.max_replicas = bounds.max;
                }
            }
            _ => {}
        }
    }
    let mut outcome = ensure_admin_token(&cluster, ctx, &namespace).await;
    if outcome.is_ok() {
        outcome = apply_children(&cluster, ctx, &namespace, &desired, &kept, &live).await;
    }
    if outcome.is_ok() {
        // The decision wants these while its step runs; each is created once (logged
        // then) and read again by every later reconcile of the step.
        if let Some(request) = &decision.smoke {
            let job = smoke::smoke_job(&cluster, request);
            outcome = ensure_job(ctx, &namespace, &job, &decided.existing_jobs)
                .await
                .map(|created| {
                    if created {
                        info!(job = %request.job_name, slot = %request.slot, "created smoke test Job");
                    }
                });
        }
    }
    if outcome.is_ok() {
        if let Some(request) = &decision.backup {
            outcome = ensure_prerollout_backup(&cluster, ctx, &namespace, &request.name)
                .await
                .map(|created| {
                    if created {
                        info!(backup = %request.name, "created the backup before the switch");
                    }
                });
        }
    }
    if outcome.is_ok() {
        if let Some(request) = &decision.handover {
            let job = handover::handover_job(&cluster, request);
            outcome = ensure_job(ctx, &namespace, &job, &decided.existing_jobs)
                .await
                .map(|created| {
                    if created {
                        info!(job = %request.job_name, from = %request.from, to = %request.to, "created handover Job");
                    }
                });
        }
    }
    for note in &decision.notes {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, &cluster, type_, note.reason, note.message.clone()).await;
    }
    let mut backups = BackupReport::default();
    if outcome.is_ok() {
        // Scheduled backups need running relays: none while hibernating or waking.
        let relays_down = hibernation.record().is_some();
        match reconcile_backups(&cluster, ctx, &namespace, now, relays_down).await {
            Ok(report) => backups = report,
            Err(e) => outcome = Err(e),
        }
    }
    let reconcile_error = outcome.as_ref().err().map(Error::as_failure);
    let serving_live = live.get(
        "StatefulSet",
        &labels::statefulset_name(&cluster, serving_slot),
    );
    let obs = Observation {
        reconcile_error,
        rollout: decision.rollout.clone(),
        active_is_desired: decision.active_is_desired,
        serving_version: decision.serving.version.clone(),
        serving_hash: decision.serving.hash.clone(),
        monitoring,
        backup: backups.status.clone(),
        backup_health: backups.health.clone(),
        restore: restore.status.clone(),
        hibernation,
        // In the template applied above: acted on.
        restarted_at: day2::restart_marker(&cluster).map(Time),
        ..observation(&cluster, serving_slot, serving_live, &desired_hash, now)
    };
    write_status(&cluster, ctx, &namespace, obs).await?;
    outcome?;
    reported!(consume_annotations(&cluster, ctx, &namespace, &decision).await);
    // The restore Job's changes and deletion (which retries a failed one) start a
    // reconcile; these looks only bound what a missed event delays.
    let restoring = restore.status.as_ref().and_then(|r| match r.phase {
        crate::api::RestorePhase::Running => Some(rollout::IN_FLIGHT_RESYNC),
        crate::api::RestorePhase::Failed => Some(rollout::HANDOVER_RETRY_POLL),
        crate::api::RestorePhase::Completed => None,
    });
    // The autoscaler comes back on the reconcile after the wake finished, at once.
    let woken = woke.then_some(std::time::Duration::ZERO);
    let requeue = [decision.requeue, backups.requeue, restoring, woken]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(RESYNC)
        .min(RESYNC);
    Ok(Action::requeue(requeue))
}

pub(super) fn observation(
    cluster: &DchatCluster,
    active_slot: Slot,
    active_live: Option<&DynamicObject>,
    template_hash: &str,
    now: Timestamp,
) -> Observation {
    let selector = labels::selector_string(&labels::slot_selector(cluster, active_slot));
    Observation {
        invalid_spec: None,
        reconcile_error: None,
        active_slot,
        active: slot_observation(active_live),
        template_hash: template_hash.to_string(),
        selector,
        now,
        rollout: cluster.status.as_ref().and_then(|s| s.rollout.clone()),
        active_is_desired: true,
        serving_version: None,
        serving_hash: None,
        monitoring: Default::default(),
        backup: cluster.status.as_ref().and_then(|s| s.backup.clone()),
        backup_health: None,
        restore: cluster.status.as_ref().and_then(|s| s.restore.clone()),
        hibernation: kept_hibernation(cluster),
        restarted_at: cluster.status.as_ref().and_then(|s| s.restarted_at.clone()),
    }
}

/// Hibernation as the previous status left it, for a reconcile that decides nothing (an
/// invalid spec): the record stays, and so does what it means.
fn kept_hibernation(cluster: &DchatCluster) -> HibernationView {
    let Some(record) = cluster.status.as_ref().and_then(|s| s.hibernation.clone()) else {
        return HibernationView::Off;
    };
    match day2::hibernation_requested(cluster) {
        Ok(Some(source)) => HibernationView::Hibernating { source, record },
        // A value the operator does not understand wakes nothing.
        Err(_) => HibernationView::Hibernating {
            source: Source::Annotation,
            record,
        },
        Ok(None) => HibernationView::Waking {
            replicas: day2::wake_replicas(&record, &cluster.spec),
            record,
        },
    }
}

/// Hash of the relay pod template the spec asks for, recorded in status when it serves.
/// Computed for the blue slot whatever slot serves: the slot only changes labels and
/// peer DNS names, and a hash that moved with the slot would look like a new template
/// after every switch.
pub(super) fn template_hash(cluster: &DchatCluster) -> String {
    use sha2::{Digest, Sha256};
    // Only the StatefulSet (and the config hash its template carries) is needed, not
    // every child.
    let config_hash = crate::build::config_hash(&crate::build::configmap(cluster));
    let deployment = SlotDeployment {
        slot: Slot::Blue,
        replicas: None,
        existing_claims: None,
    };
    let template = crate::build::statefulset(cluster, &deployment, &config_hash)
        .spec
        .map(|s| s.template);
    let bytes = serde_json::to_vec(&template).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

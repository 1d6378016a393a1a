//! Reporting: the status patch and Kubernetes Events.

use crate::events::{EventType, Occurrence};
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::error::kube_error;
use super::status::Observation;
use super::{status, Context, Error};
use crate::api::{DchatCluster, DchatClusterStatus};
use crate::labels::FIELD_MANAGER;

/// Writes the status computed from `obs`, unless the cluster already has it, and
/// records an Event for a phase change and for monitoring that became unavailable.
pub(super) async fn write_status(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    obs: Observation,
) -> Result<(), Error> {
    let next = status::compute(cluster, &obs);
    ctx.metrics
        .set_phase(&status::display_name(cluster), next.phase);
    if cluster.status.as_ref() == Some(&next) {
        return Ok(());
    }
    let transition = status::phase_transition(cluster, &next)
        .filter(|phase| ctx.announced.first(cluster, "phase", phase.as_str()));
    if let Some(message) = &obs.invalid_spec {
        // Every different invalid spec is a Warning of its own, also while the cluster
        // stays `Failed` (a second mistake fixed in place of the first).
        let new_message = ctx.announced.first(cluster, "invalid_spec", message);
        if transition.is_some() || new_message {
            publish(
                ctx,
                cluster,
                EventType::Warning,
                next.phase.as_str(),
                message.clone(),
            )
            .await;
        }
    } else if let Some(phase) = transition {
        let (type_, note) = match &obs {
            Observation {
                reconcile_error: Some(failure),
                ..
            } => (EventType::Warning, failure.message.clone()),
            _ => (
                EventType::Normal,
                next.conditions
                    .iter()
                    .find(|c| c.type_ == status::PROGRESSING)
                    .map(|c| c.message.clone())
                    .unwrap_or_default(),
            ),
        };
        publish(ctx, cluster, type_, phase.as_str(), note).await;
    }
    if let Some(message) = status::monitoring_became_unavailable(cluster, &next)
        .filter(|m| ctx.announced.first(cluster, "monitoring", m))
    {
        publish(
            ctx,
            cluster,
            EventType::Normal,
            status::reason::PROMETHEUS_OPERATOR_MISSING,
            message,
        )
        .await;
    }
    patch_status(cluster, ctx, namespace, &next).await
}

/// Writes a status that shows `error` before giving it back: a reconcile that fails
/// before (or after) its status write still shows in `kubectl get dchat` within the same
/// attempt. Best effort: when the status write fails too, the error is logged and the
/// original error returned.
pub(super) async fn report_failure(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    error: Error,
) -> Error {
    let next = status::failed(cluster, &error.as_failure(), ctx.clock.now());
    ctx.metrics
        .set_phase(&status::display_name(cluster), next.phase);
    if cluster.status.as_ref() == Some(&next) {
        return error;
    }
    if status::phase_transition(cluster, &next).is_some()
        && ctx.announced.first(cluster, "phase", next.phase.as_str())
    {
        publish(
            ctx,
            cluster,
            EventType::Warning,
            status::reason::RECONCILE_ERROR,
            error.to_string(),
        )
        .await;
    }
    if let Err(write) = patch_status(cluster, ctx, namespace, &next).await {
        warn!(error = %write, "could not report the failed reconcile in status");
    }
    error
}

pub(super) async fn patch_status(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    next: &DchatClusterStatus,
) -> Result<(), Error> {
    let api: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({
        "apiVersion": DchatCluster::api_version(&()),
        "kind": DchatCluster::kind(&()),
        "status": next,
    });
    api.patch_status(
        &cluster.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_error(
        "updating status of",
        "DchatCluster",
        namespace,
        &cluster.name_any(),
    ))?;
    Ok(())
}

/// Publishes an Event about the cluster; best effort.
pub(super) async fn publish(
    ctx: &Context,
    cluster: &DchatCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_about(ctx, &cluster.object_ref(&()), type_, reason, note).await;
}

/// Publishes an Event about any object; best effort.
pub(super) async fn publish_about(
    ctx: &Context,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let occurrence = Occurrence {
        type_,
        reason,
        action: "Reconcile",
        note: &note,
    };
    // An Event is best effort: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(object, &occurrence).await {
        warn!(error = %e, "could not publish event");
    }
}

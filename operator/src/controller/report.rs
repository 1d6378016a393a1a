//! Reporting: the status patch and Kubernetes Events.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::error::kube_error;
use super::status::Observation;
use super::{status, Context, Error};
use crate::api::DchatCluster;
use crate::labels::FIELD_MANAGER;

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
    if let Some(phase) = status::phase_transition(cluster, &next) {
        let (type_, note) = match &obs {
            Observation {
                invalid_spec: Some(m),
                ..
            } => (EventType::Warning, m.clone()),
            Observation {
                reconcile_error: Some(m),
                ..
            } => (EventType::Warning, m.clone()),
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

pub(super) async fn publish(
    ctx: &Context,
    cluster: &DchatCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    // An Event is best effort: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

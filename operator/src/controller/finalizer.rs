//! The finalizer: added before the first child exists, removed after cleanup.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, DeleteParams, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::error::{is_not_found, kube_error, patch_params};
use super::report::publish;
use super::{status, Context, Error};
use crate::api::{DchatCluster, Slot};
use crate::build::SerializeError;
use crate::labels;
use crate::labels::FINALIZER;

/// Adds the finalizer, guarded by the resourceVersion read, so that a concurrent
/// change fails this reconcile (and is retried) instead of being overwritten.
pub(super) async fn add_finalizer(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    let api: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let mut ops = vec![json!({
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": cluster.resource_version(),
    })];
    if cluster.meta().finalizers.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}));
    }
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).map_err(|e| {
        Error::Serialize(SerializeError::new("DchatCluster", &cluster.name_any(), e))
    })?;
    api.patch(
        &cluster.name_any(),
        &patch_params(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map_err(kube_error(
        "adding finalizer to",
        "DchatCluster",
        namespace,
        &cluster.name_any(),
    ))?;
    Ok(())
}

/// Removes the finalizer at `index`, checking it is still ours at that position.
pub(super) async fn remove_finalizer(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    index: usize,
) -> Result<(), Error> {
    let api: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
    .map_err(|e| Error::Serialize(SerializeError::new("DchatCluster", &cluster.name_any(), e)))?;
    match api
        .patch(
            &cluster.name_any(),
            &patch_params(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: the API server removed it once the last finalizer went.
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_error(
            "removing finalizer from",
            "DchatCluster",
            namespace,
            &cluster.name_any(),
        )(e)),
    }
}

pub(super) async fn cleanup(cluster: Arc<DchatCluster>, ctx: &Context) -> Result<Action, Error> {
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(cluster.name_any()))?;
    // Delete the relays first so each drains its clients within its grace period;
    // garbage collection removes the remaining children through their owner references.
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
    for slot in Slot::ALL {
        let name = labels::statefulset_name(&cluster, slot);
        match api.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => info!(%name, "deleted relay StatefulSet"),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(kube_error("deleting", "StatefulSet", &namespace, &name)(e)),
        }
    }
    publish(
        ctx,
        &cluster,
        EventType::Normal,
        "Deleting",
        "Relays deleted; remaining children are garbage-collected".into(),
    )
    .await;
    ctx.metrics.forget(&status::display_name(&cluster));
    ctx.announced.forget(&cluster);
    Ok(Action::await_change())
}

//! The finalizer: added before the first child exists, removed after cleanup.

use std::sync::Arc;

use crate::events::EventType;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, Patch};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::info;

use super::error::{is_not_found, kube_error, patch_params};
use super::report::publish;
use super::{status, Context, Error};
use crate::api::{DchatCluster, Slot};
use crate::build::SerializeError;
use crate::labels;
use crate::labels::FINALIZER;

/// Adds the cluster's finalizer (see [`add_finalizer_to`]).
pub(super) async fn add_finalizer(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    let adding = add_finalizer_to(cluster, ctx, namespace, FINALIZER);
    ctx.own_writes
        .track(namespace, &cluster.name_any(), adding)
        .await?;
    Ok(())
}

/// Removes the cluster's finalizer at `index` (see [`remove_finalizer_from`]).
pub(super) async fn remove_finalizer(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    index: usize,
) -> Result<(), Error> {
    remove_finalizer_from(cluster, ctx, namespace, FINALIZER, index).await
}

/// Adds `finalizer` to `object`, guarded by the resourceVersion read, so that a
/// concurrent change fails this reconcile (and is retried) instead of being overwritten.
/// Returns the object as written.
pub(super) async fn add_finalizer_to<K>(
    object: &K,
    ctx: &Context,
    namespace: &str,
    finalizer: &str,
) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let mut ops = vec![json!({
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": object.resource_version(),
    })];
    if object.meta().finalizers.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/finalizers", "value": [finalizer]}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata/finalizers/-", "value": finalizer}));
    }
    let patch: json_patch::Patch = serde_json::from_value(json!(ops))
        .map_err(|e| Error::Serialize(SerializeError::new(&kind, &object.name_any(), e)))?;
    api.patch(
        &object.name_any(),
        &patch_params(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map_err(kube_error(
        "adding finalizer to",
        &kind,
        namespace,
        &object.name_any(),
    ))
}

/// Removes `finalizer` at `index` of `object`, checking it is still there.
pub(super) async fn remove_finalizer_from<K>(
    object: &K,
    ctx: &Context,
    namespace: &str,
    finalizer: &str,
    index: usize,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let kind = K::kind(&()).to_string();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": path, "value": finalizer},
        {"op": "remove", "path": path},
    ]))
    .map_err(|e| Error::Serialize(SerializeError::new(&kind, &object.name_any(), e)))?;
    match api
        .patch(
            &object.name_any(),
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
            &kind,
            namespace,
            &object.name_any(),
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

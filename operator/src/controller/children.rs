//! Applying children: server-side apply of the desired objects, resizing kept slots,
//! handing replicas to the HPA, deleting children no longer desired, the admin token.

use std::collections::HashSet;

use crate::events::EventType;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::ResourceExt;
use serde_json::json;
use tracing::{debug, info};

use super::error::{is_not_found, kube_error};
use super::observe::LiveChildren;
use super::report::publish;
use super::{diff, Context, Error};
use crate::api::DchatCluster;
use crate::build::{managed_kinds, Child, ErasedChild};
use crate::labels;
use crate::labels::FIELD_MANAGER;

/// Field manager that takes over `spec.replicas` of a StatefulSet for the moment the
/// operator hands the count to a HorizontalPodAutoscaler (see [`hand_replicas_to_hpa`]).
pub const HANDOVER_MANAGER: &str = "dchat-operator-hpa-handover";

/// Field manager of the replica-count patches of a slot whose template the operator
/// leaves alone during a rollout (the old or failed version).
pub const ROLLOUT_MANAGER: &str = "dchat-operator-rollout";

/// Creates the admin token Secret of an embedded-store cluster unless it exists. The
/// token is random and never rewritten (the relays read it at start); the Secret is
/// owned by the DchatCluster, so it goes with it.
pub(super) async fn ensure_admin_token(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<(), Error> {
    if cluster.spec.database.is_some() {
        return Ok(());
    }
    let name = labels::admin_token_secret_name(cluster);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(kube_error("reading", "Secret", namespace, &name))?;
    if existing.is_some() {
        return Ok(());
    }
    let mut token = [0u8; 32];
    getrandom::fill(&mut token).map_err(|e| Error::Random(e.to_string()))?;
    let secret = Secret {
        metadata: labels::child_meta(
            cluster,
            name.clone(),
            labels::labels(cluster, labels::Component::Relay),
        ),
        type_: Some("Opaque".into()),
        string_data: Some(std::collections::BTreeMap::from([(
            crate::build::statefulset::ADMIN_TOKEN_KEY.to_string(),
            hex::encode(token),
        )])),
        ..Secret::default()
    };
    info!(secret = %name, "creating the relays' admin token Secret");
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(kube_error("creating", "Secret", namespace, &name)(e)),
    }
}

pub(super) async fn apply_children(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    desired: &[Child],
    kept: &[(String, Option<i32>)],
    live: &LiveChildren,
) -> Result<(), Error> {
    let mut wanted = HashSet::new();
    // StatefulSets whose template stays as it is (the old or failed version during and
    // after a rollout): never re-rendered, only resized.
    for (name, replicas) in kept {
        wanted.insert(("StatefulSet".to_string(), name.clone()));
        let current = live
            .get("StatefulSet", name)
            .and_then(|o| o.data.pointer("/spec/replicas"))
            .and_then(serde_json::Value::as_i64);
        if let Some(replicas) = replicas {
            if current != Some(i64::from(*replicas)) {
                scale_statefulset(ctx, namespace, name, *replicas).await?;
            }
        }
    }
    for child in desired {
        let erased = child.erase()?;
        wanted.insert((erased.resource.kind.clone(), erased.name.clone()));
        let live_object = live.get(&erased.resource.kind, &erased.name);
        // A StatefulSet created without a count (the HPA owns it) would start at the API
        // server's default of one relay until the HPA's first sync.
        let created_for_hpa = live_object.is_none()
            && erased.resource.kind == "StatefulSet"
            && erased.body.pointer("/spec/replicas").is_none();
        if let Some(live_object) = live_object {
            let live_json = serde_json::to_value(live_object).unwrap_or_default();
            if erased.resource.kind == "StatefulSet"
                && erased.body.pointer("/spec/replicas").is_none()
                && diff::manager_owns_replicas(&live_json, FIELD_MANAGER)
            {
                hand_replicas_to_hpa(ctx, namespace, &erased, &live_json).await?;
            } else if diff::is_subset(&erased.body, &live_json) {
                continue;
            }
        }
        server_side_apply(ctx, namespace, &erased).await?;
        // One relay is what the API server gives a StatefulSet created without a count.
        let starting = created_for_hpa
            .then(|| crate::build::starting_replicas(cluster))
            .filter(|&replicas| replicas != 1);
        if let Some(replicas) = starting {
            info!(name = %erased.name, replicas, "starting the HorizontalPodAutoscaler's relays");
            apply_replicas_for_hpa(ctx, namespace, &erased, json!(replicas), "starting").await?;
        }
    }
    for (kind, object) in &live.objects {
        let name = object.name_any();
        if wanted.contains(&(kind.kind.clone(), name.clone())) {
            continue;
        }
        let resource = managed_kinds()
            .into_iter()
            .find(|k| k.resource.kind == kind.kind && k.resource.group == kind.group)
            .map(|k| k.resource);
        let Some(resource) = resource else { continue };
        info!(kind = %kind.kind, %name, "deleting child no longer desired");
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), namespace, &resource);
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            // Already gone: the cache it was read from had not seen the deletion yet.
            Err(e) if is_not_found(&e) => continue,
            Err(e) => return Err(kube_error("deleting", &kind.kind, namespace, &name)(e)),
        }
        publish(
            ctx,
            cluster,
            EventType::Normal,
            "Deleted",
            format!("Deleted {} {name}", kind.kind),
        )
        .await;
    }
    Ok(())
}

/// Sets only `spec.replicas` of a StatefulSet the operator does not re-render. A merge
/// patch under its own field manager: an apply by the main manager with just the
/// replica count would drop every other field it owns.
pub(super) async fn scale_statefulset(
    ctx: &Context,
    namespace: &str,
    name: &str,
    replicas: i32,
) -> Result<(), Error> {
    info!(%name, replicas, "scaling relay StatefulSet");
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PatchParams {
        field_manager: Some(ROLLOUT_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    ctx.own_writes
        .track(namespace, name, api.patch(name, &params, &patch))
        .await
        .map_err(kube_error("scaling", "StatefulSet", namespace, name))?;
    Ok(())
}

pub(super) async fn server_side_apply(
    ctx: &Context,
    namespace: &str,
    child: &ErasedChild,
) -> Result<(), Error> {
    debug!(kind = %child.resource.kind, name = %child.name, "applying");
    // Forced: the DchatCluster is the declared source of truth for its children, so a
    // field another manager changed (a kubectl edit, a deleted HPA's replica count that
    // the operator takes back) is set back to the declared value instead of failing
    // the reconcile with a conflict forever.
    force_apply(
        ctx,
        namespace,
        child,
        FIELD_MANAGER,
        &child.body,
        "applying",
    )
    .await
}

/// Server-side applies `body` to `child` as `manager`, forced, through the record of the
/// operator's own writes; `doing` names the write in an error.
async fn force_apply(
    ctx: &Context,
    namespace: &str,
    child: &ErasedChild,
    manager: &str,
    body: &serde_json::Value,
    doing: &'static str,
) -> Result<(), Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &child.resource);
    let (params, patch) = (PatchParams::apply(manager).force(), Patch::Apply(body));
    ctx.own_writes
        .track(
            namespace,
            &child.name,
            api.patch(&child.name, &params, &patch),
        )
        .await
        .map_err(kube_error(
            doing,
            &child.resource.kind,
            namespace,
            &child.name,
        ))?;
    Ok(())
}

/// Gives `spec.replicas` of a StatefulSet to the autoscaler without a dip: a second
/// field manager first co-owns the current count, so the operator's next apply, which
/// omits replicas, releases its ownership without the API server resetting the field
/// (server-side apply removes fields their only manager stops setting).
pub(super) async fn hand_replicas_to_hpa(
    ctx: &Context,
    namespace: &str,
    child: &ErasedChild,
    live: &serde_json::Value,
) -> Result<(), Error> {
    let current = live.pointer("/spec/replicas").cloned().unwrap_or(json!(1));
    info!(name = %child.name, replicas = %current, "handing replica count to the HorizontalPodAutoscaler");
    apply_replicas_for_hpa(ctx, namespace, child, current, "handing over replicas of").await
}

/// Sets `spec.replicas` of a StatefulSet whose count the HorizontalPodAutoscaler owns,
/// under the handover field manager, which never sets it again: the HPA's scale writes
/// change it from then on, and the operator's applies (which omit it) leave it alone.
async fn apply_replicas_for_hpa(
    ctx: &Context,
    namespace: &str,
    child: &ErasedChild,
    replicas: serde_json::Value,
    doing: &'static str,
) -> Result<(), Error> {
    let body = json!({
        "apiVersion": child.resource.api_version,
        "kind": child.resource.kind,
        "metadata": {"name": child.name},
        "spec": {"replicas": replicas},
    });
    force_apply(ctx, namespace, child, HANDOVER_MANAGER, &body, doing).await
}

//! Observation: what the API server holds for a cluster — its children, the serving
//! slot's StatefulSet, the pods of a rollout's slot, the database Secret's hash.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::core::DynamicObject;
use kube::ResourceExt;
use tracing::info;

use super::discovery::OptionalKinds;
use super::error::kube_error;
use super::status::SlotObservation;
use super::{Context, Error};
use crate::api::{DchatCluster, Slot};
use crate::build::managed_kinds;
use crate::rollout::{PodHealth, SlotState, TEMPLATE_HASH_ANNOTATION};
use crate::{labels, rollout};

/// Live children of a cluster, by kind, as the API server returned them.
pub(super) struct LiveChildren {
    pub(super) objects: Vec<(ErasedKind, DynamicObject)>,
    /// The optional kinds that were served, so listed (and may be applied).
    pub(super) served: OptionalKinds,
}

/// A child's kind without its version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ErasedKind {
    pub(super) group: String,
    pub(super) kind: String,
}

impl LiveChildren {
    /// The live child of `kind` named `name`.
    pub(super) fn get(&self, kind: &str, name: &str) -> Option<&DynamicObject> {
        self.objects
            .iter()
            .find(|(k, o)| k.kind == kind && o.metadata.name.as_deref() == Some(name))
            .map(|(_, o)| o)
    }
}

/// The cluster's children of every managed kind the API server serves (`served` says
/// which optional ones): from the controller's caches ([`super::cache`]), listed for a
/// kind whose watch has not listed yet (just started, refused, or an optional kind whose
/// watch is stopped) and for every kind when no controller runs. A 404 for an optional
/// kind means its CRD went away since the last discovery: it is skipped and forgotten
/// until discovery finds it again.
pub(super) async fn observe(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    mut served: OptionalKinds,
) -> Result<LiveChildren, Error> {
    let uid = cluster.uid();
    let params = ListParams::default().labels(&labels::managed_selector(cluster));
    let caches = ctx.children.get();
    let mut objects = Vec::new();
    for kind in managed_kinds() {
        let kind_name = kind.resource.kind.as_str();
        if !served.serves(kind_name) {
            continue;
        }
        let erased = || ErasedKind {
            group: kind.resource.group.clone(),
            kind: kind.resource.kind.clone(),
        };
        let cached = match (&caches, &uid) {
            (Some(caches), Some(uid)) => {
                caches.owned(kind_name, &cluster.name_any(), namespace, uid)
            }
            _ => None,
        };
        if let Some(cached) = cached {
            objects.extend(cached.into_iter().map(|object| (erased(), object)));
            continue;
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), namespace, &kind.resource);
        let list = match api.list(&params).await {
            Ok(list) => list,
            // Any 404: an unserved group answers in plain text, without a reason.
            Err(kube::Error::Api(status)) if kind.needs_monitoring_crds && status.code == 404 => {
                info!(
                    kind = kind_name,
                    "no longer served; skipping it until it is again"
                );
                ctx.capabilities.forget(kind_name);
                served = served.without(kind_name);
                continue;
            }
            Err(e) => return Err(kube_error("listing", kind_name, namespace, "")(e)),
        };
        for mut object in list.items {
            // A list answer leaves apiVersion and kind out of the items of built-in
            // kinds. Without them no live child contains its desired copy, and every
            // reconcile re-applied every child: server-side applies that change nothing
            // (the resourceVersion stays), but a write request each.
            object.types.get_or_insert_with(|| kube::core::TypeMeta {
                api_version: kind.resource.api_version.clone(),
                kind: kind.resource.kind.clone(),
            });
            let owned = object
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| Some(&r.uid) == uid.as_ref());
            if owned {
                objects.push((erased(), object));
            }
        }
    }
    Ok(LiveChildren { objects, served })
}

pub(super) fn slot_observation(live: Option<&DynamicObject>) -> Option<SlotObservation> {
    let sts: StatefulSet = serde_json::from_value(serde_json::to_value(live?).ok()?).ok()?;
    let status = sts.status.clone().unwrap_or_default();
    let desired = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let generation_seen = status.observed_generation >= sts.metadata.generation;
    let revision_done = match (&status.current_revision, &status.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => false,
    };
    Some(SlotObservation {
        desired,
        replicas: status.replicas,
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        rolled_out: generation_seen
            && revision_done
            && status.updated_replicas.unwrap_or(0) >= desired,
    })
}

pub(super) fn existing_claims(
    live: Option<&DynamicObject>,
) -> Option<Vec<k8s_openapi::api::core::v1::PersistentVolumeClaim>> {
    let sts: StatefulSet = serde_json::from_value(serde_json::to_value(live?).ok()?).ok()?;
    let claims = sts.spec?.volume_claim_templates?;
    // Only the fields the operator sets, so the comparison with live stays exact.
    Some(
        claims
            .into_iter()
            .map(|c| k8s_openapi::api::core::v1::PersistentVolumeClaim {
                metadata: kube::api::ObjectMeta {
                    name: c.metadata.name,
                    labels: c.metadata.labels,
                    ..Default::default()
                },
                spec: c
                    .spec
                    .map(|s| k8s_openapi::api::core::v1::PersistentVolumeClaimSpec {
                        access_modes: s.access_modes,
                        storage_class_name: s.storage_class_name,
                        resources: s.resources,
                        ..Default::default()
                    }),
                status: None,
            })
            .collect(),
    )
}

/// Hash of the database Secret the relays read, or `None` without a database or while
/// the Secret does not exist (the relays cannot start then anyway; its creation is then
/// a template change like any other).
pub(super) async fn database_secret_hash(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
) -> Result<Option<String>, Error> {
    let Some(database) = &cluster.spec.database else {
        return Ok(None);
    };
    let name = &database.secret_ref.name;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(kube_error("reading", "Secret", namespace, name))?;
    Ok(secret.map(|s| rollout::secret_hash(&s.data.unwrap_or_default())))
}

pub(super) fn typed_statefulset(live: Option<&DynamicObject>) -> Option<StatefulSet> {
    serde_json::from_value(serde_json::to_value(live?).ok()?).ok()
}

/// What the rollout needs to know of a slot's StatefulSet.
pub(super) fn slot_state(live: Option<&DynamicObject>) -> Option<SlotState> {
    let sts = typed_statefulset(live)?;
    let obs = slot_observation(live)?;
    Some(SlotState {
        replicas: obs.desired,
        ready: obs.ready,
        rolled_out: obs.rolled_out,
        template_hash: sts
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION))
            .cloned(),
    })
}

/// Container waiting reasons that mean a relay will not come up by itself.
pub(super) const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "RunContainerError",
];

/// Restarts and crash loops of the pods running the rollout's target template in
/// `slot`. Pods of an older revision of the StatefulSet (being replaced) do not count.
pub(super) async fn observe_pods(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    slot: Slot,
    live: Option<&DynamicObject>,
    target_hash: &str,
) -> Result<PodHealth, Error> {
    let mut health = PodHealth {
        slot: Some(slot),
        ..PodHealth::default()
    };
    let Some(sts) = typed_statefulset(live) else {
        return Ok(health);
    };
    let given = sts
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TEMPLATE_HASH_ANNOTATION));
    if given.map(String::as_str) != Some(target_hash) {
        return Ok(health);
    }
    let revision = sts.status.as_ref().and_then(|s| s.update_revision.clone());
    let selector = labels::slot_selector(cluster, slot);
    let cached = ctx
        .children
        .get()
        .and_then(|caches| caches.pods(namespace, &selector));
    let pods = match cached {
        Some(pods) => pods,
        None => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
            api.list(&ListParams::default().labels(&labels::selector_string(&selector)))
                .await
                .map_err(kube_error("listing", "Pod", namespace, ""))?
                .items
        }
    };
    for pod in pods {
        let name = pod.name_any();
        let pod_revision = pod.labels().get("controller-revision-hash");
        if revision.is_some() && pod_revision != revision.as_ref() {
            continue;
        }
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.clone());
        for cs in statuses.into_iter().flatten() {
            if let Some(reason) = cs
                .state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                .filter(|r| FAILING_REASONS.contains(r))
            {
                health.failing.push(format!(
                    "{name} container {}: {reason}{}",
                    cs.name,
                    last_exit(&cs)
                ));
            } else if cs.restart_count > 0 {
                health.restarted.push(format!(
                    "{name} container {} restarted {} time(s){}",
                    cs.name,
                    cs.restart_count,
                    last_exit(&cs)
                ));
            }
        }
    }
    Ok(health)
}

/// " (last exit 1: Error)" from a container's last termination, kept in status and
/// Events because the pod and its logs go away when the failed slot scales down.
pub(super) fn last_exit(cs: &k8s_openapi::api::core::v1::ContainerStatus) -> String {
    cs.last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .map(|t| {
            let mut out = format!(" (last exit {}", t.exit_code);
            if let Some(reason) = &t.reason {
                out.push_str(&format!(": {reason}"));
            }
            if let Some(message) = t.message.as_deref().filter(|m| !m.is_empty()) {
                let short: String = message.chars().take(200).collect();
                out.push_str(&format!(", {short}"));
            }
            out.push(')');
            out
        })
        .unwrap_or_default()
}

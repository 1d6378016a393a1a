//! The operator's caches of the children of every cluster, filled by the same watches
//! that start reconciles ([`super::triggers`]).
//!
//! A reconcile reads a cluster's children from here instead of listing each kind: a
//! list per child kind was ten requests per reconcile, most of the operator's requests
//! on a real API server. A cache can lag the API server by a watch event; what a
//! reconcile decides from it holds anyway, because a child's status is judged against
//! its own `generation` (a StatefulSet just changed reads as not rolled out yet) and the
//! event that brings the cache up to date starts the next reconcile.
//!
//! The cached objects keep of their `managedFields` only what the reconcile reads:
//! whether the operator's apply owns `spec.replicas` ([`super::diff::manager_owns_replicas`]).
//! The rest is about as large as the object and never read.

use std::sync::Arc;

use futures::{FutureExt, Stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::api::Api;
use kube::core::DynamicObject;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::labels::{self, FIELD_MANAGER};

/// The caches of the child kinds the controller watches, by kind name.
#[derive(Default)]
pub struct ChildCaches {
    kinds: Vec<(String, Box<dyn KindCache>)>,
}

/// One kind's cache, without its type.
trait KindCache: Send + Sync {
    /// Whether the cache holds the watch's first list.
    fn ready(&self) -> bool;
    /// The cached objects in `namespace` with all of `labels` and owned by `owner_uid`.
    fn owned(
        &self,
        namespace: &str,
        labels: &[(&str, &str)],
        owner_uid: &str,
    ) -> Vec<DynamicObject>;
}

impl<K> KindCache for Store<K>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + Send + Sync + 'static,
{
    fn ready(&self) -> bool {
        // Resolves at its first poll once the first list is in.
        self.wait_until_ready()
            .now_or_never()
            .is_some_and(|r| r.is_ok())
    }

    fn owned(
        &self,
        namespace: &str,
        labels: &[(&str, &str)],
        owner_uid: &str,
    ) -> Vec<DynamicObject> {
        self.state_filter(|object| {
            object.meta().namespace.as_deref() == Some(namespace)
                && labels
                    .iter()
                    .all(|(k, v)| object.labels().get(*k).map(String::as_str) == Some(*v))
                && object.owner_references().iter().any(|r| r.uid == owner_uid)
        })
        .iter()
        // A typed object always serializes, with its apiVersion and kind.
        .filter_map(|object| serde_json::to_value(object.as_ref()).ok())
        .filter_map(|value| serde_json::from_value(value).ok())
        .collect()
    }
}

impl ChildCaches {
    /// A watch of `api` whose objects (managedFields trimmed) this cache keeps as the
    /// cache of `K`'s kind; the stream must be polled for the cache to fill.
    pub fn watch<K>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
    ) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
    where
        K: Resource<DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (reader, writer) = reflector::store();
        self.kinds
            .push((K::kind(&()).into_owned(), Box::new(reader)));
        reflector(
            writer,
            watcher(api, config).modify(|object: &mut K| trim_managed_fields(object)),
        )
    }

    /// The children of kind `kind` that `cluster` (in `namespace`, uid `owner_uid`)
    /// owns and labels as its own, or `None` when this kind is not cached or its watch
    /// has not listed yet: just started, refused (RBAC), or ended. The caller lists
    /// instead, so that a refusal shows in the cluster's status rather than a reconcile
    /// waiting for a cache that never fills.
    pub(super) fn owned(
        &self,
        kind: &str,
        cluster_name: &str,
        namespace: &str,
        owner_uid: &str,
    ) -> Option<Vec<DynamicObject>> {
        let (_, cache) = self.kinds.iter().find(|(k, _)| k == kind)?;
        if !cache.ready() {
            return None;
        }
        let selector = [
            (labels::INSTANCE_LABEL, cluster_name),
            (labels::MANAGED_BY_LABEL, labels::MANAGED_BY),
        ];
        Some(cache.owned(namespace, &selector, owner_uid))
    }
}

/// Where the running controller's caches are found: replaced whenever the controller's
/// watches restart, empty while none run (a reconcile called directly then lists).
#[derive(Default)]
pub struct ChildCacheSlot(std::sync::RwLock<Option<Arc<ChildCaches>>>);

impl ChildCacheSlot {
    /// Makes `caches` the ones reconciles read.
    pub fn set(&self, caches: Arc<ChildCaches>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(caches);
    }

    /// The current caches, if a controller runs.
    pub fn get(&self) -> Option<Arc<ChildCaches>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Drops an object's managedFields but for one fact: whether the operator's apply owns
/// `spec.replicas`, kept as an entry that says only that.
fn trim_managed_fields<K: Resource>(object: &mut K) {
    let fields = object.managed_fields_mut();
    let owns_replicas = fields.iter().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry.operation.as_deref() == Some("Apply")
            && entry
                .fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
    });
    fields.clear();
    if owns_replicas {
        fields.push(ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.to_string()),
            operation: Some("Apply".to_string()),
            fields_type: Some("FieldsV1".to_string()),
            fields_v1: Some(FieldsV1(json!({"f:spec": {"f:replicas": {}}}))),
            ..ManagedFieldsEntry::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::diff::manager_owns_replicas;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;
    use kube::runtime::watcher::Event;
    use std::collections::BTreeMap;

    fn entry(manager: &str, operation: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        }
    }

    fn statefulset(entries: Vec<ManagedFieldsEntry>) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("chat-blue".into()),
                managed_fields: Some(entries),
                ..ObjectMeta::default()
            },
            ..StatefulSet::default()
        }
    }

    #[test]
    fn trimmed_fields_still_tell_whether_the_operator_owns_replicas() {
        let big =
            json!({"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {}}}}});
        let mut owned = statefulset(vec![
            entry(FIELD_MANAGER, "Apply", big.clone()),
            entry("kube-controller-manager", "Update", json!({"f:status": {}})),
        ]);
        let before = serde_json::to_value(&owned).unwrap();
        trim_managed_fields(&mut owned);
        let after = serde_json::to_value(&owned).unwrap();
        assert!(manager_owns_replicas(&before, FIELD_MANAGER));
        assert!(manager_owns_replicas(&after, FIELD_MANAGER));
        assert_eq!(
            owned.metadata.managed_fields.as_ref().map(Vec::len),
            Some(1)
        );

        for entries in [
            // Handed to the autoscaler: the operator's apply no longer sets replicas.
            vec![entry(
                FIELD_MANAGER,
                "Apply",
                json!({"f:spec": {"f:template": {}}}),
            )],
            // Someone else's apply, and the operator's own update (not an apply).
            vec![entry("someone", "Apply", big.clone())],
            vec![entry(FIELD_MANAGER, "Update", big.clone())],
        ] {
            let mut other = statefulset(entries);
            trim_managed_fields(&mut other);
            let value = serde_json::to_value(&other).unwrap();
            assert!(!manager_owns_replicas(&value, FIELD_MANAGER));
            assert_eq!(other.metadata.managed_fields, Some(vec![]));
        }
    }

    fn config_map(namespace: &str, instance: &str, owner: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("{instance}-config-{owner}")),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([
                    (labels::INSTANCE_LABEL.to_string(), instance.to_string()),
                    (
                        labels::MANAGED_BY_LABEL.to_string(),
                        labels::MANAGED_BY.to_string(),
                    ),
                ])),
                owner_references: Some(vec![OwnerReference {
                    uid: owner.into(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    #[test]
    fn a_cluster_reads_only_the_children_it_owns_in_its_namespace() {
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let mut caches = ChildCaches::default();
        caches.kinds.push(("ConfigMap".into(), Box::new(reader)));
        assert!(caches
            .owned("StatefulSet", "chat", "team-a", "uid-1")
            .is_none());
        assert!(
            caches
                .owned("ConfigMap", "chat", "team-a", "uid-1")
                .is_none(),
            "not listed yet"
        );

        writer.apply_watcher_event(&Event::Init);
        for object in [
            config_map("team-a", "chat", "uid-1"),
            // Same name elsewhere, another owner, another cluster's labels.
            config_map("team-b", "chat", "uid-1"),
            config_map("team-a", "chat", "uid-2"),
            config_map("team-a", "other", "uid-1"),
        ] {
            writer.apply_watcher_event(&Event::InitApply(object));
        }
        writer.apply_watcher_event(&Event::InitDone);

        let owned = caches
            .owned("ConfigMap", "chat", "team-a", "uid-1")
            .expect("ConfigMaps are cached");
        assert_eq!(owned.len(), 1);
        let object = &owned[0];
        assert_eq!(object.metadata.namespace.as_deref(), Some("team-a"));
        let types = object.types.as_ref().expect("apiVersion and kind are kept");
        assert_eq!(
            (types.api_version.as_str(), types.kind.as_str()),
            ("v1", "ConfigMap")
        );
    }

    #[test]
    fn a_watch_that_ended_before_its_first_list_sends_the_reconcile_to_list() {
        let (reader, writer) = reflector::store::<ConfigMap>();
        let mut caches = ChildCaches::default();
        caches.kinds.push(("ConfigMap".into(), Box::new(reader)));
        drop(writer);
        assert!(caches
            .owned("ConfigMap", "chat", "team-a", "uid-1")
            .is_none());
    }
}

//! The operator's caches of the children of every cluster, filled by the same watches
//! that start reconciles ([`super::triggers`]).
//!
//! A reconcile reads a cluster's children from here instead of listing each kind: a
//! list per child kind was ten requests per reconcile, most of the operator's requests
//! on a real API server. A cache can lag the API server by a watch event; what a
//! reconcile decides from it holds anyway, because a child's status is judged against
//! its own `generation` (a StatefulSet just changed reads as not rolled out yet), the
//! event of someone else's change that brings the cache up to date starts the next
//! reconcile, and a child read before the operator's own write of it reached the cache
//! (that event starts none, [`super::own_writes`]) is applied again with the same fields,
//! which changes nothing.
//!
//! Each object is kept as its compact JSON text, indexed by namespace, and parsed only
//! when its own cluster's reconcile reads it: as typed objects the children of 1,000
//! clusters took about 60 MiB. The cached objects keep of their `managedFields` only
//! what the reconcile reads: whether the operator's apply owns `spec.replicas`
//! ([`super::diff::manager_owns_replicas`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::api::{Api, ObjectMeta};
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use super::discovery::{self, Capabilities};
use crate::labels::{self, FIELD_MANAGER};

/// The caches of the child kinds the controller watches, by kind name.
#[derive(Default)]
pub struct ChildCaches {
    kinds: Vec<(String, Arc<KindCache>)>,
}

/// One kind's cache.
#[derive(Default)]
struct KindCache(RwLock<CacheState>);

#[derive(Default)]
struct CacheState {
    /// By (namespace, name).
    objects: BTreeMap<(String, String), CachedObject>,
    /// The objects of a relist in progress (a watch restarted), which replace
    /// `objects` when it is done: a relist reports no deletions.
    relisting: Option<BTreeMap<(String, String), CachedObject>>,
    /// Whether the first list is in.
    listed: bool,
}

/// An object as kept: what tells whose it is, and its JSON.
struct CachedObject {
    instance: Option<String>,
    managed_by_operator: bool,
    owner_uids: Vec<String>,
    json: Box<[u8]>,
}

impl CachedObject {
    fn new<K: Resource + Serialize>(object: &K) -> Option<((String, String), Self)> {
        let meta = object.meta();
        let key = (meta.namespace.clone()?, meta.name.clone()?);
        let label = |name: &str| meta.labels.as_ref().and_then(|l| l.get(name));
        let cached = CachedObject {
            instance: label(labels::INSTANCE_LABEL).cloned(),
            managed_by_operator: label(labels::MANAGED_BY_LABEL)
                .is_some_and(|v| v == labels::MANAGED_BY),
            owner_uids: object
                .owner_references()
                .iter()
                .map(|r| r.uid.clone())
                .collect(),
            // A typed object always serializes, with its apiVersion and kind.
            json: serde_json::to_vec(object).ok()?.into_boxed_slice(),
        };
        Some((key, cached))
    }
}

impl KindCache {
    fn apply<K: Resource + Serialize>(&self, event: &Event<K>) {
        let mut state = self.0.write().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Apply(object) => {
                if let Some((key, cached)) = CachedObject::new(object) {
                    state.objects.insert(key, cached);
                }
            }
            Event::Delete(object) => {
                let meta = object.meta();
                if let (Some(namespace), Some(name)) = (&meta.namespace, &meta.name) {
                    state.objects.remove(&(namespace.clone(), name.clone()));
                }
            }
            Event::Init => state.relisting = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                if let Some((key, cached)) = CachedObject::new(object) {
                    state
                        .relisting
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, cached);
                }
            }
            Event::InitDone => {
                state.objects = state.relisting.take().unwrap_or_default();
                state.listed = true;
            }
        }
    }

    /// The objects in `namespace` of cluster `instance` (labels) owned by `owner_uid`,
    /// or `None` before the first list is in.
    fn owned(
        &self,
        namespace: &str,
        instance: &str,
        owner_uid: &str,
    ) -> Option<Vec<DynamicObject>> {
        self.in_namespace(namespace, |cached| {
            let ours = cached.managed_by_operator
                && cached.instance.as_deref() == Some(instance)
                && cached.owner_uids.iter().any(|uid| uid == owner_uid);
            ours.then(|| serde_json::from_slice(&cached.json).ok())
                .flatten()
        })
    }

    /// The objects in `namespace` whose labels include all of `selector`, or `None`
    /// before the first list is in.
    fn labelled<K: DeserializeOwned + Resource>(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Option<Vec<K>> {
        self.in_namespace(namespace, |cached| {
            let object: K = serde_json::from_slice(&cached.json).ok()?;
            let labels = object.labels();
            selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
                .then_some(object)
        })
    }

    /// What `pick` makes of each object in `namespace`, or `None` before the first list
    /// is in.
    fn in_namespace<T>(
        &self,
        namespace: &str,
        pick: impl FnMut(&CachedObject) -> Option<T>,
    ) -> Option<Vec<T>> {
        let state = self.0.read().unwrap_or_else(|e| e.into_inner());
        if !state.listed {
            return None;
        }
        let start = (namespace.to_string(), String::new());
        Some(
            state
                .objects
                .range(start..)
                .take_while(|((ns, _), _)| ns == namespace)
                .map(|(_, cached)| cached)
                .filter_map(pick)
                .collect(),
        )
    }

    /// Drops everything: the watch stopped, and until another one has listed, the kind
    /// reads as not listed.
    fn forget(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = CacheState::default();
    }

    /// How many objects it holds (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .objects
            .len()
    }
}

/// A built-in kind whose watch fills a cache.
pub trait CachedKind:
    Resource<DynamicType = ()>
    + Clone
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> CachedKind for K where
    K: Resource<DynamicType = ()>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

impl ChildCaches {
    /// A watch of `api` whose objects this cache keeps as the cache of `K`'s kind
    /// (managedFields trimmed, also in the events passed on); the stream must be polled
    /// for the cache to fill.
    pub fn watch<K>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
    ) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
    where
        K: CachedKind,
    {
        self.watch_trimmed(api, config, trim_managed_fields::<K>)
    }

    /// A watch of relay Pods (`api`, `config`) whose Pods this cache keeps, trimmed
    /// to what a rollout reads of them ([`trim_pod`], also in the events passed on).
    pub fn watch_pods(
        &mut self,
        api: Api<Pod>,
        config: watcher::Config,
    ) -> impl Stream<Item = Result<Event<Pod>, watcher::Error>> + Send + 'static {
        self.watch_trimmed(api, config, trim_pod)
    }

    fn watch_trimmed<K>(
        &mut self,
        api: Api<K>,
        config: watcher::Config,
        trim: fn(&mut K),
    ) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
    where
        K: CachedKind,
    {
        let cache = self.add(K::kind(&()).into_owned());
        filling(cache, watcher(api, config).modify(trim))
    }

    /// A watch of the optional kind `resource` whose objects this cache keeps, running
    /// only while discovery says the API server serves the kind
    /// ([`discovery::while_served`]): a watch of a kind without its CRD would fail
    /// forever. While it does not run, the kind reads as not listed (reconciles list it).
    pub fn watch_while_served(
        &mut self,
        api: Api<DynamicObject>,
        resource: &ApiResource,
        config: watcher::Config,
        capabilities: Arc<Capabilities>,
        changes: tokio::sync::watch::Receiver<u64>,
    ) -> impl Stream<Item = Result<Event<DynamicObject>, watcher::Error>> + Send + 'static {
        let cache = self.add(resource.kind.clone());
        let stopped = cache.clone();
        let start = move || {
            watcher(api.clone(), config.clone())
                .modify(|object: &mut DynamicObject| trim_managed_fields(object))
        };
        let events = discovery::while_served(
            resource.kind.clone(),
            capabilities,
            changes,
            start,
            move || stopped.forget(),
        );
        filling(cache, events)
    }

    /// The relay Pods in `namespace` whose labels include all of `selector`, trimmed
    /// ([`trim_pod`]), or `None` when Pods are not cached or not listed yet.
    pub(super) fn pods(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Option<Vec<Pod>> {
        let (_, cache) = self.kinds.iter().find(|(k, _)| k == "Pod")?;
        cache.labelled(namespace, selector)
    }

    fn add(&mut self, kind: String) -> Arc<KindCache> {
        let cache = Arc::new(KindCache::default());
        self.kinds.push((kind, cache.clone()));
        cache
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
        cache.owned(namespace, cluster_name, owner_uid)
    }
}

/// Where the running controller's caches are found: replaced whenever the controller's
/// watches restart, empty while none run (a reconcile called directly then lists).
#[derive(Default)]
pub struct ChildCacheSlot(RwLock<Option<Arc<ChildCaches>>>);

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

/// The watch `events`, passed on after each has been applied to `cache`: a reconcile
/// that an event starts reads a cache that already holds it.
fn filling<K: Resource + Serialize>(
    cache: Arc<KindCache>,
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static {
    events.map(move |event| {
        if let Ok(event) = &event {
            cache.apply(event);
        }
        event
    })
}

/// Keeps of a relay Pod what a rollout reads ([`super::observe::observe_pods`]) and what
/// starts a reconcile ([`super::triggers::relay_pod_trouble`]): its identity and labels,
/// and of each container its name, restarts, state and last state. A whole Pod is about
/// 10 KiB of JSON, most of it the spec.
fn trim_pod(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        ..ObjectMeta::default()
    };
    pod.spec = None;
    let statuses = pod.status.take().and_then(|s| s.container_statuses);
    pod.status = statuses.map(|statuses| PodStatus {
        container_statuses: Some(
            statuses
                .into_iter()
                .map(|cs| ContainerStatus {
                    name: cs.name,
                    restart_count: cs.restart_count,
                    state: cs.state,
                    last_state: cs.last_state,
                    ..ContainerStatus::default()
                })
                .collect(),
        ),
        ..PodStatus::default()
    });
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

    fn names(objects: Option<Vec<DynamicObject>>) -> Vec<String> {
        let mut names: Vec<String> = objects
            .expect("listed")
            .into_iter()
            .map(|o| o.name_any())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_cluster_reads_only_the_children_it_owns_in_its_namespace() {
        let cache = Arc::new(KindCache::default());
        let mut caches = ChildCaches::default();
        caches.kinds.push(("ConfigMap".into(), cache.clone()));
        assert!(caches
            .owned("StatefulSet", "chat", "team-a", "uid-1")
            .is_none());
        assert!(
            caches
                .owned("ConfigMap", "chat", "team-a", "uid-1")
                .is_none(),
            "not listed yet: the reconcile lists"
        );

        cache.apply(&Event::<ConfigMap>::Init);
        for object in [
            config_map("team-a", "chat", "uid-1"),
            // Another namespace (also one that starts with the same letters), another
            // owner, another cluster's labels.
            config_map("team-b", "chat", "uid-1"),
            config_map("team-ab", "chat", "uid-1"),
            config_map("team-a", "chat", "uid-2"),
            config_map("team-a", "other", "uid-1"),
        ] {
            cache.apply(&Event::InitApply(object));
        }
        cache.apply(&Event::<ConfigMap>::InitDone);

        let owned = caches
            .owned("ConfigMap", "chat", "team-a", "uid-1")
            .expect("ConfigMaps are cached");
        assert_eq!(owned.len(), 1);
        let object = &owned[0];
        assert_eq!(object.name_any(), "chat-config-uid-1");
        assert_eq!(object.metadata.namespace.as_deref(), Some("team-a"));
        let types = object.types.as_ref().expect("apiVersion and kind are kept");
        assert_eq!(
            (types.api_version.as_str(), types.kind.as_str()),
            ("v1", "ConfigMap")
        );

        // Someone else's ConfigMap with the cluster's labels is not its child.
        let mut unowned = config_map("team-a", "chat", "uid-1");
        unowned.metadata.name = Some("lookalike".into());
        unowned.metadata.owner_references = None;
        cache.apply(&Event::Apply(unowned));
        assert_eq!(
            names(caches.owned("ConfigMap", "chat", "team-a", "uid-1")),
            ["chat-config-uid-1"]
        );
    }

    #[test]
    fn changes_deletions_and_a_relist_keep_the_cache_current() {
        let cache = KindCache::default();
        cache.apply(&Event::<ConfigMap>::Init);
        cache.apply(&Event::<ConfigMap>::InitDone);
        assert_eq!(
            names(cache.owned("team-a", "chat", "uid-1")),
            Vec::<String>::new()
        );

        let mut object = config_map("team-a", "chat", "uid-1");
        cache.apply(&Event::Apply(object.clone()));
        object.data = Some(BTreeMap::from([("k".to_string(), "v2".to_string())]));
        cache.apply(&Event::Apply(object.clone()));
        let owned = cache.owned("team-a", "chat", "uid-1").expect("listed");
        assert_eq!(owned.len(), 1);
        assert_eq!(owned[0].data["data"]["k"], "v2", "the latest version");

        cache.apply(&Event::Delete(object.clone()));
        assert_eq!(cache.len(), 0);

        // A relist after a broken watch reports no deletions: what it does not list is
        // gone when it is done, and until then the old objects stay readable.
        let second = config_map("team-a", "chat", "uid-9");
        cache.apply(&Event::Apply(object.clone()));
        cache.apply(&Event::<ConfigMap>::Init);
        cache.apply(&Event::InitApply(second));
        assert_eq!(
            names(cache.owned("team-a", "chat", "uid-1")),
            ["chat-config-uid-1"]
        );
        cache.apply(&Event::<ConfigMap>::InitDone);
        assert_eq!(cache.len(), 1);
        assert_eq!(
            names(cache.owned("team-a", "chat", "uid-1")),
            Vec::<String>::new()
        );
        assert_eq!(
            names(cache.owned("team-a", "chat", "uid-9")),
            ["chat-config-uid-9"]
        );
    }

    fn relay_pod(namespace: &str, name: &str, slot: &str, restarts: i32) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("uid-{name}"),
                "resourceVersion": "7",
                "labels": {
                    labels::INSTANCE_LABEL: "chat",
                    labels::SLOT_LABEL: slot,
                    "controller-revision-hash": "chat-blue-5d8f",
                },
                "annotations": {"big": "x".repeat(2000)},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            },
            "spec": {"containers": [{"name": "relay", "image": "dchat-relay:0.1.0"}]},
            "status": {
                "phase": "Running",
                "containerStatuses": [{
                    "name": "relay",
                    "image": "dchat-relay:0.1.0",
                    "imageID": "sha256:abc",
                    "ready": false,
                    "restartCount": restarts,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
                }],
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_trimmed_pod_keeps_what_rollouts_and_triggers_read() {
        use crate::controller::triggers::{cluster_of_pod, pod_trouble_key};
        let whole = relay_pod("team-a", "chat-blue-0", "blue", 3);
        let mut trimmed = whole.clone();
        trim_pod(&mut trimmed);
        assert_eq!(pod_trouble_key(&trimmed), pod_trouble_key(&whole));
        assert!(pod_trouble_key(&trimmed).is_some());
        assert_eq!(cluster_of_pod(&trimmed), cluster_of_pod(&whole));
        assert_eq!(trimmed.metadata.labels, whole.metadata.labels);
        let status = |pod: &Pod| {
            pod.status
                .as_ref()
                .unwrap()
                .container_statuses
                .as_ref()
                .unwrap()[0]
                .clone()
        };
        assert_eq!(status(&trimmed).last_state, status(&whole).last_state);
        assert_eq!(status(&trimmed).state, status(&whole).state);
        assert!(trimmed.spec.is_none());
        assert!(trimmed.metadata.annotations.is_none());
        assert!(trimmed.metadata.managed_fields.is_none());
        let size = |pod: &Pod| serde_json::to_vec(pod).unwrap().len();
        assert!(
            size(&trimmed) * 4 < size(&whole),
            "{} of {}",
            size(&trimmed),
            size(&whole)
        );
    }

    #[test]
    fn pods_are_read_by_namespace_and_labels() {
        let cache = Arc::new(KindCache::default());
        let mut caches = ChildCaches::default();
        caches.kinds.push(("Pod".into(), cache.clone()));
        let blue = BTreeMap::from([
            (labels::INSTANCE_LABEL.to_string(), "chat".to_string()),
            (labels::SLOT_LABEL.to_string(), "blue".to_string()),
        ]);
        assert!(caches.pods("team-a", &blue).is_none(), "not listed yet");
        cache.apply(&Event::<Pod>::Init);
        for pod in [
            relay_pod("team-a", "chat-blue-0", "blue", 0),
            relay_pod("team-a", "chat-blue-1", "blue", 1),
            relay_pod("team-a", "chat-green-0", "green", 0),
            relay_pod("team-ab", "chat-blue-0", "blue", 0),
        ] {
            let mut pod = pod;
            trim_pod(&mut pod);
            cache.apply(&Event::InitApply(pod));
        }
        cache.apply(&Event::<Pod>::InitDone);
        let mut names: Vec<String> = caches
            .pods("team-a", &blue)
            .expect("listed")
            .iter()
            .map(|p| p.name_any())
            .collect();
        names.sort();
        assert_eq!(names, ["chat-blue-0", "chat-blue-1"]);
        assert_eq!(caches.pods("team-b", &blue).map(|p| p.len()), Some(0));
    }

    #[test]
    fn a_forgotten_cache_reads_as_not_listed() {
        let cache = KindCache::default();
        cache.apply(&Event::<ConfigMap>::Init);
        cache.apply(&Event::InitApply(config_map("team-a", "chat", "uid-1")));
        cache.apply(&Event::<ConfigMap>::InitDone);
        assert_eq!(names(cache.owned("team-a", "chat", "uid-1")).len(), 1);
        cache.forget();
        assert!(cache.owned("team-a", "chat", "uid-1").is_none());
        assert_eq!(cache.len(), 0);
        // A new watch's first list brings it back.
        cache.apply(&Event::<ConfigMap>::Init);
        cache.apply(&Event::<ConfigMap>::InitDone);
        assert_eq!(names(cache.owned("team-a", "chat", "uid-1")).len(), 0);
    }
}

//! Which changes of a child start a reconcile of its cluster.
//!
//! Controllers update the status of the children often (the autoscaler every sync, the
//! disruption controller whenever a relay becomes ready or goes away), and each reconcile
//! costs about a dozen reads. The reconcile reads the status of StatefulSets only, so for
//! the other kinds a change of status alone is not passed on; a change of spec
//! (`generation`), labels, annotations or owners is, and so is every deletion and every
//! object created again under the same name.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Resource;
use serde::de::DeserializeOwned;

/// What of a child's metadata must change for its cluster to be reconciled. With
/// `status_matters`, or for a kind without `generation` (its status and spec cannot be
/// told apart), every change: the resourceVersion.
pub fn change_key(meta: &ObjectMeta, status_matters: bool) -> u64 {
    let mut hasher = DefaultHasher::new();
    match meta.generation {
        Some(generation) if !status_matters => {
            // A child deleted and created again (new uid) starts at the same generation.
            meta.uid.hash(&mut hasher);
            generation.hash(&mut hasher);
            meta.labels.hash(&mut hasher);
            meta.annotations.hash(&mut hasher);
            meta.deletion_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .hash(&mut hasher);
            for owner in meta.owner_references.iter().flatten() {
                owner.uid.hash(&mut hasher);
            }
        }
        _ => meta.resource_version.hash(&mut hasher),
    }
    hasher.finish()
}

/// The children of `api` whose changes need a reconcile (see [`change_key`]): a metadata
/// watch, each object passed on when its key changed since it was last seen, and on
/// deletion.
pub fn child_changes<K>(
    api: Api<PartialObjectMeta<K>>,
    config: watcher::Config,
    status_matters: bool,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let mut seen: HashMap<Identity, u64> = HashMap::new();
    // A relist after a broken watch reports no deletions: the keys it lists replace
    // `seen` when it is done, so children gone meanwhile are forgotten.
    let mut relisted: Option<HashMap<Identity, u64>> = None;
    watcher(api, config).filter_map(move |event| {
        let passed = match event {
            Err(e) => Some(Err(e)),
            Ok(Event::Delete(object)) => {
                seen.remove(&identity(&object.metadata));
                Some(Ok(object))
            }
            Ok(Event::Apply(object)) => {
                let key = change_key(&object.metadata, status_matters);
                let previous = seen.insert(identity(&object.metadata), key);
                (previous != Some(key)).then_some(Ok(object))
            }
            Ok(Event::InitApply(object)) => {
                let id = identity(&object.metadata);
                let key = change_key(&object.metadata, status_matters);
                let previous = seen.get(&id).copied();
                relisted.get_or_insert_with(HashMap::new).insert(id, key);
                (previous != Some(key)).then_some(Ok(object))
            }
            Ok(Event::Init) => {
                relisted = Some(HashMap::new());
                None
            }
            Ok(Event::InitDone) => {
                seen = relisted.take().unwrap_or_default();
                None
            }
        };
        std::future::ready(passed)
    })
}

/// A child's namespace and name.
type Identity = (Option<String>, Option<String>);

fn identity(meta: &ObjectMeta) -> Identity {
    (meta.namespace.clone(), meta.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn meta(generation: Option<i64>, version: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some("relays".into()),
            namespace: Some("apps".into()),
            generation,
            resource_version: Some(version.into()),
            uid: Some("child-1".into()),
            labels: Some([("app".to_string(), "dchat".to_string())].into()),
            owner_references: Some(vec![OwnerReference {
                uid: "u1".into(),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_status_update_of_a_kind_whose_status_is_not_read_is_not_passed_on() {
        // A status write: the resourceVersion moves, the generation does not.
        assert_eq!(
            change_key(&meta(Some(1), "10"), false),
            change_key(&meta(Some(1), "11"), false)
        );
    }

    #[test]
    fn spec_labels_annotations_owners_and_a_new_uid_are_passed_on() {
        let base = meta(Some(1), "10");
        let key = change_key(&base, false);
        assert_ne!(key, change_key(&meta(Some(2), "11"), false), "spec");
        let mut labelled = base.clone();
        labelled
            .labels
            .get_or_insert_with(Default::default)
            .insert("app".into(), "other".into());
        assert_ne!(key, change_key(&labelled, false), "labels");
        let mut annotated = base.clone();
        annotated.annotations = Some([("a".to_string(), "b".to_string())].into());
        assert_ne!(key, change_key(&annotated, false), "annotations");
        let mut orphaned = base.clone();
        orphaned.owner_references = None;
        assert_ne!(key, change_key(&orphaned, false), "owners");
        let mut recreated = base.clone();
        recreated.uid = Some("child-2".into());
        assert_ne!(
            key,
            change_key(&recreated, false),
            "deleted and created again"
        );
    }

    #[test]
    fn every_change_counts_where_status_is_read_or_there_is_no_generation() {
        assert_ne!(
            change_key(&meta(Some(1), "10"), true),
            change_key(&meta(Some(1), "11"), true),
            "a StatefulSet's status"
        );
        assert_ne!(
            change_key(&meta(None, "10"), false),
            change_key(&meta(None, "11"), false),
            "a ConfigMap"
        );
    }
}

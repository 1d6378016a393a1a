//! Which changes start a reconcile: of a DchatCluster, and of a child of one.
//!
//! Each reconcile costs requests (a Secret read, status, Events; during a rollout its
//! Jobs) and CPU, and on a real API server
//! most changes come from the operator itself and from other controllers, not from
//! people. So not every watch event starts one (every event still updates the caches the
//! reconcile reads, [`super::cache`]):
//!
//! - **The DchatCluster.** A change of its spec (`generation`), labels, annotations (the
//!   day-2 and rollout requests), finalizers, a deletion starting, or the cluster created
//!   again under the same name (new uid). Not a change of status alone: only the
//!   operator writes status, with what the reconcile that wrote it already knew; what
//!   must be looked at again later (a rollout step, a backup schedule, a restore) asks
//!   for it with a requeue, and a change of a child starts one below.
//! - **The children.** Controllers update their status often (the autoscaler every sync,
//!   the disruption controller whenever a relay becomes ready or goes away). The reconcile
//!   reads the status of StatefulSets only, so for the other kinds a change of status
//!   alone is not passed on; a change of spec (`generation`, or the spec itself for a kind
//!   without one: HorizontalPodAutoscalers), labels, annotations or owners is, and so is
//!   every deletion and every object created again under the same name.
//!
//! - **Relay Pods** are not children (their StatefulSet owns them), and their readiness
//!   reaches the reconcile through the StatefulSet's status. What does not is a container
//!   that restarted or cannot start while the StatefulSet's counts stay the same, which a
//!   rollout must act on at once: a change of those starts a reconcile of the Pod's
//!   cluster.
//! - **Jobs** the cluster owns (smoke test, handover, restore) and a DchatBackup's Jobs:
//!   a change of their outcome (success, failure, a pod that succeeded), so a rollout or
//!   a backup moves on when its Job finishes, not at its next timer. Not their creation
//!   (the operator's own), and not the Job controller's updates of a running Job's status
//!   (start, pods active and ready, pods counted as they end): the reconcile reads only
//!   the outcome (`rollout::smoke::job_state`, `backups::job_outcome`).
//!
//! - **The operator's own writes** of a child or of a DchatCluster's metadata: their
//!   echoes are not passed on ([`super::own_writes`]); the reconcile that wrote them
//!   knew what it wrote.
//!
//! A burst of changes (the StatefulSet controller's status steps, a person's edits)
//! becomes one reconcile through the controller's debounce (`controller/mod.rs`).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::future::Either;
use futures::{Stream, StreamExt};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{PredicateConfig, WatchStreamExt};
use kube::Resource;
use serde::Serialize;

use super::observe::FAILING_REASONS;
use super::own_writes::OwnWrites;
use crate::api::DchatCluster;
use crate::job_end;
use crate::labels;

/// What of a DchatCluster must change for it to be reconciled (see the module docs): not
/// its status. Always `Some`, as kube's predicate filter wants.
pub fn cluster_change_key(cluster: &DchatCluster) -> Option<u64> {
    let meta = cluster.meta();
    let mut hasher = DefaultHasher::new();
    meta.uid.hash(&mut hasher);
    meta.generation.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    meta.finalizers.hash(&mut hasher);
    deletion_second(meta).hash(&mut hasher);
    Some(hasher.finish())
}

/// The DchatClusters of a watch whose changes need a reconcile ([`cluster_change_key`]),
/// less the echoes of the operator's own writes of their metadata (`own_writes`: the
/// finalizer, consumed annotations). `events` is the watch after the controller's
/// reflector, so its cache (which the reconcile reads) still takes every change, status
/// included.
pub fn cluster_changes<S>(
    events: S,
    own_writes: Arc<OwnWrites>,
) -> impl Stream<Item = Result<DchatCluster, watcher::Error>>
where
    S: Stream<Item = Result<Event<DchatCluster>, watcher::Error>>,
{
    let forget = own_writes.clone();
    events
        .inspect(move |event| {
            if let Ok(Event::Delete(cluster)) = event {
                forget.forget(cluster.meta());
            }
        })
        .applied_objects()
        .predicate_filter(cluster_change_key, PredicateConfig::default())
        .filter(move |changed| {
            let own = own_writes.clone();
            let meta = match changed {
                Ok(cluster) if !own.is_echo(cluster.meta()) => cluster.meta().clone(),
                Ok(_) => return Either::Left(std::future::ready(false)),
                Err(_) => return Either::Left(std::future::ready(true)),
            };
            if !own.writing(&meta) {
                return Either::Left(std::future::ready(true));
            }
            // A write of the cluster is in flight: this may be its echo, read first.
            Either::Right(async move { !own.is_echo_once_answered(&meta).await })
        })
}

/// What of a child must change for its cluster to be reconciled. `spec` is the hash
/// ([`spec_hash`]) of the spec of a kind without `generation` whose watch carries it.
/// With `status_matters`, or for a kind with neither (its status and spec cannot be told
/// apart), every change: the resourceVersion.
pub fn change_key(meta: &ObjectMeta, spec: Option<u64>, status_matters: bool) -> u64 {
    let mut hasher = DefaultHasher::new();
    #[derive(Hash)]
    enum Revision {
        Generation(i64),
        Spec(u64),
    }
    let revision = match (meta.generation, spec) {
        _ if status_matters => None,
        (Some(generation), _) => Some(Revision::Generation(generation)),
        (None, Some(spec)) => Some(Revision::Spec(spec)),
        (None, None) => None,
    };
    match revision {
        Some(revision) => {
            // A child deleted and created again (new uid) starts at the same generation.
            meta.uid.hash(&mut hasher);
            revision.hash(&mut hasher);
            meta.labels.hash(&mut hasher);
            meta.annotations.hash(&mut hasher);
            deletion_second(meta).hash(&mut hasher);
            for owner in meta.owner_references.iter().flatten() {
                owner.uid.hash(&mut hasher);
            }
        }
        None => meta.resource_version.hash(&mut hasher),
    }
    hasher.finish()
}

/// A hash of a spec as it serializes (typed specs serialize the same way every time).
pub fn spec_hash<T: Serialize>(spec: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_vec(spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

fn deletion_second(meta: &ObjectMeta) -> Option<i64> {
    meta.deletion_timestamp.as_ref().map(|t| t.0.as_second())
}

/// The children of a watch (`events`) whose changes need a reconcile (see
/// [`change_key`]): each object passed on when its key changed since it was last seen,
/// unless the change is the echo of the operator's own write (`own_writes`), and on
/// deletion.
pub fn child_changes<K, S>(
    events: S,
    status_matters: bool,
    own_writes: Arc<OwnWrites>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    keyed_changes(
        events,
        move |object: &K| change_key(object.meta(), None, status_matters),
        |_| true,
        Some(own_writes),
    )
}

/// The HorizontalPodAutoscalers of a watch (`events`) whose changes need a reconcile:
/// they have no `generation`, and the autoscaler writes their status on every sync that
/// changes it, so a change of their spec is told apart from one of status by the spec.
/// The echoes of the operator's own writes (`own_writes`) are not passed on.
pub fn autoscaler_changes<S>(
    events: S,
    own_writes: Arc<OwnWrites>,
) -> impl Stream<Item = Result<HorizontalPodAutoscaler, watcher::Error>> + Send
where
    S: Stream<Item = Result<Event<HorizontalPodAutoscaler>, watcher::Error>> + Send + 'static,
{
    keyed_changes(
        events,
        |hpa: &HorizontalPodAutoscaler| {
            change_key(&hpa.metadata, Some(spec_hash(&hpa.spec)), false)
        },
        |_| true,
        Some(own_writes),
    )
}

/// What of an owned Job must change for its owner to be reconciled: what
/// [`change_key`] looks at for any child, and the Job's outcome as the reconciles read it
/// ([`crate::job_end`]) — whether it succeeded, failed, and whether a pod succeeded. Not
/// the Job controller's
/// progress updates of a running Job (`startTime`, `active`, `ready`, terminated pods
/// being counted, a failed pod that will be retried), nor `Complete` after
/// `SuccessCriteriaMet`.
pub fn job_change_key(job: &Job) -> u64 {
    let mut hasher = DefaultHasher::new();
    change_key(&job.metadata, None, false).hash(&mut hasher);
    job_end::true_condition(job, &job_end::SUCCEEDED)
        .is_some()
        .hash(&mut hasher);
    job_end::true_condition(job, &job_end::FAILED)
        .is_some()
        .hash(&mut hasher);
    job_end::pod_succeeded(job).hash(&mut hasher);
    hasher.finish()
}

/// The Jobs of a watch (`events`) whose changes need a reconcile of their owner
/// ([`job_change_key`]). A Job seen for the first time is passed on only when it has
/// already ended ([`job_end::ended`]): the operator creates its Jobs itself, and the reconcile
/// that created one has nothing new to learn from its echo.
pub fn job_changes<S>(events: S) -> impl Stream<Item = Result<Job, watcher::Error>> + Send
where
    S: Stream<Item = Result<Event<Job>, watcher::Error>> + Send + 'static,
{
    keyed_changes(events, job_change_key, job_end::ended, None)
}

/// What of a relay Pod's containers a rollout acts on: restarts, and the waiting reasons
/// that mean it will not come up by itself. `None` for a Pod with neither.
pub fn pod_trouble_key(pod: &Pod) -> Option<u64> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let mut hasher = DefaultHasher::new();
    let mut troubled = false;
    for status in statuses {
        let failing = status
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .filter(|reason| FAILING_REASONS.contains(reason));
        troubled |= status.restart_count > 0 || failing.is_some();
        status.name.hash(&mut hasher);
        status.restart_count.hash(&mut hasher);
        failing.hash(&mut hasher);
    }
    troubled.then(|| {
        pod.metadata.uid.hash(&mut hasher);
        hasher.finish()
    })
}

/// The cluster a relay Pod belongs to, from its `app.kubernetes.io/instance` label.
pub fn cluster_of_pod(pod: &Pod) -> Option<ObjectRef<DchatCluster>> {
    let name = pod.metadata.labels.as_ref()?.get(labels::INSTANCE_LABEL)?;
    let namespace = pod.metadata.namespace.as_deref()?;
    Some(ObjectRef::new(name).within(namespace))
}

/// The relay Pods whose restarts or failures need a reconcile ([`pod_trouble_key`]):
/// each passed on when its key changed since it was last seen, and only while it has
/// trouble; a healthy Pod is never passed on.
pub fn relay_pod_trouble<S>(events: S) -> impl Stream<Item = Result<Pod, watcher::Error>> + Send
where
    S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Send + 'static,
{
    keyed_changes(
        events,
        |pod: &Pod| pod_trouble_key(pod).unwrap_or(0),
        |_| true,
        None,
    )
    .filter(|event| {
        let troubled = match event {
            Ok(pod) => pod_trouble_key(pod).is_some(),
            Err(_) => true,
        };
        std::future::ready(troubled)
    })
}

/// The objects of a watch (`events`), each passed on when its `key` changed since it was
/// last seen, when it is seen for the first time and `first` says so, and on deletion;
/// with `own_writes`, not when the change is the echo of one of the operator's writes.
fn keyed_changes<K, S>(
    events: S,
    key: impl Fn(&K) -> u64 + Send + 'static,
    first: impl Fn(&K) -> bool + Send + 'static,
    own_writes: Option<Arc<OwnWrites>>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send
where
    K: Resource + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let mut seen: HashMap<Identity, u64> = HashMap::new();
    // A relist after a broken watch reports no deletions: the keys it lists replace
    // `seen` when it is done, so children gone meanwhile are forgotten.
    let mut relisted: Option<HashMap<Identity, u64>> = None;
    // Whether a change is passed on: `Some(true)` at once, `Some(false)` once it is
    // known not to be the echo of a write of the operator's whose response is still
    // coming, `None` not at all.
    let passes = {
        let own_writes = own_writes.clone();
        move |previous: Option<u64>, key: u64, object: &K| {
            // Asked of every event, so that the write it answers is forgotten either way.
            let echo = own_writes
                .as_ref()
                .is_some_and(|own| own.is_echo(object.meta()));
            let changed = match previous {
                Some(previous) => previous != key,
                None => first(object),
            };
            let writing = own_writes
                .as_ref()
                .is_some_and(|own| own.writing(object.meta()));
            (changed && !echo).then_some(!writing)
        }
    };
    events.filter_map(move |event| {
        let (object, at_once) = match event {
            Err(e) => return Either::Left(std::future::ready(Some(Err(e)))),
            Ok(Event::Delete(object)) => {
                seen.remove(&identity(object.meta()));
                if let Some(own) = &own_writes {
                    own.forget(object.meta());
                }
                (Some(object), Some(true))
            }
            Ok(Event::Apply(object)) => {
                let key = key(&object);
                let previous = seen.insert(identity(object.meta()), key);
                let passed = passes(previous, key, &object);
                (Some(object), passed)
            }
            Ok(Event::InitApply(object)) => {
                let id = identity(object.meta());
                let key = key(&object);
                let previous = seen.get(&id).copied();
                relisted.get_or_insert_with(HashMap::new).insert(id, key);
                let passed = passes(previous, key, &object);
                (Some(object), passed)
            }
            Ok(Event::Init) => {
                relisted = Some(HashMap::new());
                (None, None)
            }
            Ok(Event::InitDone) => {
                seen = relisted.take().unwrap_or_default();
                (None, None)
            }
        };
        match (object, at_once, &own_writes) {
            (Some(object), Some(false), Some(own)) => {
                // The event came while a write of the object is in flight: it may be
                // that write's echo, read before its response.
                let own = own.clone();
                Either::Right(async move {
                    let echo = own.is_echo_once_answered(object.meta()).await;
                    (!echo).then_some(Ok(object))
                })
            }
            (Some(object), Some(_), _) => Either::Left(std::future::ready(Some(Ok(object)))),
            _ => Either::Left(std::future::ready(None)),
        }
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
            change_key(&meta(Some(1), "10"), None, false),
            change_key(&meta(Some(1), "11"), None, false)
        );
    }

    #[test]
    fn spec_labels_annotations_owners_and_a_new_uid_are_passed_on() {
        let base = meta(Some(1), "10");
        let key = change_key(&base, None, false);
        assert_ne!(key, change_key(&meta(Some(2), "11"), None, false), "spec");
        let mut labelled = base.clone();
        labelled
            .labels
            .get_or_insert_with(Default::default)
            .insert("app".into(), "other".into());
        assert_ne!(key, change_key(&labelled, None, false), "labels");
        let mut annotated = base.clone();
        annotated.annotations = Some([("a".to_string(), "b".to_string())].into());
        assert_ne!(key, change_key(&annotated, None, false), "annotations");
        let mut orphaned = base.clone();
        orphaned.owner_references = None;
        assert_ne!(key, change_key(&orphaned, None, false), "owners");
        let mut recreated = base.clone();
        recreated.uid = Some("child-2".into());
        assert_ne!(
            key,
            change_key(&recreated, None, false),
            "deleted and created again"
        );
    }

    #[test]
    fn every_change_counts_where_status_is_read_or_there_is_no_generation() {
        assert_ne!(
            change_key(&meta(Some(1), "10"), None, true),
            change_key(&meta(Some(1), "11"), None, true),
            "a StatefulSet's status"
        );
        assert_ne!(
            change_key(&meta(None, "10"), None, false),
            change_key(&meta(None, "11"), None, false),
            "a ConfigMap"
        );
    }

    fn job(status: k8s_openapi::api::batch::v1::JobStatus) -> Job {
        Job {
            metadata: meta(Some(1), "10"),
            status: Some(status),
            ..Job::default()
        }
    }

    fn condition(type_: &str, status: &str) -> k8s_openapi::api::batch::v1::JobCondition {
        k8s_openapi::api::batch::v1::JobCondition {
            type_: type_.into(),
            status: status.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_jobs_progress_is_not_passed_on_and_its_outcome_is() {
        use k8s_openapi::api::batch::v1::{JobStatus, UncountedTerminatedPods};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let created = job_change_key(&Job {
            metadata: meta(Some(1), "9"),
            ..Job::default()
        });
        let running = JobStatus {
            start_time: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            active: Some(1),
            ready: Some(0),
            ..JobStatus::default()
        };
        let progress = [
            running.clone(),
            JobStatus {
                ready: Some(1),
                ..running.clone()
            },
            JobStatus {
                active: Some(0),
                uncounted_terminated_pods: Some(UncountedTerminatedPods {
                    succeeded: Some(vec!["pod-1".into()]),
                    ..Default::default()
                }),
                ..running.clone()
            },
            JobStatus {
                failed: Some(1),
                conditions: Some(vec![condition("Complete", "False")]),
                ..running.clone()
            },
        ];
        for status in progress {
            assert_eq!(job_change_key(&job(status.clone())), created, "{status:?}");
        }
        let mut seen = vec![created];
        for status in [
            JobStatus {
                succeeded: Some(1),
                ..running.clone()
            },
            JobStatus {
                succeeded: Some(1),
                conditions: Some(vec![condition("SuccessCriteriaMet", "True")]),
                ..running.clone()
            },
            JobStatus {
                conditions: Some(vec![condition("FailureTarget", "True")]),
                ..running.clone()
            },
        ] {
            let key = job_change_key(&job(status.clone()));
            assert!(!seen.contains(&key), "not told apart: {status:?}");
            seen.push(key);
        }
        // The second condition of an end is the same end.
        let ended = |conditions: Vec<k8s_openapi::api::batch::v1::JobCondition>| {
            job_change_key(&job(JobStatus {
                succeeded: None,
                conditions: Some(conditions),
                ..running.clone()
            }))
        };
        assert_eq!(
            ended(vec![condition("SuccessCriteriaMet", "True")]),
            ended(vec![
                condition("SuccessCriteriaMet", "True"),
                condition("Complete", "True"),
            ]),
        );
        assert_eq!(
            ended(vec![condition("FailureTarget", "True")]),
            ended(vec![
                condition("FailureTarget", "True"),
                condition("Failed", "True"),
            ]),
        );
        let mut deleting = job(running.clone());
        deleting.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_ne!(job_change_key(&deleting), created, "deletion started");
        let mut again = job(running);
        again.metadata.uid = Some("child-2".into());
        assert_ne!(job_change_key(&again), created, "created again");
    }

    #[tokio::test]
    async fn a_jobs_echo_is_not_passed_on_and_its_end_and_deletion_are() {
        use k8s_openapi::api::batch::v1::JobStatus;
        let named = |name: &str, status: JobStatus| {
            let mut job = job(status);
            job.metadata.name = Some(name.into());
            job
        };
        let running = JobStatus {
            active: Some(1),
            ..JobStatus::default()
        };
        let done = JobStatus {
            succeeded: Some(1),
            conditions: Some(vec![condition("SuccessCriteriaMet", "True")]),
            ..JobStatus::default()
        };
        let events = vec![
            // The operator's own create, then the Job controller's progress: nothing.
            Ok(Event::Apply(named("smoke", JobStatus::default()))),
            Ok(Event::Apply(named("smoke", running.clone()))),
            // Its end, then the second condition of the same end: one.
            Ok(Event::Apply(named("smoke", done.clone()))),
            Ok(Event::Apply(named(
                "smoke",
                JobStatus {
                    conditions: Some(vec![
                        condition("SuccessCriteriaMet", "True"),
                        condition("Complete", "True"),
                    ]),
                    ..done.clone()
                },
            ))),
            // A Job first seen when it has already ended (the operator restarted): passed.
            Ok(Event::Apply(named("restore", done))),
            Ok(Event::Delete(named("smoke", running))),
        ];
        let passed: Vec<(String, bool)> = job_changes(futures::stream::iter(events))
            .map(|job| {
                let job = job.expect("no errors");
                (
                    job.metadata.name.clone().unwrap_or_default(),
                    job_end::ended(&job),
                )
            })
            .collect()
            .await;
        assert_eq!(
            passed,
            [
                ("smoke".to_string(), true),
                ("restore".to_string(), true),
                ("smoke".to_string(), false),
            ]
        );
    }

    #[tokio::test]
    async fn the_echo_of_the_operators_own_write_of_a_child_is_not_passed_on() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let config_map = |version: &str, generation: i64| ConfigMap {
            metadata: meta(Some(generation), version),
            ..ConfigMap::default()
        };
        let own = Arc::new(OwnWrites::default());
        // The operator created it (generation 1) and re-applied it (2); someone else
        // edited it (3), then the operator put it back (4), its response recorded only
        // after the echo went by.
        own.record(&config_map("10", 1).metadata);
        own.record(&config_map("11", 2).metadata);
        let events = vec![
            Ok(Event::Apply(config_map("10", 1))),
            Ok(Event::Apply(config_map("11", 2))),
            Ok(Event::Apply(config_map("12", 3))),
            Ok(Event::Apply(config_map("13", 4))),
        ];
        let passed: Vec<_> = child_changes(futures::stream::iter(events), false, own.clone())
            .map(|c| c.expect("no errors").metadata.resource_version)
            .collect()
            .await;
        assert_eq!(passed, [Some("12".into()), Some("13".into())]);
        assert_eq!(own.pending(), 0);
        own.record(&config_map("13", 4).metadata);
        let deleted = futures::stream::iter(vec![Ok(Event::Delete(config_map("14", 4)))]);
        let passed: Vec<_> = child_changes(deleted, false, own.clone()).collect().await;
        assert_eq!(passed.len(), 1, "a deletion is passed on");
        assert_eq!(own.pending(), 0, "forgotten with the deleted object");
    }

    #[tokio::test]
    async fn an_echo_read_before_its_writes_response_is_still_not_passed_on() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let config_map = |version: &str, generation: i64| ConfigMap {
            metadata: meta(Some(generation), version),
            ..ConfigMap::default()
        };
        let own = Arc::new(OwnWrites::default());
        let (events, rx) =
            futures::channel::mpsc::unbounded::<Result<Event<ConfigMap>, watcher::Error>>();
        let passed = tokio::spawn(
            child_changes(rx, false, own.clone())
                .map(|c| c.expect("no errors").metadata.resource_version)
                .collect::<Vec<_>>(),
        );
        let send = |object: ConfigMap| {
            events
                .unbounded_send(Ok(Event::Apply(object)))
                .expect("the stream runs");
        };
        send(config_map("10", 1));
        // The operator's write (11): its echo is read before its response.
        let writing = own.begin("apps", "relays");
        send(config_map("11", 2));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        own.record(&config_map("11", 2).metadata);
        drop(writing);
        // Someone else's change (12) during another write of the operator's, which fails.
        let failing = own.begin("apps", "relays");
        send(config_map("12", 3));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(failing);
        events.close_channel();
        let passed = passed.await.expect("the stream task");
        assert_eq!(passed, [Some("10".into()), Some("12".into())]);
    }

    #[tokio::test]
    async fn the_echo_of_the_operators_own_metadata_write_does_not_reconcile_a_cluster() {
        let own = Arc::new(OwnWrites::default());
        let base = cluster();
        let with = |version: &str, annotation: &str| {
            let mut cluster = base.clone();
            cluster.metadata.resource_version = Some(version.into());
            cluster.metadata.annotations = Some([("a".to_string(), annotation.to_string())].into());
            cluster
        };
        // Created by someone; the operator's write (11); someone else's (12).
        own.record(&with("11", "consumed").metadata);
        let events = vec![
            Ok(Event::Apply(with("10", "asked"))),
            Ok(Event::Apply(with("11", "consumed"))),
            Ok(Event::Apply(with("12", "asked again"))),
        ];
        let passed: Vec<_> = cluster_changes(futures::stream::iter(events), own.clone())
            .map(|c| c.expect("no errors").metadata.resource_version)
            .collect()
            .await;
        assert_eq!(passed, [Some("10".into()), Some("12".into())]);
        assert_eq!(own.pending(), 0);

        own.record(&with("13", "unanswered").metadata);
        let deleted = futures::stream::iter(vec![Ok(Event::Delete(with("14", "x")))]);
        let _: Vec<_> = cluster_changes(deleted, own.clone()).collect().await;
        assert_eq!(own.pending(), 0, "forgotten with the deleted cluster");
    }

    #[test]
    fn a_spec_edit_of_an_autoscaler_is_passed_on_and_its_status_updates_are_not() {
        use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscalerSpec;
        // HorizontalPodAutoscalers have no generation: the spec itself is in the key.
        let spec = HorizontalPodAutoscalerSpec {
            min_replicas: Some(1),
            max_replicas: 3,
            ..HorizontalPodAutoscalerSpec::default()
        };
        let key = change_key(&meta(None, "10"), Some(spec_hash(&spec)), false);
        assert_eq!(
            key,
            change_key(&meta(None, "11"), Some(spec_hash(&spec.clone())), false),
            "a status update"
        );
        let edited = HorizontalPodAutoscalerSpec {
            max_replicas: 5,
            ..spec.clone()
        };
        assert_ne!(
            key,
            change_key(&meta(None, "12"), Some(spec_hash(&edited)), false),
            "a spec edit"
        );
        let mut relabelled = meta(None, "13");
        relabelled.labels = None;
        assert_ne!(
            key,
            change_key(&relabelled, Some(spec_hash(&spec)), false),
            "labels"
        );
    }

    fn cluster() -> DchatCluster {
        let mut cluster = DchatCluster::new(
            "relays",
            serde_json::from_value(serde_json::json!({"version": "1.0.0"})).expect("a spec"),
        );
        cluster.metadata = ObjectMeta {
            namespace: Some("apps".into()),
            uid: Some("cluster-1".into()),
            generation: Some(1),
            resource_version: Some("10".into()),
            finalizers: Some(vec!["dchat.network/cleanup".into()]),
            annotations: Some([("a".to_string(), "b".to_string())].into()),
            ..cluster.metadata
        };
        cluster
    }

    #[test]
    fn the_operators_own_status_write_does_not_reconcile_a_cluster_again() {
        let base = cluster();
        let mut written = base.clone();
        written.metadata.resource_version = Some("11".into());
        written.status = Some(crate::api::DchatClusterStatus {
            phase: crate::api::Phase::Running,
            ready_replicas: 1,
            ..Default::default()
        });
        assert_eq!(cluster_change_key(&base), cluster_change_key(&written));
    }

    #[test]
    fn spec_labels_annotations_finalizers_deletion_and_a_new_uid_reconcile_a_cluster() {
        let base = cluster();
        let key = cluster_change_key(&base);
        let changed = |what: &str, edit: &dyn Fn(&mut DchatCluster)| {
            let mut cluster = base.clone();
            edit(&mut cluster);
            cluster.metadata.resource_version = Some("11".into());
            assert_ne!(key, cluster_change_key(&cluster), "{what}");
        };
        changed("spec", &|c| c.metadata.generation = Some(2));
        changed("labels", &|c| {
            c.metadata.labels = Some([("team".to_string(), "chat".to_string())].into())
        });
        // The day-2 and rollout requests: pause, hibernate, restart, promote, abort.
        for annotation in [
            crate::labels::RECONCILE_ANNOTATION,
            crate::labels::HIBERNATION_ANNOTATION,
            crate::labels::RESTARTED_AT_ANNOTATION,
            crate::rollout::PROMOTE_ANNOTATION,
            crate::rollout::ABORT_ANNOTATION,
        ] {
            changed(annotation, &|c| {
                c.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(annotation.into(), "x".into());
            });
        }
        changed("finalizer removed", &|c| c.metadata.finalizers = None);
        changed("deletion", &|c| {
            c.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("a time"),
                ))
        });
        changed("created again", &|c| {
            c.metadata.uid = Some("cluster-2".into())
        });
    }

    fn relay_pod(restarts: i32, waiting: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "chat-green-0", "namespace": "apps", "uid": "pod-1",
                "labels": {"app.kubernetes.io/instance": "chat"}
            },
            "status": {"containerStatuses": [{
                "name": "relay", "image": "relay:1.1", "imageID": "", "ready": false,
                "restartCount": restarts,
                "state": waiting.map(|reason| serde_json::json!({"waiting": {"reason": reason}}))
                    .unwrap_or_else(|| serde_json::json!({"running": {}}))
            }]}
        }))
        .expect("a pod")
    }

    #[test]
    fn only_restarts_and_failing_containers_of_a_relay_pod_are_trouble() {
        assert_eq!(pod_trouble_key(&relay_pod(0, None)), None, "healthy");
        assert_eq!(
            pod_trouble_key(&relay_pod(0, Some("ContainerCreating"))),
            None,
            "starting"
        );
        let failing = pod_trouble_key(&relay_pod(0, Some("CrashLoopBackOff")));
        let restarted = pod_trouble_key(&relay_pod(1, None));
        let again = pod_trouble_key(&relay_pod(2, Some("CrashLoopBackOff")));
        assert!(failing.is_some() && restarted.is_some() && again.is_some());
        assert_ne!(failing, restarted);
        assert_ne!(restarted, again, "each restart is a change");
        assert_eq!(
            again,
            pod_trouble_key(&relay_pod(2, Some("CrashLoopBackOff")))
        );
        let pod = relay_pod(0, None);
        assert_eq!(
            cluster_of_pod(&pod),
            Some(ObjectRef::new("chat").within("apps"))
        );
        let mut unlabelled = pod;
        unlabelled.metadata.labels = None;
        assert_eq!(cluster_of_pod(&unlabelled), None);
    }
}

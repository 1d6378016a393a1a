//! Effects: the reconcile that observes children, applies the desired ones with
//! server-side apply, deletes the ones no longer desired, and writes status and Events.
//!
//! The decisions are made by pure functions ([`crate::build`], [`status`], [`diff`]);
//! this module only moves data between them and the API server.

pub mod backups;
mod cache;
mod children;
mod clock;
mod day2;
pub mod diff;
pub mod discovery;
mod error;
mod finalizer;
mod observe;
mod own_writes;
mod report;
mod restore;
mod rollout_effects;
mod schedule;
pub mod status;
mod sync;
pub mod triggers;

pub use cache::{ChildCacheSlot, ChildCaches};
pub use children::{HANDOVER_MANAGER, ROLLOUT_MANAGER};
pub use clock::{Clock, ManualClock, SystemClock};
pub use discovery::{Capabilities, OptionalKinds, DISCOVERY_INTERVAL};
pub use error::Error;
pub use own_writes::OwnWrites;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, reflector, ObjectRef};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::api::{DchatBackup, DchatCluster};
use crate::build::managed_kinds;
use crate::events::EventRecorder;
use crate::labels::{self, FINALIZER};
use crate::metrics::Metrics;
use discovery::{discover, keep_discovering, serves_backups};
use finalizer::{add_finalizer, cleanup, remove_finalizer};
use k8s_openapi::api::batch::v1::Job;
use report::report_failure;
use sync::sync;

/// How long in-flight reconciles may finish after the shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How often an unchanged cluster is looked at again; watches trigger everything else.
const RESYNC: Duration = Duration::from_secs(300);

/// How long a cluster's reconcile waits for more changes after one (each further change
/// starts the wait again). The children one reconcile creates, its finalizer, and the
/// StatefulSet controller's first status steps arrive within about a second; without
/// it each started a reconcile of its own.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Reconciles running at once. Each holds its cluster's children (parsed from the caches)
/// and an API connection; unbounded, 1,000 clusters created together made 1,000 of each
/// at once.
const MAX_CONCURRENT_RECONCILES: u16 = 32;

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: EventRecorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Source of the time rollout steps are measured with.
    pub clock: Arc<dyn Clock>,
    /// Which optional kinds the API server serves, as last discovered.
    pub capabilities: Arc<Capabilities>,
    /// What each cluster's Events last announced, so one change is said once.
    pub announced: Announcements,
    /// The running controller's caches of children (none: reconciles list them).
    pub children: ChildCacheSlot,
    /// The operator's writes whose watch events start no reconcile.
    pub own_writes: Arc<OwnWrites>,
}

/// The last value each cluster's Events announced, per topic ("phase", "monitoring").
///
/// A reconcile can start from a cached object that predates the previous reconcile's
/// status write; judged from that object alone, a transition would be announced twice.
/// Only for deduplication: after a restart, a transition is at most announced once more.
#[derive(Debug, Default)]
pub struct Announcements(
    std::sync::Mutex<std::collections::HashMap<(String, &'static str), String>>,
);

impl Announcements {
    /// True, and remembered, when `value` is not what `topic` last announced for `cluster`.
    pub fn first(&self, cluster: &DchatCluster, topic: &'static str, value: &str) -> bool {
        let key = (
            cluster
                .uid()
                .unwrap_or_else(|| status::display_name(cluster)),
            topic,
        );
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if last.get(&key).map(String::as_str) == Some(value) {
            return false;
        }
        last.insert(key, value.to_string());
        true
    }

    /// Forgets a deleted cluster.
    pub fn forget(&self, cluster: &DchatCluster) {
        let uid = cluster
            .uid()
            .unwrap_or_else(|| status::display_name(cluster));
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.retain(|(id, _), _| *id != uid);
    }
}

impl Context {
    /// A context reporting Events as `dchat-operator` from `instance`.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        Self {
            recorder: EventRecorder::new(client.clone(), "dchat-operator", instance),
            client,
            metrics,
            clock: Arc::new(SystemClock),
            capabilities: Arc::default(),
            announced: Announcements::default(),
            children: ChildCacheSlot::default(),
            own_writes: Arc::default(),
        }
    }

    /// The same context with these capabilities (tests fix them instead of discovering).
    pub fn with_capabilities(mut self, capabilities: Arc<Capabilities>) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// The optional kinds the API server serves: the last discovery's answer, or a
    /// discovery now when there has been none.
    pub async fn served_kinds(&self) -> Result<OptionalKinds, Error> {
        if let Some(kinds) = self.capabilities.get() {
            return Ok(kinds);
        }
        let kinds = discover(&self.client).await.map_err(Error::Discovery)?;
        self.capabilities.set(kinds);
        Ok(kinds)
    }

    /// The same context reading the time from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// Reconciles one DchatCluster: the entry point the controller calls.
pub async fn reconcile(cluster: Arc<DchatCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(cluster.name_any()))?;
    let span = info_span!("reconcile", cluster = %cluster.name_any(), namespace = %namespace);
    let _timer = ctx.metrics.reconcile_timer();
    ctx.metrics.reconciles.inc();
    let result = async {
        // Inside kube-runtime's `reconciling object` span, which names what started it.
        debug!("reconcile started");
        let finalizers = cluster.finalizers();
        let ours = finalizers.iter().position(|f| f == FINALIZER);
        match (cluster.meta().deletion_timestamp.is_some(), ours) {
            (true, Some(index)) => {
                let action = cleanup(cluster.clone(), &ctx).await?;
                remove_finalizer(&cluster, &ctx, &namespace, index).await?;
                Ok(action)
            }
            // Being deleted and already cleaned up: nothing to do.
            (true, None) => Ok(Action::await_change()),
            (false, None) => {
                if let Err(e) = add_finalizer(&cluster, &ctx, &namespace).await {
                    return Err(report_failure(&cluster, &ctx, &namespace, e).await);
                }
                sync(cluster, &ctx).await
            }
            (false, Some(_)) => sync(cluster, &ctx).await,
        }
    }
    .instrument(span.clone())
    .await;
    match &result {
        Ok(action) => debug!(parent: &span, ?action, "reconcile finished"),
        Err(e) => ctx.metrics.record_error(e.metric_label()),
    }
    result
}

/// Controller error policy: an invalid spec waits for the next spec change (the watch
/// delivers it); anything else is retried with a delay.
pub fn error_policy(cluster: Arc<DchatCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_invalid_spec() {
        info!(cluster = %cluster.name_any(), %error, "waiting for a spec change");
        Action::await_change()
    } else {
        warn!(cluster = %cluster.name_any(), %error, "reconcile failed; retrying");
        Action::requeue(Duration::from_secs(15))
    }
}

/// Runs the controller until `shutdown` resolves: watches DchatClusters (in `namespace`
/// or everywhere) and the kinds they own, and asks API discovery every
/// `discovery_interval` which optional kinds are served, reconciling every cluster when
/// that changes.
///
/// A watch whose connection breaks mid-stream (the API server restarted, a proxy dropped
/// it) is not resumed by kube-runtime: it yields the same read error forever and the
/// controller goes deaf. Such an error restarts every watch here, with a fresh list.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    instance: Option<String>,
    discovery_interval: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context::new(client.clone(), metrics, instance));
    let (changes_tx, changes_rx) = tokio::sync::watch::channel(0_u64);
    let discovery = tokio::spawn(keep_discovering(
        client.clone(),
        ctx.capabilities.clone(),
        discovery_interval,
        changes_tx,
    ));
    let shutdown = shutdown.shared();
    loop {
        // Every reconcile-all request of discovery after this point.
        let mut rx = changes_rx.clone();
        rx.mark_unchanged();
        let rediscovered = futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            Some(((), rx))
        });
        // Without the DchatBackup CRD (an upgrade whose CRDs were not applied) a
        // controller for it would never start; clusters are reconciled regardless.
        let with_backups = match serves_backups(&client).await {
            Ok(served) => served,
            Err(e) => {
                warn!(error = %e, "could not ask whether DchatBackup is served; assuming it is");
                true
            }
        };
        if !with_backups {
            error!(
                "the DchatBackup CRD is not installed: backups are off until \
                 crds/dchatbackups.dchat.network.yaml is applied and the operator restarted"
            );
        }
        let (controller, caches) = controller(
            &client,
            &namespace,
            with_backups,
            &ctx.capabilities,
            &changes_rx,
            &ctx.own_writes,
        );
        ctx.children.set(Arc::new(caches));
        let clusters = controller
            .reconcile_all_on(rediscovered)
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, ctx.clone())
            .map(|r| r.map(|(o, _)| o.name).map_err(queue_error))
            .boxed();
        let results = if with_backups {
            let backups = backup_controller(&client, &namespace)
                .graceful_shutdown_on(shutdown.clone())
                .run(backups::reconcile, backups::error_policy, ctx.clone())
                .map(|r| r.map(|(o, _)| o.name).map_err(queue_error));
            futures::stream::select(clusters, backups).boxed()
        } else {
            clusters
        };
        // After the shutdown signal, in-flight reconciles get SHUTDOWN_GRACE to finish.
        let deadline = shutdown
            .clone()
            .then(|()| tokio::time::sleep(SHUTDOWN_GRACE));
        let results = results.take_until(deadline);
        futures::pin_mut!(results);
        let mut broken = false;
        while let Some(result) = results.next().await {
            match result {
                Ok(name) => debug!(object = %name, "reconciled"),
                Err(Some(e)) => {
                    warn!(error = %e, "a watch connection broke; restarting the watches");
                    broken = true;
                    break;
                }
                Err(None) => {}
            }
        }
        if !broken {
            break;
        }
        tokio::select! {
            _ = shutdown.clone() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    discovery.abort();
}

/// Picks out of a controller's errors the one that needs the watches restarted (a watch
/// connection that broke mid-stream); logs the others.
fn queue_error<R: std::fmt::Display, Q: std::error::Error + 'static>(
    error: kube::runtime::controller::Error<R, Q>,
) -> Option<String> {
    if let kube::runtime::controller::Error::QueueError(q) = &error {
        let q: &dyn std::error::Error = q;
        if let Some(watcher::Error::WatchFailed(kube::Error::ReadEvents(e))) =
            q.downcast_ref::<watcher::Error>()
        {
            return Some(e.to_string());
        }
    }
    debug!(error = %error, "reconcile did not complete");
    None
}

/// The DchatBackup controller, and the Jobs it owns.
fn backup_controller(client: &Client, namespace: &Option<String>) -> Controller<DchatBackup> {
    let (backups, jobs): (Api<DchatBackup>, Api<Job>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let owned = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/name={}",
        crate::backup::job::BACKUP_APP_NAME
    ));
    // Backups accumulate (a schedule's retention per cluster).
    let (reader, backups) = cached_without_managed_fields(backups);
    Controller::for_stream(backups.applied_objects(), reader)
        .owns_stream(triggers::job_changes(watcher(jobs, owned)))
}

/// A watch of `api` and the cache it fills, the objects kept without their
/// managedFields: the operator never reads them, and they cost about 11 KiB of memory
/// per cached DchatCluster.
fn cached_without_managed_fields<K>(
    api: Api<K>,
) -> (
    reflector::Store<K>,
    impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher(api, watcher::Config::default())
            .modify(|object: &mut K| object.managed_fields_mut().clear()),
    );
    (reader, events)
}

/// The controller: DchatClusters and the kinds they own, in `namespace` or everywhere;
/// and the caches of those children its watches fill, which reconciles read. The
/// optional kinds are watched while `capabilities` says they are served (re-read at
/// each of discovery's `changes`). The echoes of the writes in `own_writes` start no
/// reconcile.
fn controller(
    client: &Client,
    namespace: &Option<String>,
    with_backups: bool,
    capabilities: &Arc<Capabilities>,
    changes: &tokio::sync::watch::Receiver<u64>,
    own_writes: &Arc<OwnWrites>,
) -> (Controller<DchatCluster>, ChildCaches) {
    fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY_LABEL,
        labels::MANAGED_BY
    ));
    let mut caches = ChildCaches::default();
    // Each child kind is watched whole and cached (cache.rs); only some of its changes
    // start a reconcile (triggers.rs). Only StatefulSets are read for their status.
    macro_rules! cached_changes {
        ($kind:ty, $status_matters:expr) => {
            triggers::child_changes(
                caches.watch(api::<$kind>(client, namespace), owned.clone()),
                $status_matters,
                own_writes.clone(),
            )
        };
    }
    // The cache keeps every change of a cluster (the reconcile reads it); only some
    // start a reconcile (triggers.rs).
    let (reader, clusters) = cached_without_managed_fields(api::<DchatCluster>(client, namespace));
    let clusters = triggers::cluster_changes(clusters, own_writes.clone());
    let mut controller = Controller::for_stream(clusters, reader)
        .with_config(
            controller::Config::default()
                .concurrency(MAX_CONCURRENT_RECONCILES)
                .debounce(DEBOUNCE),
        )
        .owns_stream(cached_changes!(StatefulSet, true))
        .owns_stream(cached_changes!(Service, false))
        .owns_stream(cached_changes!(ConfigMap, false))
        .owns_stream(cached_changes!(ServiceAccount, false))
        .owns_stream(triggers::autoscaler_changes(
            caches.watch(
                api::<HorizontalPodAutoscaler>(client, namespace),
                owned.clone(),
            ),
            own_writes.clone(),
        ))
        .owns_stream(cached_changes!(PodDisruptionBudget, false))
        .owns_stream(cached_changes!(NetworkPolicy, false))
        .owns_stream(cached_changes!(Ingress, false))
        // A rollout's smoke test and handover, a restore: when one finishes. A reconcile
        // reads its Jobs by name (get), so they are not cached; the watch carries whole
        // Jobs only for their outcome.
        .owns_stream(triggers::job_changes(watcher(
            api::<Job>(client, namespace),
            owned.clone(),
        )))
        .watches_stream(
            triggers::relay_pod_trouble(caches.watch_pods(
                api::<Pod>(client, namespace),
                watcher::Config::default().labels(&format!(
                    "app.kubernetes.io/name={},app.kubernetes.io/managed-by={}",
                    labels::APP_NAME,
                    labels::MANAGED_BY
                )),
            )),
            |pod| triggers::cluster_of_pod(&pod),
        );
    for kind in managed_kinds()
        .into_iter()
        .filter(|k| k.needs_monitoring_crds)
    {
        let api = match namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &kind.resource),
            None => Api::all_with(client.clone(), &kind.resource),
        };
        let events = caches.watch_while_served(
            api,
            &kind.resource,
            owned.clone(),
            capabilities.clone(),
            changes.clone(),
        );
        controller = controller.owns_stream_with(
            triggers::child_changes(events, false, own_writes.clone()),
            kind.resource,
        );
    }
    if !with_backups {
        return (controller, caches);
    }
    // A backup that starts, completes or fails changes its cluster's status.backup.
    let controller = controller.watches(
        api::<DchatBackup>(client, namespace),
        watcher::Config::default(),
        |backup| {
            let namespace = backup.namespace()?;
            Some(ObjectRef::new(&backup.spec.cluster.name).within(&namespace))
        },
    );
    (controller, caches)
}

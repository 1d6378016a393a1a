//! Effects: the reconcile that observes children, applies the desired ones with
//! server-side apply, deletes the ones no longer desired, and writes status and Events.
//!
//! The decisions are made by pure functions ([`crate::build`], [`status`], [`diff`]);
//! this module only moves data between them and the API server.

mod children;
mod clock;
pub mod diff;
mod error;
mod finalizer;
mod observe;
mod report;
mod rollout_effects;
pub mod status;
mod sync;

pub use children::{HANDOVER_MANAGER, ROLLOUT_MANAGER};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::Error;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::api::DchatCluster;
use crate::labels::{self, FINALIZER};
use crate::metrics::Metrics;
use finalizer::{add_finalizer, cleanup, remove_finalizer};
use sync::sync;

/// How often an unchanged cluster is looked at again; watches trigger everything else.
const RESYNC: Duration = Duration::from_secs(300);

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Source of the time rollout steps are measured with.
    pub clock: Arc<dyn Clock>,
}

impl Context {
    /// A context reporting Events as `dchat-operator` from `instance`.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: "dchat-operator".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            clock: Arc::new(SystemClock),
        }
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
                add_finalizer(&cluster, &ctx, &namespace).await?;
                sync(cluster, &ctx).await
            }
            (false, Some(_)) => sync(cluster, &ctx).await,
        }
    }
    .instrument(span)
    .await;
    if let Err(e) = &result {
        ctx.metrics.record_error(e.metric_label());
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
/// or everywhere) and the kinds they own.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    instance: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
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
        "app.kubernetes.io/managed-by={}",
        labels::MANAGED_BY
    ));
    let ctx = Arc::new(Context::new(client.clone(), metrics, instance));
    Controller::new(
        api::<DchatCluster>(&client, &namespace),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(&client, &namespace), owned.clone())
    .owns(api::<Service>(&client, &namespace), owned.clone())
    .owns(api::<ConfigMap>(&client, &namespace), owned.clone())
    .owns(api::<ServiceAccount>(&client, &namespace), owned.clone())
    .owns(
        api::<HorizontalPodAutoscaler>(&client, &namespace),
        owned.clone(),
    )
    .owns(
        api::<PodDisruptionBudget>(&client, &namespace),
        owned.clone(),
    )
    .owns(api::<NetworkPolicy>(&client, &namespace), owned.clone())
    .owns(api::<Ingress>(&client, &namespace), owned)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => debug!(cluster = %object.name, "reconciled"),
            Err(e) => debug!(error = %e, "reconcile did not complete"),
        }
    })
    .await;
}

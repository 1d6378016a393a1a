//! Effects: the reconcile that observes children, applies the desired ones with
//! server-side apply, deletes the ones no longer desired, and writes status and Events.
//!
//! The decisions are made by pure functions ([`crate::build`], [`status`], [`diff`]);
//! this module only moves data between them and the API server.

pub mod diff;
pub mod status;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::api::{validate, DchatCluster, RolloutStep, Slot};
use crate::build::{
    desired_children, managed_kinds, BuildInputs, Child, ErasedChild, SerializeError,
    SlotDeployment,
};
use crate::labels::{self, FIELD_MANAGER, FINALIZER};
use crate::metrics::Metrics;
use crate::rollout::{
    self, handover, smoke, Decision, JobState, PodHealth, Serving, Settings, SlotState, Target,
    Template, ABORT_ANNOTATION, PROMOTE_ANNOTATION, SECRET_HASH_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
};
use status::{Observation, SlotObservation};

/// Longest wait for Prometheus to answer the rollout's analysis query.
const ANALYSIS_TIMEOUT: Duration = Duration::from_secs(5);

/// Field manager that takes over `spec.replicas` of a StatefulSet for the moment the
/// operator hands the count to a HorizontalPodAutoscaler (see [`hand_replicas_to_hpa`]).
pub const HANDOVER_MANAGER: &str = "dchat-operator-hpa-handover";

/// How often an unchanged cluster is looked at again; watches trigger everything else.
const RESYNC: Duration = Duration::from_secs(300);

/// Field manager of the replica-count patches of a slot whose template the operator
/// leaves alone during a rollout (the old or failed version).
pub const ROLLOUT_MANAGER: &str = "dchat-operator-rollout";

/// Where a reconcile gets the time from: the system clock in the operator, a
/// hand-moved one in tests (rollout timeouts are decided on it).
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock(Mutex<Timestamp>);

impl ManualClock {
    /// A clock standing at `at`.
    pub fn new(at: Timestamp) -> Self {
        Self(Mutex::new(at))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(later) = now.checked_add(by) {
            *now = later;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

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

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec breaks a rule the schema cannot check; waits for a spec change.
    #[error("invalid spec of {cluster}: {message}")]
    InvalidSpec {
        /// namespace/name.
        cluster: String,
        /// Which fields are wrong.
        message: String,
    },
    /// A Kubernetes API call failed.
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Kube {
        /// What the operator was doing ("applying", "listing", ...).
        action: &'static str,
        /// Kind of object.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Object name (empty for lists).
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A child could not be serialized (a bug).
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// The object lacks a namespace (the CRD is namespaced, so this is a bug).
    #[error("DchatCluster {0} has no namespace")]
    NoNamespace(String),
    /// The operating system could not provide randomness for the admin token.
    #[error("generating the relays' admin token: {0}")]
    Random(String),
}

impl Error {
    /// A stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Kube { source, .. } => match source {
                kube::Error::Api(status) if status.code == 409 => "conflict",
                kube::Error::Api(status) if status.code >= 500 => "api_server",
                kube::Error::Api(_) => "api_request",
                _ => "transport",
            },
            Error::Serialize(_) => "serialize",
            Error::NoNamespace(_) => "internal",
            Error::Random(_) => "random",
        }
    }

    /// Whether only a spec change can fix this.
    pub fn is_invalid_spec(&self) -> bool {
        self.metric_label() == "invalid_spec"
    }
}

fn kube_error(
    action: &'static str,
    kind: &str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let (kind, namespace, name) = (kind.to_string(), namespace.to_string(), name.to_string());
    move |source| Error::Kube {
        action,
        kind,
        namespace,
        name,
        source,
    }
}

fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_not_found())
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
                apply(cluster, &ctx).await
            }
            (false, Some(_)) => apply(cluster, &ctx).await,
        }
    }
    .instrument(span)
    .await;
    if let Err(e) = &result {
        ctx.metrics.record_error(e.metric_label());
    }
    result
}

/// Adds the finalizer, guarded by the resourceVersion read, so that a concurrent
/// change fails this reconcile (and is retried) instead of being overwritten.
async fn add_finalizer(
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
        &PatchParams::default(),
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
async fn remove_finalizer(
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
            &PatchParams::default(),
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

/// Live children of a cluster, by kind, as the API server returned them.
struct LiveChildren {
    objects: Vec<(ErasedKind, DynamicObject)>,
    monitoring_available: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ErasedKind {
    group: String,
    kind: String,
}

impl LiveChildren {
    fn get(&self, kind: &str, name: &str) -> Option<&DynamicObject> {
        self.objects
            .iter()
            .find(|(k, o)| k.kind == kind && o.metadata.name.as_deref() == Some(name))
            .map(|(_, o)| o)
    }
}

async fn observe(
    cluster: &DchatCluster,
    client: &Client,
    namespace: &str,
) -> Result<LiveChildren, Error> {
    let uid = cluster.uid();
    let params = ListParams::default().labels(&labels::managed_selector(cluster));
    let mut objects = Vec::new();
    let mut monitoring_available = true;
    for kind in managed_kinds() {
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), namespace, &kind.resource);
        let list = match api.list(&params).await {
            Ok(list) => list,
            // No Prometheus Operator: its kinds are not served.
            Err(e) if kind.needs_monitoring_crds && is_not_found(&e) => {
                monitoring_available = false;
                continue;
            }
            Err(e) => return Err(kube_error("listing", &kind.resource.kind, namespace, "")(e)),
        };
        for object in list.items {
            let owned = object
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| Some(&r.uid) == uid.as_ref());
            if owned {
                objects.push((
                    ErasedKind {
                        group: kind.resource.group.clone(),
                        kind: kind.resource.kind.clone(),
                    },
                    object,
                ));
            }
        }
    }
    Ok(LiveChildren {
        objects,
        monitoring_available,
    })
}

fn slot_observation(live: Option<&DynamicObject>) -> Option<SlotObservation> {
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

fn existing_claims(
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

async fn apply(cluster: Arc<DchatCluster>, ctx: &Context) -> Result<Action, Error> {
    let namespace = cluster
        .namespace()
        .ok_or_else(|| Error::NoNamespace(cluster.name_any()))?;
    let now = ctx.clock.now();
    let previous = cluster.status.clone().unwrap_or_default();
    let active_slot = previous.active_slot;
    let live = observe(&cluster, &ctx.client, &namespace).await?;
    let active_name = labels::statefulset_name(&cluster, active_slot);
    let active_live = live.get("StatefulSet", &active_name);
    let secret_hash = database_secret_hash(&cluster, ctx, &namespace).await?;
    let desired_hash = rollout::combined_hash(&template_hash(&cluster), secret_hash.as_deref());

    let settings = validate(&cluster.spec)
        .map_err(|e| e.to_string())
        .and_then(|()| Settings::from_spec(&cluster.spec).map_err(|e| e.to_string()));
    let settings = match settings {
        Ok(settings) => settings,
        Err(message) => {
            let obs = Observation {
                invalid_spec: Some(message.clone()),
                rollout: previous.rollout.clone(),
                active_is_desired: false,
                ..observation(&cluster, active_slot, active_live, &desired_hash, now)
            };
            write_status(&cluster, ctx, &namespace, obs).await?;
            return Err(Error::InvalidSpec {
                cluster: status::display_name(&cluster),
                message,
            });
        }
    };

    let decision = decide_rollout(
        &cluster,
        ctx,
        &namespace,
        &live,
        &settings,
        &desired_hash,
        now,
    )
    .await?;
    let serving_slot = decision.serving.slot;
    let mut deployments = Vec::new();
    let mut kept = Vec::new();
    for plan in &decision.slots {
        let name = labels::statefulset_name(&cluster, plan.slot);
        let live_sts = live.get("StatefulSet", &name);
        match (plan.template, live_sts) {
            (Template::Keep, Some(_)) => kept.push((name, plan.replicas)),
            // Nothing to keep: an idle slot that never ran stays absent.
            (Template::Keep, None) if plan.slot != serving_slot => {}
            // The serving slot must exist; if someone deleted it, recreate it from the
            // spec rather than serve nothing.
            (Template::Keep, None) | (Template::Desired, _) => deployments.push(SlotDeployment {
                slot: plan.slot,
                replicas: plan.replicas,
                existing_claims: existing_claims(live_sts),
            }),
        }
    }
    let inputs = BuildInputs {
        active_slot: serving_slot,
        slots: deployments,
        monitoring_available: live.monitoring_available,
    };
    if !live.monitoring_available
        && (cluster.spec.monitoring.service_monitor || cluster.spec.monitoring.prometheus_rule)
    {
        debug!(
            "monitoring.coreos.com CRDs not installed; skipping ServiceMonitor and PrometheusRule"
        );
    }
    let mut desired = desired_children(&cluster, &inputs);
    for child in &mut desired {
        match child {
            // Records which template a slot was given, so a rollout can tell the new
            // template from an old one that happens to be ready.
            Child::StatefulSet(sts) => {
                sts.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(TEMPLATE_HASH_ANNOTATION.to_string(), desired_hash.clone());
                // New database credentials are a new pod template.
                if let (Some(hash), Some(spec)) = (&secret_hash, sts.spec.as_mut()) {
                    spec.template
                        .metadata
                        .get_or_insert_with(Default::default)
                        .annotations
                        .get_or_insert_with(Default::default)
                        .insert(SECRET_HASH_ANNOTATION.to_string(), hash.clone());
                }
            }
            // Scale is held steady while a rollout compares and switches slots.
            Child::HorizontalPodAutoscaler(hpa) => {
                if let (Some(pin), Some(spec)) = (decision.hpa_pin, hpa.spec.as_mut()) {
                    spec.min_replicas = Some(pin);
                    spec.max_replicas = pin;
                }
            }
            _ => {}
        }
    }
    let mut outcome = ensure_admin_token(&cluster, ctx, &namespace).await;
    if outcome.is_ok() {
        outcome = apply_children(&cluster, ctx, &namespace, &desired, &kept, &live).await;
    }
    if outcome.is_ok() {
        if let Some(request) = &decision.smoke {
            info!(job = %request.job_name, slot = %request.slot, "creating smoke test Job");
            let job = smoke::smoke_job(&cluster, request);
            outcome = ensure_job(ctx, &namespace, &request.job_name, &job).await;
        }
    }
    if outcome.is_ok() {
        if let Some(request) = &decision.handover {
            info!(job = %request.job_name, from = %request.from, to = %request.to, "creating handover Job");
            let job = handover::handover_job(&cluster, request);
            outcome = ensure_job(ctx, &namespace, &request.job_name, &job).await;
        }
    }
    for note in &decision.notes {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(ctx, &cluster, type_, note.reason, note.message.clone()).await;
    }
    let reconcile_error = outcome.as_ref().err().map(ToString::to_string);
    let serving_live = live.get(
        "StatefulSet",
        &labels::statefulset_name(&cluster, serving_slot),
    );
    let obs = Observation {
        reconcile_error,
        rollout: decision.rollout.clone(),
        active_is_desired: decision.active_is_desired,
        serving_version: decision.serving.version.clone(),
        serving_hash: decision.serving.hash.clone(),
        ..observation(&cluster, serving_slot, serving_live, &desired_hash, now)
    };
    write_status(&cluster, ctx, &namespace, obs).await?;
    outcome?;
    consume_annotations(&cluster, ctx, &namespace, &decision).await?;
    Ok(Action::requeue(decision.requeue.unwrap_or(RESYNC)))
}

/// Hash of the database Secret the relays read, or `None` without a database or while
/// the Secret does not exist (the relays cannot start then anyway; its creation is then
/// a template change like any other).
async fn database_secret_hash(
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

/// Observes what the rollout state machine needs and lets it decide.
async fn decide_rollout(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    live: &LiveChildren,
    settings: &Settings,
    desired_hash: &str,
    now: Timestamp,
) -> Result<Decision, Error> {
    let previous = cluster.status.clone().unwrap_or_default();
    let serving = Serving {
        slot: previous.active_slot,
        version: previous.active_version.clone(),
        hash: previous.active_template_hash.clone(),
    };
    let desired = Target {
        version: cluster.spec.version.clone(),
        hash: desired_hash.to_string(),
    };
    let slot_live = |slot| live.get("StatefulSet", &labels::statefulset_name(cluster, slot));
    let in_flight = previous.rollout.as_ref().filter(|r| r.step.in_flight());
    // Pods and the smoke Job are read only while a rollout needs them, so a settled
    // cluster costs no extra requests.
    let mut pods = PodHealth::default();
    let mut smoke_state = JobState::Absent;
    let mut handover_state = JobState::Absent;
    if let Some(r) = previous.rollout.as_ref().filter(|r| {
        settings.handover
            && (matches!(
                r.step,
                RolloutStep::ScalingDown | RolloutStep::HandoverFailed
            ) || (matches!(r.step, RolloutStep::RolledBack | RolloutStep::Aborted)
                && r.rolled_back_from.is_some()
                && r.handback.is_none()))
    }) {
        let name = rollout::handover_job_name(&cluster.name_any(), r);
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
        let job = jobs
            .get_opt(&name)
            .await
            .map_err(kube_error("reading", "Job", namespace, &name))?;
        handover_state = smoke::job_state(job.as_ref());
    }
    let mut analysis = None;
    if let (Some(r), Some(check)) = (in_flight, settings.analysis.as_ref()) {
        if r.step == RolloutStep::Promoted {
            let query = crate::analysis::render_query(
                &check.query,
                namespace,
                &cluster.name_any(),
                r.slot.as_str(),
                &r.target_version,
            );
            let reading =
                crate::analysis::instant_query(&check.prometheus_url, &query, ANALYSIS_TIMEOUT)
                    .await;
            match &reading {
                crate::analysis::Reading::Value(value) => {
                    debug!(value, fail_above = check.fail_above, "analysis query")
                }
                crate::analysis::Reading::Inconclusive(why) => {
                    warn!(why = %why, "analysis query inconclusive")
                }
            }
            analysis = Some(reading);
        }
    }
    if let Some(r) = in_flight {
        if r.step != RolloutStep::ScalingDown {
            pods = observe_pods(
                cluster,
                ctx,
                namespace,
                r.slot,
                slot_live(r.slot),
                &r.target_template_hash,
            )
            .await?;
        }
        if r.step == RolloutStep::Validating && settings.smoke_test {
            let name = rollout::smoke_job_name(&cluster.name_any(), r);
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
            let job = jobs
                .get_opt(&name)
                .await
                .map_err(kube_error("reading", "Job", namespace, &name))?;
            smoke_state = smoke::job_state(job.as_ref());
        }
    }
    let annotations = cluster.annotations();
    let cluster_name = cluster.name_any();
    let input = rollout::Input {
        cluster_name: &cluster_name,
        settings,
        desired: &desired,
        serving: &serving,
        rollout: previous.rollout.as_ref(),
        blue: slot_state(slot_live(Slot::Blue)),
        green: slot_state(slot_live(Slot::Green)),
        pods,
        smoke: smoke_state,
        handover: handover_state,
        analysis,
        promote: annotations.contains_key(PROMOTE_ANNOTATION),
        abort: annotations.contains_key(ABORT_ANNOTATION),
        now,
    };
    Ok(rollout::decide(&input))
}

fn typed_statefulset(live: Option<&DynamicObject>) -> Option<StatefulSet> {
    serde_json::from_value(serde_json::to_value(live?).ok()?).ok()
}

/// What the rollout needs to know of a slot's StatefulSet.
fn slot_state(live: Option<&DynamicObject>) -> Option<SlotState> {
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
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "RunContainerError",
];

/// Restarts and crash loops of the pods running the rollout's target template in
/// `slot`. Pods of an older revision of the StatefulSet (being replaced) do not count.
async fn observe_pods(
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
    let selector = labels::slot_selector(cluster, slot)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let pods = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_error("listing", "Pod", namespace, ""))?;
    for pod in pods.items {
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
fn last_exit(cs: &k8s_openapi::api::core::v1::ContainerStatus) -> String {
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

/// Creates a rollout Job unless it exists. Jobs are created once and never updated:
/// a Job's pod template is immutable, and each attempt has its own name.
async fn ensure_job(ctx: &Context, namespace: &str, name: &str, job: &Job) -> Result<(), Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = jobs
        .get_opt(name)
        .await
        .map_err(kube_error("reading", "Job", namespace, name))?;
    if existing.is_some() {
        return Ok(());
    }
    match jobs.create(&PostParams::default(), job).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(kube_error("creating", "Job", namespace, name)(e)),
    }
}

/// Creates the admin token Secret of an embedded-store cluster unless it exists. The
/// token is random and never rewritten (the relays read it at start); the Secret is
/// owned by the DchatCluster, so it goes with it.
async fn ensure_admin_token(
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

/// Removes the promote/abort annotations the rollout handled (or found stale), after
/// status recorded what they did, so a lost write only repeats a no-op.
async fn consume_annotations(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    decision: &Decision,
) -> Result<(), Error> {
    let annotations = cluster.annotations();
    let mut remove = serde_json::Map::new();
    if decision.consume_promote && annotations.contains_key(PROMOTE_ANNOTATION) {
        remove.insert(PROMOTE_ANNOTATION.into(), serde_json::Value::Null);
    }
    if decision.consume_abort && annotations.contains_key(ABORT_ANNOTATION) {
        remove.insert(ABORT_ANNOTATION.into(), serde_json::Value::Null);
    }
    if remove.is_empty() {
        return Ok(());
    }
    let api: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = json!({"metadata": {"annotations": remove}});
    api.patch(
        &cluster.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(kube_error(
        "removing rollout annotations of",
        "DchatCluster",
        namespace,
        &cluster.name_any(),
    ))?;
    Ok(())
}

fn observation(
    cluster: &DchatCluster,
    active_slot: Slot,
    active_live: Option<&DynamicObject>,
    template_hash: &str,
    now: Timestamp,
) -> Observation {
    let selector = labels::slot_selector(cluster, active_slot)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    Observation {
        invalid_spec: None,
        reconcile_error: None,
        active_slot,
        active: slot_observation(active_live),
        template_hash: template_hash.to_string(),
        selector,
        now,
        rollout: cluster.status.as_ref().and_then(|s| s.rollout.clone()),
        active_is_desired: true,
        serving_version: None,
        serving_hash: None,
    }
}

/// Hash of the relay pod template the spec asks for, recorded in status when it serves.
/// Computed for the blue slot whatever slot serves: the slot only changes labels and
/// peer DNS names, and a hash that moved with the slot would look like a new template
/// after every switch.
fn template_hash(cluster: &DchatCluster) -> String {
    use sha2::{Digest, Sha256};
    // Only the StatefulSet (and the config hash its template carries) is needed, not
    // every child.
    let config_hash = crate::build::config_hash(&crate::build::configmap(cluster));
    let deployment = SlotDeployment {
        slot: Slot::Blue,
        replicas: None,
        existing_claims: None,
    };
    let template = crate::build::statefulset(cluster, &deployment, &config_hash)
        .spec
        .map(|s| s.template);
    let bytes = serde_json::to_vec(&template).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..8])
}

async fn apply_children(
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
            Err(e) if is_not_found(&e) => {}
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
async fn scale_statefulset(
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
    api.patch(
        name,
        &params,
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .map_err(kube_error("scaling", "StatefulSet", namespace, name))?;
    Ok(())
}

async fn server_side_apply(
    ctx: &Context,
    namespace: &str,
    child: &ErasedChild,
) -> Result<(), Error> {
    debug!(kind = %child.resource.kind, name = %child.name, "applying");
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &child.resource);
    // Forced: the DchatCluster is the declared source of truth for its children, so a
    // field another manager changed (a kubectl edit, a deleted HPA's replica count that
    // the operator takes back) is set back to the declared value instead of failing
    // the reconcile with a conflict forever.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&child.name, &params, &Patch::Apply(&child.body))
        .await
        .map_err(kube_error(
            "applying",
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
async fn hand_replicas_to_hpa(
    ctx: &Context,
    namespace: &str,
    child: &ErasedChild,
    live: &serde_json::Value,
) -> Result<(), Error> {
    let current = live.pointer("/spec/replicas").cloned().unwrap_or(json!(1));
    info!(name = %child.name, replicas = %current, "handing replica count to the HorizontalPodAutoscaler");
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &child.resource);
    let body = json!({
        "apiVersion": child.resource.api_version,
        "kind": child.resource.kind,
        "metadata": {"name": child.name},
        "spec": {"replicas": current},
    });
    api.patch(
        &child.name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_error(
        "handing over replicas of",
        &child.resource.kind,
        namespace,
        &child.name,
    ))?;
    Ok(())
}

async fn write_status(
    cluster: &DchatCluster,
    ctx: &Context,
    namespace: &str,
    obs: Observation,
) -> Result<(), Error> {
    let next = status::compute(cluster, &obs);
    ctx.metrics
        .set_phase(&status::display_name(cluster), next.phase);
    if cluster.status.as_ref() == Some(&next) {
        return Ok(());
    }
    if let Some(phase) = status::phase_transition(cluster, &next) {
        let (type_, note) = match &obs {
            Observation {
                invalid_spec: Some(m),
                ..
            } => (EventType::Warning, m.clone()),
            Observation {
                reconcile_error: Some(m),
                ..
            } => (EventType::Warning, m.clone()),
            _ => (
                EventType::Normal,
                next.conditions
                    .iter()
                    .find(|c| c.type_ == status::PROGRESSING)
                    .map(|c| c.message.clone())
                    .unwrap_or_default(),
            ),
        };
        publish(ctx, cluster, type_, phase.as_str(), note).await;
    }
    let api: Api<DchatCluster> = Api::namespaced(ctx.client.clone(), namespace);
    let body = json!({
        "apiVersion": DchatCluster::api_version(&()),
        "kind": DchatCluster::kind(&()),
        "status": next,
    });
    api.patch_status(
        &cluster.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_error(
        "updating status of",
        "DchatCluster",
        namespace,
        &cluster.name_any(),
    ))?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    cluster: &DchatCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    // An Event is best effort: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

async fn cleanup(cluster: Arc<DchatCluster>, ctx: &Context) -> Result<Action, Error> {
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
    Ok(Action::await_change())
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

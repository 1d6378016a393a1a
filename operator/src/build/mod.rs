//! Desired state: pure functions from a `DchatCluster` (and what the controller observed)
//! to the objects the operator applies. No I/O; one file per kind.

pub(crate) mod configmap;
mod hpa;
mod ingress;
pub mod monitoring;
mod network_policy;
mod pdb;
mod service;
mod service_account;
pub(crate) mod statefulset;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::{ApiResource, DynamicObject};
use kube::Resource;

use serde::Serialize;

pub use configmap::{config_hash, configmap};
pub use hpa::horizontal_pod_autoscaler;
pub use ingress::ingress;
pub use monitoring::{prometheus_rule, service_monitor, PrometheusRule, ServiceMonitor};
pub use network_policy::network_policy;
pub use pdb::pod_disruption_budget;
pub use service::{client_service, headless_service, preview_service};
pub use service_account::service_account;
pub use statefulset::{statefulset, CONTAINER_NAME};

use crate::api::{DchatCluster, Slot};

/// One relay StatefulSet the plan wants, and at what size.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotDeployment {
    /// Which slot.
    pub slot: Slot,
    /// Replicas to set, or `None` when the HorizontalPodAutoscaler owns the count.
    pub replicas: Option<i32>,
    /// Claim templates of the live StatefulSet, which Kubernetes does not let change;
    /// `None` when the StatefulSet does not exist yet.
    pub existing_claims: Option<Vec<PersistentVolumeClaim>>,
}

/// What the controller decided and observed, as input to the builders.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildInputs {
    /// Slot the client Service selects.
    pub active_slot: Slot,
    /// Relay StatefulSets to run.
    pub slots: Vec<SlotDeployment>,
    /// The optional kinds the cluster serves; objects of others are not built.
    pub served: OptionalKinds,
    /// Clients may reach the relays: false while a new cluster restores its backup, so no
    /// client Service or Ingress exists until the data is in.
    pub clients_admitted: bool,
}

impl BuildInputs {
    /// Inputs for a cluster whose relays run in `active_slot` only: the steady state,
    /// and what `dchat-operator render` shows.
    pub fn steady(cluster: &DchatCluster, active_slot: Slot, served: OptionalKinds) -> Self {
        Self {
            active_slot,
            slots: vec![SlotDeployment {
                slot: active_slot,
                replicas: fixed_replicas(cluster),
                existing_claims: None,
            }],
            served,
            clients_admitted: true,
        }
    }
}

/// The replica count the operator sets on the serving StatefulSet: `spec.replicas`, or
/// none when autoscaling is on, because the HPA then owns it.
pub fn fixed_replicas(cluster: &DchatCluster) -> Option<i32> {
    if cluster.spec.autoscaling.enabled {
        None
    } else {
        Some(cluster.spec.replicas)
    }
}

/// The size a StatefulSet whose count the HorizontalPodAutoscaler owns is created with:
/// `spec.replicas` within `autoscaling.minReplicas`..`maxReplicas`. The HPA sizes it from
/// its first sync on.
pub fn starting_replicas(cluster: &DchatCluster) -> i32 {
    let bounds = &cluster.spec.autoscaling;
    let max = bounds.max_replicas.max(1);
    cluster
        .spec
        .replicas
        .clamp(bounds.min_replicas.clamp(1, max), max)
}

/// A desired child object, typed, so tests can inspect fields.
#[derive(Clone, Debug, PartialEq)]
pub enum Child {
    /// Relay StatefulSet of one slot.
    StatefulSet(Box<StatefulSet>),
    /// A Service.
    Service(Box<Service>),
    /// The relay ConfigMap.
    ConfigMap(Box<ConfigMap>),
    /// The relays' ServiceAccount.
    ServiceAccount(Box<ServiceAccount>),
    /// The autoscaler.
    HorizontalPodAutoscaler(Box<HorizontalPodAutoscaler>),
    /// The disruption budget.
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    /// The network policy.
    NetworkPolicy(Box<NetworkPolicy>),
    /// The Ingress.
    Ingress(Box<Ingress>),
    /// The ServiceMonitor.
    ServiceMonitor(Box<ServiceMonitor>),
    /// The PrometheusRule.
    PrometheusRule(Box<PrometheusRule>),
}

/// A kind of child the operator manages: how to reach it through the API and whether
/// it needs the Prometheus Operator.
#[derive(Clone, Debug)]
pub struct ManagedKind {
    /// Group, version, kind and plural.
    pub resource: ApiResource,
    /// Exists only when the Prometheus Operator CRDs are installed.
    pub needs_monitoring_crds: bool,
}

/// Every kind of child, in apply order: config and identity before the workloads that
/// use them, Services before what points at them.
pub fn managed_kinds() -> Vec<ManagedKind> {
    fn kind<K: Resource<DynamicType = ()>>(needs_monitoring_crds: bool) -> ManagedKind {
        ManagedKind {
            resource: ApiResource::erase::<K>(&()),
            needs_monitoring_crds,
        }
    }
    vec![
        kind::<ConfigMap>(false),
        kind::<ServiceAccount>(false),
        kind::<Service>(false),
        kind::<StatefulSet>(false),
        kind::<HorizontalPodAutoscaler>(false),
        kind::<PodDisruptionBudget>(false),
        kind::<NetworkPolicy>(false),
        kind::<Ingress>(false),
        kind::<ServiceMonitor>(true),
        kind::<PrometheusRule>(true),
    ]
}

/// A child rendered for a generic apply: its kind, name and JSON body.
#[derive(Clone, Debug)]
pub struct ErasedChild {
    /// Group, version, kind and plural.
    pub resource: ApiResource,
    /// Object name.
    pub name: String,
    /// Full object as JSON, with apiVersion and kind.
    pub body: serde_json::Value,
}

/// The optional kinds an API server serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionalKinds {
    /// `monitoring.coreos.com/v1` ServiceMonitor.
    pub service_monitor: bool,
    /// `monitoring.coreos.com/v1` PrometheusRule.
    pub prometheus_rule: bool,
}

impl OptionalKinds {
    /// Every optional kind is served.
    pub const ALL: Self = Self {
        service_monitor: true,
        prometheus_rule: true,
    };
    /// None is served.
    pub const NONE: Self = Self {
        service_monitor: false,
        prometheus_rule: false,
    };

    /// Whether the kind named `kind` is served; kinds that are not optional always are.
    pub fn serves(&self, kind: &str) -> bool {
        match kind {
            "ServiceMonitor" => self.service_monitor,
            "PrometheusRule" => self.prometheus_rule,
            _ => true,
        }
    }

    /// The same, with `kind` no longer served.
    pub fn without(mut self, kind: &str) -> Self {
        match kind {
            "ServiceMonitor" => self.service_monitor = false,
            "PrometheusRule" => self.prometheus_rule = false,
            _ => {}
        }
        self
    }

    /// Reads the kinds out of the resource list of `monitoring.coreos.com/v1`.
    pub fn from_monitoring_resources<'a>(plurals: impl IntoIterator<Item = &'a str>) -> Self {
        let mut kinds = Self::NONE;
        for plural in plurals {
            if plural == ServiceMonitor::plural(&()) {
                kinds.service_monitor = true;
            } else if plural == PrometheusRule::plural(&()) {
                kinds.prometheus_rule = true;
            }
        }
        kinds
    }
}

/// A child object could not be serialized (a bug, reported rather than panicking).
#[derive(Debug, thiserror::Error)]
#[error("serializing {kind} {name}: {source}")]
pub struct SerializeError {
    kind: String,
    name: String,
    #[source]
    source: serde_json::Error,
}

impl SerializeError {
    /// A serialization failure of `kind` `name`.
    pub fn new(kind: &str, name: &str, source: serde_json::Error) -> Self {
        Self {
            kind: kind.to_string(),
            name: name.to_string(),
            source,
        }
    }
}

impl Child {
    /// Kind name, e.g. "StatefulSet".
    pub fn kind(&self) -> &'static str {
        match self {
            Child::StatefulSet(_) => "StatefulSet",
            Child::Service(_) => "Service",
            Child::ConfigMap(_) => "ConfigMap",
            Child::ServiceAccount(_) => "ServiceAccount",
            Child::HorizontalPodAutoscaler(_) => "HorizontalPodAutoscaler",
            Child::PodDisruptionBudget(_) => "PodDisruptionBudget",
            Child::NetworkPolicy(_) => "NetworkPolicy",
            Child::Ingress(_) => "Ingress",
            Child::ServiceMonitor(_) => "ServiceMonitor",
            Child::PrometheusRule(_) => "PrometheusRule",
        }
    }

    /// Object name.
    pub fn name(&self) -> String {
        let meta = match self {
            Child::StatefulSet(o) => o.meta(),
            Child::Service(o) => o.meta(),
            Child::ConfigMap(o) => o.meta(),
            Child::ServiceAccount(o) => o.meta(),
            Child::HorizontalPodAutoscaler(o) => o.meta(),
            Child::PodDisruptionBudget(o) => o.meta(),
            Child::NetworkPolicy(o) => o.meta(),
            Child::Ingress(o) => o.meta(),
            Child::ServiceMonitor(o) => o.meta(),
            Child::PrometheusRule(o) => o.meta(),
        };
        meta.name.clone().unwrap_or_default()
    }

    /// Erases the type for the generic apply path.
    pub fn erase(&self) -> Result<ErasedChild, SerializeError> {
        fn erase<K: Resource<DynamicType = ()> + Serialize>(
            obj: &K,
        ) -> Result<ErasedChild, SerializeError> {
            let resource = ApiResource::erase::<K>(&());
            let name = obj.meta().name.clone().unwrap_or_default();
            let mut body = serde_json::to_value(obj).map_err(|source| SerializeError {
                kind: resource.kind.clone(),
                name: name.clone(),
                source,
            })?;
            if let Some(map) = body.as_object_mut() {
                map.insert("apiVersion".into(), resource.api_version.clone().into());
                map.insert("kind".into(), resource.kind.clone().into());
            }
            Ok(ErasedChild {
                resource,
                name,
                body,
            })
        }
        match self {
            Child::StatefulSet(o) => erase(o.as_ref()),
            Child::Service(o) => erase(o.as_ref()),
            Child::ConfigMap(o) => erase(o.as_ref()),
            Child::ServiceAccount(o) => erase(o.as_ref()),
            Child::HorizontalPodAutoscaler(o) => erase(o.as_ref()),
            Child::PodDisruptionBudget(o) => erase(o.as_ref()),
            Child::NetworkPolicy(o) => erase(o.as_ref()),
            Child::Ingress(o) => erase(o.as_ref()),
            Child::ServiceMonitor(o) => erase(o.as_ref()),
            Child::PrometheusRule(o) => erase(o.as_ref()),
        }
    }
}

/// Every object the cluster should have, in apply order.
pub fn desired_children(cluster: &DchatCluster, inputs: &BuildInputs) -> Vec<Child> {
    let config = configmap(cluster);
    let hash = config_hash(&config);
    let mut children = vec![
        Child::ConfigMap(Box::new(config)),
        Child::ServiceAccount(Box::new(service_account(cluster))),
    ];
    for slot in Slot::ALL {
        children.push(Child::Service(Box::new(headless_service(cluster, slot))));
    }
    if inputs.clients_admitted {
        children.push(Child::Service(Box::new(client_service(
            cluster,
            inputs.active_slot,
        ))));
    }
    children.push(Child::Service(Box::new(preview_service(
        cluster,
        inputs.active_slot.other(),
    ))));
    for deployment in &inputs.slots {
        children.push(Child::StatefulSet(Box::new(statefulset(
            cluster, deployment, &hash,
        ))));
    }
    if let Some(hpa) = horizontal_pod_autoscaler(cluster, inputs.active_slot) {
        children.push(Child::HorizontalPodAutoscaler(Box::new(hpa)));
    }
    if let Some(pdb) = pod_disruption_budget(cluster) {
        children.push(Child::PodDisruptionBudget(Box::new(pdb)));
    }
    if let Some(policy) = network_policy(cluster) {
        children.push(Child::NetworkPolicy(Box::new(policy)));
    }
    if let Some(ingress) = ingress(cluster).filter(|_| inputs.clients_admitted) {
        children.push(Child::Ingress(Box::new(ingress)));
    }
    if inputs.served.service_monitor {
        if let Some(monitor) = service_monitor(cluster) {
            children.push(Child::ServiceMonitor(Box::new(monitor)));
        }
    }
    if inputs.served.prometheus_rule {
        if let Some(rule) = prometheus_rule(cluster) {
            children.push(Child::PrometheusRule(Box::new(rule)));
        }
    }
    children
}

/// Converts a typed object into a `DynamicObject` (used by tests and the renderer).
pub fn to_dynamic(child: &ErasedChild) -> Result<DynamicObject, serde_json::Error> {
    serde_json::from_value(child.body.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_autoscaled_statefulset_starts_at_spec_replicas_within_the_bounds() {
        let cluster = |replicas: i32, min: i32, max: i32| {
            let mut c = DchatCluster::new("c", Default::default());
            c.spec.replicas = replicas;
            c.spec.autoscaling.min_replicas = min;
            c.spec.autoscaling.max_replicas = max;
            c
        };
        assert_eq!(starting_replicas(&cluster(5, 3, 10)), 5);
        assert_eq!(starting_replicas(&cluster(1, 3, 10)), 3);
        assert_eq!(starting_replicas(&cluster(12, 3, 10)), 10);
        // Bounds the schema refuses still give a count the API server takes.
        assert_eq!(starting_replicas(&cluster(5, 8, 4)), 4);
        assert_eq!(starting_replicas(&cluster(5, 0, 0)), 1);
    }

    #[test]
    fn kinds_are_read_from_the_resource_list() {
        assert_eq!(
            OptionalKinds::from_monitoring_resources([
                "servicemonitors",
                "servicemonitors/status",
                "prometheusrules",
                "podmonitors"
            ]),
            OptionalKinds::ALL
        );
        assert_eq!(
            OptionalKinds::from_monitoring_resources(["prometheusrules"]),
            OptionalKinds {
                service_monitor: false,
                prometheus_rule: true
            }
        );
        assert_eq!(
            OptionalKinds::from_monitoring_resources([]),
            OptionalKinds::NONE
        );
    }

    #[test]
    fn only_optional_kinds_can_be_unserved() {
        let none = OptionalKinds::NONE;
        assert!(none.serves("StatefulSet"));
        assert!(!none.serves("ServiceMonitor"));
        assert!(!OptionalKinds::ALL
            .without("PrometheusRule")
            .serves("PrometheusRule"));
        assert!(OptionalKinds::ALL
            .without("PrometheusRule")
            .serves("ServiceMonitor"));
    }
}

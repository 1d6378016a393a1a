//! Names, labels, selectors and owner references of every object the operator creates.
//!
//! Nothing else in the crate formats an object name or a label, so the slot model and the
//! cleanup selector cannot drift apart.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::api::{DchatCluster, Slot};

/// Field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "dchat-operator";
/// Field manager of the restore drill's result on a DchatBackup's status (apart from the
/// backup controller's own status fields, so neither removes the other's).
pub const FIELD_MANAGER_VERIFY: &str = "dchat-operator-verify";
/// Field manager of the `dchat-operator promote` / `abort` commands' annotation patches.
pub const CLI_FIELD_MANAGER: &str = "dchat-operator-cli";
/// Value of `app.kubernetes.io/name` on every object.
pub const APP_NAME: &str = "dchat-relay";
/// Value of `app.kubernetes.io/managed-by` on every object.
pub const MANAGED_BY: &str = "dchat-operator";
/// Label naming the manager of an object (value [`MANAGED_BY`] for the operator's).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming the DchatCluster an object belongs to (its name).
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label naming the deployment slot of relay pods and their per-slot objects.
pub const SLOT_LABEL: &str = "dchat.network/slot";
/// Pod annotation carrying the hash of the relay configuration, so a config change
/// rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "dchat.network/config-hash";
/// Finalizer the operator puts on every DchatCluster.
pub const FINALIZER: &str = "dchat.network/cleanup";
/// Annotation on a DchatCluster: the value `paused` stops the operator from changing
/// anything for that cluster (like `spec.paused`); removing it resumes.
pub const RECONCILE_ANNOTATION: &str = "dchat.network/reconcile";
/// Value of [`RECONCILE_ANNOTATION`] that pauses reconciliation.
pub const RECONCILE_PAUSED: &str = "paused";
/// Annotation on a DchatCluster: `on` hibernates the cluster (like `spec.hibernate`),
/// `off` or absent wakes it.
pub const HIBERNATION_ANNOTATION: &str = "dchat.network/hibernation";
/// Annotation on a DchatCluster: an RFC 3339 time; a value newer than the last one the
/// operator acted on restarts the relays (like `spec.restartedAt`).
pub const RESTARTED_AT_ANNOTATION: &str = "dchat.network/restartedAt";

/// What an object is for, as `app.kubernetes.io/component`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// Relay workload, its pods and Services.
    Relay,
    /// Relay configuration and identity.
    Config,
    /// Autoscaler, disruption budget, network policy.
    Policy,
    /// Ingress.
    Ingress,
    /// Prometheus Operator objects.
    Monitoring,
}

impl Component {
    fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Config => "config",
            Self::Policy => "policy",
            Self::Ingress => "ingress",
            Self::Monitoring => "monitoring",
        }
    }
}

/// Name of the relay StatefulSet of a slot.
pub fn statefulset_name(cluster: &DchatCluster, slot: Slot) -> String {
    format!("{}-{}", cluster.name_any(), slot)
}

/// Name of the headless Service giving a slot's relays stable peer DNS names.
pub fn headless_service_name(cluster: &DchatCluster, slot: Slot) -> String {
    format!("{}-{}-headless", cluster.name_any(), slot)
}

/// Name of the client Service, which selects the active slot.
pub fn client_service_name(cluster: &DchatCluster) -> String {
    cluster.name_any()
}

/// Name of the preview Service, which selects the idle slot.
pub fn preview_service_name(cluster: &DchatCluster) -> String {
    format!("{}-preview", cluster.name_any())
}

/// Name of the relay ConfigMap.
pub fn configmap_name(cluster: &DchatCluster) -> String {
    format!("{}-config", cluster.name_any())
}

/// Name of the Secret holding the relays' admin API token (embedded store only), which
/// the handover Job uses to move stored messages between slots.
pub fn admin_token_secret_name(cluster: &DchatCluster) -> String {
    format!("{}-admin-token", cluster.name_any())
}

/// Name of the relays' ServiceAccount.
pub fn service_account_name(cluster: &DchatCluster) -> String {
    format!("{}-relay", cluster.name_any())
}

/// Name shared by the single-instance children (HPA, PDB, NetworkPolicy, Ingress,
/// ServiceMonitor, PrometheusRule).
pub fn cluster_object_name(cluster: &DchatCluster) -> String {
    cluster.name_any()
}

/// Labels every relay pod of the cluster carries, whatever its slot.
pub fn cluster_selector(cluster: &DchatCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (INSTANCE_LABEL.to_string(), cluster.name_any()),
    ])
}

/// Labels selecting the relay pods of one slot.
pub fn slot_selector(cluster: &DchatCluster, slot: Slot) -> BTreeMap<String, String> {
    let mut labels = cluster_selector(cluster);
    labels.insert(SLOT_LABEL.to_string(), slot.as_str().to_string());
    labels
}

/// `labels` as a label selector string (`k=v,k=v`).
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Label selector string matching every object the operator manages for a cluster;
/// used to find children to delete.
pub fn managed_selector(cluster: &DchatCluster) -> String {
    format!(
        "{INSTANCE_LABEL}={},{MANAGED_BY_LABEL}={MANAGED_BY}",
        cluster.name_any(),
    )
}

/// The standard labels of an object of `component`, with the relay version.
pub fn labels(cluster: &DchatCluster, component: Component) -> BTreeMap<String, String> {
    let mut labels = cluster_selector(cluster);
    labels.insert(
        "app.kubernetes.io/component".to_string(),
        component.as_str().to_string(),
    );
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGED_BY.to_string(),
    );
    labels.insert(
        "app.kubernetes.io/version".to_string(),
        cluster.spec.version.clone(),
    );
    labels
}

/// Standard labels plus the slot label.
pub fn slot_labels(cluster: &DchatCluster, slot: Slot) -> BTreeMap<String, String> {
    let mut labels = labels(cluster, Component::Relay);
    labels.insert(SLOT_LABEL.to_string(), slot.as_str().to_string());
    labels
}

/// The controller owner reference to the cluster, so garbage collection removes the
/// children with it.
pub fn owner_reference(cluster: &DchatCluster) -> Option<OwnerReference> {
    cluster.controller_owner_ref(&())
}

/// Metadata of a child object: name, namespace, labels and owner reference.
pub fn child_meta(
    cluster: &DchatCluster,
    name: String,
    labels: BTreeMap<String, String>,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cluster.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: owner_reference(cluster).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

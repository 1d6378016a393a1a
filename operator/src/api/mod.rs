//! The `DchatCluster` API (group `dchat.network`, version `v1alpha1`).
//!
//! Field doc comments become the CRD's descriptions, so they are written for the user
//! reading `kubectl explain dchatcluster.spec`. What the API server can check lives in
//! the schema (ranges, patterns, enums, CEL rules); what it cannot (quantity ordering,
//! duration sizes) lives in [`validate`] and surfaces as a `Degraded` condition.

mod admission;
mod backup;
mod validate;

pub use admission::{admit, AdmissionError};
pub use backup::{
    BackupCounts, BackupDestination, BackupPhase, BackupSpec, ClusterBackupStatus,
    ClusterReference, DchatBackup, DchatBackupSpec, DchatBackupStatus, DeletionPolicy, Encryption,
    RdsSnapshotSpec, RetentionSpec, S3Credentials, S3Destination, CRON_PATTERN,
};
pub use backup::{
    BackupReference, BootstrapSpec, RecoverySource, RecoverySpec, RestorePhase, RestoreStatus,
    Verification, VerifySpec,
};
pub use validate::{validate, FieldError, ValidationErrors};

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every dchat resource.
pub const GROUP: &str = "dchat.network";
/// API version of [`DchatCluster`].
pub const VERSION: &str = "v1alpha1";

/// Pattern of a Kubernetes resource quantity as this API accepts it ("500m", "2", "4Gi").
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$";
/// Pattern of a duration: one or more number+unit pairs, units ms, s, m, h, d ("90s", "1h30m", "90d").
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";

/// Desired state of a dchat relay cluster.
///
/// One DchatCluster becomes a relay StatefulSet per deployment slot (blue, green), the
/// Services, autoscaler, disruption budget, network policy, monitoring objects, config and
/// service account a production relay fleet needs.
// Each printer column repeats `type_`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dchat.network",
    version = "v1alpha1",
    kind = "DchatCluster",
    plural = "dchatclusters",
    shortname = "dchat",
    category = "dchat-all",
    namespaced,
    status = "DchatClusterStatus",
    doc = "A dchat relay cluster managed by dchat-operator.",
    derive = "Default",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready relays / desired relays"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.activeVersion",
        description = "Relay version serving traffic"
    ),
    printcolumn(
        name = "Slot",
        type_ = "string",
        json_path = ".status.activeSlot",
        description = "Deployment slot serving traffic"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Paused",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Paused\")].status",
        description = "True while reconciliation is paused (spec.paused or the dchat.network/reconcile annotation)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("has(self.database) || self.replicas == 1")
        .message("embedded storage (no spec.database) runs exactly one relay: set spec.replicas to 1 or configure spec.database")
        .field_path(".replicas"),
    validation = Rule::new("has(self.database) || !self.autoscaling.enabled")
        .message("autoscaling needs shared storage: configure spec.database or disable spec.autoscaling")
        .field_path(".autoscaling.enabled"),
    validation = Rule::new("!has(self.disruptionBudget.minAvailable) || self.disruptionBudget.minAvailable < (self.autoscaling.enabled ? self.autoscaling.minReplicas : self.replicas)")
        .message("disruptionBudget.minAvailable must be less than the replica count (spec.replicas, or autoscaling.minReplicas when autoscaling), or no relay could ever be evicted")
        .field_path(".disruptionBudget.minAvailable"),
    validation = Rule::new("!self.autoscaling.enabled || self.replicas <= self.autoscaling.maxReplicas")
        .message("spec.replicas must not exceed autoscaling.maxReplicas")
        .field_path(".replicas")
)]
#[serde(rename_all = "camelCase")]
pub struct DchatClusterSpec {
    /// Relay version: the image tag to run. Changing it starts a rollout of the relays.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    )]
    pub version: String,

    /// Relay image repository, without tag; the tag is `spec.version`.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// When the kubelet pulls the relay image.
    #[serde(default)]
    pub image_pull_policy: ImagePullPolicy,

    /// Number of relays. Fixed size when autoscaling is off; when it is on, the size a
    /// new StatefulSet starts at (kept within `autoscaling.minReplicas`..`maxReplicas`),
    /// after which the HorizontalPodAutoscaler owns the count. Embedded storage (no
    /// `database`) supports exactly one relay.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,

    /// CPU and memory for each relay container.
    #[serde(default)]
    pub resources: ComputeResources,

    /// Persistent volume for each relay's data directory (`/data`).
    #[serde(default)]
    pub storage: StorageSpec,

    /// Shared PostgreSQL database. Absent: each relay keeps messages in an embedded store
    /// on its volume, which limits the cluster to one relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSpec>,

    /// Relay settings, passed to the relays through a ConfigMap.
    #[serde(default)]
    pub relay: RelaySettings,

    /// Horizontal autoscaling of the serving relays on CPU and memory.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,

    /// PodDisruptionBudget for the relays, created when more than one relay can run
    /// (`replicas`, or `autoscaling.maxReplicas` when autoscaling, above 1). With neither
    /// `minAvailable` nor `maxUnavailable` it is `maxUnavailable: 1`.
    #[serde(default)]
    pub disruption_budget: DisruptionBudgetSpec,

    /// The client-facing Service.
    #[serde(default)]
    pub service: ServiceSpec,

    /// Optional Ingress in front of the client Service.
    #[serde(default)]
    pub ingress: IngressSpec,

    /// NetworkPolicy restricting relay traffic to what relays need.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,

    /// Prometheus Operator objects (created only when its CRDs are installed).
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// Scheduling and identity settings passed to the relay pods.
    #[serde(default)]
    pub pod: PodSettings,

    /// How a change of the relay pod template (version, image, resources, relay
    /// settings, ...) rolls out: blue-green between the two slots, validated before the
    /// switch, watched after it, rolled back automatically on failure.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Scheduled and on-demand backups of the relay store to S3, with RDS snapshots;
    /// absent means no backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// How a new cluster starts: from a backup (`recovery`) instead of empty. Read only
    /// until the cluster first serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,

    /// Pause reconciliation: the operator changes nothing for this cluster (no child is
    /// applied, scaled or deleted, no rollout step is taken, no scheduled backup, retention
    /// or restore drill runs) and only says so in status (condition `Paused`). Setting it
    /// back to false resumes; a rollout in flight continues at the step it stood at, and
    /// the time paused does not count against its timeouts and windows. The annotation
    /// `dchat.network/reconcile: paused` pauses too. Deleting a paused cluster still
    /// cleans up.
    #[serde(default)]
    pub paused: bool,

    /// Hibernate: the relays scale to zero (the HorizontalPodAutoscaler is removed
    /// meanwhile); every volume, Service, ConfigMap and Secret is kept, and status phase
    /// is `Hibernating`. Setting it back to false wakes the cluster at the size it had
    /// (`status.hibernation.replicas`, within the autoscaling range). A rollout that has
    /// not switched traffic yet is cancelled and starts again after the wake; one that
    /// has switched finishes first. The annotation `dchat.network/hibernation: on`
    /// hibernates too.
    #[serde(default)]
    pub hibernate: bool,

    /// Restart the relays: a time (RFC 3339, e.g. "2026-12-06T10:00:00Z") newer than
    /// `status.restartedAt` replaces every relay through a blue-green rollout of the
    /// current spec (new slot, validation, switch; no capacity lost, stored messages
    /// handed over). The same or an older time does nothing. The annotation
    /// `dchat.network/restartedAt` requests a restart the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<Time>,
}

/// An empty spec (no version), only for tooling that needs a `Default` object; the API
/// server rejects it because `version` is required and non-empty.
impl Default for DchatClusterSpec {
    fn default() -> Self {
        Self {
            version: String::new(),
            image: default_image(),
            image_pull_policy: ImagePullPolicy::default(),
            replicas: default_replicas(),
            resources: ComputeResources::default(),
            storage: StorageSpec::default(),
            database: None,
            relay: RelaySettings::default(),
            autoscaling: AutoscalingSpec::default(),
            disruption_budget: DisruptionBudgetSpec::default(),
            service: ServiceSpec::default(),
            ingress: IngressSpec::default(),
            network_policy: NetworkPolicySpec::default(),
            monitoring: MonitoringSpec::default(),
            pod: PodSettings::default(),
            rollout: RolloutSpec::default(),
            backup: None,
            bootstrap: None,
            paused: false,
            hibernate: false,
            restarted_at: None,
        }
    }
}

fn default_image() -> String {
    "ghcr.io/dchat/relay".to_string()
}
fn default_replicas() -> i32 {
    1
}
fn default_true() -> bool {
    true
}

/// When the kubelet pulls the relay image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    /// Pull when the image is not on the node.
    #[default]
    IfNotPresent,
    /// Pull on every pod start.
    Always,
    /// Never pull; the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling of this policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IfNotPresent => "IfNotPresent",
            Self::Always => "Always",
            Self::Never => "Never",
        }
    }
}

/// CPU and memory requests and limits of a relay container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeResources {
    /// Resources the scheduler reserves for each relay.
    #[serde(default = "default_requests")]
    pub requests: ResourceAmounts,
    /// Upper bounds for each relay; must not be below the requests.
    #[serde(default = "default_limits")]
    pub limits: ResourceAmounts,
}

impl Default for ComputeResources {
    fn default() -> Self {
        Self {
            requests: default_requests(),
            limits: default_limits(),
        }
    }
}

fn default_requests() -> ResourceAmounts {
    ResourceAmounts {
        cpu: Some("250m".into()),
        memory: Some("256Mi".into()),
    }
}
fn default_limits() -> ResourceAmounts {
    ResourceAmounts {
        cpu: None,
        memory: Some("512Mi".into()),
    }
}

/// A CPU and memory amount in Kubernetes quantity notation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    /// CPU, e.g. "500m" or "2".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"))]
    pub cpu: Option<String>,
    /// Memory, e.g. "512Mi" or "4Gi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"))]
    pub memory: Option<String>,
}

/// Persistent volume of each relay.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size, e.g. "50Gi".
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"))]
    pub size: String,
    /// StorageClass of the volume; absent uses the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

fn default_storage_size() -> String {
    "10Gi".into()
}

/// Connection to the shared PostgreSQL database.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret in the cluster's namespace with keys `host`, `port`, `name`, `username`,
    /// `password`; the relays read them as `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`,
    /// `DB_PASSWORD`.
    pub secret_ref: SecretReference,
    /// TCP port the NetworkPolicy allows relays to reach the database on.
    #[serde(default = "default_db_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_db_port() -> i32 {
    5432
}

/// A Secret in the DchatCluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// Relay process settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySettings {
    /// Log level of the relays.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Largest frame a client may send, in bytes.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_message_bytes: i64,
    /// How long a message waits for an offline recipient before it expires, e.g. "720h".
    #[serde(default = "default_message_ttl")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub message_ttl: String,
    /// Chain RPC URL given to the relays (DCHAT_CHAIN_RPC); validated, not used by them (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^(https?|wss?)://"))]
    pub chain_rpc_url: Option<String>,
    /// How long a relay may take to drain its connections on shutdown, e.g. "60s".
    /// The pod's termination grace period is this plus a safety margin.
    #[serde(default = "default_drain_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub drain_timeout: String,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            log_level: LogLevel::default(),
            max_message_bytes: default_max_message_bytes(),
            message_ttl: default_message_ttl(),
            chain_rpc_url: None,
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_max_message_bytes() -> i64 {
    262_144
}
fn default_message_ttl() -> String {
    "720h".into()
}
fn default_drain_timeout() -> String {
    "60s".into()
}

/// Relay log level.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-frame detail.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    #[default]
    Info,
    /// Problems only.
    Warn,
    /// Errors only.
    Error,
}

impl LogLevel {
    /// The `RUST_LOG` spelling of this level.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

/// Horizontal autoscaling of the serving slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("autoscaling.minReplicas must not exceed autoscaling.maxReplicas")
    .field_path(".minReplicas"))]
#[x_kube(validation = Rule::new("!self.enabled || has(self.targetCPUUtilizationPercentage) || has(self.targetMemoryUtilizationPercentage)")
    .message("autoscaling needs at least one target: targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage"))]
pub struct AutoscalingSpec {
    /// Whether a HorizontalPodAutoscaler manages the relay count.
    #[serde(default)]
    pub enabled: bool,
    /// Fewest relays the autoscaler keeps.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most relays the autoscaler starts.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation (percent of requests) the autoscaler aims for.
    #[serde(
        default = "default_cpu_target",
        rename = "targetCPUUtilizationPercentage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: Option<i32>,
    /// Average memory utilisation (percent of requests) the autoscaler aims for.
    #[serde(
        default = "default_memory_target",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_memory_utilization_percentage: Option<i32>,
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_cpu_utilization_percentage: default_cpu_target(),
            target_memory_utilization_percentage: default_memory_target(),
        }
    }
}

fn default_min_replicas() -> i32 {
    2
}
fn default_max_replicas() -> i32 {
    10
}
fn default_cpu_target() -> Option<i32> {
    Some(70)
}
fn default_memory_target() -> Option<i32> {
    Some(80)
}

/// PodDisruptionBudget settings. Set at most one of the two fields; with neither, at
/// most one relay is disrupted at a time.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.minAvailable) && has(self.maxUnavailable))")
    .message("set at most one of disruptionBudget.minAvailable and disruptionBudget.maxUnavailable"))]
pub struct DisruptionBudgetSpec {
    /// Relays that must stay available during voluntary disruptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_available: Option<i32>,
    /// Relays that may be unavailable during voluntary disruptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_unavailable: Option<i32>,
}

/// The client-facing Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Port clients connect to; it forwards to the relay's port 7070.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations for the Service (e.g. load balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_service_port() -> i32 {
    7070
}

/// Kubernetes Service type of the client Service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling of this type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Optional Ingress in front of the client Service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.host)")
    .message("ingress.host is required when ingress.enabled is true")
    .field_path(".host"))]
pub struct IngressSpec {
    /// Whether to create the Ingress.
    #[serde(default)]
    pub enabled: bool,
    /// IngressClass to use (e.g. "alb", "nginx").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub class_name: Option<String>,
    /// Host name clients use, e.g. "relay.example.com".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        )
    )]
    pub host: Option<String>,
    /// Secret with the TLS certificate for the host; absent means no TLS section
    /// (e.g. when the load balancer terminates TLS with ACM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub tls_secret_name: Option<String>,
    /// Annotations for the Ingress (e.g. ALB settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// NetworkPolicy settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Whether to create the NetworkPolicy.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Labels of the namespaces allowed to scrape metrics on port 9090; empty allows
    /// every namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics_namespace_selector: BTreeMap<String, String>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            metrics_namespace_selector: BTreeMap::new(),
        }
    }
}

/// Prometheus Operator integration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a ServiceMonitor for the relays' metrics.
    #[serde(default = "default_true")]
    pub service_monitor: bool,
    /// Create a PrometheusRule with the relay alerts.
    #[serde(default = "default_true")]
    pub prometheus_rule: bool,
    /// Scrape interval, e.g. "30s".
    #[serde(default = "default_scrape_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub interval: String,
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            service_monitor: true,
            prometheus_rule: true,
            interval: default_scrape_interval(),
        }
    }
}

fn default_scrape_interval() -> String {
    "30s".into()
}

/// Scheduling and identity settings of the relay pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Node labels the relay pods must run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the relay pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity rules; when set they replace the operator's default spreading rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Names of Secrets used to pull the relay image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// Annotations for the relays' ServiceAccount, e.g.
    /// `eks.amazonaws.com/role-arn` for IAM Roles for Service Accounts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_account_annotations: BTreeMap<String, String>,
    /// Extra annotations for the relay pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One of the two deployment slots a cluster's relays run in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// The blue slot; a new cluster starts here.
    #[default]
    Blue,
    /// The green slot.
    Green,
}

impl Slot {
    /// Both slots, blue first.
    pub const ALL: [Slot; 2] = [Slot::Blue, Slot::Green];

    /// The lowercase name used in object names and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blue => "blue",
            Self::Green => "green",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Self::Blue => Self::Green,
            Self::Green => Self::Blue,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lifecycle phase, a one-word summary of the conditions for `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing created yet.
    #[default]
    Pending,
    /// Objects created; relays are starting.
    Provisioning,
    /// All relays ready and serving.
    Running,
    /// A change is rolling out.
    Progressing,
    /// A validated new version waits for manual promotion.
    AwaitingPromotion,
    /// The last rollout failed and traffic went back to the previous version.
    RolledBack,
    /// Serving, but not as desired (relays not ready, invalid spec, failed apply).
    Degraded,
    /// Cannot make progress without a change to the spec.
    Failed,
    /// A new cluster loads its backup (`spec.bootstrap.recovery`) before it serves.
    Restoring,
    /// Hibernating (`spec.hibernate` or the hibernation annotation): the relays are
    /// stopping or stopped; volumes and Services are kept.
    Hibernating,
}

impl Phase {
    /// Every phase, for metrics.
    pub const ALL: [Phase; 10] = [
        Phase::Pending,
        Phase::Provisioning,
        Phase::Running,
        Phase::Progressing,
        Phase::AwaitingPromotion,
        Phase::RolledBack,
        Phase::Degraded,
        Phase::Failed,
        Phase::Restoring,
        Phase::Hibernating,
    ];

    /// The phase's name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Provisioning => "Provisioning",
            Self::Running => "Running",
            Self::Progressing => "Progressing",
            Self::AwaitingPromotion => "AwaitingPromotion",
            Self::RolledBack => "RolledBack",
            Self::Degraded => "Degraded",
            Self::Restoring => "Restoring",
            Self::Failed => "Failed",
            Self::Hibernating => "Hibernating",
        }
    }
}

/// Observed state of a dchat relay cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DchatClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One-word summary of the conditions.
    #[serde(default)]
    pub phase: Phase,
    /// Slot whose relays serve client traffic.
    #[serde(default)]
    pub active_slot: Slot,
    /// Relay version serving client traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,
    /// Relays in the serving slot.
    #[serde(default)]
    pub replicas: i32,
    /// Ready relays in the serving slot.
    #[serde(default)]
    pub ready_replicas: i32,
    /// "ready/desired", for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Label selector of the serving relays (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Hash of the relay pod template serving traffic; a different desired hash means a
    /// rollout is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_template_hash: Option<String>,
    /// Conditions: Ready, Progressing, Degraded always; Reconciling and Stalled (kstatus)
    /// while they hold; Monitoring and BackupHealthy when the spec asks for monitoring or
    /// backups; Paused while reconciliation is paused; Hibernated while the cluster
    /// hibernates or wakes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The current or last blue-green rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// Backups of this cluster (with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<ClusterBackupStatus>,
    /// The restore of a new cluster from a backup (`spec.bootstrap.recovery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// The newest restart request (`spec.restartedAt` or the `dchat.network/restartedAt`
    /// annotation) the operator acted on: the relay pod template carries it, so a
    /// request with the same or an older time restarts nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<Time>,
    /// Present while the cluster hibernates and until it has woken (every relay ready
    /// again); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernation: Option<HibernationStatus>,
}

/// A hibernation in progress (`status.hibernation`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HibernationStatus {
    /// When the operator scaled the relays to zero.
    pub since: Time,
    /// Relays of the serving slot when hibernation began (the autoscaler's choice when
    /// autoscaling): the count a wake starts, kept within `autoscaling.minReplicas` and
    /// `maxReplicas`; without autoscaling a wake starts `spec.replicas`.
    pub replicas: i32,
}

/// Blue-green rollout settings. A change of the relay pod template starts the idle
/// slot with the new template, validates it behind the `<name>-preview` Service,
/// switches the client Service to it, watches it for `postPromotionWindow` (rolling
/// back to the still-warm old slot on failure) and scales the old slot to zero after
/// `scaleDownDelay`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoPromoteAfter) || !self.autoPromote")
    .message("rollout.autoPromoteAfter only applies when rollout.autoPromote is false")
    .field_path(".autoPromoteAfter"))]
pub struct RolloutSpec {
    /// Switch traffic as soon as the new version passes validation. When false the
    /// rollout waits in phase AwaitingPromotion until the annotation
    /// `dchat.network/promote` is set on the DchatCluster (or `autoPromoteAfter` passes).
    #[serde(default = "default_true")]
    pub auto_promote: bool,
    /// With `autoPromote: false`: promote by itself after waiting this long for manual
    /// promotion, e.g. "1h". Absent: wait for the annotation however long it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub auto_promote_after: Option<String>,
    /// Checks the new slot must pass before it gets traffic.
    #[serde(default)]
    pub validation: RolloutValidation,
    /// How long the operator watches the new slot after the switch, e.g. "10m". A relay
    /// that restarts, crash-loops or stops being ready inside the window switches traffic
    /// back to the old slot (automatic rollback).
    #[serde(default = "default_post_promotion_window")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub post_promotion_window: String,
    /// How long after the switch the old slot keeps running, warm for an instant
    /// rollback, e.g. "10m". Never shorter in effect than `postPromotionWindow`: the old
    /// slot scales to zero at the later of the two.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub scale_down_delay: String,
    /// Longest a rollout step that waits on the cluster (starting the new relays,
    /// running the smoke test) may take, e.g. "15m". A rollout that exceeds it fails,
    /// keeps traffic on the old slot and says so in status.
    #[serde(default = "default_progress_deadline")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub progress_deadline: String,
    /// A Prometheus query the new version must keep at or below a threshold during the
    /// post-promotion window; above it, traffic goes back to the old slot like for a
    /// crashing relay. Absent: only relay readiness and restarts are watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<RolloutAnalysis>,
}

/// A metric check of the new version after the switch (`spec.rollout.analysis`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutAnalysis {
    /// Base URL of the Prometheus HTTP API the operator queries (plain HTTP, reachable
    /// from the operator), e.g. "http://prometheus-operated.monitoring.svc:9090".
    #[schemars(regex(pattern = r"^http://[^/\s?#]+(/[^\s?#]*)?$"))]
    pub prometheus_url: String,
    /// PromQL instant query, evaluated about every 10 s during the window. The
    /// placeholders `{{namespace}}`, `{{cluster}}`, `{{slot}}` (the new slot) and
    /// `{{version}}` are replaced first, e.g.
    /// `sum(rate(dchat_rejected_frames_total{namespace="{{namespace}}",pod=~"{{cluster}}-{{slot}}-.*"}[1m]))`.
    /// The largest value of the result counts; an empty result counts as 0.
    #[schemars(length(min = 1, max = 4096))]
    pub query: String,
    /// The new version fails when the query's value is above this.
    pub fail_above: f64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            auto_promote: true,
            auto_promote_after: None,
            validation: RolloutValidation::default(),
            post_promotion_window: default_post_promotion_window(),
            scale_down_delay: default_scale_down_delay(),
            progress_deadline: default_progress_deadline(),
            analysis: None,
        }
    }
}

fn default_post_promotion_window() -> String {
    "10m".into()
}
fn default_scale_down_delay() -> String {
    "10m".into()
}
fn default_progress_deadline() -> String {
    "15m".into()
}

/// Checks a new slot passes before the switch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutValidation {
    /// Every relay of the new slot must be Ready within this time of the rollout's
    /// start, e.g. "10m"; a relay that restarts or crash-loops fails validation at once.
    #[serde(default = "default_ready_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub ready_timeout: String,
    /// Run `dchat smoke` (from the new relay image, as a Job) against the preview
    /// Service: a message to itself must round-trip.
    #[serde(default = "default_true")]
    pub smoke_test: bool,
}

impl Default for RolloutValidation {
    fn default() -> Self {
        Self {
            ready_timeout: default_ready_timeout(),
            smoke_test: true,
        }
    }
}

fn default_ready_timeout() -> String {
    "10m".into()
}

/// Step of a blue-green rollout, as recorded in `status.rollout.step`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RolloutStep {
    /// The idle slot runs the new template; waiting for all its relays to be Ready.
    Preparing,
    /// The smoke test runs against the preview Service.
    Validating,
    /// Validated; a backup of the serving version runs before the switch
    /// (`spec.backup.beforeRollout`). A failed backup fails the rollout.
    BackingUp,
    /// Validated; waiting for `dchat.network/promote` (or `autoPromoteAfter`).
    AwaitingPromotion,
    /// Traffic switched to the new slot; watching it for the post-promotion window.
    Promoted,
    /// Window passed; the old slot scales to zero after the scale-down delay.
    ScalingDown,
    /// Done: the new version serves and the old slot is at zero.
    Complete,
    /// The new version serves, but the old slot's stored messages (embedded store)
    /// could not be handed over; the old slot keeps running so none is lost. Deleting
    /// the failed handover Job retries.
    HandoverFailed,
    /// Validation failed or the progress deadline passed; traffic never left the old slot.
    Failed,
    /// The new version failed after the switch; traffic went back to the old slot.
    RolledBack,
    /// Aborted with `dchat.network/abort`; traffic is on the old slot.
    Aborted,
    /// The spec went back to the serving template before the switch; nothing to do.
    Cancelled,
}

impl RolloutStep {
    /// The step's name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preparing => "Preparing",
            Self::Validating => "Validating",
            Self::BackingUp => "BackingUp",
            Self::AwaitingPromotion => "AwaitingPromotion",
            Self::Promoted => "Promoted",
            Self::ScalingDown => "ScalingDown",
            Self::Complete => "Complete",
            Self::HandoverFailed => "HandoverFailed",
            Self::Failed => "Failed",
            Self::RolledBack => "RolledBack",
            Self::Aborted => "Aborted",
            Self::Cancelled => "Cancelled",
        }
    }

    /// Whether the rollout is still moving (not a final step).
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            Self::Preparing
                | Self::Validating
                | Self::BackingUp
                | Self::AwaitingPromotion
                | Self::Promoted
                | Self::ScalingDown
        )
    }

    /// Whether traffic has moved to the new slot.
    pub fn switched(self) -> bool {
        matches!(
            self,
            Self::Promoted | Self::ScalingDown | Self::Complete | Self::HandoverFailed
        )
    }
}

impl std::fmt::Display for RolloutStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current (or last) blue-green rollout. Everything the operator needs to continue
/// a rollout lives here, so an operator restart resumes at the recorded step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Relay version being rolled out.
    pub target_version: String,
    /// Hash of the relay pod template being rolled out.
    pub target_template_hash: String,
    /// Slot the new version runs in.
    pub slot: Slot,
    /// Version that served when the rollout started (traffic returns to it on rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// Pod template hash that served when the rollout started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_template_hash: Option<String>,
    /// Relay count of the new slot, held steady during the rollout (the serving slot's
    /// count when the rollout started).
    pub replicas: i32,
    /// Current step.
    pub step: RolloutStep,
    /// Machine-readable reason of the current step, e.g. "SmokeTestFailed".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What is happening or what went wrong, for people.
    pub message: String,
    /// When the rollout started.
    pub started_at: Time,
    /// When the current step started.
    pub step_started_at: Time,
    /// When traffic switched to the new slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<Time>,
    /// Version traffic was switched back from (set by a rollback or an abort after the
    /// switch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
    /// Template hash that failed or was aborted; it is not tried again until the spec
    /// changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_template_hash: Option<String>,
    /// Embedded store, after a rollback or an abort after the switch: how handing the
    /// failed slot's stored messages back to the serving slot ended (absent until it
    /// ran). The failed slot scales to zero either way; after a failure its messages
    /// stay on its retained volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handback: Option<HandoverOutcome>,
    /// Seconds this rollout spent with reconciliation paused. Not counted against
    /// `validation.readyTimeout` (measured from `startedAt`); `stepStartedAt` and
    /// `promotedAt` are moved forward by each pause instead, so no step timer counts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_seconds: Option<i64>,
}

/// How a handover Job ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum HandoverOutcome {
    /// Every stored message was moved.
    Succeeded,
    /// The Job failed; see `status.rollout.message` and the Job's logs.
    Failed,
}

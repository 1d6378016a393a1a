//! The backup API: `spec.backup` of a DchatCluster and the `DchatBackup` kind.
//!
//! A DchatBackup is one backup of one cluster's relay store (and, on RDS, a manual
//! snapshot of its database). Creating one asks for a backup now; the cluster's
//! `spec.backup.schedule` creates them on a cron schedule. They are not owned by the
//! cluster: deleting a DchatCluster never deletes its backups.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{SecretReference, DURATION_PATTERN};

/// Pattern of a 5-field cron expression (minute hour day-of-month month day-of-week).
pub const CRON_PATTERN: &str = r"^\S+(\s+\S+){4}$";

/// Scheduled and on-demand backups of the relay store to S3, with RDS snapshots.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.encryption != 'aws:kms' || has(self.kmsKeyId)")
        .message("destination.s3.kmsKeyId is required when encryption is aws:kms")
        .field_path(".kmsKeyId")
)]
#[serde(rename_all = "camelCase")]
pub struct S3Destination {
    /// Bucket name.
    #[schemars(
        length(min = 3, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    )]
    pub bucket: String,
    /// Key prefix under which backups are written (`<prefix>/<namespace>/<cluster>/<backup>/`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 512))]
    pub prefix: String,
    /// AWS region of the bucket.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub region: String,
    /// Endpoint of an S3-compatible store (MinIO, Ceph); absent means AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    /// Address buckets by path (`endpoint/bucket/key`), as most S3-compatible stores need.
    #[serde(default)]
    pub force_path_style: bool,
    /// A Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`; absent means the
    /// default AWS credential chain of the backup Job (IRSA through the relays'
    /// ServiceAccount, `spec.pod.serviceAccountAnnotations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<S3Credentials>,
    /// Server-side encryption of the objects.
    #[serde(default)]
    pub encryption: Encryption,
    /// KMS key (ID or ARN) when `encryption` is `aws:kms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
}

/// Static S3 credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    /// Secret in the cluster's namespace with the keys `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_ref: SecretReference,
}

/// S3 server-side encryption.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Encryption {
    /// S3-managed keys.
    #[default]
    #[serde(rename = "AES256")]
    Aes256,
    /// A KMS key (`kmsKeyId`).
    #[serde(rename = "aws:kms")]
    AwsKms,
}

impl Encryption {
    /// The value S3 and the `dchat backup --sse` flag use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Aes256 => "AES256",
            Self::AwsKms => "aws:kms",
        }
    }
}

/// Where backups go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupDestination {
    /// An S3 bucket (or an S3-compatible store).
    pub s3: S3Destination,
}

/// Which backups are kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// A Completed backup older than this may be pruned (e.g. `30d`), but only while more
    /// than `minKeep` newer Completed backups exist. The newest Completed backup is never
    /// pruned. Failed backups are pruned after 7 days.
    #[serde(default = "default_max_age")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_age: String,
    /// Completed backups always kept, newest first.
    #[serde(default = "default_min_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_keep: i32,
}

impl Default for RetentionSpec {
    fn default() -> Self {
        Self {
            max_age: default_max_age(),
            min_keep: default_min_keep(),
        }
    }
}

fn default_max_age() -> String {
    "30d".to_string()
}
fn default_min_keep() -> i32 {
    3
}

/// A manual RDS snapshot with each backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RdsSnapshotSpec {
    /// The RDS instance behind `spec.database`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-zA-Z][a-zA-Z0-9-]*$"))]
    pub instance_identifier: String,
    /// Its AWS region.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub region: String,
    /// Start of every snapshot's identifier (`<prefix>-<namespace>-<cluster>-<backup>-<hash>`);
    /// an IAM policy can allow exactly these (terraform/aws: its `rds_snapshot_prefix`
    /// output).
    #[serde(default = "default_snapshot_prefix")]
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-zA-Z][a-zA-Z0-9]*(-[a-zA-Z0-9]+)*$")
    )]
    pub snapshot_prefix: String,
}

fn default_snapshot_prefix() -> String {
    "dchat".to_string()
}

/// Restore drills: the newest Completed backup restored into a scratch store and checked.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// When to run a drill (5-field cron, UTC, e.g. `0 3 * * 0`).
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: String,
}

/// `spec.backup`: scheduled and on-demand backups of the relay store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Where backups are written.
    pub destination: BackupDestination,
    /// When to take a backup (5-field cron, UTC, e.g. `0 */6 * * *`); absent means on
    /// demand only (DchatBackup objects, `dchat-operator backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: Option<String>,
    /// Pause the schedule; on-demand backups still run.
    #[serde(default)]
    pub suspend: bool,
    /// Which backups are kept.
    #[serde(default)]
    pub retention: RetentionSpec,
    /// Also take a manual RDS snapshot with each backup (PostgreSQL on RDS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rds: Option<RdsSnapshotSpec>,
    /// A rollout takes a backup of the serving version after validation and before the
    /// switch; a failed backup fails the rollout (traffic never moves).
    #[serde(default)]
    pub before_rollout: bool,
    /// Restore drills of the newest Completed backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
}

/// What happens to a backup's data when its DchatBackup is deleted by hand.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// The S3 objects and the RDS snapshot stay.
    #[default]
    Retain,
    /// The S3 objects and the RDS snapshot are deleted first.
    Delete,
}

/// The cluster a backup belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ClusterReference {
    /// Name of the DchatCluster in the same namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
}

/// One backup of one DchatCluster. Creating it takes the backup.
// Each printer column repeats `type_`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "dchat.network",
    version = "v1alpha1",
    kind = "DchatBackup",
    plural = "dchatbackups",
    shortname = "dchatbackup",
    category = "dchat-all",
    namespaced,
    status = "DchatBackupStatus",
    doc = "One backup of a DchatCluster's relay store (and its RDS snapshot).",
    derive = "Default",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.cluster.name",
        description = "The DchatCluster backed up"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Completed or Failed"
    ),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizeBytes",
        description = "Bytes of the uploaded snapshot"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a DchatBackup's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct DchatBackupSpec {
    /// The DchatCluster to back up (same namespace).
    pub cluster: ClusterReference,
    /// What deleting this object does to the backup's data: `Retain` (default) keeps
    /// the S3 objects and the RDS snapshot, `Delete` removes them first. Retention
    /// always deletes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Lifecycle of a backup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum BackupPhase {
    /// Waiting to start (another backup of the cluster runs, or not picked up yet).
    #[default]
    Pending,
    /// Its Job runs.
    Running,
    /// Written, checksummed and verified in the bucket; the manifest is written.
    Completed,
    /// It did not complete; `status.error` says why.
    Failed,
}

impl BackupPhase {
    /// The phase's name as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
        }
    }
}

/// Records in a backup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct BackupCounts {
    /// Stored, unacknowledged messages.
    #[serde(default)]
    pub messages: u64,
    /// Dedup records of acknowledged messages.
    #[serde(default)]
    pub tombstones: u64,
    /// Profiles.
    #[serde(default)]
    pub profiles: u64,
    /// Channel memberships.
    #[serde(default)]
    pub memberships: u64,
}

/// Observed state of a DchatBackup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DchatBackupStatus {
    /// Pending, Running, Completed or Failed.
    #[serde(default)]
    pub phase: BackupPhase,
    /// When its Job was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// The Job that moves the bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// `s3://bucket/key` of the snapshot object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Bytes of the snapshot object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Hex SHA-256 of the snapshot object, verified after the upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// What the backup holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BackupCounts>,
    /// Relay version that served the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_version: Option<String>,
    /// `embedded` or `postgres`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_kind: Option<String>,
    /// The manual RDS snapshot taken with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rds_snapshot_identifier: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last restore drill of this backup (`spec.backup.verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// `Ready` (True once Completed) and `Failed`-style details, kstatus-compatible.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The result of a restore drill.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// The DchatBackup restored.
    pub backup: String,
    /// When the drill ended.
    pub verified_at: Time,
    /// Whether the download, checksum, counts and scratch restore all passed.
    pub passed: bool,
    /// Seconds the download and scratch restore took (the measured restore time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_seconds: Option<f64>,
    /// What the scratch store held after the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BackupCounts>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Backups in a DchatCluster's status.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterBackupStatus {
    /// The newest backup, whatever became of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    /// The newest Completed backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    /// When the newest Completed backup was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup_time: Option<Time>,
    /// The oldest point the cluster can be restored to (its oldest Completed backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverability_point: Option<Time>,
    /// When the schedule last created a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When the schedule creates the next backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_at: Option<Time>,
    /// The last restore drill (`spec.backup.verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<Verification>,
    /// When the drill schedule last fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify_schedule_time: Option<Time>,
    /// The drill's Job while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_job: Option<String>,
}

/// A DchatBackup by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct BackupReference {
    /// Name of the DchatBackup in the cluster's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A backup found in a bucket, for when its DchatBackup object is gone (disaster recovery).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySource {
    /// The bucket holding it.
    pub destination: BackupDestination,
    /// `<namespace>/<cluster>/<backup>` under the destination's prefix (`dchat backup
    /// list` shows them).
    #[schemars(regex(pattern = r"^[a-z0-9-]+/[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub backup_path: String,
}

/// Where a new cluster's data comes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.backup) != has(self.source)")
        .message("bootstrap.recovery needs exactly one of backup (a DchatBackup) or source (a bucket and a backup path)")
)]
#[serde(rename_all = "camelCase")]
pub struct RecoverySpec {
    /// A DchatBackup of this namespace; the bucket is this cluster's
    /// `spec.backup.destination`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupReference>,
    /// A backup in a bucket, named by its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RecoverySource>,
}

/// How a new cluster starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Restore a backup into the new, empty store before the cluster serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,
}

/// How a restore stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestorePhase {
    /// Its Job runs.
    #[default]
    Running,
    /// The backup is in the store; the cluster serves.
    Completed,
    /// It failed; deleting the restore Job retries.
    Failed,
}

/// The restore of a new cluster.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// `<namespace>/<cluster>/<backup>` restored.
    pub backup_path: String,
    /// Running, Completed or Failed.
    pub phase: RestorePhase,
    /// The Job that restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// What it restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<BackupCounts>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

//! The Jobs that move a backup's bytes: `dchat backup create` and `dchat backup delete`
//! from the relay image, in the cluster's namespace, under the relays' ServiceAccount
//! (IRSA) or the destination's credentials Secret. Pure builders; the controller creates
//! them and reads their result from the pod's termination message.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::{BackupDestination, DchatBackup, DchatCluster, RdsSnapshotSpec, Slot};
use crate::build::statefulset::{admin_token_env, database_env};
use crate::labels;
use crate::rollout::handover::admin_url;
use crate::rollout::smoke::{tool_job, ToolJob};

/// Value of `app.kubernetes.io/name` on backup Jobs and their pods; the relays'
/// NetworkPolicy lets such pods of the same cluster reach the admin port.
pub const BACKUP_APP_NAME: &str = "dchat-backup";
/// Label on Jobs and scheduled DchatBackups naming the DchatBackup / cluster.
pub const BACKUP_LABEL: &str = "dchat.network/backup";
/// Label on DchatBackups naming their DchatCluster (the schedule and retention list by it).
pub const CLUSTER_LABEL: &str = "dchat.network/cluster";
/// Keys of a credentials Secret.
pub const ACCESS_KEY_ID: &str = "AWS_ACCESS_KEY_ID";
/// Keys of a credentials Secret.
pub const SECRET_ACCESS_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// The relay image's `dchat` binary.
const DCHAT: &str = "/usr/local/bin/dchat";
/// A backup may retry once (a lost node); `dchat backup create` aborts what an earlier
/// attempt left behind.
const BACKOFF_LIMIT: i32 = 1;
/// Hard limit for one backup Job.
const ACTIVE_DEADLINE_SECONDS: i64 = 6 * 3600;

/// Which store a backup reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// Each relay's own store, read through the active relay's admin API.
    Embedded,
    /// The shared PostgreSQL database.
    Postgres,
}

impl StoreKind {
    /// The store of `cluster`.
    pub fn of(cluster: &DchatCluster) -> Self {
        if cluster.spec.database.is_some() {
            Self::Postgres
        } else {
            Self::Embedded
        }
    }

    /// The name `dchat backup --source` and the manifest use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Postgres => "postgres",
        }
    }
}

/// A Job name (≤ 63 characters, a label value) for `purpose` of backup `backup`:
/// readable prefix, then a hash of the full name so long names stay unique.
pub fn job_name(backup: &str, purpose: &str) -> String {
    let digest = hex::encode(&Sha256::digest(format!("{purpose}/{backup}").as_bytes())[..4]);
    let room = 63 - purpose.len() - digest.len() - 2;
    // A name (and label value) takes lowercase letters, digits and '-' here; a backup
    // path's '/' and a backup name's '.' become '-'.
    let prefix: String = backup
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(room)
        .collect();
    format!("{}-{purpose}-{digest}", prefix.trim_end_matches('-'))
}

/// `NS/CLUSTER/BACKUP`: where a backup lives under the destination's prefix.
pub fn backup_path(namespace: &str, cluster: &str, backup: &str) -> String {
    format!("{namespace}/{cluster}/{backup}")
}

fn s3_args(destination: &BackupDestination) -> Vec<String> {
    let s3 = &destination.s3;
    let mut args = vec![
        "--s3-bucket".to_string(),
        s3.bucket.clone(),
        "--s3-prefix".to_string(),
        s3.prefix.clone(),
        "--s3-region".to_string(),
        s3.region.clone(),
        "--sse".to_string(),
        s3.encryption.as_str().to_string(),
    ];
    if let Some(endpoint) = &s3.endpoint {
        args.extend(["--s3-endpoint".to_string(), endpoint.clone()]);
    }
    if s3.force_path_style {
        args.push("--s3-force-path-style".to_string());
    }
    if let Some(key) = &s3.kms_key_id {
        args.extend(["--kms-key-id".to_string(), key.clone()]);
    }
    args
}

fn credentials_env(destination: &BackupDestination) -> Vec<EnvVar> {
    let Some(credentials) = &destination.s3.credentials else {
        return Vec::new();
    };
    [ACCESS_KEY_ID, SECRET_ACCESS_KEY]
        .into_iter()
        .map(|key| EnvVar {
            name: key.to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: credentials.secret_ref.name.clone(),
                    key: key.to_string(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        })
        .collect()
}

fn rds_args(rds: Option<&RdsSnapshotSpec>, flag: &str, id: &str) -> Vec<String> {
    rds.map(|rds| {
        vec![
            flag.to_string(),
            id.to_string(),
            "--rds-region".to_string(),
            rds.region.clone(),
        ]
    })
    .unwrap_or_default()
}

fn labels_for(
    cluster_name: &str,
    backup: &str,
    component: &str,
    version: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            BACKUP_APP_NAME.to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            cluster_name.to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            labels::MANAGED_BY.to_string(),
        ),
        ("app.kubernetes.io/version".to_string(), version.to_string()),
        (BACKUP_LABEL.to_string(), backup.to_string()),
    ])
}

/// Owned by the DchatBackup: the Job goes with it, not with the cluster.
fn owned_by(job: &mut Job, backup: &DchatBackup) {
    job.metadata.owner_references = backup.meta().uid.clone().map(|uid| {
        vec![OwnerReference {
            api_version: DchatBackup::api_version(&()).to_string(),
            kind: DchatBackup::kind(&()).to_string(),
            name: backup.name_any(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]
    });
}

/// Runs as the relays' ServiceAccount (IRSA), with room for the streaming upload.
fn as_backup_pod(job: &mut Job, cluster: &DchatCluster) {
    let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    pod.service_account_name = Some(labels::service_account_name(cluster));
    for container in &mut pod.containers {
        // The Kubernetes termination message carries the manifest to the operator.
        container.termination_message_policy = Some("FallbackToLogsOnError".to_string());
        if let Some(limits) = container.resources.as_mut().and_then(|r| r.limits.as_mut()) {
            limits.insert("memory".to_string(), Quantity("128Mi".into()));
            limits.insert("cpu".to_string(), Quantity("1".into()));
        }
    }
}

/// What `dchat backup create` is told.
#[derive(Clone, Debug)]
pub struct CreateRequest<'a> {
    /// The cluster backed up.
    pub cluster: &'a DchatCluster,
    /// The backup.
    pub backup: &'a DchatBackup,
    /// Relay version serving now: the Job runs its image.
    pub version: &'a str,
    /// The slot serving now (embedded store: its first relay is read).
    pub slot: Slot,
}

/// The `dchat backup create` Job of a backup.
pub fn create_job(request: &CreateRequest<'_>) -> Option<Job> {
    let cluster = request.cluster;
    let spec = cluster.spec.backup.as_ref()?;
    let namespace = cluster.namespace()?;
    let backup = request.backup.name_any();
    let store = StoreKind::of(cluster);
    let mut command = vec![
        DCHAT.to_string(),
        "backup".to_string(),
        "create".to_string(),
        "--namespace".to_string(),
        namespace,
        "--cluster".to_string(),
        cluster.name_any(),
        "--cluster-uid".to_string(),
        cluster.uid().unwrap_or_default(),
        "--backup".to_string(),
        backup.clone(),
        "--relay-version".to_string(),
        request.version.to_string(),
        "--source".to_string(),
        store.as_str().to_string(),
    ];
    let mut env = credentials_env(&spec.destination);
    match store {
        StoreKind::Embedded => {
            command.extend(["--admin-url".to_string(), admin_url(cluster, request.slot)]);
            env.push(admin_token_env(cluster));
        }
        StoreKind::Postgres => env.extend(database_env(cluster)),
    }
    command.extend(s3_args(&spec.destination));
    if let Some(rds) = spec.rds.as_ref() {
        command.extend(rds_args(
            Some(rds),
            "--rds-instance",
            &rds.instance_identifier,
        ));
        // The backup role's IAM policy allows only snapshots named with this prefix.
        command.extend([
            "--rds-snapshot-prefix".to_string(),
            rds.snapshot_prefix.clone(),
        ]);
    }
    let mut job = tool_job(
        cluster,
        ToolJob {
            name: job_name(&backup, "backup"),
            labels: labels_for(&cluster.name_any(), &backup, "backup", request.version),
            container: "backup",
            version: request.version,
            command,
            env,
            backoff_limit: BACKOFF_LIMIT,
            active_deadline_seconds: ACTIVE_DEADLINE_SECONDS,
        },
    );
    owned_by(&mut job, request.backup);
    as_backup_pod(&mut job, cluster);
    Some(job)
}

/// What `dchat backup restore` is told.
#[derive(Clone, Debug)]
pub struct RestoreRequest<'a> {
    /// The new cluster restored into.
    pub cluster: &'a DchatCluster,
    /// The bucket holding the backup.
    pub destination: &'a BackupDestination,
    /// `<namespace>/<cluster>/<backup>`.
    pub backup_path: &'a str,
    /// Relay version whose image runs the command (the one starting).
    pub version: &'a str,
    /// The slot starting (embedded store: its first relay is written).
    pub slot: Slot,
}

/// The `dchat backup restore` Job of a new cluster: the backup into its empty store,
/// before any client can reach it. Owned by the cluster.
pub fn restore_job(request: &RestoreRequest<'_>) -> Job {
    let cluster = request.cluster;
    let store = StoreKind::of(cluster);
    let mut command = vec![
        DCHAT.to_string(),
        "backup".to_string(),
        "restore".to_string(),
        "--backup-path".to_string(),
        request.backup_path.to_string(),
        "--target".to_string(),
        store.as_str().to_string(),
    ];
    let mut env = credentials_env(request.destination);
    match store {
        StoreKind::Embedded => {
            command.extend(["--admin-url".to_string(), admin_url(cluster, request.slot)]);
            env.push(admin_token_env(cluster));
        }
        StoreKind::Postgres => env.extend(database_env(cluster)),
    }
    command.extend(s3_args(request.destination));
    let name = job_name(
        &format!("{}-{}", cluster.name_any(), request.backup_path),
        "restore",
    );
    let mut job = tool_job(
        cluster,
        ToolJob {
            name,
            labels: labels_for(
                &cluster.name_any(),
                request.backup_path.rsplit('/').next().unwrap_or_default(),
                "restore",
                request.version,
            ),
            container: "restore",
            version: request.version,
            command,
            env,
            backoff_limit: BACKOFF_LIMIT,
            active_deadline_seconds: ACTIVE_DEADLINE_SECONDS,
        },
    );
    as_backup_pod(&mut job, cluster);
    job
}

/// What `dchat backup verify` (a restore drill) is told.
#[derive(Clone, Debug)]
pub struct DrillRequest<'a> {
    /// The cluster, for its image, identity and destination.
    pub cluster: &'a DchatCluster,
    /// The backup drilled (owns the Job).
    pub backup: &'a DchatBackup,
    /// Relay version whose image runs the command.
    pub version: &'a str,
    /// `<namespace>/<cluster>/<backup>`.
    pub backup_path: &'a str,
    /// Where the scratch store goes.
    pub scratch_dir: &'a str,
    /// The drill's scheduled time, which makes the Job's name unique.
    pub stamp: &'a str,
}

/// The `dchat backup verify` Job of a restore drill: download, check, restore into a
/// scratch store, compare counts. Not retried: a failed drill is a result.
pub fn drill_job(request: &DrillRequest<'_>) -> Option<Job> {
    let cluster = request.cluster;
    let spec = cluster.spec.backup.as_ref()?;
    let backup = request.backup.name_any();
    let mut command = vec![
        DCHAT.to_string(),
        "backup".to_string(),
        "verify".to_string(),
        "--backup-path".to_string(),
        request.backup_path.to_string(),
        "--scratch-dir".to_string(),
        request.scratch_dir.to_string(),
    ];
    command.extend(s3_args(&spec.destination));
    let mut job = tool_job(
        cluster,
        ToolJob {
            name: job_name(&format!("{backup}-{}", request.stamp), "verify"),
            labels: labels_for(
                &cluster.name_any(),
                &backup,
                "backup-verify",
                request.version,
            ),
            container: "verify",
            version: request.version,
            command,
            env: credentials_env(&spec.destination),
            backoff_limit: 0,
            active_deadline_seconds: ACTIVE_DEADLINE_SECONDS,
        },
    );
    owned_by(&mut job, request.backup);
    as_backup_pod(&mut job, cluster);
    Some(job)
}

/// What `dchat backup delete` is told.
#[derive(Clone, Debug)]
pub struct DeleteRequest<'a> {
    /// The cluster the backup belongs to, for its image, identity and destination.
    pub cluster: &'a DchatCluster,
    /// The backup whose data goes.
    pub backup: &'a DchatBackup,
    /// Relay version whose image runs the command.
    pub version: &'a str,
}

/// The `dchat backup delete` Job of a backup: its RDS snapshot (only if tagged by this
/// operator), then its S3 objects.
pub fn delete_job(request: &DeleteRequest<'_>) -> Option<Job> {
    let cluster = request.cluster;
    let spec = cluster.spec.backup.as_ref()?;
    let namespace = request.backup.namespace()?;
    let backup = request.backup.name_any();
    let mut command = vec![
        DCHAT.to_string(),
        "backup".to_string(),
        "delete".to_string(),
        "--backup-path".to_string(),
        backup_path(&namespace, &request.backup.spec.cluster.name, &backup),
    ];
    command.extend(s3_args(&spec.destination));
    if let Some(id) = request
        .backup
        .status
        .as_ref()
        .and_then(|s| s.rds_snapshot_identifier.as_deref())
    {
        command.extend(rds_args(spec.rds.as_ref(), "--rds-snapshot", id));
    }
    let mut job = tool_job(
        cluster,
        ToolJob {
            name: job_name(&backup, "delete"),
            labels: labels_for(
                &cluster.name_any(),
                &backup,
                "backup-delete",
                request.version,
            ),
            container: "delete",
            version: request.version,
            command,
            env: credentials_env(&spec.destination),
            backoff_limit: 3,
            active_deadline_seconds: 1800,
        },
    );
    owned_by(&mut job, request.backup);
    as_backup_pod(&mut job, cluster);
    Some(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClusterReference, DchatBackupSpec, DeletionPolicy};
    use crate::testing::cluster_from_yaml;

    fn backup(name: &str) -> DchatBackup {
        let mut b = DchatBackup::new(
            name,
            DchatBackupSpec {
                cluster: ClusterReference {
                    name: "chat".into(),
                },
                deletion_policy: DeletionPolicy::Retain,
            },
        );
        b.metadata.namespace = Some("apps".into());
        b.metadata.uid = Some("backup-uid".into());
        b
    }

    fn command(job: &Job) -> Vec<String> {
        job.spec.clone().unwrap().template.spec.unwrap().containers[0]
            .command
            .clone()
            .unwrap()
    }

    fn env_names(job: &Job) -> Vec<String> {
        job.spec.clone().unwrap().template.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.name)
            .collect()
    }

    const S3: &str =
        "backup: {destination: {s3: {bucket: dchat-backups, prefix: prod, region: eu-west-1}}}";

    #[test]
    fn embedded_backup_reads_the_active_relay_through_the_admin_api() {
        let cluster = cluster_from_yaml(&format!("version: '1.4.2'\n{S3}"));
        let b = backup("chat-20261206t120000z");
        let job = create_job(&CreateRequest {
            cluster: &cluster,
            backup: &b,
            version: "1.4.2",
            slot: Slot::Green,
        })
        .unwrap();
        let name = job.metadata.name.clone().unwrap();
        assert!(
            name.starts_with("chat-20261206t120000z-backup-") && name.len() <= 63,
            "{name}"
        );
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("DchatBackup", "chat-20261206t120000z")
        );
        let cmd = command(&job);
        let joined = cmd.join(" ");
        assert!(
            joined
                .starts_with("/usr/local/bin/dchat backup create --namespace apps --cluster chat"),
            "{joined}"
        );
        assert!(joined.contains("--source embedded --admin-url http://chat-green-0.chat-green-headless.apps.svc:9090"), "{joined}");
        assert!(
            joined.contains(
                "--s3-bucket dchat-backups --s3-prefix prod --s3-region eu-west-1 --sse AES256"
            ),
            "{joined}"
        );
        assert!(!joined.contains("--rds"));
        assert_eq!(env_names(&job), vec!["DCHAT_ADMIN_TOKEN"]);
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("chat-relay"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("ghcr.io/dchat/relay:1.4.2"));
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"],
            Quantity("128Mi".into())
        );
        let labels = pod_labels(&b, &cluster);
        assert_eq!(labels["app.kubernetes.io/name"], BACKUP_APP_NAME);
    }

    fn pod_labels(b: &DchatBackup, cluster: &DchatCluster) -> BTreeMap<String, String> {
        let job = create_job(&CreateRequest {
            cluster,
            backup: b,
            version: "1",
            slot: Slot::Blue,
        })
        .unwrap();
        job.spec.unwrap().template.metadata.unwrap().labels.unwrap()
    }

    #[test]
    fn postgres_backup_with_credentials_kms_and_rds() {
        let cluster = cluster_from_yaml(
            "version: '2.0'\nreplicas: 2\ndatabase: {secretRef: {name: db}}\nbackup: {destination: {s3: {bucket: b1, region: us-east-1, endpoint: 'http://minio:9000', forcePathStyle: true, credentials: {secretRef: {name: s3-keys}}, encryption: 'aws:kms', kmsKeyId: alias/dchat}}, rds: {instanceIdentifier: dchat-prod, region: us-east-1, snapshotPrefix: prod-relay}}",
        );
        let job = nightly_backup_job(&cluster);
        let joined = command(&job).join(" ");
        assert!(
            joined.contains("--source postgres --s3-bucket b1"),
            "{joined}"
        );
        assert!(!joined.contains("--admin-url"));
        assert!(joined.contains("--sse aws:kms --s3-endpoint http://minio:9000 --s3-force-path-style --kms-key-id alias/dchat"), "{joined}");
        assert!(
            joined.ends_with(
                "--rds-instance dchat-prod --rds-region us-east-1 --rds-snapshot-prefix prod-relay"
            ),
            "{joined}"
        );
        assert_eq!(
            env_names(&job),
            vec![
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "DB_HOST",
                "DB_PORT",
                "DB_NAME",
                "DB_USER",
                "DB_PASSWORD"
            ]
        );
    }

    #[test]
    fn rds_snapshots_are_named_with_the_default_prefix_when_none_is_set() {
        let cluster = cluster_from_yaml(
            "version: '2.0'\nreplicas: 2\ndatabase: {secretRef: {name: db}}\nbackup: {destination: {s3: {bucket: b1, region: us-east-1}}, rds: {instanceIdentifier: dchat-prod, region: us-east-1}}",
        );
        let job = nightly_backup_job(&cluster);
        let joined = command(&job).join(" ");
        assert!(joined.ends_with("--rds-snapshot-prefix dchat"), "{joined}");
    }

    /// The backup Job of the backup `nightly` of `cluster`, version 2.0, blue serving.
    fn nightly_backup_job(cluster: &DchatCluster) -> Job {
        create_job(&CreateRequest {
            cluster,
            backup: &backup("nightly"),
            version: "2.0",
            slot: Slot::Blue,
        })
        .unwrap()
    }

    #[test]
    fn delete_job_names_the_backup_path_and_its_rds_snapshot() {
        let cluster = cluster_from_yaml(
            "version: '2.0'\nreplicas: 2\ndatabase: {secretRef: {name: db}}\nbackup: {destination: {s3: {bucket: b1, region: us-east-1}}, rds: {instanceIdentifier: dchat-prod, region: us-east-1}}",
        );
        let mut b = backup("nightly");
        b.status = Some(crate::api::DchatBackupStatus {
            rds_snapshot_identifier: Some("dchat-apps-chat-nightly".into()),
            ..Default::default()
        });
        let job = delete_job(&DeleteRequest {
            cluster: &cluster,
            backup: &b,
            version: "2.0",
        })
        .unwrap();
        let joined = command(&job).join(" ");
        assert!(
            joined.starts_with(
                "/usr/local/bin/dchat backup delete --backup-path apps/chat/nightly --s3-bucket b1"
            ),
            "{joined}"
        );
        assert!(
            joined.ends_with("--rds-snapshot dchat-apps-chat-nightly --rds-region us-east-1"),
            "{joined}"
        );
    }

    #[test]
    fn no_backup_spec_no_job() {
        let cluster = cluster_from_yaml("version: '1'");
        assert!(create_job(&CreateRequest {
            cluster: &cluster,
            backup: &backup("x"),
            version: "1",
            slot: Slot::Blue
        })
        .is_none());
    }

    #[test]
    fn job_names_fit_and_stay_unique() {
        let long = "a".repeat(200);
        let one = job_name(&long, "backup");
        let other = job_name(&format!("{long}b"), "backup");
        assert!(one.len() <= 63 && other.len() <= 63);
        assert_ne!(one, other);
        let from_path = job_name("chat-apps/old/old-1.b", "restore");
        assert!(
            from_path.starts_with("chat-apps-old-old-1-b-restore-"),
            "{from_path}"
        );
    }
}

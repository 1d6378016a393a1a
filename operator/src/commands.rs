//! `dchat-operator promote`, `abort` and `backup`: set the rollout annotations on a
//! DchatCluster, the same thing `kubectl annotate` does, or create a DchatBackup, so
//! runbooks and pipelines have one command. The kubectl plugin (`kubectl-dchat`) uses
//! [`annotate`], [`create_backup_as`] and [`wait_for_backup`] too, under its own field
//! manager.

use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject};
use kube::Client;
use serde_json::json;

use crate::api::DchatCluster;
use crate::labels::CLI_FIELD_MANAGER;
use crate::rollout::{ABORT_ANNOTATION, PROMOTE_ANNOTATION};

/// What to ask of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutCommand {
    /// Promote a rollout awaiting promotion.
    Promote,
    /// Abort the rollout in flight and return traffic to the old slot.
    Abort,
}

impl RolloutCommand {
    /// The annotation that carries the request.
    pub fn annotation(self) -> &'static str {
        match self {
            Self::Promote => PROMOTE_ANNOTATION,
            Self::Abort => ABORT_ANNOTATION,
        }
    }
}

/// The annotation could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such DchatCluster.
    #[error("DchatCluster {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The API call failed.
    #[error("annotating DchatCluster {namespace}/{name}: {source}")]
    Kube {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Sets the command's annotation (value: the current time, for the audit trail) on
/// `namespace/name`. The operator acts on it at its next reconcile and removes it.
pub async fn request(
    client: Client,
    namespace: &str,
    name: &str,
    command: RolloutCommand,
) -> Result<(), CommandError> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    annotate(
        client,
        namespace,
        name,
        &[(command.annotation(), Some(now))],
        CLI_FIELD_MANAGER,
    )
    .await
}

/// Sets (`Some`) or removes (`None`) annotations of DchatCluster `namespace/name` with
/// one merge patch, recorded under `field_manager`. A merge patch rather than an apply:
/// removing must work whoever set the annotation (a person, a pipeline, Argo CD).
/// The answer is not read back as a typed DchatCluster, so a cluster whose status an
/// operator newer than this crate wrote can still be annotated.
pub async fn annotate(
    client: Client,
    namespace: &str,
    name: &str,
    changes: &[(&str, Option<String>)],
    field_manager: &str,
) -> Result<(), CommandError> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, namespace, &ApiResource::erase::<DchatCluster>(&()));
    let annotations: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|(key, value)| (key.to_string(), json!(value)))
        .collect();
    let patch = json!({"metadata": {"annotations": annotations}});
    match api
        .patch(
            name,
            &PatchParams {
                field_manager: Some(field_manager.to_string()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(CommandError::NotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        Err(source) => Err(CommandError::Kube {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

/// Why `dchat-operator backup` did not end with a Completed backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupCommandError {
    /// No such DchatCluster.
    #[error("DchatCluster {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The cluster has no `spec.backup`.
    #[error("DchatCluster {namespace}/{name} has no spec.backup: set a destination first")]
    NotConfigured {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// An API call failed.
    #[error("{action} {namespace}/{name}: {source}")]
    Kube {
        /// What was being done.
        action: &'static str,
        /// Namespace.
        namespace: String,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The backup failed.
    #[error("backup {namespace}/{name} failed: {error}")]
    Failed {
        /// Namespace.
        namespace: String,
        /// Backup name.
        name: String,
        /// Its status.error.
        error: String,
    },
    /// `--wait` ran out of time.
    #[error("backup {namespace}/{name} is still {phase} after {waited:?}")]
    TimedOut {
        /// Namespace.
        namespace: String,
        /// Backup name.
        name: String,
        /// Its last phase.
        phase: &'static str,
        /// How long it waited.
        waited: std::time::Duration,
    },
}

/// Creates an on-demand DchatBackup of `cluster`, named `<cluster>-<UTC time>` like the
/// scheduled ones; returns its name.
pub async fn create_backup(
    client: Client,
    namespace: &str,
    cluster: &str,
) -> Result<String, BackupCommandError> {
    create_backup_as(client, namespace, cluster, CLI_FIELD_MANAGER).await
}

/// [`create_backup`], recorded under `field_manager` (e.g. the kubectl plugin's).
pub async fn create_backup_as(
    client: Client,
    namespace: &str,
    cluster: &str,
    field_manager: &str,
) -> Result<String, BackupCommandError> {
    use crate::api::{ClusterReference, DchatBackup, DchatBackupSpec};
    use kube::api::PostParams;
    let kube_err = |action, name: &str| {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        move |source| BackupCommandError::Kube {
            action,
            namespace,
            name,
            source,
        }
    };
    // Read untyped: only spec.backup matters, and a status written by a newer operator
    // must not stop a backup.
    let clusters: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<DchatCluster>(&()),
    );
    let found = clusters
        .get_opt(cluster)
        .await
        .map_err(kube_err("reading DchatCluster", cluster))?
        .ok_or_else(|| BackupCommandError::NotFound {
            namespace: namespace.to_string(),
            name: cluster.to_string(),
        })?;
    if found.data["spec"]["backup"].is_null() {
        return Err(BackupCommandError::NotConfigured {
            namespace: namespace.to_string(),
            name: cluster.to_string(),
        });
    }
    let name = crate::backup::schedule::backup_name(cluster, k8s_openapi::jiff::Timestamp::now());
    let mut backup = DchatBackup::new(
        &name,
        DchatBackupSpec {
            cluster: ClusterReference {
                name: cluster.to_string(),
            },
            deletion_policy: Default::default(),
        },
    );
    backup.metadata.labels = Some(
        [(
            crate::backup::job::CLUSTER_LABEL.to_string(),
            cluster.to_string(),
        )]
        .into(),
    );
    let backups: Api<DchatBackup> = Api::namespaced(client, namespace);
    backups
        .create(
            &PostParams {
                field_manager: Some(field_manager.to_string()),
                ..PostParams::default()
            },
            &backup,
        )
        .await
        .map_err(kube_err("creating DchatBackup", &name))?;
    Ok(name)
}

/// Waits until backup `name` is Completed (Ok) or Failed (Err), at most `timeout`.
pub async fn wait_for_backup(
    client: Client,
    namespace: &str,
    name: &str,
    timeout: std::time::Duration,
) -> Result<crate::api::DchatBackupStatus, BackupCommandError> {
    use crate::api::{BackupPhase, DchatBackup};
    let backups: Api<DchatBackup> = Api::namespaced(client, namespace);
    let started = tokio::time::Instant::now();
    loop {
        let backup = backups
            .get(name)
            .await
            .map_err(|source| BackupCommandError::Kube {
                action: "reading DchatBackup",
                namespace: namespace.to_string(),
                name: name.to_string(),
                source,
            })?;
        let status = backup.status.unwrap_or_default();
        match status.phase {
            BackupPhase::Completed => return Ok(status),
            BackupPhase::Failed => {
                return Err(BackupCommandError::Failed {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    error: status.error.unwrap_or_default(),
                })
            }
            phase if started.elapsed() >= timeout => {
                return Err(BackupCommandError::TimedOut {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    phase: phase.as_str(),
                    waited: timeout,
                })
            }
            _ => tokio::time::sleep(std::time::Duration::from_secs(2)).await,
        }
    }
}

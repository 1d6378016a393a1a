//! Manual RDS snapshots taken with a backup, and their deletion.
//!
//! Every snapshot this tool creates carries three tags:
//! `dchat.network/managed-by=dchat-operator`, `dchat.network/cluster=<namespace>/<cluster>`
//! and `dchat.network/backup=<backup>`. Deletion touches only manual snapshots with all
//! three naming the backup being deleted; anything else (automated `rds:` snapshots,
//! snapshots someone took by hand, another backup's) is refused, never deleted.

use std::time::{Duration, Instant};

use aws_sdk_rds::types::{DbSnapshot, Tag};
use sha2::{Digest, Sha256};

use super::aws::{describe, status};
use super::manifest::BackupPath;

/// Tag key naming the tool that manages the snapshot.
pub const TAG_MANAGED_BY: &str = "dchat.network/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "dchat-operator";
/// Tag key naming the cluster as `namespace/name`.
pub const TAG_CLUSTER: &str = "dchat.network/cluster";
/// Tag key naming the backup.
pub const TAG_BACKUP: &str = "dchat.network/backup";

/// Why an RDS operation failed; each variant names the snapshot.
#[derive(Debug, thiserror::Error)]
pub enum RdsError {
    /// An RDS request failed.
    #[error("RDS {op} {id}: {reason}")]
    Request {
        /// The RDS operation.
        op: &'static str,
        /// The snapshot (or instance) identifier.
        id: String,
        /// The SDK error with its causes.
        reason: String,
    },
    /// The snapshot exists but is not one this tool made for this backup.
    #[error("RDS snapshot {id} is not managed by dchat for backup {backup}: {reason}; refusing to touch it")]
    NotManaged {
        /// The snapshot identifier.
        id: String,
        /// The backup it was expected to belong to.
        backup: String,
        /// Which tag or property disagrees.
        reason: String,
    },
    /// The snapshot reached a state it cannot leave for `available`.
    #[error("RDS snapshot {id} is {status}, not available")]
    Failed {
        /// The snapshot identifier.
        id: String,
        /// Its status.
        status: String,
    },
    /// The snapshot did not become available in time.
    #[error("RDS snapshot {id} not available after {secs}s (status {status})")]
    Timeout {
        /// The snapshot identifier.
        id: String,
        /// The limit.
        secs: u64,
        /// Its last status.
        status: String,
    },
}

/// Default first part of the snapshot identifiers.
pub const DEFAULT_SNAPSHOT_PREFIX: &str = "dchat";

/// Checks a snapshot identifier prefix (`--rds-snapshot-prefix`): 1–64 letters, digits
/// and single hyphens, starting with a letter, not ending with a hyphen. An IAM policy
/// may allow snapshot actions only on names with a given prefix.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix.starts_with(|c: char| c.is_ascii_alphabetic())
        && !prefix.ends_with('-')
        && !prefix.contains("--")
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{prefix:?} must be 1 to 64 letters, digits and single hyphens, starting with a \
             letter and not ending with a hyphen"
        ))
    }
}

/// The RDS snapshot identifier of a backup: `<prefix>-<namespace>-<cluster>-<backup>`
/// with every character RDS does not allow made a hyphen (no doubled or trailing
/// hyphens), shortened to fit 255 characters, and ended with 8 hex digits of the
/// SHA-256 of the exact path, so that different paths never share an identifier.
/// `prefix` must pass [`validate_prefix`].
pub fn snapshot_identifier(prefix: &str, path: &BackupPath) -> String {
    let raw = format!("{}-{}-{}", path.namespace, path.cluster, path.backup);
    let mut base = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if c == '-' && base.ends_with('-') {
            continue;
        }
        base.push(c);
    }
    let hash = hex::encode(&Sha256::digest(path.to_string().as_bytes())[..4]);
    // prefix + "-" + base + "-" + 8 hex digits ≤ 255.
    base.truncate(255 - prefix.len() - 1 - 1 - 8);
    let base = base.trim_matches('-');
    format!("{prefix}-{base}-{hash}")
}

/// What a deletion found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The snapshot existed and was deleted.
    Deleted,
    /// There was no such snapshot.
    Gone,
}

/// An RDS client in one region.
#[derive(Clone, Debug)]
pub struct Rds {
    client: aws_sdk_rds::Client,
    /// Between two polls of a snapshot's status.
    pub poll: Duration,
}

impl Rds {
    /// A client for `region`.
    pub async fn connect(region: &str) -> Rds {
        let sdk = super::aws::sdk_config(Some(region)).await;
        Rds {
            client: aws_sdk_rds::Client::new(&sdk),
            poll: Duration::from_secs(5),
        }
    }

    /// The snapshot `id`, or `None` if there is none.
    async fn describe(&self, id: &str) -> Result<Option<DbSnapshot>, RdsError> {
        match self
            .client
            .describe_db_snapshots()
            .db_snapshot_identifier(id)
            .send()
            .await
        {
            Ok(out) => Ok(out.db_snapshots().first().cloned()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_db_snapshot_not_found_fault())
                    || status(&e) == Some(404) =>
            {
                Ok(None)
            }
            Err(e) => Err(RdsError::Request {
                op: "DescribeDBSnapshots",
                id: id.to_string(),
                reason: describe(&e),
            }),
        }
    }

    /// Takes a manual snapshot of `instance` for the backup at `path` (its identifier
    /// from [`snapshot_identifier`] with `prefix`), tagged, and
    /// waits until it is `available` (at most `timeout`). A snapshot of this backup
    /// left by an earlier, interrupted run is reused; one with the same identifier that
    /// is not this backup's is refused.
    pub async fn create_snapshot(
        &self,
        instance: &str,
        prefix: &str,
        path: &BackupPath,
        timeout: Duration,
    ) -> Result<String, RdsError> {
        let id = snapshot_identifier(prefix, path);
        match self.describe(&id).await? {
            Some(existing) => {
                check_owner(&existing, &id, path)?;
                tracing::info!(snapshot = %id, "RDS snapshot of this backup exists already; waiting for it");
            }
            None => {
                let tags = [
                    (TAG_MANAGED_BY, MANAGED_BY.to_string()),
                    (TAG_CLUSTER, format!("{}/{}", path.namespace, path.cluster)),
                    (TAG_BACKUP, path.backup.clone()),
                ]
                .into_iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect::<Vec<_>>();
                match self
                    .client
                    .create_db_snapshot()
                    .db_instance_identifier(instance)
                    .db_snapshot_identifier(&id)
                    .set_tags(Some(tags))
                    .send()
                    .await
                {
                    Ok(_) => tracing::info!(snapshot = %id, instance, "RDS snapshot started"),
                    // A concurrent run of the same backup: check it is ours and wait.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_db_snapshot_already_exists_fault()) =>
                    {
                        match self.describe(&id).await? {
                            Some(existing) => check_owner(&existing, &id, path)?,
                            None => {
                                return Err(RdsError::Request {
                                    op: "CreateDBSnapshot",
                                    id,
                                    reason: describe(&e),
                                })
                            }
                        }
                    }
                    Err(e) => {
                        return Err(RdsError::Request {
                            op: "CreateDBSnapshot",
                            id: format!("{id} (instance {instance})"),
                            reason: describe(&e),
                        })
                    }
                }
            }
        }
        self.wait_available(&id, timeout).await?;
        Ok(id)
    }

    async fn wait_available(&self, id: &str, timeout: Duration) -> Result<(), RdsError> {
        let started = Instant::now();
        loop {
            let status = match self.describe(id).await? {
                Some(s) => s.status().unwrap_or("unknown").to_string(),
                None => "deleted".to_string(),
            };
            match status.as_str() {
                "available" => {
                    tracing::info!(
                        snapshot = id,
                        secs = started.elapsed().as_secs(),
                        "RDS snapshot available"
                    );
                    return Ok(());
                }
                "creating" | "pending" | "backing-up" | "copying" | "unknown" => {}
                _ => {
                    return Err(RdsError::Failed {
                        id: id.to_string(),
                        status,
                    })
                }
            }
            if started.elapsed() >= timeout {
                return Err(RdsError::Timeout {
                    id: id.to_string(),
                    secs: timeout.as_secs(),
                    status,
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Whether the snapshot `id` exists, after checking that it is a manual snapshot
    /// tagged as the backup at `path`'s (refused otherwise). A delete checks every
    /// snapshot it was given before it deletes any, so a refusal removes nothing.
    pub async fn check_snapshot(&self, id: &str, path: &BackupPath) -> Result<bool, RdsError> {
        let Some(existing) = self.describe(id).await? else {
            return Ok(false);
        };
        check_owner(&existing, id, path)?;
        Ok(true)
    }

    /// Deletes the manual snapshot `id` of the backup at `path`. Refuses (and deletes
    /// nothing) unless it is a manual snapshot tagged as this backup's; a snapshot that
    /// does not exist is [`Deleted::Gone`].
    pub async fn delete_snapshot(&self, id: &str, path: &BackupPath) -> Result<Deleted, RdsError> {
        if !self.check_snapshot(id, path).await? {
            return Ok(Deleted::Gone);
        }
        match self
            .client
            .delete_db_snapshot()
            .db_snapshot_identifier(id)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(snapshot = id, "RDS snapshot deleted");
                Ok(Deleted::Deleted)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_db_snapshot_not_found_fault()) =>
            {
                Ok(Deleted::Gone)
            }
            Err(e) => Err(RdsError::Request {
                op: "DeleteDBSnapshot",
                id: id.to_string(),
                reason: describe(&e),
            }),
        }
    }
}

/// Checks that `snap` is a manual snapshot carrying this backup's three tags.
fn check_owner(snap: &DbSnapshot, id: &str, path: &BackupPath) -> Result<(), RdsError> {
    let refuse = |reason: String| RdsError::NotManaged {
        id: id.to_string(),
        backup: path.to_string(),
        reason,
    };
    let kind = snap.snapshot_type().unwrap_or("");
    if kind != "manual" || id.starts_with("rds:") {
        return Err(refuse(format!(
            "it is an {kind:?} snapshot, not a manual one"
        )));
    }
    let tag = |key: &str| {
        snap.tag_list()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_string)
    };
    let cluster = format!("{}/{}", path.namespace, path.cluster);
    for (key, want) in [
        (TAG_MANAGED_BY, MANAGED_BY),
        (TAG_CLUSTER, cluster.as_str()),
        (TAG_BACKUP, path.backup.as_str()),
    ] {
        match tag(key) {
            Some(v) if v == want => {}
            Some(v) => return Err(refuse(format!("its tag {key} is {v:?}, not {want:?}"))),
            None => return Err(refuse(format!("it does not carry the tag {key}={want}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(ns: &str, c: &str, b: &str) -> BackupPath {
        BackupPath::new(ns, c, b, ["ns", "cluster", "backup"]).unwrap()
    }

    #[test]
    fn identifiers_follow_the_rds_rules_and_never_collide() {
        let a = snapshot_identifier("dchat", &path("prod", "chat", "chat-20261206t015045z"));
        assert!(
            a.starts_with("dchat-prod-chat-chat-20261206t015045z-"),
            "{a}"
        );
        let b = snapshot_identifier("dchat", &path("a-b", "c", "d"));
        let c = snapshot_identifier("dchat", &path("a", "b-c", "d"));
        assert_ne!(b, c);
        let long = "x".repeat(253);
        let custom = snapshot_identifier("dchat-prod-relay", &path("prod", "chat", "b1"));
        assert!(
            custom.starts_with("dchat-prod-relay-prod-chat-b1-"),
            "{custom}"
        );
        validate_prefix("dchat-prod-relay").unwrap();
        for bad in ["", "1a", "a-", "a--b", "a_b", &"a".repeat(65)] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
        for id in [
            a,
            b,
            c,
            snapshot_identifier("dchat", &path("a.b", "c--d", "e.-f")),
            snapshot_identifier("dchat", &path(&long, &long, &long)),
            snapshot_identifier(&"p".repeat(64), &path(&long, &long, &long)),
        ] {
            assert!(id.len() <= 255, "{id}");
            assert!(id.starts_with(|c: char| c.is_ascii_alphabetic()), "{id}");
            assert!(!id.ends_with('-') && !id.contains("--"), "{id}");
            assert!(
                id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "{id}"
            );
        }
    }

    fn snap(kind: &str, tags: &[(&str, &str)]) -> DbSnapshot {
        DbSnapshot::builder()
            .snapshot_type(kind)
            .set_tag_list(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                    .collect(),
            ))
            .build()
    }

    #[test]
    fn only_this_backups_manual_tagged_snapshots_are_touched() {
        let p = path("prod", "chat", "b1");
        let ours = [
            (TAG_MANAGED_BY, MANAGED_BY),
            (TAG_CLUSTER, "prod/chat"),
            (TAG_BACKUP, "b1"),
        ];
        check_owner(&snap("manual", &ours), "id", &p).unwrap();
        let e = check_owner(&snap("automated", &ours), "rds:x", &p).unwrap_err();
        assert!(e.to_string().contains("not a manual one"), "{e}");
        let e = check_owner(&snap("manual", &[]), "id", &p).unwrap_err();
        assert!(
            e.to_string()
                .contains("dchat.network/managed-by=dchat-operator"),
            "{e}"
        );
        let mut other = ours;
        other[2] = (TAG_BACKUP, "b2");
        let e = check_owner(&snap("manual", &other), "id", &p).unwrap_err();
        assert!(e.to_string().contains("\"b2\""), "{e}");
    }
}

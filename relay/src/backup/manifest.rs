//! The manifest written next to each backup's data object, and the names that place a
//! backup in the bucket.
//!
//! The manifest is small on purpose (well under a kilobyte): `dchat backup create`
//! also writes it as the Job's Kubernetes termination message, which is limited to
//! 4 KiB. Its JSON field names are camelCase, like the Kubernetes objects that quote it.

use serde::{Deserialize, Serialize};

/// Version of the manifest document this relay writes and reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// Largest manifest read back (a valid one is under 1 KiB).
pub const MAX_MANIFEST_BYTES: usize = 16 * 1024;

/// A name in a backup path, a flag, or a manifest field was not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A name or field failed validation.
    #[error("{field}: {reason}")]
    Invalid {
        /// The flag or field, e.g. `--backup`, `manifest.sha256`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A manifest object is not a valid manifest document.
    #[error("manifest {object} is not valid: {reason}")]
    Unreadable {
        /// Where it was read from (`s3://…/manifest.json`).
        object: String,
        /// The parse or validation error.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Record counts of a snapshot (what its header announces).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Pending (unacknowledged) messages.
    pub messages: u64,
    /// Dedup entries of acknowledged messages, kept until their expiry.
    pub tombstones: u64,
    /// Profiles.
    pub profiles: u64,
    /// Persistent channel memberships.
    pub memberships: u64,
}

/// Which store a backup was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded store of one relay (taken through its admin API).
    Embedded,
    /// The PostgreSQL database a cluster's relays share.
    Postgres,
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Embedded => "embedded",
            StoreKind::Postgres => "postgres",
        })
    }
}

impl std::str::FromStr for StoreKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "embedded" => Ok(StoreKind::Embedded),
            "postgres" => Ok(StoreKind::Postgres),
            other => Err(format!("{other:?} is not embedded or postgres")),
        }
    }
}

/// `manifest.json`: what a completed backup holds and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Manifest document version ([`MANIFEST_FORMAT_VERSION`]).
    pub format_version: u32,
    /// DchatCluster name.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    /// Its `metadata.uid` when the backup was taken.
    pub cluster_uid: String,
    /// Backup name (the DchatBackup's).
    pub backup: String,
    /// When the data object was completed, RFC 3339 UTC (`2026-12-06T01:50:45Z`).
    pub created_at: String,
    /// Version of the relays whose data this is.
    pub relay_version: String,
    /// The store the snapshot was taken from.
    pub store_kind: StoreKind,
    /// The snapshot header's counts.
    pub counts: Counts,
    /// Hex SHA-256 of the whole data object.
    pub sha256: String,
    /// Size of the data object in bytes.
    pub size_bytes: u64,
    /// `s3://bucket/key` of the data object.
    pub location: String,
    /// The manual RDS snapshot taken with this backup, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rds_snapshot_identifier: Option<String>,
    /// The region of that snapshot, so a delete finds it whatever region it is told
    /// (absent in manifests written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rds_region: Option<String>,
}

impl Manifest {
    /// Parses and validates a manifest read from `object`.
    pub fn parse(object: &str, bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let unreadable = |reason: String| ManifestError::Unreadable {
            object: object.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| unreadable(e.to_string()))?;
        m.validate().map_err(|e| unreadable(e.to_string()))?;
        Ok(m)
    }

    /// Checks the fields a restore relies on.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format_version != MANIFEST_FORMAT_VERSION {
            return Err(invalid(
                "formatVersion",
                format!(
                    "{}, this relay reads {MANIFEST_FORMAT_VERSION}",
                    self.format_version
                ),
            ));
        }
        validate_name("namespace", &self.namespace)?;
        validate_name("cluster", &self.cluster)?;
        validate_name("backup", &self.backup)?;
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("sha256", "must be 64 hex digits"));
        }
        if !self.location.starts_with("s3://") {
            return Err(invalid("location", "must be an s3:// URL"));
        }
        Ok(())
    }

    /// The backup's path (`namespace/cluster/backup`).
    pub fn path(&self) -> BackupPath {
        BackupPath {
            namespace: self.namespace.clone(),
            cluster: self.cluster.clone(),
            backup: self.backup.clone(),
        }
    }

    /// The manifest as one line of JSON (what is printed and written as the
    /// termination message).
    pub fn to_line(&self) -> String {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Checks a Kubernetes-style name (namespace, cluster or backup): 1–253 characters of
/// lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit.
/// These become S3 key segments and RDS tag values, so nothing else is accepted.
pub fn validate_name(field: &str, name: &str) -> Result<(), ManifestError> {
    if name.is_empty() || name.len() > 253 {
        return Err(invalid(
            field,
            format!("{name:?} must be 1 to 253 characters"),
        ));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !name.chars().all(ok_char)
        || !name.starts_with(alnum)
        || !name.ends_with(alnum)
        || name.contains("..")
    {
        return Err(invalid(
            field,
            format!(
                "{name:?} is not a valid name (lowercase letters, digits, '-' and '.', \
                 starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// Where a backup lives: `namespace/cluster/backup`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupPath {
    /// Namespace of the cluster.
    pub namespace: String,
    /// Cluster name.
    pub cluster: String,
    /// Backup name.
    pub backup: String,
}

impl BackupPath {
    /// Builds a path from its parts, validating each (named by `flags`).
    pub fn new(
        namespace: &str,
        cluster: &str,
        backup: &str,
        flags: [&str; 3],
    ) -> Result<BackupPath, ManifestError> {
        validate_name(flags[0], namespace)?;
        validate_name(flags[1], cluster)?;
        validate_name(flags[2], backup)?;
        Ok(BackupPath {
            namespace: namespace.to_string(),
            cluster: cluster.to_string(),
            backup: backup.to_string(),
        })
    }

    /// Parses `NS/CLUSTER/BACKUP` (the value of `--backup-path`).
    pub fn parse(flag: &str, s: &str) -> Result<BackupPath, ManifestError> {
        let parts: Vec<&str> = s.trim().trim_matches('/').split('/').collect();
        let [ns, cluster, backup] = parts.as_slice() else {
            return Err(invalid(
                flag,
                format!("{s:?} is not NAMESPACE/CLUSTER/BACKUP"),
            ));
        };
        Self::new(
            ns,
            cluster,
            backup,
            [
                &format!("{flag} (namespace)"),
                &format!("{flag} (cluster)"),
                &format!("{flag} (backup)"),
            ],
        )
    }
}

impl std::fmt::Display for BackupPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.cluster, self.backup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: 1,
            cluster: "chat".into(),
            namespace: "prod".into(),
            cluster_uid: "0b4f2c4e-5b7e-4d8e-9a55-3f0f0f0f0f0f".into(),
            backup: "chat-20261206t015045z".into(),
            created_at: "2026-12-06T01:50:45Z".into(),
            relay_version: "1.4.2".into(),
            store_kind: StoreKind::Postgres,
            counts: Counts {
                messages: 10,
                tombstones: 2,
                profiles: 3,
                memberships: 4,
            },
            sha256: "ab".repeat(32),
            size_bytes: 1234,
            location: "s3://bucket/dchat/prod/chat/chat-20261206t015045z/data.dchat".into(),
            rds_snapshot_identifier: Some("dchat-prod-chat-chat-20261206t015045z".into()),
            rds_region: Some("eu-west-1".into()),
        }
    }

    #[test]
    fn the_json_is_camel_case_and_round_trips() {
        let m = sample();
        let line = m.to_line();
        for field in [
            "\"formatVersion\":1",
            "\"clusterUid\"",
            "\"createdAt\"",
            "\"relayVersion\"",
            "\"storeKind\":\"postgres\"",
            "\"sizeBytes\":1234",
            "\"rdsSnapshotIdentifier\"",
            "\"counts\":{\"messages\":10,\"tombstones\":2,\"profiles\":3,\"memberships\":4}",
        ] {
            assert!(line.contains(field), "{field} in {line}");
        }
        assert!(line.len() < 1024);
        assert_eq!(Manifest::parse("x", line.as_bytes()).unwrap(), m);
        let mut none = m.clone();
        none.rds_snapshot_identifier = None;
        none.rds_region = None;
        assert!(!none.to_line().contains("rdsSnapshotIdentifier"));
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let mut m = sample();
        m.sha256 = "xyz".into();
        let e = Manifest::parse("s3://b/k", m.to_line().as_bytes()).unwrap_err();
        assert!(
            e.to_string().contains("s3://b/k") && e.to_string().contains("sha256"),
            "{e}"
        );
        let e = Manifest::parse("s3://b/k", b"{\"formatVersion\":1}").unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
        let e = Manifest::parse("s3://b/k", b"not json").unwrap_err();
        assert!(
            e.to_string().starts_with("manifest s3://b/k is not valid"),
            "{e}"
        );
    }

    #[test]
    fn names_and_paths() {
        for ok in ["a", "prod", "chat-1", "a.b-c", "0"] {
            validate_name("--backup", ok).unwrap();
        }
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a/b",
            "a..b",
            "a b",
            &"a".repeat(254),
            "ä",
        ] {
            let e = validate_name("--backup", bad).unwrap_err();
            assert!(e.to_string().starts_with("--backup: "), "{bad}: {e}");
        }
        let p = BackupPath::parse("--backup-path", "prod/chat/b1").unwrap();
        assert_eq!(p.to_string(), "prod/chat/b1");
        for bad in ["prod/chat", "prod/chat/b1/x", "prod//b1", "../chat/b1"] {
            let e = BackupPath::parse("--backup-path", bad).unwrap_err();
            assert!(e.to_string().starts_with("--backup-path"), "{bad}: {e}");
        }
    }
}

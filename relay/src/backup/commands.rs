//! The five backup commands and what they report.
//!
//! Each returns a typed result; [`Outcome`] turns it into what the CLI prints (one line
//! of JSON on stdout), the Kubernetes termination message (the same JSON, or
//! `{"error": "...", "reason": "..."}` on failure, at most 4 KiB) and the exit code (0
//! or 1). docs/backup.md is the reference of this contract.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::check::{
    compare_counts, CheckError, Expected, PipeError, StreamCheck, StreamSummary, VerifiedPipe,
};
use super::manifest::{
    validate_name, BackupPath, Counts, Manifest, ManifestError, StoreKind, MANIFEST_FORMAT_VERSION,
    MAX_MANIFEST_BYTES,
};
use super::rds::{Deleted, Rds, RdsError};
use super::s3::{Destination, S3Error, S3Settings, UploadCheck};
use super::source::{self, Admin, SourceError};
use crate::store::PostgresConfig;

/// Largest Kubernetes termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Why a backup command failed. Every variant names the object, field or flag.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A flag or a name in the backup path is invalid.
    #[error(transparent)]
    Input(#[from] ManifestError),
    /// An S3 operation failed or an object did not verify.
    #[error(transparent)]
    S3(#[from] S3Error),
    /// The relay or the database failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// An RDS operation failed or was refused.
    #[error(transparent)]
    Rds(#[from] RdsError),
    /// A backup's data does not match its manifest, or is damaged.
    #[error("backup {path}: {object}: {source}")]
    Check {
        /// The backup.
        path: String,
        /// `s3://…/data.dchat`.
        object: String,
        /// What did not verify.
        #[source]
        source: CheckError,
    },
    /// `create` of a backup whose manifest exists.
    #[error("backup {path} already exists ({object}); delete it first or choose another name")]
    Exists {
        /// The backup.
        path: String,
        /// Its manifest.
        object: String,
    },
    /// No completed backup at that path.
    #[error("backup {path} not found: {object} does not exist")]
    NotFound {
        /// The backup.
        path: String,
        /// The missing object.
        object: String,
    },
    /// The restore target already holds data.
    #[error("restore refused: the target {target} is not empty: {detail}")]
    NotEmpty {
        /// Which store.
        target: String,
        /// What it holds (the store's own words).
        detail: String,
    },
    /// The scratch store of `verify` disagrees with the manifest after the restore.
    #[error("backup {path}: after the restore the scratch store has {actual} {what}, the manifest says {expected}")]
    Restored {
        /// The backup.
        path: String,
        /// Which count.
        what: &'static str,
        /// The manifest's number.
        expected: u64,
        /// The store's number.
        actual: u64,
    },
    /// Local file trouble (the scratch directory).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl BackupError {
    /// A stable, machine-readable reason (the termination message's `reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            BackupError::Input(_) => "InvalidInput",
            BackupError::S3(S3Error::Config { .. }) => "InvalidInput",
            BackupError::S3(S3Error::Verify { .. }) => "UploadVerificationFailed",
            BackupError::S3(S3Error::Check { .. }) => "SnapshotInvalid",
            BackupError::S3(_) => "S3Error",
            BackupError::Source(SourceError::Config { .. }) => "InvalidInput",
            BackupError::Source(_) => "SourceError",
            BackupError::Rds(RdsError::NotManaged { .. }) => "RdsSnapshotNotManaged",
            BackupError::Rds(_) => "RdsError",
            BackupError::Check { .. } => "ChecksumMismatch",
            BackupError::Exists { .. } => "AlreadyExists",
            BackupError::NotFound { .. } => "NotFound",
            BackupError::NotEmpty { .. } => "TargetNotEmpty",
            BackupError::Restored { .. } => "CountMismatch",
            BackupError::Io { .. } => "IoError",
        }
    }
}

/// Where `create` takes the snapshot from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// A relay's admin API (embedded store).
    Embedded {
        /// `http://host:9090`.
        admin_url: String,
        /// The admin token.
        token: String,
    },
    /// The relays' PostgreSQL database.
    Postgres(PostgresConfig),
}

/// Where `restore` loads the backup into.
pub type TargetSpec = SourceSpec;

/// Optional RDS snapshot with a backup.
#[derive(Debug, Clone)]
pub struct RdsSpec {
    /// DB instance identifier.
    pub instance: String,
    /// Region; `None` means the S3 region.
    pub region: Option<String>,
    /// How long to wait for `available`.
    pub timeout: Duration,
    /// First part of the snapshot identifier ([`super::rds::snapshot_identifier`]).
    pub snapshot_prefix: String,
}

/// What `create` needs besides the destination.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Where the backup goes.
    pub path: BackupPath,
    /// The cluster's `metadata.uid`.
    pub cluster_uid: String,
    /// Relay version recorded in the manifest.
    pub relay_version: String,
    /// Where the data comes from.
    pub source: SourceSpec,
    /// RDS snapshot, if any.
    pub rds: Option<RdsSpec>,
    /// How the uploaded object is verified.
    pub upload_check: UploadCheck,
}

/// `dchat backup create`. Returns the manifest it wrote.
pub async fn create(s3: &S3Settings, opts: CreateOptions) -> Result<Manifest, BackupError> {
    let path = &opts.path;
    if opts.cluster_uid.trim().is_empty() {
        return Err(ManifestError::Invalid {
            field: "--cluster-uid".into(),
            reason: "must not be empty".into(),
        }
        .into());
    }
    if opts.relay_version.trim().is_empty() {
        return Err(ManifestError::Invalid {
            field: "--relay-version".into(),
            reason: "must not be empty".into(),
        }
        .into());
    }
    let dest = Destination::connect(s3).await?;
    let data_key = dest.data_key(path);
    let manifest_key = dest.manifest_key(path);
    if dest.size(&manifest_key).await?.is_some() {
        return Err(BackupError::Exists {
            path: path.to_string(),
            object: dest.url(&manifest_key),
        });
    }
    // A run killed before it finished (kill -9, node loss) leaves its multipart upload
    // open; the parts cost storage until aborted.
    let stale = dest.abort_incomplete(&data_key).await?;
    if stale > 0 {
        tracing::info!(backup = %path, aborted = stale, "aborted incomplete uploads of an earlier run");
    }
    let started = Instant::now();
    let (kind, stream, task): (StoreKind, Box<dyn tokio::io::AsyncRead + Unpin + Send>, _) =
        match &opts.source {
            SourceSpec::Embedded { admin_url, token } => {
                let admin = Admin::new(admin_url, token.clone())?;
                (StoreKind::Embedded, Box::new(admin.snapshot().await?), None)
            }
            SourceSpec::Postgres(cfg) => {
                let store = source::connect_postgres(cfg).await?;
                let (reader, task) = source::postgres_snapshot(store);
                (StoreKind::Postgres, Box::new(reader), Some(task))
            }
        };

    let mut upload = dest.start_upload(&data_key).await?;
    let sent = upload.send_stream(stream).await;
    // The source's own verdict first: its error says why a stream ended early.
    let source_result = match task {
        Some(task) => match task.await {
            Ok(r) => r.map(|_| ()),
            Err(e) => Err(SourceError::Store {
                what: "PostgreSQL snapshot",
                source: Box::new(crate::store::StoreError::Task {
                    op: "snapshot",
                    reason: e.to_string(),
                }),
            }),
        },
        None => Ok(()),
    };
    let failure: Option<BackupError> = match (source_result, sent) {
        (Err(e), _) => Some(e.into()),
        (Ok(()), Err(e)) => Some(e.into()),
        (Ok(()), Ok(_)) => None,
    };
    if let Some(e) = failure {
        if let Err(abort) = upload.abort().await {
            tracing::warn!(error = %abort, "aborting the multipart upload failed; the next create or delete of this backup aborts it");
        }
        return Err(e);
    }
    let uploaded = upload.complete().await?;
    // From here the object exists: a failure deletes it, so no backup is left that
    // looks complete without a manifest (and nothing is left to pay for).
    let finish = async {
        let how = dest.verify(&uploaded, opts.upload_check).await?;
        tracing::info!(backup = %path, verified_by = how, "uploaded object verified");
        let (rds_id, rds_region) = match &opts.rds {
            Some(rds) => {
                let region = rds
                    .region
                    .clone()
                    .unwrap_or_else(|| dest.region().to_string());
                let client = Rds::connect(&region).await;
                let id = client
                    .create_snapshot(&rds.instance, &rds.snapshot_prefix, path, rds.timeout)
                    .await?;
                (Some(id), Some(region))
            }
            None => (None, None),
        };
        let manifest = Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            cluster: path.cluster.clone(),
            namespace: path.namespace.clone(),
            cluster_uid: opts.cluster_uid.trim().to_string(),
            backup: path.backup.clone(),
            created_at: now_rfc3339(),
            relay_version: opts.relay_version.trim().to_string(),
            store_kind: kind,
            counts: uploaded.summary.counts.clone(),
            sha256: uploaded.summary.sha256.clone(),
            size_bytes: uploaded.summary.bytes,
            location: dest.url(&data_key),
            rds_snapshot_identifier: rds_id,
            rds_region,
        };
        dest.put_small(
            &manifest_key,
            manifest.to_line().into_bytes(),
            "application/json",
        )
        .await?;
        Ok::<_, BackupError>(manifest)
    };
    match finish.await {
        Ok(manifest) => {
            tracing::info!(
                backup = %path,
                bytes = manifest.size_bytes,
                messages = manifest.counts.messages,
                secs = started.elapsed().as_secs_f64(),
                "backup completed"
            );
            Ok(manifest)
        }
        Err(e) => {
            if let Err(del) = dest.delete(&data_key).await {
                tracing::warn!(error = %del, "deleting the unfinished data object failed");
            }
            Err(e)
        }
    }
}

/// The current time as RFC 3339 UTC with whole seconds.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    aws_sdk_s3::primitives::DateTime::from_secs(secs)
        .fmt(aws_sdk_s3::primitives::DateTimeFormat::DateTime)
        .unwrap_or_else(|_| secs.to_string())
}

/// Filters of `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only this cluster (needs `namespace`).
    pub cluster: Option<String>,
}

/// `dchat backup list`: the manifests under the prefix, sorted by namespace, cluster
/// and creation time. Unreadable manifests are reported in the second list (object and
/// reason) and skipped.
pub async fn list(
    s3: &S3Settings,
    filter: &ListFilter,
) -> Result<(Vec<Manifest>, Vec<String>), BackupError> {
    let dest = Destination::connect(s3).await?;
    let folder = match (&filter.namespace, &filter.cluster) {
        (None, None) => dest.key_under(""),
        (Some(ns), None) => {
            validate_name("--namespace", ns)?;
            dest.key_under(&format!("{ns}/"))
        }
        (Some(ns), Some(c)) => {
            validate_name("--namespace", ns)?;
            validate_name("--cluster", c)?;
            dest.key_under(&format!("{ns}/{c}/"))
        }
        (None, Some(_)) => {
            return Err(ManifestError::Invalid {
                field: "--cluster".into(),
                reason: "needs --namespace".into(),
            }
            .into())
        }
    };
    let mut found = Vec::new();
    let mut bad = Vec::new();
    for key in dest.manifest_keys(&folder).await? {
        let object = dest.url(&key);
        let parsed = match dest.get_small(&key, MAX_MANIFEST_BYTES).await {
            Ok(Some(bytes)) => Manifest::parse(&object, &bytes).map_err(|e| e.to_string()),
            // Deleted between the listing and the read.
            Ok(None) => continue,
            Err(e) => Err(e.to_string()),
        };
        match parsed {
            // Only manifests in their own backup's folder count.
            Ok(m) if key == dest.manifest_key(&m.path()) => found.push(m),
            Ok(m) => bad.push(format!(
                "manifest {object} names backup {}, which belongs elsewhere",
                m.path()
            )),
            Err(e) => bad.push(e),
        }
    }
    found.sort_by(|a, b| {
        (&a.namespace, &a.cluster, &a.created_at, &a.backup).cmp(&(
            &b.namespace,
            &b.cluster,
            &b.created_at,
            &b.backup,
        ))
    });
    Ok((found, bad))
}

/// `list` as a table.
pub fn table(manifests: &[Manifest]) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "CLUSTER".into(),
        "BACKUP".into(),
        "CREATED".into(),
        "STORE".into(),
        "MESSAGES".into(),
        "SIZE".into(),
        "RDS SNAPSHOT".into(),
    ]];
    for m in manifests {
        rows.push([
            m.namespace.clone(),
            m.cluster.clone(),
            m.backup.clone(),
            m.created_at.clone(),
            m.store_kind.to_string(),
            m.counts.messages.to_string(),
            human_size(m.size_bytes),
            m.rds_snapshot_identifier
                .clone()
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut widths = [0usize; 8];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// Reads and checks the manifest of `path`; the data object's key.
async fn load_manifest(
    dest: &Destination,
    path: &BackupPath,
) -> Result<(Manifest, String), BackupError> {
    let key = dest.manifest_key(path);
    let object = dest.url(&key);
    let Some(bytes) = dest.get_small(&key, MAX_MANIFEST_BYTES).await? else {
        return Err(BackupError::NotFound {
            path: path.to_string(),
            object,
        });
    };
    let manifest = Manifest::parse(&object, &bytes)?;
    if manifest.path() != *path {
        return Err(ManifestError::Unreadable {
            object,
            reason: format!("it names backup {}", manifest.path()),
        }
        .into());
    }
    let data_key = dest.data_key(path);
    if manifest.location != dest.url(&data_key) {
        return Err(ManifestError::Unreadable {
            object,
            reason: format!(
                "location {} is not {}",
                manifest.location,
                dest.url(&data_key)
            ),
        }
        .into());
    }
    Ok((manifest, data_key))
}

/// Opens the data object of a backup as a stream that verifies itself against the
/// manifest (size and header counts as it goes, SHA-256 and trailer at its end).
async fn open_verified(
    dest: &Destination,
    path: &BackupPath,
    manifest: &Manifest,
    data_key: &str,
) -> Result<
    (
        VerifiedPipe,
        impl tokio::io::AsyncRead + Unpin + Send + Sync + 'static,
    ),
    BackupError,
> {
    let (body, size) = dest.download(data_key).await.map_err(|e| match e {
        S3Error::NotFound { object } => BackupError::NotFound {
            path: path.to_string(),
            object,
        },
        e => e.into(),
    })?;
    if size != manifest.size_bytes {
        return Err(BackupError::Check {
            path: path.to_string(),
            object: dest.url(data_key),
            source: CheckError::Mismatch {
                field: "sizeBytes",
                expected: manifest.size_bytes.to_string(),
                actual: size.to_string(),
            },
        });
    }
    let expected = Expected {
        bytes: manifest.size_bytes,
        sha256: manifest.sha256.to_ascii_lowercase(),
        counts: manifest.counts.clone(),
    };
    Ok(VerifiedPipe::start(body, StreamCheck::expecting(expected)))
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    /// `namespace/cluster/backup`.
    pub backup: String,
    /// `embedded` or `postgres`.
    pub target: StoreKind,
    /// The backup's source store.
    pub source: StoreKind,
    /// Seconds from the start of the download to the commit.
    pub restore_seconds: f64,
    /// What was restored.
    pub counts: Counts,
    /// Hex SHA-256 of the data object (verified).
    pub sha256: String,
    /// Its size.
    pub size_bytes: u64,
}

/// `dchat backup restore`: loads a backup into an empty store, verified before the
/// store commits it.
pub async fn restore(
    s3: &S3Settings,
    path: &BackupPath,
    target: &TargetSpec,
) -> Result<RestoreReport, BackupError> {
    let dest = Destination::connect(s3).await?;
    let (manifest, data_key) = load_manifest(&dest, path).await?;
    // Connect to the target before downloading anything.
    enum Target {
        Embedded(Box<Admin>),
        Postgres(crate::store::PostgresStore, String),
    }
    let target = match target {
        SourceSpec::Embedded { admin_url, token } => {
            let admin = Admin::new(admin_url, token.clone())?;
            refuse_busy_relay(&admin).await?;
            Target::Embedded(Box::new(admin))
        }
        SourceSpec::Postgres(cfg) => Target::Postgres(
            source::connect_postgres(cfg).await?,
            format!(
                "PostgreSQL database {} on {}:{}",
                cfg.dbname, cfg.host, cfg.port
            ),
        ),
    };
    let started = Instant::now();
    let (pipe, reader) = open_verified(&dest, path, &manifest, &data_key).await?;
    let (kind, result) = match &target {
        Target::Embedded(admin) => (
            StoreKind::Embedded,
            match admin.restore(reader).await {
                Ok(_) => Ok(()),
                Err(e) => Err(match e.not_empty() {
                    Some(detail) => BackupError::NotEmpty {
                        target: format!("relay at {}", admin.url()),
                        detail,
                    },
                    None => e.into(),
                }),
            },
        ),
        Target::Postgres(store, name) => (
            StoreKind::Postgres,
            source::restore_postgres(store, reader)
                .await
                .map(|_| ())
                .map_err(|e| match e.not_empty() {
                    Some(detail) => BackupError::NotEmpty {
                        target: name.clone(),
                        detail,
                    },
                    None => e.into(),
                }),
        ),
    };
    let summary = settle(path, &dest.url(&data_key), pipe, result).await?;
    Ok(RestoreReport {
        backup: path.to_string(),
        target: kind,
        source: manifest.store_kind,
        restore_seconds: round_ms(started.elapsed()),
        counts: summary.counts,
        sha256: summary.sha256,
        size_bytes: summary.bytes,
    })
}

/// Refuses a relay whose store holds data (its `contents`, which covers dedup entries
/// too), or that is not on the embedded store, before anything is downloaded. The
/// relay's restore checks again under its writer lock, but a refusal there (data that
/// arrived in between) may reach this client only as a broken connection: the relay
/// stops reading the stream it refuses.
async fn refuse_busy_relay(admin: &Admin) -> Result<(), BackupError> {
    let stats = admin.stats().await?;
    if stats["backend"] == "postgres" {
        return Err(SourceError::Config {
            field: "--target",
            reason: format!(
                "the relay at {} stores its data in PostgreSQL: restore into its database with --target postgres",
                admin.url()
            ),
        }
        .into());
    }
    if let Some(what) = stats["contents"].as_str() {
        return Err(BackupError::NotEmpty {
            target: format!("relay at {}", admin.url()),
            detail: what.to_string(),
        });
    }
    // A relay that does not report `contents` still reports its counts.
    let store = &stats["store"];
    let count = |k: &str| store[k].as_u64().unwrap_or(0);
    let found: Vec<String> = [
        ("pending_messages", "pending messages"),
        ("profiles", "profiles"),
        ("channels", "channels with members"),
    ]
    .into_iter()
    .filter(|(k, _)| count(k) > 0)
    .map(|(k, what)| format!("{} {what}", count(k)))
    .collect();
    if !found.is_empty() {
        return Err(BackupError::NotEmpty {
            target: format!("relay at {}", admin.url()),
            detail: found.join(", "),
        });
    }
    Ok(())
}

/// Combines the store's result with the stream's own check. A check failure is the
/// clearer error (the store only saw its read fail, or found the stream malformed): when
/// the store refused the stream itself, the rest of the object is still read and hashed
/// so that a damaged object is reported as what it is — a checksum mismatch. A store
/// that failed for another reason (not empty, unreachable) ends the download at once.
async fn settle(
    path: &BackupPath,
    object: &str,
    pipe: VerifiedPipe,
    result: Result<(), BackupError>,
) -> Result<StreamSummary, BackupError> {
    let check_error = |source| BackupError::Check {
        path: path.to_string(),
        object: object.to_string(),
        source,
    };
    let pipe_error = |e: PipeError| match e {
        PipeError::Check(c) => check_error(c),
        PipeError::Read(source) => BackupError::S3(S3Error::Read {
            object: object.to_string(),
            source,
        }),
    };
    match result {
        Ok(()) => pipe.finish().await.map_err(pipe_error),
        Err(e) => {
            if let Some(c) = pipe.failed() {
                pipe.stop();
                return Err(check_error(c));
            }
            if refused_the_stream(&e) {
                return match pipe.finish().await {
                    Err(PipeError::Check(c)) => Err(check_error(c)),
                    _ => Err(e),
                };
            }
            pipe.stop();
            Err(e)
        }
    }
}

/// Whether a restore failed because of the stream's content.
fn refused_the_stream(e: &BackupError) -> bool {
    use crate::store::StoreError;
    match e {
        BackupError::Source(SourceError::Refused { status, .. }) => *status == 400,
        BackupError::Source(SourceError::Store { source, .. }) => matches!(
            **source,
            StoreError::SnapshotInvalid { .. }
                | StoreError::SnapshotChecksum { .. }
                | StoreError::SnapshotIo { .. }
                | StoreError::InvalidInput { .. }
        ),
        _ => false,
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// `namespace/cluster/backup`.
    pub backup: String,
    /// Whether every check passed.
    pub ok: bool,
    /// Seconds to download and restore into the scratch store (0 if it did not get
    /// that far).
    pub restore_seconds: f64,
    /// What the scratch restore held (absent if it did not get that far).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<Counts>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failure's stable reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// `dchat backup verify`: downloads a backup, checks it against its manifest, restores
/// it into a scratch embedded store under `scratch` and compares the counts. Never
/// fails as a call: the report says what went wrong.
pub async fn verify(s3: &S3Settings, path: &BackupPath, scratch: &Path) -> VerifyReport {
    let started = Instant::now();
    match verify_inner(s3, path, scratch).await {
        Ok(counts) => VerifyReport {
            backup: path.to_string(),
            ok: true,
            restore_seconds: round_ms(started.elapsed()),
            counts: Some(counts),
            error: None,
            reason: None,
        },
        Err(e) => VerifyReport {
            backup: path.to_string(),
            ok: false,
            restore_seconds: 0.0,
            counts: None,
            reason: Some(e.reason()),
            error: Some(e.to_string()),
        },
    }
}

async fn verify_inner(
    s3: &S3Settings,
    path: &BackupPath,
    scratch: &Path,
) -> Result<Counts, BackupError> {
    let dest = Destination::connect(s3).await?;
    let (manifest, data_key) = load_manifest(&dest, path).await?;
    let dir = scratch.join(format!(
        "dchat-verify-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).map_err(|source| BackupError::Io {
        what: "creating the scratch directory",
        path: dir.clone(),
        source,
    })?;
    let result = async {
        let (pipe, reader) = open_verified(&dest, path, &manifest, &data_key).await?;
        let restored = source::restore_scratch(&dir, reader).await;
        let (result, stats) = match restored {
            Ok((_, stats)) => (Ok(()), Some(stats)),
            Err(e) => (Err(e.into()), None),
        };
        let summary = settle(path, &dest.url(&data_key), pipe, result).await?;
        compare_counts(&manifest.counts, &summary.counts).map_err(|source| BackupError::Check {
            path: path.to_string(),
            object: dest.url(&data_key),
            source,
        })?;
        if let Some(stats) = stats {
            for (what, expected, actual) in [
                (
                    "pending messages",
                    manifest.counts.messages,
                    stats.pending_messages,
                ),
                ("profiles", manifest.counts.profiles, stats.profiles),
            ] {
                if expected != actual {
                    return Err(BackupError::Restored {
                        path: path.to_string(),
                        what,
                        expected,
                        actual,
                    });
                }
            }
        }
        Ok(summary.counts)
    }
    .await;
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "removing the scratch store failed");
    }
    result
}

/// What `delete` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteReport {
    /// `namespace/cluster/backup`.
    pub backup: String,
    /// Whether `data.dchat` existed (it is gone now either way).
    pub data_deleted: bool,
    /// Whether `manifest.json` existed.
    pub manifest_deleted: bool,
    /// Incomplete multipart uploads aborted.
    pub aborted_uploads: usize,
    /// RDS snapshots: identifier and `deleted` or `gone`.
    pub rds_snapshots: Vec<RdsDeletion>,
}

/// One RDS snapshot `delete` handled.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RdsDeletion {
    /// Its identifier.
    pub id: String,
    /// `deleted`, or `gone` if it did not exist.
    pub result: &'static str,
}

/// `dchat backup delete`: the RDS snapshots first (those named by `rds_snapshot` and by
/// the manifest; each only if tagged as this backup's, otherwise the whole delete is
/// refused before anything is removed), then `data.dchat`, then `manifest.json` (last,
/// so an interrupted delete still has the record of what is left), and any incomplete
/// upload of the data object. What is already gone counts as deleted.
pub async fn delete(
    s3: &S3Settings,
    path: &BackupPath,
    rds_snapshot: Option<&str>,
    rds_region: Option<&str>,
) -> Result<DeleteReport, BackupError> {
    let dest = Destination::connect(s3).await?;
    let manifest_key = dest.manifest_key(path);
    let object = dest.url(&manifest_key);
    // Each snapshot with the region to look for it in: the manifest's own snapshot in the
    // region the manifest recorded (a delete told another region would otherwise find
    // it "gone" and drop its only record), the one named on the command line in
    // `--rds-region` (default: the S3 region).
    let told_region = rds_region
        .map(str::to_string)
        .unwrap_or_else(|| dest.region().to_string());
    let mut snapshots: Vec<(String, String)> = rds_snapshot
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|id| (told_region.clone(), id.to_string()))
        .into_iter()
        .collect();
    match dest.get_small(&manifest_key, MAX_MANIFEST_BYTES).await {
        Ok(Some(bytes)) => match Manifest::parse(&object, &bytes) {
            Ok(m) => {
                let region = m.rds_region.unwrap_or_else(|| told_region.clone());
                snapshots.extend(m.rds_snapshot_identifier.map(|id| (region, id)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the manifest is unreadable; deleting the objects anyway")
            }
        },
        Ok(None) => {}
        Err(S3Error::TooBig { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut by_region: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (region, id) in snapshots {
        by_region.entry(region).or_default().push(id);
    }
    let mut groups = Vec::new();
    for (region, mut ids) in by_region {
        ids.sort();
        ids.dedup();
        groups.push((Rds::connect(&region).await, ids));
    }
    // Every snapshot is checked before any is deleted: one that is not this backup's
    // refuses the whole delete with nothing removed.
    for (rds, ids) in &groups {
        for id in ids {
            rds.check_snapshot(id, path).await?;
        }
    }
    let mut rds_snapshots = Vec::new();
    for (rds, ids) in groups {
        for id in ids {
            let result = match rds.delete_snapshot(&id, path).await? {
                Deleted::Deleted => "deleted",
                Deleted::Gone => "gone",
            };
            rds_snapshots.push(RdsDeletion { id, result });
        }
    }
    let data_key = dest.data_key(path);
    let aborted_uploads = dest.abort_incomplete(&data_key).await?;
    let data_deleted = dest.delete(&data_key).await?;
    let manifest_deleted = dest.delete(&manifest_key).await?;
    Ok(DeleteReport {
        backup: path.to_string(),
        data_deleted,
        manifest_deleted,
        aborted_uploads,
        rds_snapshots,
    })
}

/// What the CLI does with a command's result: the line printed on stdout, the
/// termination message and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Printed on stdout (may be several lines, e.g. `list`); empty for nothing.
    pub stdout: String,
    /// Written to the termination log, if any.
    pub termination: Option<String>,
    /// Exit code: 0 success, 1 failure.
    pub code: u8,
}

impl Outcome {
    /// Success that prints `line` and also reports it as the termination message.
    pub fn reported(line: String) -> Outcome {
        Outcome {
            stdout: format!("{line}\n"),
            termination: Some(line),
            code: 0,
        }
    }

    /// A failure: `{"error": "...", "reason": "..."}` as the termination message; the
    /// message also goes to stderr.
    pub fn failed(e: &BackupError) -> Outcome {
        Outcome {
            stdout: String::new(),
            termination: Some(error_json(&e.to_string(), e.reason())),
            code: 1,
        }
    }
}

/// `{"error": message, "reason": reason}`, with the message shortened to keep the whole
/// line within the termination message limit.
pub fn error_json(message: &str, reason: &str) -> String {
    let mut msg = message.to_string();
    if msg.len() > 3500 {
        let mut cut = 3500;
        while !msg.is_char_boundary(cut) {
            cut -= 1;
        }
        msg.truncate(cut);
        msg.push('…');
    }
    serde_json::json!({"error": msg, "reason": reason}).to_string()
}

/// Writes the termination message to `path` if that file exists and is writable (as
/// Kubernetes provides `/dev/termination-log`); elsewhere it does nothing.
pub fn write_termination_message(path: &Path, message: &str) {
    if !path.exists() {
        return;
    }
    let mut bytes = message.as_bytes();
    if bytes.len() > TERMINATION_MESSAGE_LIMIT {
        bytes = &bytes[..TERMINATION_MESSAGE_LIMIT];
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes));
    if let Err(e) = written {
        tracing::debug!(path = %path.display(), error = %e, "termination message not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_stay_within_the_termination_limit() {
        let long = "x".repeat(10_000);
        let line = error_json(&long, "S3Error");
        assert!(line.len() <= TERMINATION_MESSAGE_LIMIT, "{}", line.len());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["reason"], "S3Error");
        let line = error_json("snapshot checksum \"mismatch\"", "ChecksumMismatch");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["error"], "snapshot checksum \"mismatch\"");
    }

    #[test]
    fn table_and_sizes() {
        assert_eq!(human_size(10), "10B");
        assert_eq!(human_size(3 << 20), "3.0MiB");
        let t = table(&[]);
        assert!(t.starts_with("NAMESPACE  CLUSTER  BACKUP"), "{t}");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_seconds() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[10] == b'T', "{t}");
    }
}

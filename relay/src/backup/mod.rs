//! Backups of relay data to S3, with optional RDS snapshots: the data path behind
//! `dchat backup create|list|verify|restore|delete` (docs/backup.md).
//!
//! The operator runs these commands in Kubernetes Jobs and reads their result from the
//! termination message; it never holds relay data or calls AWS itself. The same commands
//! work by hand against a relay and a bucket.
//!
//! One backup is two objects under `s3://<bucket>/<prefix>/<namespace>/<cluster>/<backup>/`:
//! `data.dchat`, the store's snapshot stream (docs/storage.md, "Snapshot format" — the
//! same format whether it came from the embedded store or PostgreSQL), and
//! `manifest.json`, written last, only after the data object was uploaded and verified.
//! A backup without a manifest is not a backup.
//!
//! Modules, one per concern:
//! - [`aws`]: the SDK configuration shared by S3 and RDS (credentials chain, HTTPS
//!   client on rustls with ring).
//! - [`s3`]: the destination — object layout, streaming multipart upload with bounded
//!   memory, upload verification, download, listing, deletion.
//! - [`check`]: what is verified about a snapshot stream as it passes (object SHA-256,
//!   size, header counts, the stream's own trailer).
//! - [`manifest`]: the manifest document and the names in a backup path.
//! - [`source`]: where snapshots come from and go to (a relay's admin API for the
//!   embedded store, the PostgreSQL database directly, a scratch embedded store).
//! - [`rds`]: manual RDS snapshots, tagged, and their deletion.
//! - [`commands`]: the five commands, their JSON output and the termination message.

pub mod aws;
pub mod check;
pub mod commands;
pub mod manifest;
pub mod rds;
pub mod s3;
pub mod source;

pub use commands::{BackupError, Outcome};
pub use manifest::{BackupPath, Counts, Manifest};

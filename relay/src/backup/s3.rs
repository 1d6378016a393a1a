//! The S3 destination: where a backup's objects are, how the data object is uploaded
//! with bounded memory and verified, and how objects are read, listed and deleted.
//!
//! Layout: `s3://<bucket>/<prefix>/<namespace>/<cluster>/<backup>/data.dchat` and
//! `…/<backup>/manifest.json` (the prefix may be empty).
//!
//! The data object is always a multipart upload, streamed in parts of
//! [`PART_BYTES`] (16 MiB from part [`LARGE_PARTS_FROM`] on, so that S3's 10,000-part
//! limit allows 117 GiB): one part is uploaded while the next fills, so the upload
//! holds at most two parts in memory whatever the snapshot's size. Each part carries its
//! SHA-256 (`x-amz-checksum-sha256`): S3 refuses a part whose bytes do not match. After
//! completion the object is verified ([`Destination::verify`]).

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart, ServerSideEncryption,
};
use base64::Engine as _;
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use super::aws::{describe, status};
use super::check::{CheckError, StreamCheck, StreamSummary};
use super::manifest::BackupPath;

/// Part size of the multipart upload (S3's minimum is 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// From this part number on, parts are twice as large.
pub const LARGE_PARTS_FROM: i32 = 5001;
/// Longest wait for the next bytes of the snapshot being uploaded.
const SOURCE_IDLE: std::time::Duration = std::time::Duration::from_secs(600);
/// S3's limit of parts per upload.
const MAX_PARTS: i32 = 10_000;
/// The data object's name in a backup's folder.
pub const DATA_OBJECT: &str = "data.dchat";
/// The manifest's name in a backup's folder.
pub const MANIFEST_OBJECT: &str = "manifest.json";

/// Why an S3 operation failed. Every variant names the object (`s3://bucket/key`) or
/// the setting involved.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// A destination setting is unusable.
    #[error("{field}: {reason}")]
    Config {
        /// The flag (and its environment variable).
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// An S3 request failed.
    #[error("S3 {op} {object}: {reason}")]
    Request {
        /// The S3 operation, e.g. `UploadPart`.
        op: &'static str,
        /// `s3://bucket/key` (or the bucket and prefix for listings).
        object: String,
        /// The SDK error with its causes.
        reason: String,
    },
    /// An object that must exist does not.
    #[error("{object} does not exist")]
    NotFound {
        /// `s3://bucket/key`.
        object: String,
    },
    /// The snapshot is larger than one multipart upload can hold.
    #[error("{object}: the snapshot exceeds {MAX_PARTS} parts (117 GiB)")]
    TooLarge {
        /// `s3://bucket/key`.
        object: String,
    },
    /// Reading the snapshot stream (the source) failed while uploading.
    #[error("reading the snapshot for {object}: {source}")]
    Read {
        /// `s3://bucket/key` being written.
        object: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The stream failed its check (see [`CheckError`]).
    #[error("{object}: {source}")]
    Check {
        /// `s3://bucket/key`.
        object: String,
        /// What did not verify.
        #[source]
        source: CheckError,
    },
    /// The uploaded object is not what was sent.
    #[error(
        "{object} failed verification after upload: {what}: expected {expected}, S3 has {actual}"
    )]
    Verify {
        /// `s3://bucket/key`.
        object: String,
        /// What was compared (`size`, `composite SHA-256`, `SHA-256 (re-read)`).
        what: &'static str,
        /// What was uploaded.
        expected: String,
        /// What S3 reports.
        actual: String,
    },
    /// A small object (a manifest) is larger than allowed.
    #[error("{object} is {size} bytes, more than the {limit} a manifest may have")]
    TooBig {
        /// `s3://bucket/key`.
        object: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: usize,
    },
}

/// Server-side encryption of the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sse {
    /// SSE-S3 (`AES256`), the default.
    Aes256,
    /// SSE-KMS (`aws:kms`), with the bucket's or the given key.
    Kms,
}

impl std::str::FromStr for Sse {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "AES256" => Ok(Sse::Aes256),
            "aws:kms" => Ok(Sse::Kms),
            other => Err(format!("{other:?} is not AES256 or aws:kms")),
        }
    }
}

/// How an uploaded object is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadCheck {
    /// Compare S3's composite SHA-256 (of the part checksums) with the one computed
    /// while uploading; read the object back if S3 reports none.
    Checksum,
    /// Always read the whole object back and hash it.
    Reread,
}

impl std::str::FromStr for UploadCheck {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "checksum" => Ok(UploadCheck::Checksum),
            "reread" => Ok(UploadCheck::Reread),
            other => Err(format!("{other:?} is not checksum or reread")),
        }
    }
}

/// The destination settings (flags `--s3-*`, `--sse`, `--kms-key-id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix; may be empty. Leading and trailing slashes are ignored.
    pub prefix: String,
    /// Region; `None` uses the SDK's region chain (`AWS_REGION`).
    pub region: Option<String>,
    /// Endpoint URL of an S3-compatible store (MinIO, moto).
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible stores need.
    pub force_path_style: bool,
    /// Server-side encryption.
    pub sse: Sse,
    /// KMS key for `aws:kms`; `None` uses the bucket's default key.
    pub kms_key_id: Option<String>,
}

/// A connected destination.
#[derive(Clone, Debug)]
pub struct Destination {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    region: String,
    sse: Sse,
    kms_key_id: Option<String>,
}

/// A finished data object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Its key.
    pub key: String,
    /// What the stream held (size, SHA-256, counts).
    pub summary: StreamSummary,
    /// Number of parts.
    pub parts: usize,
    /// Base64 composite checksum: SHA-256 of the concatenated part digests.
    pub composite_sha256: String,
}

impl Destination {
    /// Validates the settings and builds the client. Nothing is sent yet.
    pub async fn connect(settings: &S3Settings) -> Result<Destination, S3Error> {
        let bucket = settings.bucket.trim();
        if bucket.is_empty() {
            return Err(S3Error::Config {
                field: "--s3-bucket (DCHAT_BACKUP_S3_BUCKET)",
                reason: "is required".into(),
            });
        }
        if bucket.contains('/') {
            return Err(S3Error::Config {
                field: "--s3-bucket (DCHAT_BACKUP_S3_BUCKET)",
                reason: format!("{bucket:?} is a bucket name, not a path"),
            });
        }
        if settings.kms_key_id.is_some() && settings.sse != Sse::Kms {
            return Err(S3Error::Config {
                field: "--kms-key-id",
                reason: "is only used with --sse aws:kms".into(),
            });
        }
        let region = settings.region.as_deref().filter(|r| !r.trim().is_empty());
        let sdk = super::aws::sdk_config(region).await;
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            return Err(S3Error::Config {
                field: "--s3-region (DCHAT_BACKUP_S3_REGION)",
                reason: "is required (no AWS_REGION either)".into(),
            });
        };
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(settings.force_path_style)
            // The whole object's SHA-256 is checked here against the manifest; the SDK's
            // own response validation would misread a composite (multipart) checksum
            // from stores that report it without the `-N` suffix.
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(endpoint) = settings.endpoint.as_deref().filter(|e| !e.is_empty()) {
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                return Err(S3Error::Config {
                    field: "--s3-endpoint (DCHAT_BACKUP_S3_ENDPOINT)",
                    reason: format!("{endpoint:?} is not an http(s):// URL"),
                });
            }
            conf = conf.endpoint_url(endpoint);
        }
        Ok(Destination {
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            bucket: bucket.to_string(),
            prefix: settings.prefix.trim().trim_matches('/').to_string(),
            region,
            sse: settings.sse,
            kms_key_id: settings.kms_key_id.clone(),
        })
    }

    /// The region the client uses.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Key of the folder that holds `path`'s objects, with a trailing slash.
    pub fn folder(&self, path: &BackupPath) -> String {
        self.key_under(&format!("{path}/"))
    }

    /// The key of `rest` under the prefix.
    pub fn key_under(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// Key of a backup's data object.
    pub fn data_key(&self, path: &BackupPath) -> String {
        format!("{}{DATA_OBJECT}", self.folder(path))
    }

    /// Key of a backup's manifest.
    pub fn manifest_key(&self, path: &BackupPath) -> String {
        format!("{}{MANIFEST_OBJECT}", self.folder(path))
    }

    /// `s3://bucket/key`.
    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn request_error(
        &self,
        op: &'static str,
        key: &str,
        e: impl std::error::Error + 'static,
    ) -> S3Error {
        S3Error::Request {
            op,
            object: self.url(key),
            reason: describe(&e),
        }
    }

    /// The size of an object, or `None` if it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, S3Error> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(h) => Ok(Some(h.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.request_error("HeadObject", key, e)),
        }
    }

    /// Aborts every incomplete multipart upload of exactly `key` (left by a killed
    /// run); returns how many there were. Without permission to list them (HTTP 403) it
    /// warns and aborts none.
    pub async fn abort_incomplete(&self, key: &str) -> Result<usize, S3Error> {
        let mut aborted = 0;
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(key)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await;
            let page = match page {
                Ok(page) => page,
                // Cleaning up is housekeeping, not part of a backup's correctness: without
                // s3:ListBucketMultipartUploads the bucket's abort-incomplete-multipart
                // lifecycle rule is left to do it.
                Err(e) if status(&e) == Some(403) => {
                    tracing::warn!(
                        object = %self.url(key),
                        error = %describe(&e),
                        "not allowed to list incomplete multipart uploads (s3:ListBucketMultipartUploads); leaving them to the bucket's lifecycle rule"
                    );
                    return Ok(aborted);
                }
                Err(e) => return Err(self.request_error("ListMultipartUploads", key, e)),
            };
            for u in page.uploads() {
                let (Some(k), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                // The prefix also matches longer keys; only this object's uploads go.
                if k != key {
                    continue;
                }
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(k)
                    .upload_id(id)
                    .send()
                    .await
                {
                    Ok(_) => {}
                    // Finished or aborted meanwhile: gone is what was wanted.
                    Err(e) if status(&e) == Some(404) => {}
                    Err(e) => return Err(self.request_error("AbortMultipartUpload", k, e)),
                }
                tracing::info!(object = %self.url(k), upload_id = id, "aborted an incomplete multipart upload");
                aborted += 1;
            }
            if page.is_truncated() != Some(true) {
                return Ok(aborted);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(aborted);
            }
        }
    }

    /// Starts a multipart upload of `key` (SHA-256 part checksums, the configured
    /// encryption).
    pub async fn start_upload(&self, key: &str) -> Result<MultipartUpload, S3Error> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/octet-stream")
            .checksum_algorithm(ChecksumAlgorithm::Sha256);
        req = match self.sse {
            Sse::Aes256 => req.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms => req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(self.kms_key_id.clone()),
        };
        let out = req
            .send()
            .await
            .map_err(|e| self.request_error("CreateMultipartUpload", key, e))?;
        let Some(upload_id) = out.upload_id().map(str::to_string) else {
            return Err(S3Error::Request {
                op: "CreateMultipartUpload",
                object: self.url(key),
                reason: "the answer has no upload id".into(),
            });
        };
        tracing::info!(object = %self.url(key), %upload_id, "multipart upload started");
        Ok(MultipartUpload {
            dest: self.clone(),
            key: key.to_string(),
            upload_id,
            parts: Vec::new(),
            digests: Vec::new(),
            in_flight: None,
            spare: None,
            summary: None,
        })
    }

    /// Verifies an uploaded data object: its size (HeadObject) and its content — the
    /// composite SHA-256 S3 reports (`ChecksumMode=ENABLED`), or, when S3 reports none
    /// or `how` asks for it, the SHA-256 of the object read back in full (streamed).
    /// Returns how it was verified.
    pub async fn verify(
        &self,
        uploaded: &Uploaded,
        how: UploadCheck,
    ) -> Result<&'static str, S3Error> {
        let key = uploaded.key.as_str();
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| self.request_error("HeadObject", key, e))?;
        let size = head.content_length().unwrap_or(-1);
        if size != uploaded.summary.bytes as i64 {
            return Err(S3Error::Verify {
                object: self.url(key),
                what: "size",
                expected: uploaded.summary.bytes.to_string(),
                actual: size.to_string(),
            });
        }
        if how == UploadCheck::Checksum {
            if let Some(reported) = head.checksum_sha256() {
                // S3 writes a composite checksum as `<base64>-<parts>`; some compatible
                // stores leave the suffix out.
                let digest = reported.split('-').next().unwrap_or(reported);
                if digest != uploaded.composite_sha256 {
                    return Err(S3Error::Verify {
                        object: self.url(key),
                        what: "composite SHA-256 of the parts",
                        expected: uploaded.composite_sha256.clone(),
                        actual: reported.to_string(),
                    });
                }
                return Ok("composite-sha256");
            }
            tracing::info!(object = %self.url(key), "S3 reports no SHA-256 checksum; reading the object back");
        }
        let (mut body, _) = self.download(key).await?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = body.read(&mut buf).await.map_err(|source| S3Error::Read {
                object: self.url(key),
                source,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let actual = hex::encode(hasher.finalize());
        if actual != uploaded.summary.sha256 {
            return Err(S3Error::Verify {
                object: self.url(key),
                what: "SHA-256 (read back)",
                expected: uploaded.summary.sha256.clone(),
                actual,
            });
        }
        Ok("reread-sha256")
    }

    /// Writes a small object (a manifest) in one request, with the configured encryption.
    pub async fn put_small(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), S3Error> {
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&body));
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(digest)
            .body(ByteStream::from(body));
        req = match self.sse {
            Sse::Aes256 => req.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms => req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(self.kms_key_id.clone()),
        };
        req.send()
            .await
            .map_err(|e| self.request_error("PutObject", key, e))?;
        Ok(())
    }

    /// Reads a small object whole; `None` if it does not exist.
    pub async fn get_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, S3Error> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            // A missing bucket answers 404 too; it is an error, not a missing object.
            Err(e) if status(&e) == Some(404) && e.code() != Some("NoSuchBucket") => {
                return Ok(None)
            }
            Err(e) => return Err(self.request_error("GetObject", key, e)),
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        if size > limit as u64 {
            return Err(S3Error::TooBig {
                object: self.url(key),
                size,
                limit,
            });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        out.body
            .into_async_read()
            .take(limit as u64 + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|source| S3Error::Read {
                object: self.url(key),
                source,
            })?;
        if bytes.len() > limit {
            return Err(S3Error::TooBig {
                object: self.url(key),
                size: bytes.len() as u64,
                limit,
            });
        }
        Ok(Some(bytes))
    }

    /// Opens an object for streaming; returns the body and its size.
    pub async fn download(
        &self,
        key: &str,
    ) -> Result<(impl AsyncRead + Unpin + Send + 'static, u64), S3Error> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let size = out.content_length().unwrap_or(0).max(0) as u64;
                Ok((out.body.into_async_read(), size))
            }
            Err(e) if status(&e) == Some(404) => Err(S3Error::NotFound {
                object: self.url(key),
            }),
            Err(e) => Err(self.request_error("GetObject", key, e)),
        }
    }

    /// Keys of every `manifest.json` under `folder` (a key prefix ending in `/`, or
    /// empty for the whole bucket), in key order.
    pub async fn manifest_keys(&self, folder: &str) -> Result<Vec<String>, S3Error> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(folder)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.request_error("ListObjectsV2", folder, e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    if k.ends_with(&format!("/{MANIFEST_OBJECT}")) {
                        keys.push(k.to_string());
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Deletes an object; returns whether it existed. Deleting what is gone succeeds.
    pub async fn delete(&self, key: &str) -> Result<bool, S3Error> {
        let existed = self.size(key).await?.is_some();
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.request_error("DeleteObject", key, e))?;
        Ok(existed)
    }
}

/// One multipart upload in progress. [`MultipartUpload::send_stream`] uploads a stream
/// as its parts; then either [`MultipartUpload::complete`] or
/// [`MultipartUpload::abort`].
pub struct MultipartUpload {
    dest: Destination,
    key: String,
    upload_id: String,
    parts: Vec<CompletedPart>,
    digests: Vec<[u8; 32]>,
    /// The part being uploaded; the task hands its buffer back.
    in_flight: Option<JoinHandle<Result<(CompletedPart, Bytes), S3Error>>>,
    /// A part buffer to fill again: reusing the two buffers keeps the allocator from
    /// holding on to a fresh 8 MiB block per part.
    spare: Option<Vec<u8>>,
    summary: Option<StreamSummary>,
}

impl MultipartUpload {
    /// `s3://bucket/key` of the object being written.
    pub fn object(&self) -> String {
        self.dest.url(&self.key)
    }

    /// The upload id.
    pub fn upload_id(&self) -> &str {
        &self.upload_id
    }

    /// Reads `input` to its end and uploads it as parts, one uploading while the next
    /// fills. The stream is checked as it passes ([`StreamCheck`]): a stream that is
    /// not a complete, intact snapshot fails here, before anything is completed.
    pub async fn send_stream(
        &mut self,
        mut input: impl AsyncRead + Unpin,
    ) -> Result<StreamSummary, S3Error> {
        let mut check = StreamCheck::new();
        let mut part_number: i32 = 1;
        loop {
            let size = if part_number >= LARGE_PARTS_FROM {
                PART_BYTES * 2
            } else {
                PART_BYTES
            };
            let mut buf = match self.spare.take() {
                Some(mut v) if v.capacity() >= size => {
                    v.clear();
                    v
                }
                _ => Vec::with_capacity(size),
            };
            let mut eof = false;
            while buf.len() < size {
                // A source that stops sending (a hung relay) must not hold the upload
                // open until the Job's deadline.
                let n = match tokio::time::timeout(SOURCE_IDLE, input.read_buf(&mut buf)).await {
                    Ok(read) => read,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no data from the source for {} s", SOURCE_IDLE.as_secs()),
                    )),
                }
                .map_err(|source| S3Error::Read {
                    object: self.object(),
                    source,
                })?;
                if n == 0 {
                    eof = true;
                    break;
                }
            }
            check.update(&buf).map_err(|source| S3Error::Check {
                object: self.object(),
                source,
            })?;
            if !buf.is_empty() || part_number == 1 {
                if part_number > MAX_PARTS {
                    return Err(S3Error::TooLarge {
                        object: self.object(),
                    });
                }
                self.finish_in_flight().await?;
                self.start_part(part_number, Bytes::from(buf));
                part_number += 1;
            }
            if eof {
                break;
            }
        }
        self.finish_in_flight().await?;
        let summary = check.finish().map_err(|source| S3Error::Check {
            object: self.object(),
            source,
        })?;
        self.summary = Some(summary.clone());
        Ok(summary)
    }

    fn start_part(&mut self, number: i32, data: Bytes) {
        let digest: [u8; 32] = Sha256::digest(&data).into();
        self.digests.push(digest);
        let checksum = base64::engine::general_purpose::STANDARD.encode(digest);
        let client = self.dest.client.clone();
        let (bucket, key, upload_id) = (
            self.dest.bucket.clone(),
            self.key.clone(),
            self.upload_id.clone(),
        );
        let object = self.object();
        let len = data.len();
        let kept = data.clone();
        self.in_flight = Some(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let out = client
                .upload_part()
                .bucket(&bucket)
                .key(&key)
                .upload_id(&upload_id)
                .part_number(number)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(&checksum)
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| S3Error::Request {
                    op: "UploadPart",
                    object: format!("{object} (part {number})"),
                    reason: describe(&e),
                })?;
            tracing::debug!(
                part = number,
                bytes = len,
                ms = started.elapsed().as_millis() as u64,
                "part uploaded"
            );
            let part = CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .checksum_sha256(checksum)
                .build();
            Ok((part, kept))
        }));
    }

    async fn finish_in_flight(&mut self) -> Result<(), S3Error> {
        if let Some(task) = self.in_flight.take() {
            let (part, data) = task.await.map_err(|e| S3Error::Request {
                op: "UploadPart",
                object: self.object(),
                reason: format!("upload task failed: {e}"),
            })??;
            self.parts.push(part);
            // The SDK has let go of the request by now; if not, the buffer is dropped.
            if let Ok(buf) = data.try_into_mut() {
                self.spare = Some(buf.into());
            }
        }
        Ok(())
    }

    /// Completes the upload: the object appears. Returns what it holds.
    pub async fn complete(mut self) -> Result<Uploaded, S3Error> {
        let Some(summary) = self.summary.take() else {
            return Err(S3Error::Request {
                op: "CompleteMultipartUpload",
                object: self.object(),
                reason: "nothing was sent".into(),
            });
        };
        let mut concat = Vec::with_capacity(self.digests.len() * 32);
        for d in &self.digests {
            concat.extend_from_slice(d);
        }
        let composite = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&concat));
        let parts = std::mem::take(&mut self.parts);
        let n = parts.len();
        self.dest
            .client
            .complete_multipart_upload()
            .bucket(&self.dest.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                self.dest
                    .request_error("CompleteMultipartUpload", &self.key, e)
            })?;
        tracing::info!(object = %self.object(), parts = n, bytes = summary.bytes, "multipart upload completed");
        Ok(Uploaded {
            key: self.key.clone(),
            summary,
            parts: n,
            composite_sha256: composite,
        })
    }

    /// Aborts the upload: S3 discards the parts. A part still uploading is waited for
    /// first, so that it cannot land after the abort.
    pub async fn abort(mut self) -> Result<(), S3Error> {
        if let Some(task) = self.in_flight.take() {
            let _ = task.await;
        }
        match self
            .dest
            .client
            .abort_multipart_upload()
            .bucket(&self.dest.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if status(&e) == Some(404) => {}
            Err(e) => {
                return Err(self
                    .dest
                    .request_error("AbortMultipartUpload", &self.key, e))
            }
        }
        tracing::info!(object = %self.object(), upload_id = %self.upload_id, "multipart upload aborted");
        Ok(())
    }
}

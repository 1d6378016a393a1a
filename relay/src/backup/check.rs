//! What is verified about a snapshot stream while it passes, without holding it.
//!
//! [`StreamCheck`] sees every byte of a backup once (as it is uploaded, or as it is
//! downloaded) and works out:
//! - the SHA-256 and size of the whole object (what the manifest records);
//! - the header's counts (what the manifest reports), and that the stream is a dchat
//!   snapshot of a version this relay reads;
//! - that the stream is complete and intact: its own trailer, the SHA-256 of every byte
//!   before it, matches, and the byte before the trailer is the end tag.
//!
//! With an expectation (a manifest), it also fails as soon as the header's counts or the
//! size disagree with it, and at the end when the SHA-256 does. [`VerifiedPipe`] runs one
//! between a download and a restore and turns a failure into a read error, so that a
//! consumer reading to the end (a restore) never commits a stream that did not verify.

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;

use super::manifest::Counts;
use crate::store::SNAPSHOT_FORMAT_VERSION;

/// Bytes of the snapshot header (docs/storage.md).
const HEADER_BYTES: usize = 52;
/// Bytes of the SHA-256 trailer.
const TRAILER_BYTES: usize = 32;
/// The record tag that ends the records.
const END_TAG: u8 = 0xFF;

/// Why a stream failed its check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The stream is not a dchat snapshot this relay reads (bad magic or version).
    #[error("not a dchat snapshot: {reason}")]
    NotASnapshot {
        /// What was wrong with the header.
        reason: String,
    },
    /// The stream ended before its header and trailer were complete.
    #[error("snapshot truncated: the stream ended after {bytes} bytes")]
    Truncated {
        /// Bytes seen.
        bytes: u64,
    },
    /// The stream's own SHA-256 trailer does not match its content (it was cut short
    /// or damaged).
    #[error(
        "snapshot trailer checksum mismatch: trailer says sha256 {expected}, content hashes to {actual}"
    )]
    Trailer {
        /// Hex digest recorded in the trailer.
        expected: String,
        /// Hex digest of the bytes before it.
        actual: String,
    },
    /// The stream disagrees with the manifest it is checked against.
    #[error("{field}: the manifest says {expected}, the object has {actual}")]
    Mismatch {
        /// The manifest field, e.g. `sha256`, `sizeBytes`, `counts.messages`.
        field: &'static str,
        /// The manifest's value.
        expected: String,
        /// The stream's value.
        actual: String,
    },
}

/// What a stream that passed its check held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// Total bytes (the object's size).
    pub bytes: u64,
    /// Hex SHA-256 of the whole stream (the object's checksum).
    pub sha256: String,
    /// The header's counts.
    pub counts: Counts,
}

/// What a stream is expected to be (from a manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Object size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the object.
    pub sha256: String,
    /// Header counts.
    pub counts: Counts,
}

/// Incremental checker; feed it every byte in order with [`StreamCheck::update`].
pub struct StreamCheck {
    expected: Option<Expected>,
    object: Sha256,
    /// Hash of every byte except the last [`TRAILER_BYTES`] seen so far.
    content: Sha256,
    /// The last bytes seen (at most [`TRAILER_BYTES`]): the trailer once the stream ends.
    tail: Vec<u8>,
    /// The last byte that went into `content` (the end tag, once the stream ends).
    last_content_byte: Option<u8>,
    header: Vec<u8>,
    counts: Option<Counts>,
    bytes: u64,
}

impl StreamCheck {
    /// A check of a stream with no expectation (an upload: the stream defines it).
    pub fn new() -> StreamCheck {
        StreamCheck {
            expected: None,
            object: Sha256::new(),
            content: Sha256::new(),
            tail: Vec::with_capacity(TRAILER_BYTES * 2),
            last_content_byte: None,
            header: Vec::with_capacity(HEADER_BYTES),
            counts: None,
            bytes: 0,
        }
    }

    /// A check against what a manifest recorded (a download).
    pub fn expecting(expected: Expected) -> StreamCheck {
        StreamCheck {
            expected: Some(expected),
            ..StreamCheck::new()
        }
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Feeds the next bytes. Fails as soon as the header is wrong or disagrees with the
    /// expectation, or the stream grows past the expected size.
    pub fn update(&mut self, data: &[u8]) -> Result<(), CheckError> {
        if data.is_empty() {
            return Ok(());
        }
        self.object.update(data);
        self.bytes += data.len() as u64;
        if self.header.len() < HEADER_BYTES {
            let take = (HEADER_BYTES - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..take]);
            if self.header.len() == HEADER_BYTES {
                self.counts = Some(self.parse_header()?);
            }
        }
        // Everything but the last TRAILER_BYTES bytes is content.
        let total = self.tail.len() + data.len();
        if total <= TRAILER_BYTES {
            self.tail.extend_from_slice(data);
        } else {
            let out = total - TRAILER_BYTES;
            if out <= self.tail.len() {
                self.content.update(&self.tail[..out]);
                self.last_content_byte = Some(self.tail[out - 1]);
                self.tail.drain(..out);
                self.tail.extend_from_slice(data);
            } else {
                let from_data = out - self.tail.len();
                self.content.update(&self.tail);
                self.content.update(&data[..from_data]);
                self.last_content_byte = Some(data[from_data - 1]);
                self.tail.clear();
                self.tail.extend_from_slice(&data[from_data..]);
            }
        }
        if let Some(e) = &self.expected {
            if self.bytes > e.bytes {
                return Err(CheckError::Mismatch {
                    field: "sizeBytes",
                    expected: e.bytes.to_string(),
                    actual: format!("more than {} bytes", e.bytes),
                });
            }
        }
        Ok(())
    }

    fn parse_header(&self) -> Result<Counts, CheckError> {
        let h = &self.header;
        if &h[..8] != b"DCHATSNP" {
            return Err(CheckError::NotASnapshot {
                reason: "bad magic bytes".into(),
            });
        }
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_be_bytes(b)
        };
        let version = u32_at(8);
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(CheckError::NotASnapshot {
                reason: format!(
                    "format version {version}, this relay reads {SNAPSHOT_FORMAT_VERSION}"
                ),
            });
        }
        let counts = Counts {
            messages: u64_at(20),
            tombstones: u64_at(28),
            profiles: u64_at(36),
            memberships: u64_at(44),
        };
        if let Some(e) = &self.expected {
            compare_counts(&e.counts, &counts)?;
        }
        Ok(counts)
    }

    /// At the end of the stream: checks the header was complete, the trailer matches,
    /// and (with an expectation) the size and SHA-256.
    pub fn finish(self) -> Result<StreamSummary, CheckError> {
        let Some(counts) = self.counts else {
            return Err(CheckError::Truncated { bytes: self.bytes });
        };
        if self.bytes < (HEADER_BYTES + 1 + TRAILER_BYTES) as u64 {
            return Err(CheckError::Truncated { bytes: self.bytes });
        }
        let content = self.content.finalize();
        if content[..] != self.tail[..] || self.last_content_byte != Some(END_TAG) {
            return Err(CheckError::Trailer {
                expected: hex::encode(&self.tail),
                actual: hex::encode(content),
            });
        }
        let summary = StreamSummary {
            bytes: self.bytes,
            sha256: hex::encode(self.object.finalize()),
            counts,
        };
        if let Some(e) = &self.expected {
            if summary.bytes != e.bytes {
                return Err(CheckError::Mismatch {
                    field: "sizeBytes",
                    expected: e.bytes.to_string(),
                    actual: summary.bytes.to_string(),
                });
            }
            if !summary.sha256.eq_ignore_ascii_case(&e.sha256) {
                return Err(CheckError::Mismatch {
                    field: "sha256",
                    expected: e.sha256.clone(),
                    actual: summary.sha256,
                });
            }
        }
        Ok(summary)
    }
}

impl Default for StreamCheck {
    fn default() -> Self {
        StreamCheck::new()
    }
}

/// Compares counts field by field, naming the first that differs.
pub fn compare_counts(expected: &Counts, actual: &Counts) -> Result<(), CheckError> {
    for (field, want, have) in [
        ("counts.messages", expected.messages, actual.messages),
        ("counts.tombstones", expected.tombstones, actual.tombstones),
        ("counts.profiles", expected.profiles, actual.profiles),
        (
            "counts.memberships",
            expected.memberships,
            actual.memberships,
        ),
    ] {
        if want != have {
            return Err(CheckError::Mismatch {
                field,
                expected: want.to_string(),
                actual: have.to_string(),
            });
        }
    }
    Ok(())
}

/// Why the download side of a [`VerifiedPipe`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// The stream failed its check.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// Reading the source (the download) failed.
    #[error("reading the object: {0}")]
    Read(#[source] std::io::Error),
}

/// A stream piped through a [`StreamCheck`] to a consumer (a restore).
///
/// A task reads the source, checks every byte and forwards it over a small bounded
/// channel; the consumer reads [`VerifiedPipe::reader`]. When the check fails — at once
/// for the header or size, at the very end for the checksums — the consumer's next read
/// fails instead of reaching the end of the stream, so a restore, which must see the
/// end before it commits, never commits a stream that did not verify.
///
/// If the consumer stops early (it found the stream malformed), the task keeps reading
/// and hashing to the end, so the failure can be named by its cause: an object whose
/// SHA-256 does not match its manifest. [`VerifiedPipe::stop`] ends it at once when the
/// consumer failed for another reason.
pub struct VerifiedPipe {
    task: tokio::task::JoinHandle<Result<StreamSummary, PipeError>>,
    /// Set as soon as the check failed (before the consumer hears of it).
    failed: Arc<Mutex<Option<CheckError>>>,
}

/// Chunks forwarded ahead of the consumer.
const PIPE_CHUNKS: usize = 8;
/// Bytes read from the source at a time.
const PIPE_READ: usize = 256 << 10;

impl VerifiedPipe {
    /// Starts piping `source` through `check`; returns the pipe and the consumer's reader.
    pub fn start<R>(
        source: R,
        check: StreamCheck,
    ) -> (VerifiedPipe, impl AsyncRead + Unpin + Send + Sync + 'static)
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<std::io::Result<hyper::body::Bytes>>(PIPE_CHUNKS);
        let failed = Arc::new(Mutex::new(None));
        let task = tokio::spawn(pump(source, check, tx, failed.clone()));
        let chunks = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let reader = tokio_util::io::StreamReader::new(Box::pin(chunks));
        (VerifiedPipe { task, failed }, reader)
    }

    /// The check's failure, if it failed already.
    pub fn failed(&self) -> Option<CheckError> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }

    /// Waits for the whole source to be read and checked.
    pub async fn finish(self) -> Result<StreamSummary, PipeError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(PipeError::Read(std::io::Error::other(e.to_string()))),
        }
    }

    /// Stops reading the source.
    pub fn stop(self) {
        self.task.abort();
    }
}

async fn pump<R: AsyncRead + Unpin>(
    mut source: R,
    mut check: StreamCheck,
    tx: tokio::sync::mpsc::Sender<std::io::Result<hyper::body::Bytes>>,
    failed: Arc<Mutex<Option<CheckError>>>,
) -> Result<StreamSummary, PipeError> {
    use tokio::io::AsyncReadExt;
    let fail = |e: CheckError| {
        if let Ok(mut f) = failed.lock() {
            *f = Some(e.clone());
        }
        e
    };
    let mut consumer = true;
    loop {
        let mut buf = Vec::with_capacity(PIPE_READ);
        let n = match source.read_buf(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = tx
                    .send(Err(std::io::Error::new(e.kind(), e.to_string())))
                    .await;
                return Err(PipeError::Read(e));
            }
        };
        if n == 0 {
            return match check.finish() {
                Ok(summary) => Ok(summary),
                Err(e) => {
                    let e = fail(e);
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            e.clone(),
                        )))
                        .await;
                    Err(e.into())
                }
            };
        }
        if let Err(e) = check.update(&buf) {
            let e = fail(e);
            let _ = tx
                .send(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.clone(),
                )))
                .await;
            return Err(e.into());
        }
        // A consumer that stopped reading does not stop the check (see the type's doc).
        if consumer && tx.send(Ok(buf.into())).await.is_err() {
            consumer = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn snapshot_bytes() -> Vec<u8> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dchat-check-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = EmbeddedStore::open(&dir).unwrap();
        let mut out = Vec::new();
        store.snapshot(&mut out).unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    fn run(bytes: &[u8], chunk: usize, check: StreamCheck) -> Result<StreamSummary, CheckError> {
        let mut check = check;
        for c in bytes.chunks(chunk) {
            check.update(c)?;
        }
        check.finish()
    }

    #[test]
    fn any_chunking_gives_the_same_verdict() {
        let bytes = snapshot_bytes();
        let want = hex::encode(Sha256::digest(&bytes));
        for chunk in [1, 2, 31, 32, 33, 52, 53, 1000] {
            let s = run(&bytes, chunk, StreamCheck::new()).unwrap();
            assert_eq!(s.sha256, want);
            assert_eq!(s.bytes, bytes.len() as u64);
            assert_eq!(s.counts, Counts::default());
        }
    }

    #[test]
    fn damage_truncation_and_mismatches_are_named() {
        let bytes = snapshot_bytes();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(run(&bad, 7, StreamCheck::new()).is_err(), "flip at {i}");
        }
        for n in 0..bytes.len() {
            assert!(
                run(&bytes[..n], 5, StreamCheck::new()).is_err(),
                "cut at {n}"
            );
        }
        let good = run(&bytes, 64, StreamCheck::new()).unwrap();
        let expect = |sha: &str, size: u64, messages: u64| Expected {
            bytes: size,
            sha256: sha.to_string(),
            counts: Counts {
                messages,
                ..Counts::default()
            },
        };
        let e = run(
            &bytes,
            64,
            StreamCheck::expecting(expect(&"0".repeat(64), good.bytes, 0)),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                CheckError::Mismatch {
                    field: "sha256",
                    ..
                }
            ),
            "{e}"
        );
        let e = run(
            &bytes,
            64,
            StreamCheck::expecting(expect(&good.sha256, good.bytes, 3)),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                CheckError::Mismatch {
                    field: "counts.messages",
                    ..
                }
            ),
            "{e}"
        );
        let e = run(
            &bytes,
            64,
            StreamCheck::expecting(expect(&good.sha256, 10, 0)),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                CheckError::Mismatch {
                    field: "sizeBytes",
                    ..
                }
            ),
            "{e}"
        );
        run(
            &bytes,
            64,
            StreamCheck::expecting(expect(&good.sha256, good.bytes, 0)),
        )
        .unwrap();
    }

    #[tokio::test]
    async fn a_verified_pipe_fails_the_last_read_and_drains_after_the_consumer() {
        use tokio::io::AsyncReadExt;
        let bytes = snapshot_bytes();
        let good = run(&bytes, 64, StreamCheck::new()).unwrap();
        let wrong = Expected {
            bytes: good.bytes,
            sha256: "ab".repeat(32),
            counts: good.counts.clone(),
        };
        let (pipe, mut r) = VerifiedPipe::start(
            std::io::Cursor::new(bytes.clone()),
            StreamCheck::expecting(wrong.clone()),
        );
        let mut out = Vec::new();
        let e = r.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("sha256"), "{e}");
        assert_eq!(out.len(), bytes.len());
        assert!(matches!(
            pipe.failed(),
            Some(CheckError::Mismatch {
                field: "sha256",
                ..
            })
        ));
        assert!(pipe.finish().await.is_err());

        // A consumer that gives up at once: the pipe still reads and checks to the end.
        let (pipe, r) = VerifiedPipe::start(
            std::io::Cursor::new(bytes.clone()),
            StreamCheck::expecting(wrong),
        );
        drop(r);
        let e = pipe.finish().await.unwrap_err();
        assert!(
            matches!(
                e,
                PipeError::Check(CheckError::Mismatch {
                    field: "sha256",
                    ..
                })
            ),
            "{e}"
        );

        let (pipe, mut r) =
            VerifiedPipe::start(std::io::Cursor::new(bytes.clone()), StreamCheck::new());
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, bytes);
        assert_eq!(pipe.finish().await.unwrap(), good);
    }
}

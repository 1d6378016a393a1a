//! Snapshot and restore of the embedded store (the admin API's `snapshot`/`restore`).
//!
//! A snapshot is one stream: a header with the format version and record counts, the
//! records, an end tag and a SHA-256 of everything before it. This module owns the
//! format: [`SnapshotWriter`] streams one from a consistent read view of an engine
//! without buffering the store in memory, [`SnapshotReader`] parses and verifies one,
//! and [`apply_snapshot`] loads one into the embedded store in a single atomic batch
//! that is committed only after the counts and the checksum were verified. The byte
//! layout is documented in docs/storage.md ("Snapshot format"); it does not depend on
//! the storage engine.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use super::codec::{
    decode_message, dedup_key, put_bytes, split_dedup_key, split_member_key, Reader, INBOX_MESSAGE,
};
use super::embedded::Writer;
use super::{validate_channel, PublicKey, StoreError, StoredMessage};

/// Version of the snapshot stream layout this relay writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;
/// First bytes of every snapshot.
const MAGIC: &[u8; 8] = b"DCHATSNP";
const TAG_MESSAGE: u8 = 1;
const TAG_TOMBSTONE: u8 = 2;
const TAG_PROFILE: u8 = 3;
const TAG_MEMBERSHIP: u8 = 4;
const TAG_END: u8 = 0xFF;
/// Largest record body accepted on restore: bounds the allocation a corrupt length
/// field can cause.
const MAX_RECORD_BYTES: u32 = 64 << 20;

/// What a snapshot contained (returned by both snapshot and restore).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    /// Stream format version.
    pub format_version: u32,
    /// The store's next sequence number at snapshot time.
    pub next_seq: u64,
    /// Pending (unacknowledged, unexpired at snapshot time) messages.
    pub messages: u64,
    /// Dedup entries of acknowledged messages, kept until their expiry.
    pub tombstones: u64,
    /// Profiles.
    pub profiles: u64,
    /// Channel memberships.
    pub memberships: u64,
    /// Total stream length in bytes, trailer included.
    pub bytes: u64,
    /// Hex SHA-256 recorded in the trailer.
    pub sha256: String,
}

fn corrupt(table: &'static str) -> impl Fn(String) -> StoreError {
    move |reason| StoreError::Corrupt { table, reason }
}

/// Streams a snapshot: the header on creation, then records in tag order (messages,
/// tombstones, profiles, memberships), then [`SnapshotWriter::finish`] writes the end
/// tag and the SHA-256 trailer. The counts are announced in the header, so the engine
/// counts under the same consistent read view before it starts.
pub(crate) struct SnapshotWriter<W: Write> {
    out: std::io::BufWriter<W>,
    hasher: Sha256,
    bytes: u64,
    summary: SnapshotSummary,
    body: Vec<u8>,
}

/// What a snapshot announces in its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SnapshotCounts {
    pub(crate) next_seq: u64,
    pub(crate) messages: u64,
    pub(crate) tombstones: u64,
    pub(crate) profiles: u64,
    pub(crate) memberships: u64,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the header announcing `counts`.
    pub(crate) fn start(out: W, counts: SnapshotCounts) -> Result<Self, StoreError> {
        let mut w = SnapshotWriter {
            out: std::io::BufWriter::with_capacity(256 << 10, out),
            hasher: Sha256::new(),
            bytes: 0,
            summary: SnapshotSummary {
                format_version: SNAPSHOT_FORMAT_VERSION,
                next_seq: counts.next_seq,
                messages: counts.messages,
                tombstones: counts.tombstones,
                profiles: counts.profiles,
                memberships: counts.memberships,
                ..SnapshotSummary::default()
            },
            body: Vec::new(),
        };
        let mut header = Vec::with_capacity(52);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_be_bytes());
        for n in [
            counts.next_seq,
            counts.messages,
            counts.tombstones,
            counts.profiles,
            counts.memberships,
        ] {
            header.extend_from_slice(&n.to_be_bytes());
        }
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.out
            .write_all(buf)
            .map_err(|source| StoreError::SnapshotIo {
                op: "write",
                source,
            })
    }

    fn record(&mut self, tag: u8) -> Result<(), StoreError> {
        let body = std::mem::take(&mut self.body);
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        let res = self.put(&head).and_then(|()| self.put(&body));
        self.body = body;
        self.body.clear();
        res
    }

    /// A pending message: its seq and its stored record (validated first: a corrupt
    /// record fails the snapshot instead of being copied).
    pub(crate) fn message(&mut self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        decode_message(record).map_err(|r| StoreError::Corrupt {
            table: "inbox",
            reason: format!("message seq {seq}: {r}"),
        })?;
        self.body.extend_from_slice(&seq.to_be_bytes());
        self.body.extend_from_slice(record);
        self.record(TAG_MESSAGE)
    }

    /// The dedup entry `dedup_key` → (seq, expires) of an acknowledged message.
    pub(crate) fn tombstone(
        &mut self,
        dedup_key: &[u8],
        seq: u64,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let (recipient, sender, id) = split_dedup_key(dedup_key).map_err(corrupt("inbox"))?;
        self.body.extend_from_slice(&seq.to_be_bytes());
        self.body.extend_from_slice(&expires_at_ms.to_be_bytes());
        self.body.extend_from_slice(&recipient);
        self.body.extend_from_slice(&sender);
        self.body.extend_from_slice(id.as_bytes());
        self.record(TAG_TOMBSTONE)
    }

    /// A profile as stored: key and `updated_ms ‖ blob`.
    pub(crate) fn profile(&mut self, key: &[u8], stored: &[u8]) -> Result<(), StoreError> {
        let (updated, blob) = split_profile(stored)?;
        self.body.extend_from_slice(key);
        self.body.extend_from_slice(&updated.to_be_bytes());
        put_bytes(&mut self.body, blob);
        self.record(TAG_PROFILE)
    }

    /// A membership, as its stored key.
    pub(crate) fn membership(&mut self, member_key: &[u8]) -> Result<(), StoreError> {
        self.body.extend_from_slice(member_key);
        self.record(TAG_MEMBERSHIP)
    }

    /// Flushes the write buffer into the sink and lends it out: a writer whose sink is
    /// an in-memory buffer (the PostgreSQL snapshot, which forwards it to an async
    /// stream) drains it between records.
    pub(crate) fn sink(&mut self) -> Result<&mut W, StoreError> {
        self.out.flush().map_err(|source| StoreError::SnapshotIo {
            op: "write",
            source,
        })?;
        Ok(self.out.get_mut())
    }

    /// Writes the end tag and the trailer, flushes, and returns the summary.
    pub(crate) fn finish(self) -> Result<SnapshotSummary, StoreError> {
        self.finish_into().map(|(summary, _)| summary)
    }

    /// Like [`SnapshotWriter::finish`], and also hands back the sink.
    pub(crate) fn finish_into(mut self) -> Result<(SnapshotSummary, W), StoreError> {
        self.put(&[TAG_END])?;
        let digest = self.hasher.finalize_reset();
        self.summary.bytes = self.bytes + 32;
        self.out
            .write_all(&digest)
            .and_then(|_| self.out.flush())
            .map_err(|source| StoreError::SnapshotIo {
                op: "write",
                source,
            })?;
        self.summary.sha256 = hex::encode(digest);
        tracing::info!(
            messages = self.summary.messages,
            tombstones = self.summary.tombstones,
            profiles = self.summary.profiles,
            memberships = self.summary.memberships,
            bytes = self.summary.bytes,
            "snapshot written"
        );
        let summary = std::mem::take(&mut self.summary);
        let sink = self.out.into_inner().map_err(|e| StoreError::SnapshotIo {
            op: "write",
            source: e.into_error(),
        })?;
        Ok((summary, sink))
    }
}

/// Splits a stored profile value into (updated_ms, blob).
pub(crate) fn split_profile(v: &[u8]) -> Result<(i64, &[u8]), StoreError> {
    if v.len() < 8 {
        return Err(StoreError::Corrupt {
            table: "profiles",
            reason: format!("value of {} bytes, need at least 8", v.len()),
        });
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&v[..8]);
    Ok((i64::from_be_bytes(a), &v[8..]))
}

/// The seq of an inbox message key (`recipient ‖ 0x00 ‖ seq`).
pub(crate) fn seq_of_message_key(k: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(k.get(33..41).unwrap_or_default())
        .ok()
        .filter(|_| k.len() == 41)
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt {
            table: "inbox",
            reason: format!("message key of {} bytes", k.len()),
        })
}

/// Whether an inbox key is a message entry (as opposed to a dedup entry).
pub(crate) fn is_message_key(k: &[u8]) -> bool {
    k.get(32) == Some(&INBOX_MESSAGE)
}
fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::SnapshotInvalid {
        reason: reason.into(),
    }
}

/// How a snapshot is applied to a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Apply {
    /// Into an empty store, keeping the snapshot's sequence numbers.
    Restore,
    /// Into a store that may hold data (a slot handover): messages already present
    /// (same recipient, sender and id, pending or acknowledged) are skipped, the others
    /// get fresh sequence numbers in stream order, so each recipient's order among the
    /// imported messages is kept.
    Merge,
}

/// What a merge did, in addition to what the stream held.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MergeSummary {
    /// What the stream contained.
    pub snapshot: SnapshotSummary,
    /// Messages added to this store.
    pub imported: u64,
    /// Messages skipped because this store already had (or had delivered) them.
    pub duplicates: u64,
    /// Profiles replaced because the stream's copy was newer.
    pub profiles_updated: u64,
}

/// One record of a snapshot stream.
pub(crate) enum Record {
    /// A pending message under the source store's seq.
    Message { seq: u64, message: StoredMessage },
    /// The dedup entry of an acknowledged message.
    Tombstone {
        seq: u64,
        expires_at_ms: i64,
        recipient: PublicKey,
        sender: PublicKey,
        id: String,
    },
    /// A profile blob and when it was signed.
    Profile {
        key: PublicKey,
        updated_ms: i64,
        blob: Vec<u8>,
    },
    /// A persistent channel membership.
    Membership { channel: String, member: PublicKey },
}

/// Reads a snapshot stream: the header on [`SnapshotReader::open`], records until
/// [`SnapshotReader::next_record`] returns `None`, then [`SnapshotReader::finish`]
/// checks the trailer and the announced counts. Nothing a caller applied may be made
/// durable before `finish` succeeded.
pub(crate) struct SnapshotReader<R: Read> {
    input: std::io::BufReader<R>,
    hasher: Sha256,
    bytes: u64,
    expected: SnapshotSummary,
    got: SnapshotCounts,
    last_tag: u8,
    body: Vec<u8>,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the header.
    pub(crate) fn open(input: R) -> Result<Self, StoreError> {
        let mut r = SnapshotReader {
            input: std::io::BufReader::with_capacity(256 << 10, input),
            hasher: Sha256::new(),
            bytes: 0,
            expected: SnapshotSummary::default(),
            got: SnapshotCounts::default(),
            last_tag: 0,
            body: Vec::new(),
        };
        let mut header = [0u8; 52];
        r.fill(&mut header, "header", true)?;
        let mut h = Reader::new(&header);
        let header_err = |e: String| invalid(format!("header: {e}"));
        if h.take(8, "magic").map_err(header_err)? != MAGIC {
            return Err(invalid("not a dchat snapshot (bad magic bytes)"));
        }
        let version = h.u32("format version").map_err(header_err)?;
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(invalid(format!(
                "format version {version}, this relay reads {SNAPSHOT_FORMAT_VERSION}"
            )));
        }
        r.expected = SnapshotSummary {
            format_version: version,
            next_seq: h.u64("next_seq").map_err(header_err)?,
            messages: h.u64("message count").map_err(header_err)?,
            tombstones: h.u64("tombstone count").map_err(header_err)?,
            profiles: h.u64("profile count").map_err(header_err)?,
            memberships: h.u64("membership count").map_err(header_err)?,
            ..SnapshotSummary::default()
        };
        Ok(r)
    }

    /// Reads exactly `buf.len()` bytes, hashing them unless `hash` is false.
    fn fill(&mut self, buf: &mut [u8], what: &str, hash: bool) -> Result<(), StoreError> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                if hash {
                    self.hasher.update(&*buf);
                }
                self.bytes += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(StoreError::SnapshotInvalid {
                    reason: format!("truncated while reading {what} at byte {}", self.bytes),
                })
            }
            Err(source) => Err(StoreError::SnapshotIo { op: "read", source }),
        }
    }

    /// The next record, or `None` at the end tag. Records are validated as far as the
    /// stream alone allows (field limits, seq range, UTF-8).
    pub(crate) fn next_record(&mut self) -> Result<Option<Record>, StoreError> {
        let mut tag = [0u8; 1];
        self.fill(&mut tag, "record tag", true)?;
        let tag = tag[0];
        if tag == TAG_END {
            return Ok(None);
        }
        if tag < self.last_tag || !(TAG_MESSAGE..=TAG_MEMBERSHIP).contains(&tag) {
            return Err(invalid(format!(
                "unexpected record tag {tag} at byte {}",
                self.bytes - 1
            )));
        }
        self.last_tag = tag;
        let mut len = [0u8; 4];
        self.fill(&mut len, "record length", true)?;
        let len = u32::from_be_bytes(len);
        if len > MAX_RECORD_BYTES {
            return Err(invalid(format!(
                "record of {len} bytes at byte {} exceeds the {MAX_RECORD_BYTES} limit",
                self.bytes - 5
            )));
        }
        let mut body = std::mem::take(&mut self.body);
        body.resize(len as usize, 0);
        let read = self.fill(&mut body, "record body", true);
        let record = read.and_then(|()| self.parse(tag, &body));
        self.body = body;
        record.map(Some)
    }

    fn parse(&mut self, tag: u8, body: &[u8]) -> Result<Record, StoreError> {
        let at = self.bytes;
        let rec_err = |e: String| invalid(format!("record ending at byte {at}: {e}"));
        let mut b = Reader::new(body);
        Ok(match tag {
            TAG_MESSAGE => {
                let seq = b.u64("seq").map_err(rec_err)?;
                let rest = b.take(body.len() - 8, "message").map_err(rec_err)?;
                let message = decode_message(rest).map_err(rec_err)?;
                super::validate_message(&message)?;
                if seq == 0 || seq >= self.expected.next_seq {
                    return Err(rec_err(format!(
                        "seq {seq} outside 1..{}",
                        self.expected.next_seq
                    )));
                }
                self.got.messages += 1;
                Record::Message { seq, message }
            }
            TAG_TOMBSTONE => {
                let seq = b.u64("seq").map_err(rec_err)?;
                let expires_at_ms = b.i64("expiry").map_err(rec_err)?;
                let recipient = b.key("tombstone recipient").map_err(rec_err)?;
                let sender = b.key("tombstone sender").map_err(rec_err)?;
                let id = b.take(body.len() - 80, "tombstone id").map_err(rec_err)?;
                let id = std::str::from_utf8(id)
                    .map_err(|_| rec_err("tombstone id is not UTF-8".into()))?
                    .to_owned();
                self.got.tombstones += 1;
                Record::Tombstone {
                    seq,
                    expires_at_ms,
                    recipient,
                    sender,
                    id,
                }
            }
            TAG_PROFILE => {
                let key = b.key("profile key").map_err(rec_err)?;
                let updated_ms = b.i64("profile updated").map_err(rec_err)?;
                let blob = b.bytes("profile blob").map_err(rec_err)?.to_vec();
                b.finish("profile record").map_err(rec_err)?;
                self.got.profiles += 1;
                Record::Profile {
                    key,
                    updated_ms,
                    blob,
                }
            }
            _ => {
                let (channel, member) = split_member_key(body).map_err(rec_err)?;
                validate_channel(&channel)?;
                self.got.memberships += 1;
                Record::Membership { channel, member }
            }
        })
    }

    /// After the end tag: checks the SHA-256 trailer, that nothing follows it, and that
    /// the records match the header's counts. Returns what the stream held.
    pub(crate) fn finish(mut self) -> Result<SnapshotSummary, StoreError> {
        let actual = self.hasher.finalize_reset();
        let mut trailer = [0u8; 32];
        self.fill(&mut trailer, "SHA-256 trailer", false)?;
        if trailer[..] != actual[..] {
            return Err(StoreError::SnapshotChecksum {
                expected: hex::encode(trailer),
                actual: hex::encode(actual),
            });
        }
        let mut extra = [0u8; 1];
        match self.input.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(invalid("data after the SHA-256 trailer")),
            Err(source) => return Err(StoreError::SnapshotIo { op: "read", source }),
        }
        let e = &self.expected;
        for (what, want, have) in [
            ("messages", e.messages, self.got.messages),
            ("tombstones", e.tombstones, self.got.tombstones),
            ("profiles", e.profiles, self.got.profiles),
            ("memberships", e.memberships, self.got.memberships),
        ] {
            if want != have {
                return Err(invalid(format!(
                    "header announces {want} {what}, stream holds {have}"
                )));
            }
        }
        self.expected.bytes = self.bytes;
        self.expected.sha256 = hex::encode(actual);
        Ok(self.expected)
    }
}

/// Applies a snapshot stream through `w`, one batch of the embedded store that the
/// caller commits only if this returns `Ok` (so a bad stream changes nothing).
/// With `chunk` set, what is batched is committed (not yet fsync'd) every `chunk`
/// records; the caller makes that safe (a restore marker, or a staging directory). The
/// caller also checks that a restore's target is empty.
pub(crate) fn apply_snapshot(
    w: &mut Writer<'_>,
    input: impl Read,
    mode: Apply,
    chunk: Option<usize>,
) -> Result<MergeSummary, StoreError> {
    let mut merge = MergeSummary::default();
    let mut r = SnapshotReader::open(input)?;
    let mut applied = 0usize;
    while let Some(record) = r.next_record()? {
        applied += 1;
        if chunk.is_some_and(|n| applied.is_multiple_of(n)) {
            w.commit_batch(fjall::PersistMode::Buffer)?;
        }
        match record {
            Record::Message { seq, message } => {
                let dk = dedup_key(&message.recipient, &message.sender, &message.id);
                match mode {
                    Apply::Restore => w.insert_message(seq, &message, &dk),
                    Apply::Merge if w.has_dedup(&dk)? => merge.duplicates += 1,
                    Apply::Merge => {
                        let fresh = w.take_seq();
                        w.insert_message(fresh, &message, &dk);
                        merge.imported += 1;
                    }
                }
            }
            Record::Tombstone {
                seq,
                expires_at_ms,
                recipient,
                sender,
                id,
            } => {
                let dk = dedup_key(&recipient, &sender, &id);
                match mode {
                    Apply::Restore => w.insert_dedup(&dk, seq, expires_at_ms),
                    // A tombstone is a dedup entry whose seq names no message. The
                    // stream's seq may name a live message here, so take a fresh one.
                    Apply::Merge => {
                        if !w.has_dedup(&dk)? {
                            let fresh = w.take_seq();
                            w.insert_dedup(&dk, fresh, expires_at_ms);
                        }
                    }
                }
            }
            Record::Profile {
                key,
                updated_ms,
                blob,
            } => {
                if w.put_profile(&key, &blob, updated_ms)? {
                    merge.profiles_updated += 1;
                }
            }
            Record::Membership { channel, member } => w.join(&channel, &member)?,
        }
    }
    let summary = r.finish()?;
    if mode == Apply::Restore {
        w.counters.next_seq = w.counters.next_seq.max(summary.next_seq);
    }
    merge.snapshot = summary;
    Ok(merge)
}

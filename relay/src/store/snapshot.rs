//! Snapshot and restore of the embedded store (the admin API's `snapshot`/`restore`).
//!
//! A snapshot is one stream: a header with the format version and record counts, the
//! records, an end tag and a SHA-256 of everything before it. It is written from a single
//! read transaction, so it is consistent while writes continue, and streamed without
//! buffering the store in memory. Restore applies the stream inside one write transaction
//! and commits only after the counts and the checksum were verified. The byte layout is
//! documented in docs/storage.md ("Snapshot format").

use std::io::{Read, Write};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};

use super::codec::{
    decode_message, dedup_key, member_key, message_key, put_bytes, split_dedup_key,
    split_dedup_value, split_member_key, Reader, INBOX_DEDUP, INBOX_MESSAGE,
};
use super::embedded::{seq_of_message_key, split_profile, Ctx, Writer, INBOX, MEMBERS, PROFILES};
use super::{validate_channel, StoreError};

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

/// Hashes and counts everything written through it.
struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<'_, W> {
    fn put(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.inner
            .write_all(buf)
            .map_err(|source| StoreError::SnapshotIo {
                op: "write",
                source,
            })
    }

    fn record(&mut self, tag: u8, body: &[u8]) -> Result<(), StoreError> {
        let mut head = [0u8; 5];
        head[0] = tag;
        head[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
        self.put(&head)?;
        self.put(body)
    }
}

fn corrupt(table: &'static str) -> impl Fn(String) -> StoreError {
    move |reason| StoreError::Corrupt { table, reason }
}

/// Writes a snapshot of `db` to `out` (see module docs).
pub(crate) fn write_snapshot<W: Write>(
    db: &Database,
    out: &mut W,
) -> Result<SnapshotSummary, StoreError> {
    let txn = db.begin_read().ctx("snapshot: begin read")?;
    let inbox = txn.open_table(INBOX).ctx("snapshot: open inbox")?;
    let profiles = txn.open_table(PROFILES).ctx("snapshot: open profiles")?;
    let members = txn.open_table(MEMBERS).ctx("snapshot: open members")?;
    let meta = txn
        .open_table(super::embedded::META)
        .ctx("snapshot: open meta")?;
    let next_seq = meta
        .get("next_seq")
        .ctx("snapshot: read next_seq")?
        .map(|v| v.value())
        .unwrap_or(1);

    // Count first so the header can carry exact counts (same read transaction, so the
    // counts hold). Tombstones are dedup entries whose message was acknowledged.
    let (mut messages, mut tombstones) = (0u64, 0u64);
    for entry in inbox.iter().ctx("snapshot: scan inbox")? {
        let (k, v) = entry.ctx("snapshot: read inbox")?;
        if is_tombstone(&inbox, k.value(), v.value())?.is_some() {
            tombstones += 1;
        } else if k.value().get(32) == Some(&INBOX_MESSAGE) {
            messages += 1;
        }
    }
    let mut summary = SnapshotSummary {
        format_version: SNAPSHOT_FORMAT_VERSION,
        next_seq,
        messages,
        tombstones,
        profiles: profiles.len().ctx("snapshot: count profiles")?,
        memberships: members.len().ctx("snapshot: count members")?,
        ..SnapshotSummary::default()
    };

    let mut buffered = std::io::BufWriter::with_capacity(256 << 10, out);
    let mut w = HashingWriter {
        inner: &mut buffered,
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut header = Vec::with_capacity(52);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_be_bytes());
    for n in [
        summary.next_seq,
        summary.messages,
        summary.tombstones,
        summary.profiles,
        summary.memberships,
    ] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    w.put(&header)?;

    let mut body = Vec::new();
    for entry in inbox.iter().ctx("snapshot: scan inbox")? {
        let (k, rec) = entry.ctx("snapshot: read inbox")?;
        if k.value().get(32) != Some(&INBOX_MESSAGE) {
            continue;
        }
        let seq = seq_of_message_key(k.value())?;
        // Decode to validate: a corrupt record must fail the snapshot, not be copied.
        decode_message(rec.value()).map_err(|r| StoreError::Corrupt {
            table: "inbox",
            reason: format!("message seq {seq}: {r}"),
        })?;
        body.clear();
        body.extend_from_slice(&seq.to_be_bytes());
        body.extend_from_slice(rec.value());
        w.record(TAG_MESSAGE, &body)?;
    }
    for entry in inbox.iter().ctx("snapshot: scan inbox")? {
        let (k, v) = entry.ctx("snapshot: read inbox")?;
        let Some((seq, expires)) = is_tombstone(&inbox, k.value(), v.value())? else {
            continue;
        };
        let (recipient, sender, id) = split_dedup_key(k.value()).map_err(corrupt("inbox"))?;
        body.clear();
        body.extend_from_slice(&seq.to_be_bytes());
        body.extend_from_slice(&expires.to_be_bytes());
        body.extend_from_slice(&recipient);
        body.extend_from_slice(&sender);
        body.extend_from_slice(id.as_bytes());
        w.record(TAG_TOMBSTONE, &body)?;
    }
    for entry in profiles.iter().ctx("snapshot: scan profiles")? {
        let (k, v) = entry.ctx("snapshot: read profiles")?;
        let (updated, blob) = split_profile(v.value())?;
        body.clear();
        body.extend_from_slice(k.value());
        body.extend_from_slice(&updated.to_be_bytes());
        put_bytes(&mut body, blob);
        w.record(TAG_PROFILE, &body)?;
    }
    for entry in members.iter().ctx("snapshot: scan members")? {
        let (k, _) = entry.ctx("snapshot: read members")?;
        w.record(TAG_MEMBERSHIP, k.value())?;
    }
    w.put(&[TAG_END])?;
    let digest = w.hasher.finalize_reset();
    summary.bytes = w.bytes + 32;
    buffered
        .write_all(&digest)
        .and_then(|_| buffered.flush())
        .map_err(|source| StoreError::SnapshotIo {
            op: "write",
            source,
        })?;
    summary.sha256 = hex::encode(digest);
    tracing::info!(
        messages = summary.messages,
        tombstones = summary.tombstones,
        profiles = summary.profiles,
        memberships = summary.memberships,
        bytes = summary.bytes,
        "snapshot written"
    );
    Ok(summary)
}

/// For a dedup entry whose message is gone (acknowledged), its (seq, expires_at_ms);
/// `None` for a live dedup entry or a message entry.
fn is_tombstone(
    inbox: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    k: &[u8],
    v: &[u8],
) -> Result<Option<(u64, i64)>, StoreError> {
    if k.get(32) != Some(&INBOX_DEDUP) {
        return Ok(None);
    }
    let (seq, expires) = split_dedup_value(v).map_err(corrupt("inbox"))?;
    let recipient: [u8; 32] = k[..32].try_into().map_err(|_| StoreError::Corrupt {
        table: "inbox",
        reason: "short dedup key".into(),
    })?;
    let live = inbox
        .get(message_key(&recipient, seq).as_slice())
        .ctx("snapshot: read inbox message")?
        .is_some();
    Ok((!live).then_some((seq, expires)))
}

/// Hashes everything read through it.
struct HashingReader<'a, R: Read> {
    inner: &'a mut R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<'_, R> {
    /// Reads exactly `buf.len()` bytes, hashing them unless `hash` is false.
    fn fill(&mut self, buf: &mut [u8], what: &str, hash: bool) -> Result<(), StoreError> {
        match self.inner.read_exact(buf) {
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
}

fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::SnapshotInvalid {
        reason: reason.into(),
    }
}

/// How a snapshot is applied to a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Apply {
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

/// Loads a snapshot into an empty store (see module docs).
pub(crate) fn restore_snapshot<R: Read>(
    db: &Database,
    input: &mut R,
) -> Result<SnapshotSummary, StoreError> {
    apply_snapshot(db, input, Apply::Restore).map(|m| m.snapshot)
}

/// Merges a snapshot into a store that may already hold messages: the receiving side
/// of a blue-green slot handover. Idempotent: merging the same stream twice imports
/// nothing the second time. All or nothing: one transaction, committed only after
/// the checksum and counts were verified.
pub(crate) fn merge_snapshot<R: Read>(
    db: &Database,
    input: &mut R,
) -> Result<MergeSummary, StoreError> {
    apply_snapshot(db, input, Apply::Merge)
}

fn apply_snapshot<R: Read>(
    db: &Database,
    input: &mut R,
    mode: Apply,
) -> Result<MergeSummary, StoreError> {
    let mut merge = MergeSummary::default();
    let mut buffered = std::io::BufReader::with_capacity(256 << 10, input);
    let mut r = HashingReader {
        inner: &mut buffered,
        hasher: Sha256::new(),
        bytes: 0,
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
    let mut expected = SnapshotSummary {
        format_version: version,
        next_seq: h.u64("next_seq").map_err(header_err)?,
        messages: h.u64("message count").map_err(header_err)?,
        tombstones: h.u64("tombstone count").map_err(header_err)?,
        profiles: h.u64("profile count").map_err(header_err)?,
        memberships: h.u64("membership count").map_err(header_err)?,
        ..SnapshotSummary::default()
    };

    let txn = db.begin_write().ctx("restore: begin")?;
    {
        let mut w = Writer::new(&txn)?;
        let mut found = Vec::new();
        for (name, n) in [
            (
                "inbox entries (messages or dedup)",
                w.inbox.len().ctx("restore: count inbox")?,
            ),
            ("profiles", w.profiles.len().ctx("restore: count profiles")?),
            (
                "channel memberships",
                w.members.len().ctx("restore: count members")?,
            ),
        ] {
            if n > 0 {
                found.push(format!("{n} {name}"));
            }
        }
        if mode == Apply::Restore && !found.is_empty() {
            return Err(StoreError::NotEmpty {
                what: found.join(", "),
            });
        }

        let mut got = SnapshotSummary::default();
        let mut body = Vec::new();
        let mut last_tag = 0u8;
        loop {
            let mut tag = [0u8; 1];
            r.fill(&mut tag, "record tag", true)?;
            let tag = tag[0];
            if tag == TAG_END {
                break;
            }
            if tag < last_tag || !(TAG_MESSAGE..=TAG_MEMBERSHIP).contains(&tag) {
                return Err(invalid(format!(
                    "unexpected record tag {tag} at byte {}",
                    r.bytes - 1
                )));
            }
            last_tag = tag;
            let mut len = [0u8; 4];
            r.fill(&mut len, "record length", true)?;
            let len = u32::from_be_bytes(len);
            if len > MAX_RECORD_BYTES {
                return Err(invalid(format!(
                    "record of {len} bytes at byte {} exceeds the {MAX_RECORD_BYTES} limit",
                    r.bytes - 5
                )));
            }
            body.resize(len as usize, 0);
            r.fill(&mut body, "record body", true)?;
            let at = r.bytes;
            let rec_err = |e: String| invalid(format!("record ending at byte {at}: {e}"));
            let mut b = Reader::new(&body);
            match tag {
                TAG_MESSAGE => {
                    let seq = b.u64("seq").map_err(rec_err)?;
                    let rest = b.take(body.len() - 8, "message").map_err(rec_err)?;
                    let m = decode_message(rest).map_err(rec_err)?;
                    super::validate_message(&m)?;
                    if seq == 0 || seq >= expected.next_seq {
                        return Err(rec_err(format!(
                            "seq {seq} outside 1..{}",
                            expected.next_seq
                        )));
                    }
                    let dk = dedup_key(&m.recipient, &m.sender, &m.id);
                    match mode {
                        Apply::Restore => w.insert_message(seq, &m, &dk)?,
                        Apply::Merge => {
                            if has_entry(&w, &dk)? {
                                merge.duplicates += 1;
                            } else {
                                let fresh = w.next_seq;
                                w.next_seq += 1;
                                w.insert_message(fresh, &m, &dk)?;
                                merge.imported += 1;
                            }
                        }
                    }
                    got.messages += 1;
                }
                TAG_TOMBSTONE => {
                    let seq = b.u64("seq").map_err(rec_err)?;
                    let expires = b.i64("expiry").map_err(rec_err)?;
                    let recipient = b.key("tombstone recipient").map_err(rec_err)?;
                    let sender = b.key("tombstone sender").map_err(rec_err)?;
                    let id = b.take(body.len() - 80, "tombstone id").map_err(rec_err)?;
                    let id = std::str::from_utf8(id)
                        .map_err(|_| rec_err("tombstone id is not UTF-8".into()))?;
                    let dk = dedup_key(&recipient, &sender, id);
                    match mode {
                        Apply::Restore => w.insert_dedup(&dk, seq, expires)?,
                        // A tombstone is a dedup entry whose seq names no message. The
                        // stream's seq may name a live message here, so take a fresh one.
                        Apply::Merge => {
                            if !has_entry(&w, &dk)? {
                                let fresh = w.next_seq;
                                w.next_seq += 1;
                                w.insert_dedup(&dk, fresh, expires)?;
                            }
                        }
                    }
                    got.tombstones += 1;
                }
                TAG_PROFILE => {
                    let key = b.key("profile key").map_err(rec_err)?;
                    let updated = b.i64("profile updated").map_err(rec_err)?;
                    let blob = b.bytes("profile blob").map_err(rec_err)?;
                    b.finish("profile record").map_err(rec_err)?;
                    if w.put_profile(&key, blob, updated)? {
                        merge.profiles_updated += 1;
                    }
                    got.profiles += 1;
                }
                _ => {
                    let (channel, member) = split_member_key(&body).map_err(rec_err)?;
                    validate_channel(&channel)?;
                    debug_assert_eq!(member_key(&channel, &member), body);
                    w.join(&channel, &member)?;
                    got.memberships += 1;
                }
            }
        }
        let actual = r.hasher.finalize_reset();
        let mut trailer = [0u8; 32];
        r.fill(&mut trailer, "SHA-256 trailer", false)?;
        if trailer[..] != actual[..] {
            return Err(StoreError::SnapshotChecksum {
                expected: hex::encode(trailer),
                actual: hex::encode(actual),
            });
        }
        let mut extra = [0u8; 1];
        match r.inner.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(invalid("data after the SHA-256 trailer")),
            Err(source) => return Err(StoreError::SnapshotIo { op: "read", source }),
        }
        for (what, want, have) in [
            ("messages", expected.messages, got.messages),
            ("tombstones", expected.tombstones, got.tombstones),
            ("profiles", expected.profiles, got.profiles),
            ("memberships", expected.memberships, got.memberships),
        ] {
            if want != have {
                return Err(invalid(format!(
                    "header announces {want} {what}, stream holds {have}"
                )));
            }
        }
        if mode == Apply::Restore {
            w.next_seq = w.next_seq.max(expected.next_seq);
        }
        w.finish()?;
        expected.bytes = r.bytes;
        expected.sha256 = hex::encode(actual);
    }
    // Nothing above committed: any error returned earlier dropped (aborted) the txn.
    txn.commit().ctx("restore: commit")?;
    tracing::info!(
        ?mode,
        messages = expected.messages,
        tombstones = expected.tombstones,
        profiles = expected.profiles,
        memberships = expected.memberships,
        imported = merge.imported,
        duplicates = merge.duplicates,
        "snapshot applied"
    );
    merge.snapshot = expected;
    Ok(merge)
}

/// Whether the inbox has a dedup entry for this key (the message is pending or was
/// acknowledged recently).
fn has_entry(w: &Writer<'_>, dk: &[u8]) -> Result<bool, StoreError> {
    Ok(w.inbox
        .get(dk)
        .ctx("merge: read inbox dedup entry")?
        .is_some())
}

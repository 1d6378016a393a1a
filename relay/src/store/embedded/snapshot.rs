//! Snapshots of the embedded store: writing one from a single read view, and applying
//! one (restore into an empty store, merge into one that may hold data) under the
//! writer's lock. The stream format itself is [`crate::store::snapshot`].

use super::batch::Writer;
use super::tables::{
    decode_u64, recipient_of, split_dedup_record, Ctx, Table, Tables, RESTORE_MARKER,
};
use super::writer::Engine;
use crate::store::snapshot::{
    self, is_message_key, seq_of_message_key, Apply, MergeSummary, SnapshotCounts, SnapshotSummary,
    SnapshotWriter,
};
use crate::store::{PublicKey, StoreError};

/// Records a restore applies per committed chunk (bounds its memory to a few tens of MB).
#[cfg(not(test))]
const RESTORE_CHUNK_RECORDS: usize = 50_000;
/// Small in unit tests, so that a test restore spans several chunks.
#[cfg(test)]
const RESTORE_CHUNK_RECORDS: usize = 7;

/// Restore or merge under the engine lock.
///
/// A merge is one batch, committed durably at the end (the store may hold data, so
/// nothing may land unless the whole stream verified); it is held in memory until then.
///
/// A restore goes into an empty store and may be far larger, so it commits every
/// [`RESTORE_CHUNK_RECORDS`] records and stays all-or-nothing another way: its first
/// chunk sets the marker `meta.restore_incomplete`, the last one clears it. If the stream
/// fails verification the store is emptied again at once; if the process dies in the
/// middle, the next open finds the marker and does the same ([`Tables::init`]).
pub(super) fn apply_snapshot_locked(
    engine: &mut Engine,
    input: &mut impl std::io::Read,
    mode: Apply,
) -> Result<MergeSummary, StoreError> {
    let mut w = Writer::new(&engine.tables, engine.counters);
    let chunk = match mode {
        Apply::Restore => {
            // Checked before the marker: a refused restore must not roll anything back.
            if let Some(what) = w.contents()? {
                return Err(StoreError::NotEmpty { what });
            }
            w.insert(Table::Meta, RESTORE_MARKER.as_bytes(), &1u64.to_be_bytes());
            Some(RESTORE_CHUNK_RECORDS)
        }
        Apply::Merge => None,
    };
    let summary = match snapshot::apply_snapshot(&mut w, input, mode, chunk) {
        Ok(summary) => summary,
        Err(e) => {
            drop(w);
            if mode == Apply::Restore {
                engine.tables.undo_restore(engine.counters)?;
            }
            return Err(e);
        }
    };
    if mode == Apply::Restore {
        w.remove(Table::Meta, RESTORE_MARKER.as_bytes());
    }
    engine.counters = w.commit()?;
    tracing::info!(
        ?mode,
        messages = summary.snapshot.messages,
        tombstones = summary.snapshot.tombstones,
        profiles = summary.snapshot.profiles,
        memberships = summary.snapshot.memberships,
        imported = summary.imported,
        duplicates = summary.duplicates,
        "snapshot applied"
    );
    Ok(summary)
}

/// Writes a snapshot of `tables` from one consistent read view.
pub(crate) fn write_snapshot(
    tables: &Tables,
    out: &mut impl std::io::Write,
) -> Result<SnapshotSummary, StoreError> {
    use fjall::Readable;
    let view = tables.db.snapshot();
    let inbox = tables.ks(Table::Inbox);
    let next_seq = match view
        .get(tables.ks(Table::Meta), "next_seq")
        .ctx("snapshot: read next_seq")?
    {
        Some(v) => decode_u64(&v, "meta")?,
        None => 1,
    };
    // Count first, in the same view, so the header carries exact counts.
    let mut counts = SnapshotCounts {
        next_seq,
        ..SnapshotCounts::default()
    };
    let mut scan = TombstoneScan::default();
    for entry in view.iter(inbox) {
        let (k, v) = entry.into_inner().ctx("snapshot: scan inbox")?;
        if is_message_key(&k) {
            counts.messages += 1;
        }
        if scan.next(&k, &v)?.is_some() {
            counts.tombstones += 1;
        }
    }
    for entry in view.iter(tables.ks(Table::Profiles)) {
        entry.key().ctx("snapshot: scan profiles")?;
        counts.profiles += 1;
    }
    for entry in view.iter(tables.ks(Table::Members)) {
        entry.key().ctx("snapshot: scan members")?;
        counts.memberships += 1;
    }

    let mut w = SnapshotWriter::start(out, counts)?;
    for entry in view.iter(inbox) {
        let (k, v) = entry.into_inner().ctx("snapshot: scan inbox")?;
        if is_message_key(&k) {
            w.message(seq_of_message_key(&k)?, &v)?;
        }
    }
    let mut scan = TombstoneScan::default();
    for entry in view.iter(inbox) {
        let (k, v) = entry.into_inner().ctx("snapshot: scan inbox")?;
        if let Some((seq, expires)) = scan.next(&k, &v)? {
            w.tombstone(&k, seq, expires)?;
        }
    }
    for entry in view.iter(tables.ks(Table::Profiles)) {
        let (k, v) = entry.into_inner().ctx("snapshot: scan profiles")?;
        w.profile(&k, &v)?;
    }
    for entry in view.iter(tables.ks(Table::Members)) {
        let k = entry.key().ctx("snapshot: scan members")?;
        w.membership(&k)?;
    }
    w.finish()
}

/// Tells, during a scan of the inbox in key order, which dedup entries are tombstones
/// (their message was acknowledged, so only the entry is left). A recipient's message
/// keys (`recipient ‖ 0x00 ‖ seq`) sort before its dedup keys (`recipient ‖ 0x01 ‖ …`),
/// so when the scan reaches a dedup entry it has seen every message of that recipient:
/// no lookup per entry.
#[derive(Default)]
struct TombstoneScan {
    recipient: Option<PublicKey>,
    /// Seqs of the current recipient's messages, ascending (the scan's order).
    seqs: Vec<u64>,
}

impl TombstoneScan {
    /// Feeds the next inbox entry; `Some((seq, expires_at_ms))` if it is a tombstone.
    fn next(&mut self, k: &[u8], v: &[u8]) -> Result<Option<(u64, i64)>, StoreError> {
        let recipient = recipient_of(k, "inbox", "key")?;
        if self.recipient != Some(recipient) {
            self.recipient = Some(recipient);
            self.seqs.clear();
        }
        if is_message_key(k) {
            self.seqs.push(seq_of_message_key(k)?);
            return Ok(None);
        }
        let (seq, expires, stored) = split_dedup_record(v)?;
        let pending = stored && self.seqs.binary_search(&seq).is_ok();
        Ok((!pending).then_some((seq, expires)))
    }
}

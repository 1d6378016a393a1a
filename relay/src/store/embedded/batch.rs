//! One batch of the writer being built ([`Writer`]): the fjall write batch, the writes
//! staged for reads later in the same batch, and every write operation (put, ack,
//! expire, profiles, memberships) as it applies to the keyspaces.

use fjall::{PersistMode, Slice};

use super::tables::{
    decode_u64, dedup_record, recipient_of, split_dedup_record, Counters, Ctx, Table, Tables,
    DEDUP_ACKED, DEDUP_PENDING,
};
use super::writer::{Answer, WriteOp};
use crate::store::codec::{dedup_key, encode_message, expiry_key, member_key, message_key};
use crate::store::snapshot::{is_message_key, split_profile};
use crate::store::{AckKey, PublicKey, PutOutcome, StoreError, StoredMessage};

/// Which writes to a key the writer stages, for reads later in the same batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Staging {
    /// Never read back: expiry-index entries (`expire` reads the committed index, in a
    /// batch of its own).
    None,
    /// Message records: the writer asks whether one still exists (ack by id, expiry),
    /// and a record written in this batch is known by its seq ([`Writer::first_seq`]),
    /// so only removals are staged. Staging every write was a hash-map insert per
    /// stored message for nothing.
    Removals,
    /// Dedup entries (put, ack by id, merge), profiles, channel counts, memberships.
    All,
}

/// How the writer stages writes to `key` of `table`.
fn staging(table: Table, key: &[u8]) -> Staging {
    match table {
        Table::Expiry => Staging::None,
        Table::Inbox if is_message_key(key) => Staging::Removals,
        _ => Staging::All,
    }
}

/// One batch being built: the fjall write batch plus, for the keys the writer reads
/// back ([`staging`]), the same writes staged in maps, so that reads by later
/// operations of the batch see them (`None` = removed).
pub(crate) struct Writer<'t> {
    tables: &'t Tables,
    batch: fjall::OwnedWriteBatch,
    pub(super) staged: [foldhash::HashMap<Slice, Option<Slice>>; 6],
    /// `counters.next_seq` when the batch began: a message with a seq from here on was
    /// written in this batch.
    first_seq: u64,
    dirty: bool,
    /// Counters as of the end of this batch.
    pub(crate) counters: Counters,
}

impl<'t> Writer<'t> {
    pub(super) fn new(tables: &'t Tables, counters: Counters) -> Self {
        Writer {
            tables,
            batch: tables.db.batch(),
            staged: Default::default(),
            first_seq: counters.next_seq,
            dirty: false,
            counters,
        }
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Slice>, StoreError> {
        debug_assert_eq!(staging(table, key), Staging::All, "{table:?} key read");
        if let Some(v) = self.staged[table as usize].get(key) {
            return Ok(v.clone());
        }
        self.tables.ks(table).get(key).ctx("write: read")
    }

    fn contains(&self, table: Table, key: &[u8]) -> Result<bool, StoreError> {
        debug_assert_eq!(staging(table, key), Staging::All, "{table:?} key read");
        if let Some(v) = self.staged[table as usize].get(key) {
            return Ok(v.is_some());
        }
        self.tables.ks(table).contains_key(key).ctx("write: read")
    }

    /// Whether the message of a dedup entry in the [`DEDUP_PENDING`] state is still
    /// stored (not acknowledged, not expired), as of this point of the batch. Such an
    /// entry written in this batch came with its message, under a seq the batch
    /// assigned.
    fn message_stored(&self, recipient: &PublicKey, seq: u64) -> Result<bool, StoreError> {
        let key = message_key(recipient, seq);
        if let Some(v) = self.staged[Table::Inbox as usize].get(key.as_slice()) {
            return Ok(v.is_some());
        }
        if seq >= self.first_seq {
            return Ok(true);
        }
        self.tables
            .ks(Table::Inbox)
            .contains_key(key)
            .ctx("write: read")
    }

    /// Whether a dedup entry's message is pending: stored with the entry and not
    /// removed since.
    pub(super) fn still_pending(
        &self,
        recipient: &PublicKey,
        seq: u64,
        stored: bool,
    ) -> Result<bool, StoreError> {
        Ok(stored && self.message_stored(recipient, seq)?)
    }

    pub(super) fn insert(&mut self, table: Table, key: &[u8], value: &[u8]) {
        if staging(table, key) == Staging::All {
            // One copy each; the batch and the staging map share it (reference counted).
            let (key, value) = (Slice::from(key), Slice::from(value));
            self.batch
                .insert(self.tables.ks(table), key.clone(), value.clone());
            self.staged[table as usize].insert(key, Some(value));
        } else {
            self.batch.insert(self.tables.ks(table), key, value);
        }
        self.dirty = true;
    }

    pub(super) fn remove(&mut self, table: Table, key: &[u8]) {
        if staging(table, key) != Staging::None {
            let key = Slice::from(key);
            self.batch.remove(self.tables.ks(table), key.clone());
            self.staged[table as usize].insert(key, None);
        } else {
            self.batch.remove(self.tables.ks(table), key);
        }
        self.dirty = true;
    }

    /// Commits the batch (with the counters) durably: the journal is fsync'd before the
    /// batch becomes visible. Returns the new counters.
    pub(super) fn commit(mut self) -> Result<Counters, StoreError> {
        self.commit_batch(PersistMode::SyncData)?;
        Ok(self.counters)
    }

    /// Commits what is batched so far (with the counters) and starts a new batch; a
    /// restore does this every [`RESTORE_CHUNK_RECORDS`](super::snapshot) records so
    /// that its memory stays bounded (see
    /// [`apply_snapshot_locked`](super::snapshot::apply_snapshot_locked) for how it stays
    /// all-or-nothing).
    pub(crate) fn commit_batch(&mut self, durability: PersistMode) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        let mut batch = std::mem::replace(&mut self.batch, self.tables.db.batch());
        let meta = self.tables.ks(Table::Meta);
        let c = self.counters;
        for (k, v) in [
            ("next_seq", c.next_seq),
            ("pending_count", c.pending),
            ("profile_count", c.profiles),
            ("channel_count", c.channels),
        ] {
            batch.insert(meta, k, v.to_be_bytes());
        }
        batch
            .durability(Some(durability))
            .commit()
            .ctx("write: commit")?;
        for staged in &mut self.staged {
            staged.clear();
        }
        self.first_seq = c.next_seq;
        self.dirty = false;
        Ok(())
    }

    /// What the store already holds, for a restore's emptiness check.
    pub(crate) fn contents(&self) -> Result<Option<String>, StoreError> {
        let mut found = Vec::new();
        for (table, what) in super::tables::CONTENTS {
            let non_empty = !self.staged[table as usize].is_empty()
                || !self
                    .tables
                    .ks(table)
                    .is_empty()
                    .ctx("restore: check empty")?;
            if non_empty {
                found.push(what);
            }
        }
        Ok((!found.is_empty()).then(|| found.join(", ")))
    }

    /// Applies one queued op.
    pub(super) fn apply(&mut self, op: &WriteOp) -> Result<Answer, StoreError> {
        Ok(match op {
            WriteOp::Put { msgs, .. } => {
                let mut out = Vec::with_capacity(msgs.len());
                for m in msgs {
                    out.push(self.put(m)?);
                }
                Answer::Outcomes(out)
            }
            WriteOp::Ack {
                recipient, keys, ..
            } => Answer::Count(self.ack(recipient, keys)?),
            WriteOp::Expire {
                now_ms,
                max_entries,
                ..
            } => {
                let (removed, more) = self.expire(*now_ms, *max_entries)?;
                Answer::Expired(removed, more)
            }
            WriteOp::PutProfile {
                key,
                profile,
                updated_ms,
                ..
            } => Answer::Flag(self.put_profile(key, profile, *updated_ms)?),
            WriteOp::Membership {
                channel,
                member,
                join,
                ..
            } => {
                if *join {
                    self.join(channel, member)?;
                } else {
                    self.leave(channel, member)?;
                }
                Answer::Unit
            }
            WriteOp::Barrier { .. } => Answer::Unit,
        })
    }

    pub(super) fn put(&mut self, m: &StoredMessage) -> Result<PutOutcome, StoreError> {
        let dk = dedup_key(&m.recipient, &m.sender, &m.id);
        if self.has_dedup(&dk)? {
            return Ok(PutOutcome::Duplicate);
        }
        let seq = self.counters.next_seq;
        self.counters.next_seq += 1;
        self.insert_message(seq, m, &dk);
        Ok(PutOutcome::Stored { seq })
    }

    /// Whether the inbox has a dedup entry for this key (the message is pending or was
    /// acknowledged and has not expired).
    pub(crate) fn has_dedup(&self, dk: &[u8]) -> Result<bool, StoreError> {
        self.contains(Table::Inbox, dk)
    }

    /// Writes a message, its (pending) dedup entry and its expiry index entry.
    pub(crate) fn insert_message(&mut self, seq: u64, m: &StoredMessage, dk: &[u8]) {
        self.insert(
            Table::Inbox,
            &message_key(&m.recipient, seq),
            &encode_message(m),
        );
        self.counters.pending += 1;
        self.insert_dedup_entry(dk, seq, m.expires_at_ms, DEDUP_PENDING);
    }

    /// Writes the dedup entry of an acknowledged message (a snapshot tombstone) and its
    /// expiry index entry.
    pub(crate) fn insert_dedup(&mut self, dk: &[u8], seq: u64, expires_at_ms: i64) {
        self.insert_dedup_entry(dk, seq, expires_at_ms, DEDUP_ACKED);
    }

    fn insert_dedup_entry(&mut self, dk: &[u8], seq: u64, expires_at_ms: i64, state: u8) {
        self.insert(Table::Inbox, dk, &dedup_record(seq, expires_at_ms, state));
        self.insert(Table::Expiry, &expiry_key(expires_at_ms, seq), dk);
    }

    /// Takes the next sequence number (merge assigns fresh ones).
    pub(crate) fn take_seq(&mut self) -> u64 {
        let seq = self.counters.next_seq;
        self.counters.next_seq += 1;
        seq
    }

    /// Acknowledges `keys` of `recipient`: removes the message record, one write. The
    /// dedup entry stays as it is until expiry (a retry of an acknowledged id must still
    /// be a duplicate); that its record is gone is what marks it acknowledged, so the
    /// ack does not rewrite it (that was half the writes of a reconnect drain).
    ///
    /// A key that quotes its read needs no lookup (the drain's biggest cost was looking
    /// every id up): the reader was this process, which acknowledges a read message
    /// once, and no expiry pass has run past its expiry since, so it is still pending
    /// under that seq. Any other key is looked up by id.
    pub(super) fn ack(
        &mut self,
        recipient: &PublicKey,
        keys: &[AckKey],
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        for key in keys {
            let seq = match key.read_as {
                Some(r) if r.expires_at_ms > self.counters.expired_through_ms => r.seq,
                _ => {
                    let dk = dedup_key(recipient, &key.sender, &key.id);
                    let Some(v) = self.get(Table::Inbox, &dk)? else {
                        continue;
                    };
                    let (seq, _, stored) = split_dedup_record(&v)?;
                    if !self.still_pending(recipient, seq, stored)? {
                        continue;
                    }
                    seq
                }
            };
            self.remove(Table::Inbox, &message_key(recipient, seq));
            self.counters.pending = self.counters.pending.saturating_sub(1);
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes up to `max_entries` due expiry entries. Reads the committed expiry
    /// index, so it runs first in its batch (the writer loop sees to that).
    fn expire(&mut self, now_ms: i64, max_entries: usize) -> Result<(u64, bool), StoreError> {
        self.counters.expired_through_ms = self.counters.expired_through_ms.max(now_ms);
        let upper = expiry_key(now_ms, u64::MAX);
        // One more than the chunk tells whether another round is needed.
        let mut due = Vec::new();
        for entry in self
            .tables
            .ks(Table::Expiry)
            .range(..=upper.as_slice())
            .take(max_entries + 1)
        {
            let (k, v) = entry.into_inner().ctx("expire: scan expiry")?;
            due.push((k, v));
        }
        let more = due.len() > max_entries;
        due.truncate(max_entries);
        let mut removed = 0;
        for (ek, dk) in due {
            self.remove(Table::Expiry, &ek);
            let seq = ek
                .get(8..16)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| StoreError::Corrupt {
                    table: "expiry",
                    reason: format!("key of {} bytes", ek.len()),
                })?;
            let recipient = recipient_of(&dk, "expiry", "dedup key")?;
            // Only an entry that still belongs to this seq is removed (with its
            // message, if that was not acknowledged yet).
            if let Some(v) = self.get(Table::Inbox, &dk)? {
                let (current, _, stored) = split_dedup_record(&v)?;
                if current == seq {
                    self.remove(Table::Inbox, &dk);
                    if self.still_pending(&recipient, seq, stored)? {
                        self.remove(Table::Inbox, &message_key(&recipient, seq));
                        self.counters.pending = self.counters.pending.saturating_sub(1);
                        removed += 1;
                    }
                }
            }
        }
        Ok((removed, more))
    }

    /// Stores a profile if it is newer than the stored one; whether it was stored.
    pub(crate) fn put_profile(
        &mut self,
        key: &PublicKey,
        profile: &[u8],
        updated_ms: i64,
    ) -> Result<bool, StoreError> {
        match self.get(Table::Profiles, key)? {
            Some(old) => {
                let (old_updated, _) = split_profile(&old)?;
                if old_updated >= updated_ms {
                    return Ok(false);
                }
            }
            None => self.counters.profiles += 1,
        }
        let mut v = Vec::with_capacity(8 + profile.len());
        v.extend_from_slice(&updated_ms.to_be_bytes());
        v.extend_from_slice(profile);
        self.insert(Table::Profiles, key, &v);
        Ok(true)
    }

    fn channel_count(&self, channel: &str) -> Result<u64, StoreError> {
        match self.get(Table::Channels, channel.as_bytes())? {
            Some(v) => decode_u64(&v, "channels"),
            None => Ok(0),
        }
    }

    /// Adds a persistent membership (joining twice is one membership).
    pub(crate) fn join(&mut self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
        let k = member_key(channel, member);
        if self.contains(Table::Members, &k)? {
            return Ok(());
        }
        self.insert(Table::Members, &k, &[]);
        let n = self.channel_count(channel)?;
        if n == 0 {
            self.counters.channels += 1;
        }
        self.insert(Table::Channels, channel.as_bytes(), &(n + 1).to_be_bytes());
        Ok(())
    }

    fn leave(&mut self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
        let k = member_key(channel, member);
        if !self.contains(Table::Members, &k)? {
            return Ok(());
        }
        self.remove(Table::Members, &k);
        let n = self.channel_count(channel)?;
        if n <= 1 {
            self.remove(Table::Channels, channel.as_bytes());
            self.counters.channels = self.counters.channels.saturating_sub(1);
        } else {
            self.insert(Table::Channels, channel.as_bytes(), &(n - 1).to_be_bytes());
        }
        Ok(())
    }
}

//! The embedded store's keyspaces (fjall's column families): what their keys and values
//! are, how they are opened and tuned, the layout version, the dedup entry's value and
//! the counters kept in META.

use std::path::Path;

use fjall::config::{BlockSizePolicy, PinningPolicy};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::EmbeddedOptions;
use crate::store::codec::{dedup_value, split_dedup_value};
use crate::store::{PublicKey, StoreError};

/// Layout version stored in META at creation: 4 is the layout of the first release
/// (0.1.0); lower numbers were never released. A store of another version is refused.
const SCHEMA_VERSION: u64 = 4;
/// META key present while a restore is being applied (see
/// [`super::snapshot::apply_snapshot_locked`]).
pub(super) const RESTORE_MARKER: &str = "restore_incomplete";
/// Smallest journal budget: journals beyond it make fjall flush memtables early so old
/// journals can be dropped (it is twice the write buffer otherwise); bounds what a
/// restart replays.
const MIN_JOURNAL_BYTES: u64 = 64 << 20;
/// Memtable size of the small keyspaces (profiles, memberships, counters), and the
/// smallest of any.
const MIN_MEMTABLE_BYTES: u64 = 4 << 20;

/// The tables a restore requires to be empty, and how [`StoreError::NotEmpty`] names them.
pub(super) const CONTENTS: [(Table, &str); 3] = [
    (Table::Inbox, "inbox entries (messages or dedup)"),
    (Table::Profiles, "profiles"),
    (Table::Members, "channel memberships"),
];
/// Block cache for reads (fjall's blocks of sorted files). Small on purpose: the relay
/// reads a recipient's backlog back once and then it is acknowledged, and dedup checks
/// mostly stop at a file's filter (pinned in memory for the inbox, outside this cache),
/// so cached data blocks are seldom read again. A larger cache only took memory:
/// filling 32 MiB during S3's drain was ~8k fresh pages (page faults), and the drain ran
/// ~10 % slower (6 alternated runs).
const CACHE_BYTES: u64 = 8 << 20;
/// Data block size of the inbox's sorted files (fjall's default is 4 KiB). A message
/// record is ~0.5–1 KiB, so a reconnect drain reading a recipient's backlog from a file
/// loaded a block per handful of messages, each load a read, an allocation and a
/// checksum; with 16 KiB blocks S3's drain was ~9 % faster and its put phase ~10 %
/// (10 alternated runs, docs/performance.md). Point reads (dedup checks) mostly stop at
/// the filter. Set when the keyspace is created: an existing store keeps its size.
const INBOX_BLOCK_BYTES: u32 = 16 << 10;

/// The keyspaces (fjall's column families) and what their keys and values are.
/// Key layouts are shared with the snapshot format (see `codec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Table {
    /// Per recipient, side by side: `recipient ‖ 0x00 ‖ seq` → message record (pending
    /// messages, in seq order) and `recipient ‖ 0x01 ‖ sender ‖ id` → seq ‖
    /// expires_at_ms ‖ state (dedup; kept after ack until expiry). A message is pending
    /// while its record exists: an ack only removes the record ([`DEDUP_PENDING`]).
    Inbox,
    /// ordered(expires_at_ms) ‖ seq → dedup key: what `expire` removes, without a scan.
    Expiry,
    /// public key → updated_ms (i64 BE) ‖ profile blob.
    Profiles,
    /// u16 len ‖ channel ‖ member → empty: persistent memberships.
    Members,
    /// channel → member count (u64 BE).
    Channels,
    /// "schema_version", "next_seq", "pending_count", "profile_count",
    /// "channel_count" → u64 BE.
    Meta,
}

/// Keyspace names, in the order of [`Table`]'s discriminants (`Tables::ks` indexes by them).
pub(super) const TABLES: [(Table, &str); 6] = [
    (Table::Inbox, "inbox"),
    (Table::Expiry, "expiry"),
    (Table::Profiles, "profiles"),
    (Table::Members, "members"),
    (Table::Channels, "channels"),
    (Table::Meta, "meta"),
];

/// Maps a fjall error into [`StoreError::Embedded`] naming the operation.
pub(super) trait Ctx<T> {
    fn ctx(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> Ctx<T> for Result<T, fjall::Error> {
    fn ctx(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Embedded { op, source })
    }
}

/// The open database and its keyspaces; cheap to clone (handles).
#[derive(Clone)]
pub(crate) struct Tables {
    pub(super) db: Database,
    keyspaces: Vec<Keyspace>,
}

impl Tables {
    /// Opens (creating if needed) the database in `path`.
    pub(super) fn open(path: &Path, options: &EmbeddedOptions) -> Result<Tables, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = Database::builder(path)
            .cache_size(CACHE_BYTES)
            .max_journaling_size((2 * options.write_buffer_bytes).max(MIN_JOURNAL_BYTES))
            .open()
            .map_err(open_err)?;
        let mut keyspaces = Vec::with_capacity(TABLES.len());
        for (table, name) in TABLES {
            let memtable = match table {
                Table::Inbox => options.write_buffer_bytes,
                Table::Expiry => (options.write_buffer_bytes / 4).max(MIN_MEMTABLE_BYTES),
                _ => MIN_MEMTABLE_BYTES,
            };
            let ks = db
                .keyspace(name, || {
                    let options = KeyspaceCreateOptions::default().max_memtable_size(memtable);
                    if table == Table::Inbox {
                        options
                            .data_block_size_policy(BlockSizePolicy::all(INBOX_BLOCK_BYTES))
                            // Every put's dedup check reads a filter per file; pinned, they
                            // never compete with data blocks in the small block cache.
                            .filter_block_pinning_policy(PinningPolicy::all(true))
                    } else {
                        options
                    }
                })
                .map_err(open_err)?;
            keyspaces.push(ks);
        }
        Ok(Tables { db, keyspaces })
    }

    pub(super) fn ks(&self, table: Table) -> &Keyspace {
        &self.keyspaces[table as usize]
    }

    pub(super) fn meta_u64(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.ks(Table::Meta).get(key).ctx("read meta")? {
            None => Ok(None),
            Some(v) => decode_u64(&v, "meta").map(Some),
        }
    }

    /// Empties every data keyspace and puts back the counters the store had before a
    /// restore began (it was empty then), clearing the restore marker; durable.
    pub(super) fn undo_restore(&self, before: Counters) -> Result<(), StoreError> {
        for (table, _) in TABLES {
            if table != Table::Meta {
                self.ks(table).clear().ctx("restore: roll back")?;
            }
        }
        let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
        let meta = self.ks(Table::Meta);
        for (k, v) in [
            ("next_seq", before.next_seq),
            ("pending_count", 0),
            ("profile_count", 0),
            ("channel_count", 0),
        ] {
            b.insert(meta, k, v.to_be_bytes());
        }
        b.remove(meta, RESTORE_MARKER);
        b.commit().ctx("restore: roll back")?;
        self.db
            .persist(PersistMode::SyncAll)
            .ctx("restore: roll back")
    }

    /// Checks the layout version (writing it into a new store), rolls back a restore
    /// that a crash interrupted, and loads the counters.
    pub(super) fn init(&self) -> Result<Counters, StoreError> {
        if self.meta_u64(RESTORE_MARKER)?.is_some() {
            tracing::warn!("embedded store: a restore was interrupted; emptying the store again");
            let next_seq = self.meta_u64("next_seq")?.unwrap_or(1);
            self.undo_restore(Counters {
                next_seq,
                ..Counters::default()
            })?;
        }
        match self.meta_u64("schema_version")? {
            None => {
                let mut b = self.db.batch().durability(Some(PersistMode::SyncAll));
                b.insert(
                    self.ks(Table::Meta),
                    "schema_version",
                    SCHEMA_VERSION.to_be_bytes(),
                );
                b.commit().ctx("init: write schema_version")?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Corrupt {
                    table: "meta",
                    reason: format!(
                        "schema_version {other}, this relay understands {SCHEMA_VERSION}"
                    ),
                })
            }
        }
        Ok(Counters {
            next_seq: self.meta_u64("next_seq")?.unwrap_or(1),
            pending: self.meta_u64("pending_count")?.unwrap_or(0),
            profiles: self.meta_u64("profile_count")?.unwrap_or(0),
            channels: self.meta_u64("channel_count")?.unwrap_or(0),
            expired_through_ms: i64::MIN,
        })
    }
}

pub(super) fn decode_u64(v: &[u8], table: &'static str) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            table,
            reason: format!("counter of {} bytes, expected 8", v.len()),
        })
}

/// Dedup entry state: the message was stored with this entry. It is pending while its
/// message record exists: an ack removes only the record (one write, not two), so an
/// entry in this state whose record is gone belongs to an acknowledged message.
pub(super) const DEDUP_PENDING: u8 = 0;
/// Dedup entry state: the message is known to be gone (a tombstone restored or merged
/// from a snapshot); the entry only guards against a retry of the same id until it
/// expires.
pub(super) const DEDUP_ACKED: u8 = 1;

/// A dedup entry's value: seq ‖ expires_at_ms ‖ state.
pub(super) fn dedup_record(seq: u64, expires_at_ms: i64, state: u8) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[..16].copy_from_slice(&dedup_value(seq, expires_at_ms));
    v[16] = state;
    v
}

/// Splits a dedup entry's value into (seq, expires_at_ms, stored): `stored` is the
/// [`DEDUP_PENDING`] state, so the message is pending only if its record still exists.
pub(super) fn split_dedup_record(v: &[u8]) -> Result<(u64, i64, bool), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        table: "inbox",
        reason,
    };
    match v {
        [head @ .., state @ (DEDUP_PENDING | DEDUP_ACKED)] => {
            let (seq, expires) = split_dedup_value(head).map_err(corrupt)?;
            Ok((seq, expires, *state == DEDUP_PENDING))
        }
        _ => Err(corrupt(format!("dedup value of {} bytes", v.len()))),
    }
}

/// The recipient an inbox or dedup key begins with; a shorter key is corrupt (`what` in
/// `table`).
pub(super) fn recipient_of(
    key: &[u8],
    table: &'static str,
    what: &str,
) -> Result<PublicKey, StoreError> {
    key.get(..32)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt {
            table,
            reason: format!("{what} of {} bytes", key.len()),
        })
}

/// Counts the writer keeps in memory and persists in META with every batch, so that
/// `stats` and new sequence numbers need no scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) next_seq: u64,
    pub(super) pending: u64,
    pub(super) profiles: u64,
    pub(super) channels: u64,
    /// The latest `now` an expiry pass of this process ran with (in memory only): a
    /// message read later, or expiring after it, has not been removed by expiry.
    pub(super) expired_through_ms: i64,
}

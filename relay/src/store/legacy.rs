//! The previous embedded engine: one redb database file plus a sequential commit log.
//! Kept only to migrate data directories written by earlier relays: opening the store
//! (`super::EmbeddedStore::open`) finds `dchat.redb`, opens it here (which replays its
//! commit log), streams a snapshot of it into the new engine and retires the file
//! ([`migrate_if_present`]). Production code here only reads: the tables, the log
//! replay and the snapshot writer. The old write path (`old_writer`) is compiled for
//! tests only, which need real old data directories to migrate.
//!
//! How it worked: a single writer thread group-committed queued writes in one redb
//! write transaction, made durable by appending its changes to the commit log
//! `dchat.wal` and fsyncing that, then committing the redb transaction without its own
//! fsync; at least every 250 ms a durable redb commit (a checkpoint) made the log's
//! records dead. Opening replays the records newer than the last checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};

use super::codec::{
    decode_log_op, dedup_key, dedup_value, encode_message, expiry_key, fnv1a64, member_key,
    message_key, split_dedup_value, LogOp,
};
use super::snapshot::{
    is_message_key, seq_of_message_key, split_profile, tombstone_of, SnapshotCounts,
    SnapshotSummary, SnapshotWriter,
};
use super::{PublicKey, StoreError, StoredMessage};

/// The per-recipient inbox, two kinds of entries side by side:
/// `recipient ‖ 0x00 ‖ seq` → message record (pending messages, in seq order) and
/// `recipient ‖ 0x01 ‖ sender ‖ id` → seq ‖ expires_at_ms (dedup; kept after ack until
/// expiry). Keeping both under the recipient means a put touches one region of the tree.
const INBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("inbox");
/// ordered(expires_at_ms) ‖ seq → dedup key: what `expire` removes, without a full scan.
const EXPIRY: TableDefinition<&[u8], &[u8]> = TableDefinition::new("expiry");
/// public key → updated_ms (i64 BE) ‖ profile blob.
const PROFILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("profiles");
/// u16 len ‖ channel ‖ member → (): persistent memberships.
const MEMBERS: TableDefinition<&[u8], ()> = TableDefinition::new("members");
/// channel → member count, so `stats` can count channels without a scan.
const CHANNELS: TableDefinition<&str, u64> = TableDefinition::new("channels");
/// Store metadata: "schema_version", "next_seq", "pending_count", and the commit log
/// position "wal_epoch" (current log epoch) and "wal_lsn" (last log record applied).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// On-disk layout version written to META at creation. Version 3 added the commit log
/// (the tables are those of version 2, which is upgraded in place at open).
const SCHEMA_VERSION: u64 = 3;
/// Database file name inside the data directory.
pub(crate) const DB_FILE_NAME: &str = "dchat.redb";
/// Commit log file name inside the data directory.
pub(crate) const WAL_FILE_NAME: &str = "dchat.wal";

/// First bytes of every log record.
const WAL_MAGIC: u32 = 0xDC5A_1061;
/// magic(4) ‖ body length(4) ‖ epoch(8) ‖ lsn(8), then the body, then FNV-1a(8).
const WAL_HEAD: usize = 24;
/// Largest record body accepted when reading the log (bounds a corrupt length).
const WAL_MAX_BODY: usize = 64 << 20;
/// Maps any redb error into a [`StoreError::Embedded`] naming the operation.
pub(crate) trait Ctx<T> {
    fn ctx(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Legacy {
            op,
            source: e.into(),
        })
    }
}

/// Creates the tables and checks the layout version.
fn init_schema(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().ctx("init: begin")?;
    {
        txn.open_table(INBOX).ctx("init: open inbox")?;
        txn.open_table(EXPIRY).ctx("init: open expiry")?;
        txn.open_table(PROFILES).ctx("init: open profiles")?;
        txn.open_table(MEMBERS).ctx("init: open members")?;
        txn.open_table(CHANNELS).ctx("init: open channels")?;
        let mut meta = txn.open_table(META).ctx("init: open meta")?;
        let version = meta
            .get("schema_version")
            .ctx("init: read schema_version")?
            .map(|v| v.value());
        match version {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .ctx("init: write schema_version")?;
            }
            Some(SCHEMA_VERSION) => {}
            // Layout 2 has the same tables and no commit log: nothing to convert.
            Some(2) => {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .ctx("init: upgrade schema_version")?;
                tracing::info!("embedded store upgraded from layout 2 to {SCHEMA_VERSION}");
            }
            Some(other) => {
                return Err(StoreError::Corrupt {
                    table: "meta",
                    reason: format!(
                        "schema_version {other}, this relay understands {SCHEMA_VERSION}"
                    ),
                })
            }
        }
    }
    txn.commit().ctx("init: commit")?;
    Ok(())
}

// Only the test writer (`old_writer`) reads these fields; migration just replays.
#[cfg_attr(not(test), allow(dead_code))]
/// Log records of the batch being applied (not yet written to the file).
struct LogBuf {
    buf: Vec<u8>,
    /// Epoch written into every record; records of other epochs are dead.
    epoch: u64,
    /// Sequence number of the next record.
    next_lsn: u64,
}

impl LogBuf {}

// Only the test writer (`old_writer`) reads these fields; migration just replays.
#[cfg_attr(not(test), allow(dead_code))]
/// The commit log file and the writer's position in it.
struct Wal {
    file: std::fs::File,
    path: PathBuf,
    /// Where the next records are written (0 after every checkpoint: the file is
    /// overwritten in place, so an fsync rarely has to extend it).
    off: u64,
    /// Bytes of the file already written (zeros or old records).
    allocated: u64,
    log: LogBuf,
    last_checkpoint: Instant,
    /// Set when a failed write could not be repaired by a checkpoint: every later write
    /// fails rather than risk logging after records of an unknown state.
    poisoned: Option<String>,
}

impl Wal {
    /// Opens the log next to the database and replays its live records (those of the
    /// current epoch newer than the last checkpoint) in one durable transaction that
    /// also starts a new epoch.
    fn recover(db: &Database, path: &Path) -> Result<Wal, StoreError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("opening commit log"))?;
        let data = std::fs::read(path).map_err(io("reading commit log"))?;
        let allocated = data.len() as u64;
        let txn = db.begin_write().ctx("recover: begin")?;
        let (epoch, next_lsn, replayed) = {
            let mut w = Writer::new(&txn)?;
            let meta_u64 = |w: &Writer<'_>, k: &str| -> Result<u64, StoreError> {
                Ok(w.meta
                    .get(k)
                    .ctx("recover: read meta")?
                    .map(|v| v.value())
                    .unwrap_or(0))
            };
            let epoch = meta_u64(&w, "wal_epoch")?;
            let applied = meta_u64(&w, "wal_lsn")?;
            let mut last = applied;
            let mut replayed = 0u64;
            for (lsn, op) in scan_log(&data, epoch)? {
                if lsn <= applied {
                    continue;
                }
                replay(&mut w, &op)?;
                last = lsn;
                replayed += 1;
            }
            w.meta
                .insert("wal_lsn", last)
                .ctx("recover: store wal_lsn")?;
            w.meta
                .insert("wal_epoch", epoch + 1)
                .ctx("recover: store wal_epoch")?;
            w.finish()?;
            (epoch + 1, last + 1, replayed)
        };
        txn.commit().ctx("recover: commit")?;
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                "embedded store: replayed the commit log"
            );
        }
        Ok(Wal {
            file,
            path: path.to_path_buf(),
            off: 0,
            allocated,
            log: LogBuf {
                buf: Vec::new(),
                epoch,
                next_lsn,
            },
            last_checkpoint: Instant::now(),
            poisoned: None,
        })
    }
}

/// The valid records of `epoch` at the start of `data`, in order: a record ends the scan
/// when its magic, length or checksum is wrong (a torn or never-written tail), when it
/// belongs to another epoch (left over from before a checkpoint), or when its lsn does
/// not follow the previous one. A record that passes the checksum but does not decode is
/// corruption, an error.
fn scan_log(data: &[u8], epoch: u64) -> Result<Vec<(u64, LogOp)>, StoreError> {
    let u32_at = |p: usize| u32::from_be_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]);
    let u64_at = |p: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&data[p..p + 8]);
        u64::from_be_bytes(a)
    };
    let mut out: Vec<(u64, LogOp)> = Vec::new();
    let mut pos = 0usize;
    while pos + WAL_HEAD <= data.len() {
        if u32_at(pos) != WAL_MAGIC {
            break;
        }
        let len = u32_at(pos + 4) as usize;
        if len > WAL_MAX_BODY {
            break;
        }
        let end = pos + WAL_HEAD + len;
        if end + 8 > data.len() || u64_at(end) != fnv1a64(&data[pos..end]) {
            break;
        }
        let lsn = u64_at(pos + 16);
        if u64_at(pos + 8) != epoch || out.last().is_some_and(|(prev, _)| lsn != prev + 1) {
            break;
        }
        let op =
            decode_log_op(&data[pos + WAL_HEAD..end]).map_err(|reason| StoreError::Corrupt {
                table: "commit log",
                reason: format!("record lsn {lsn} at byte {pos}: {reason}"),
            })?;
        out.push((lsn, op));
        pos = end + 8;
    }
    Ok(out)
}

/// Applies one logged change again, exactly as the writer had applied it.
fn replay(w: &mut Writer<'_>, op: &LogOp) -> Result<(), StoreError> {
    match op {
        LogOp::Put { seq, msg } => {
            let dk = dedup_key(&msg.recipient, &msg.sender, &msg.id);
            w.insert_message(*seq, msg, &dk)?;
            w.next_seq = w.next_seq.max(seq + 1);
        }
        LogOp::Ack { recipient, keys } => {
            w.ack(recipient, keys)?;
        }
        LogOp::Expire {
            now_ms,
            max_entries,
        } => {
            let max = usize::try_from(*max_entries).unwrap_or(usize::MAX);
            w.expire(*now_ms, max)?;
        }
        LogOp::Profile {
            key,
            updated_ms,
            blob,
        } => {
            w.put_profile(key, blob, *updated_ms)?;
        }
        LogOp::Membership {
            channel,
            member,
            join,
        } => {
            if *join {
                w.join(channel, member)?;
            } else {
                w.leave(channel, member)?;
            }
        }
    }
    Ok(())
}

/// The open tables of one write transaction.
struct Writer<'t> {
    inbox: redb::Table<'t, &'static [u8], &'static [u8]>,
    expiry: redb::Table<'t, &'static [u8], &'static [u8]>,
    profiles: redb::Table<'t, &'static [u8], &'static [u8]>,
    members: redb::Table<'t, &'static [u8], ()>,
    channels: redb::Table<'t, &'static str, u64>,
    meta: redb::Table<'t, &'static str, u64>,
    next_seq: u64,
    /// Messages stored and not yet acknowledged or expired (for `stats`).
    pending_count: u64,
}

impl<'t> Writer<'t> {
    fn new(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        let meta = txn.open_table(META).ctx("write: open meta")?;
        let next_seq = meta
            .get("next_seq")
            .ctx("write: read next_seq")?
            .map(|v| v.value())
            .unwrap_or(1);
        let pending_count = meta
            .get("pending_count")
            .ctx("write: read pending_count")?
            .map(|v| v.value())
            .unwrap_or(0);
        Ok(Writer {
            inbox: txn.open_table(INBOX).ctx("write: open inbox")?,
            expiry: txn.open_table(EXPIRY).ctx("write: open expiry")?,
            profiles: txn.open_table(PROFILES).ctx("write: open profiles")?,
            members: txn.open_table(MEMBERS).ctx("write: open members")?,
            channels: txn.open_table(CHANNELS).ctx("write: open channels")?,
            meta,
            next_seq,
            pending_count,
        })
    }

    /// Persists the counters; call once before commit.
    fn finish(&mut self) -> Result<(), StoreError> {
        self.meta
            .insert("next_seq", self.next_seq)
            .ctx("write: store next_seq")?;
        self.meta
            .insert("pending_count", self.pending_count)
            .ctx("write: store pending_count")?;
        Ok(())
    }

    /// Writes a message, its dedup entry and its expiry index entry.
    fn insert_message(&mut self, seq: u64, m: &StoredMessage, dk: &[u8]) -> Result<(), StoreError> {
        let rec = encode_message(m);
        self.inbox
            .insert(message_key(&m.recipient, seq).as_slice(), rec.as_slice())
            .ctx("put: insert inbox message")?;
        self.pending_count += 1;
        self.insert_dedup(dk, seq, m.expires_at_ms)
    }

    /// Writes a dedup entry and its expiry index entry.
    fn insert_dedup(&mut self, dk: &[u8], seq: u64, expires_at_ms: i64) -> Result<(), StoreError> {
        self.inbox
            .insert(dk, dedup_value(seq, expires_at_ms).as_slice())
            .ctx("put: insert inbox dedup entry")?;
        self.expiry
            .insert(expiry_key(expires_at_ms, seq).as_slice(), dk)
            .ctx("put: insert expiry")?;
        Ok(())
    }

    fn ack(
        &mut self,
        recipient: &PublicKey,
        keys: &[(PublicKey, String)],
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        for (sender, id) in keys {
            let dk = dedup_key(recipient, sender, id);
            let seq = match self
                .inbox
                .get(dk.as_slice())
                .ctx("ack: read inbox dedup entry")?
            {
                Some(v) => {
                    split_dedup_value(v.value())
                        .map_err(|reason| StoreError::Corrupt {
                            table: "inbox",
                            reason,
                        })?
                        .0
                }
                None => continue,
            };
            // The dedup entry stays until expiry: a retry of an acknowledged id must
            // still be recognised as a duplicate.
            if self
                .inbox
                .remove(message_key(recipient, seq).as_slice())
                .ctx("ack: remove inbox message")?
                .is_some()
            {
                self.pending_count = self.pending_count.saturating_sub(1);
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn expire(&mut self, now_ms: i64, max_entries: usize) -> Result<(u64, bool), StoreError> {
        let upper = expiry_key(now_ms, u64::MAX);
        // One more than the chunk tells whether another round is needed.
        let mut due: Vec<(Vec<u8>, Vec<u8>)> = self
            .expiry
            .range::<&[u8]>(..=upper.as_slice())
            .ctx("expire: scan expiry")?
            .take(max_entries + 1)
            .map(|r| r.map(|(k, v)| (k.value().to_vec(), v.value().to_vec())))
            .collect::<Result<_, _>>()
            .ctx("expire: read expiry")?;
        let more = due.len() > max_entries;
        due.truncate(max_entries);
        let mut removed = 0;
        for (ek, dk) in due {
            self.expiry
                .remove(ek.as_slice())
                .ctx("expire: remove expiry")?;
            let seq =
                u64::from_be_bytes(ek[8..16].try_into().map_err(|_| StoreError::Corrupt {
                    table: "expiry",
                    reason: format!("key of {} bytes", ek.len()),
                })?);
            if dk.len() < 32 {
                return Err(StoreError::Corrupt {
                    table: "expiry",
                    reason: format!("dedup key of {} bytes", dk.len()),
                });
            }
            let mut recipient = [0u8; 32];
            recipient.copy_from_slice(&dk[..32]);
            if self
                .inbox
                .remove(message_key(&recipient, seq).as_slice())
                .ctx("expire: remove inbox message")?
                .is_some()
            {
                self.pending_count = self.pending_count.saturating_sub(1);
                removed += 1;
            }
            // Only drop the dedup entry if it still belongs to this seq.
            let current = self
                .inbox
                .get(dk.as_slice())
                .ctx("expire: read inbox dedup entry")?
                .map(|v| split_dedup_value(v.value()));
            if let Some(Ok((s, _))) = current {
                if s == seq {
                    self.inbox
                        .remove(dk.as_slice())
                        .ctx("expire: remove inbox dedup entry")?;
                }
            }
        }
        Ok((removed, more))
    }

    fn put_profile(
        &mut self,
        key: &PublicKey,
        profile: &[u8],
        updated_ms: i64,
    ) -> Result<bool, StoreError> {
        if let Some(old) = self
            .profiles
            .get(key.as_slice())
            .ctx("put_profile: read profiles")?
        {
            let (old_updated, _) = split_profile(old.value())?;
            if old_updated >= updated_ms {
                return Ok(false);
            }
        }
        let mut v = Vec::with_capacity(8 + profile.len());
        v.extend_from_slice(&updated_ms.to_be_bytes());
        v.extend_from_slice(profile);
        self.profiles
            .insert(key.as_slice(), v.as_slice())
            .ctx("put_profile: insert profiles")?;
        Ok(true)
    }

    fn join(&mut self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
        let k = member_key(channel, member);
        let was = self
            .members
            .insert(k.as_slice(), ())
            .ctx("join: insert members")?
            .is_some();
        if !was {
            let n = self
                .channels
                .get(channel)
                .ctx("join: read channels")?
                .map(|v| v.value())
                .unwrap_or(0);
            self.channels
                .insert(channel, n + 1)
                .ctx("join: update channels")?;
        }
        Ok(())
    }

    fn leave(&mut self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
        let k = member_key(channel, member);
        let was = self
            .members
            .remove(k.as_slice())
            .ctx("leave: remove members")?
            .is_some();
        if was {
            let n = self
                .channels
                .get(channel)
                .ctx("leave: read channels")?
                .map(|v| v.value())
                .unwrap_or(0);
            if n <= 1 {
                self.channels
                    .remove(channel)
                    .ctx("leave: remove channels")?;
            } else {
                self.channels
                    .insert(channel, n - 1)
                    .ctx("leave: update channels")?;
            }
        }
        Ok(())
    }
}

/// Opens the redb file in `dir` and replays its commit log into it (one durable commit
/// that also starts a new log epoch), so the file holds every acknowledged write.
fn open_replayed(dir: &Path) -> Result<(Database, Wal), StoreError> {
    let path = dir.join(DB_FILE_NAME);
    let db = Database::create(&path).map_err(|source| StoreError::LegacyOpen {
        path: path.clone(),
        source,
    })?;
    init_schema(&db)?;
    let wal = Wal::recover(&db, &dir.join(WAL_FILE_NAME))?;
    Ok((db, wal))
}

/// Writes a snapshot of the redb database from one read transaction.
fn write_snapshot(
    db: &Database,
    out: &mut impl std::io::Write,
) -> Result<SnapshotSummary, StoreError> {
    let txn = db.begin_read().ctx("snapshot: begin read")?;
    let inbox = txn.open_table(INBOX).ctx("snapshot: open inbox")?;
    let profiles = txn.open_table(PROFILES).ctx("snapshot: open profiles")?;
    let members = txn.open_table(MEMBERS).ctx("snapshot: open members")?;
    let meta = txn.open_table(META).ctx("snapshot: open meta")?;
    let live = |k: &[u8; 41]| {
        Ok(inbox
            .get(k.as_slice())
            .ctx("snapshot: read inbox message")?
            .is_some())
    };
    let mut counts = SnapshotCounts {
        next_seq: meta
            .get("next_seq")
            .ctx("snapshot: read next_seq")?
            .map(|v| v.value())
            .unwrap_or(1),
        profiles: profiles.len().ctx("snapshot: count profiles")?,
        memberships: members.len().ctx("snapshot: count members")?,
        ..SnapshotCounts::default()
    };
    for entry in inbox.iter().ctx("snapshot: scan inbox")? {
        let (k, v) = entry.ctx("snapshot: read inbox")?;
        if is_message_key(k.value()) {
            counts.messages += 1;
        } else if tombstone_of(k.value(), v.value(), live)?.is_some() {
            counts.tombstones += 1;
        }
    }
    let mut w = SnapshotWriter::start(out, counts)?;
    for entry in inbox.iter().ctx("snapshot: scan inbox")? {
        let (k, v) = entry.ctx("snapshot: read inbox")?;
        if is_message_key(k.value()) {
            w.message(seq_of_message_key(k.value())?, v.value())?;
        }
    }
    for entry in inbox.iter().ctx("snapshot: scan inbox")? {
        let (k, v) = entry.ctx("snapshot: read inbox")?;
        if let Some((seq, expires)) = tombstone_of(k.value(), v.value(), live)? {
            w.tombstone(k.value(), seq, expires)?;
        }
    }
    for entry in profiles.iter().ctx("snapshot: scan profiles")? {
        let (k, v) = entry.ctx("snapshot: read profiles")?;
        w.profile(k.value(), v.value())?;
    }
    for entry in members.iter().ctx("snapshot: scan members")? {
        let (k, _) = entry.ctx("snapshot: read members")?;
        w.membership(k.value())?;
    }
    w.finish()
}

/// File name the migrated redb database is renamed to (kept as a backup).
pub(crate) const MIGRATED_FILE_NAME: &str = "dchat.redb.migrated";
/// Where the migration builds the new database before it is renamed into place.
const STAGING_DIR_NAME: &str = "dchat.store.migrating";
/// The snapshot the migration streams through (removed afterwards).
const MIGRATION_SNAPSHOT_NAME: &str = "dchat.migration.snapshot";

/// If `dir` holds a database of this engine (`dchat.redb`), converts it into the
/// current engine: open it (replaying its commit log), write a snapshot, restore that
/// into a new database built beside it, rename the new one into place, then rename
/// `dchat.redb` to `dchat.redb.migrated` (a backup the operator may delete) and remove
/// the dead commit log. Each step is safe to interrupt: the new database only appears
/// under its real name once it is complete and durable, and a leftover staging
/// directory is rebuilt from scratch.
pub(crate) fn migrate_if_present(
    dir: &Path,
    options: &super::EmbeddedOptions,
) -> Result<(), StoreError> {
    let old = dir.join(DB_FILE_NAME);
    if !old.exists() {
        return Ok(());
    }
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { op, path, source }
    };
    let new = dir.join(super::embedded::STORE_DIR_NAME);
    if !new.exists() {
        let started = Instant::now();
        let staging = dir.join(STAGING_DIR_NAME);
        let snap_path = dir.join(MIGRATION_SNAPSHOT_NAME);
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .map_err(io("removing an interrupted migration", &staging))?;
        }
        tracing::info!(from = %old.display(), "embedded store: migrating the redb database to the LSM engine");
        {
            let (db, _log) = open_replayed(dir)?;
            let mut file = std::fs::File::create(&snap_path).map_err(io("creating", &snap_path))?;
            write_snapshot(&db, &mut file)?;
            file.sync_all().map_err(io("syncing", &snap_path))?;
        }
        let mut file = std::fs::File::open(&snap_path).map_err(io("opening", &snap_path))?;
        let summary = super::embedded::restore_into_new(&staging, options, &mut file)?;
        std::fs::rename(&staging, &new).map_err(io("renaming migrated store into", &new))?;
        sync_dir(dir)?;
        std::fs::remove_file(&snap_path).map_err(io("removing", &snap_path))?;
        tracing::info!(
            messages = summary.messages,
            tombstones = summary.tombstones,
            profiles = summary.profiles,
            memberships = summary.memberships,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "embedded store: migration complete"
        );
    }
    let backup = dir.join(MIGRATED_FILE_NAME);
    std::fs::rename(&old, &backup).map_err(io("renaming migrated database to", &backup))?;
    let wal = dir.join(WAL_FILE_NAME);
    if wal.exists() {
        // Everything it held was replayed into the redb file before the snapshot.
        std::fs::remove_file(&wal).map_err(io("removing", &wal))?;
    }
    sync_dir(dir)?;
    tracing::warn!(backup = %backup.display(), "embedded store: the pre-migration database was kept as a backup; delete it once the relay runs well");
    Ok(())
}

/// Makes renames in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            op: "syncing directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// The old engine's write path, compiled only for tests: they need real data
/// directories of the old engine (with live commit-log records) to migrate.
#[cfg(test)]
mod old_writer {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Duration;

    use redb::{Durability, ReadTransaction};
    use tokio::sync::{mpsc, oneshot};

    use crate::store::codec::{
        channel_prefix, decode_message, encode_log_ack, encode_log_op, encode_log_put,
        split_member_key,
    };
    use crate::store::{
        validate_channel, validate_message, AckKey, Pending, PutOutcome, Store, StoreStats,
    };

    /// Longest time between checkpoints (durable redb commits) while writes arrive; bounds
    /// the log to replay after a crash and the memory redb holds for uncheckpointed commits.
    const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
    /// How often the flusher thread writes back the redb file's dirty pages (see
    /// [`flusher_loop`]).
    const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
    /// Log bytes after which the next batch checkpoints regardless of time.
    const CHECKPOINT_BYTES: u64 = 8 << 20;
    /// The log file is extended by writing zeros at least this much at a time: an fsync
    /// after overwriting allocated blocks only flushes data, while one after extending the
    /// file also commits filesystem metadata (measurably slower on ext4).
    const WAL_GROW_MIN: u64 = 256 << 10;

    /// Queued write operations before callers wait (backpressure beyond this).
    const QUEUE_CAPACITY: usize = 4096;
    /// Upper bound on messages applied in one transaction, to bound commit latency.
    const MAX_BATCH_MESSAGES: usize = 8192;
    /// Expiry-index entries removed per transaction by `expire`.
    const EXPIRE_CHUNK: usize = 5000;

    /// The embedded store. Cheap to share behind an `Arc`; dropping the last handle stops
    /// the writer thread after it has committed everything queued, and closes the file.
    pub(super) struct RedbStore {
        db: Arc<Database>,
        path: PathBuf,
        tx: Option<mpsc::Sender<WriteOp>>,
        writer: Option<JoinHandle<()>>,
        /// Dropping it stops the flusher thread.
        flusher_stop: Option<std::sync::mpsc::Sender<()>>,
        flusher: Option<JoinHandle<()>>,
    }

    impl std::fmt::Debug for RedbStore {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedbStore")
                .field("path", &self.path)
                .finish_non_exhaustive()
        }
    }

    /// One queued write and the channel its caller waits on.
    enum WriteOp {
        Put {
            msgs: Vec<StoredMessage>,
            reply: oneshot::Sender<Result<Vec<PutOutcome>, StoreError>>,
        },
        Ack {
            recipient: PublicKey,
            keys: Vec<(PublicKey, String)>,
            reply: oneshot::Sender<Result<u64, StoreError>>,
        },
        /// Removes at most `max_entries` due expiry-index entries; answers (pending
        /// messages removed, whether due entries remain).
        Expire {
            now_ms: i64,
            max_entries: usize,
            reply: oneshot::Sender<Result<(u64, bool), StoreError>>,
        },
        PutProfile {
            key: PublicKey,
            profile: Vec<u8>,
            updated_ms: i64,
            reply: oneshot::Sender<Result<bool, StoreError>>,
        },
        Membership {
            channel: String,
            member: PublicKey,
            join: bool,
            reply: oneshot::Sender<Result<(), StoreError>>,
        },
        /// Commits (possibly empty) and answers: proves the queue drained and the disk
        /// accepts commits. Used by `flush` and `check`.
        Barrier {
            reply: oneshot::Sender<Result<(), StoreError>>,
        },
    }

    /// What an applied op will answer once its transaction is durable.
    enum Answer {
        Outcomes(Vec<PutOutcome>),
        Count(u64),
        Expired(u64, bool),
        Flag(bool),
        Unit,
    }

    impl WriteOp {
        fn message_count(&self) -> usize {
            match self {
                WriteOp::Put { msgs, .. } => msgs.len(),
                _ => 1,
            }
        }

        /// Sends the result to the waiting caller. A caller that gave up (dropped its
        /// future) is not an error: its write is committed regardless.
        fn answer(self, result: Result<Answer, StoreError>) {
            fn send<T>(
                reply: oneshot::Sender<Result<T, StoreError>>,
                r: Result<Answer, StoreError>,
                pick: impl FnOnce(Answer) -> Option<T>,
            ) {
                let out = r.and_then(|a| {
                    pick(a).ok_or(StoreError::Task {
                        op: "embedded writer",
                        reason: "internal: answer of the wrong kind".into(),
                    })
                });
                let _ = reply.send(out);
            }
            match self {
                WriteOp::Put { reply, .. } => send(reply, result, |a| match a {
                    Answer::Outcomes(o) => Some(o),
                    _ => None,
                }),
                WriteOp::Ack { reply, .. } => send(reply, result, |a| match a {
                    Answer::Count(c) => Some(c),
                    _ => None,
                }),
                WriteOp::Expire { reply, .. } => send(reply, result, |a| match a {
                    Answer::Expired(c, more) => Some((c, more)),
                    _ => None,
                }),
                WriteOp::PutProfile { reply, .. } => send(reply, result, |a| match a {
                    Answer::Flag(b) => Some(b),
                    _ => None,
                }),
                WriteOp::Membership { reply, .. } | WriteOp::Barrier { reply, .. } => {
                    send(reply, result, |a| match a {
                        Answer::Unit => Some(()),
                        _ => None,
                    })
                }
            }
        }
    }

    impl RedbStore {
        /// Opens (creating if needed) the store in `dir`, whose file is `dir/dchat.redb`.
        /// After a crash redb recovers the last committed state. A corrupt or foreign file
        /// is a typed error ([`StoreError::Open`]), never a panic.
        pub(super) fn open(dir: &Path) -> Result<RedbStore, StoreError> {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                op: "creating data directory",
                path: dir.to_path_buf(),
                source,
            })?;
            let path = dir.join(DB_FILE_NAME);
            let (db, wal) = open_replayed(dir)?;
            let db = Arc::new(db);
            let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
            let writer_db = db.clone();
            let writer = std::thread::Builder::new()
                .name("dchat-store-writer".into())
                .spawn(move || writer_loop(&writer_db, rx, wal))
                .map_err(|source| StoreError::Io {
                    op: "spawning writer thread for",
                    path: path.clone(),
                    source,
                })?;
            // A second handle on the file, only for fdatasync (works on a read-only handle).
            let flush_file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
                op: "opening for the flusher",
                path: path.clone(),
                source,
            })?;
            let (stop_tx, stop_rx) = std::sync::mpsc::channel();
            let flusher = std::thread::Builder::new()
                .name("dchat-store-flusher".into())
                .spawn(move || flusher_loop(&flush_file, &stop_rx))
                .map_err(|source| StoreError::Io {
                    op: "spawning flusher thread for",
                    path: path.clone(),
                    source,
                })?;
            tracing::info!(path = %path.display(), "embedded store opened");
            Ok(RedbStore {
                db,
                path,
                tx: Some(tx),
                writer: Some(writer),
                flusher_stop: Some(stop_tx),
                flusher: Some(flusher),
            })
        }

        async fn submit<T>(
            &self,
            op_name: &'static str,
            make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
        ) -> Result<T, StoreError> {
            let tx = self
                .tx
                .as_ref()
                .ok_or(StoreError::WriterClosed { op: op_name })?;
            let (reply, rx) = oneshot::channel();
            tx.send(make(reply))
                .await
                .map_err(|_| StoreError::WriterClosed { op: op_name })?;
            rx.await
                .map_err(|_| StoreError::WriterClosed { op: op_name })?
        }

        async fn read<T: Send + 'static>(
            &self,
            op: &'static str,
            f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
        ) -> Result<T, StoreError> {
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().ctx(op)?;
                f(&txn)
            })
            .await
            .map_err(|e| StoreError::Task {
                op,
                reason: e.to_string(),
            })?
        }
    }

    impl Drop for RedbStore {
        fn drop(&mut self) {
            // Closing the channel lets the writer finish the queued batches and exit; joining
            // it releases its handle on the file so the directory can be reopened at once.
            self.tx.take();
            if let Some(writer) = self.writer.take() {
                if writer.join().is_err() {
                    tracing::error!(path = %self.path.display(), "embedded store writer panicked");
                }
            }
            self.flusher_stop.take();
            if let Some(flusher) = self.flusher.take() {
                if flusher.join().is_err() {
                    tracing::error!(path = %self.path.display(), "embedded store flusher panicked");
                }
            }
        }
    }

    /// The writer thread: batch everything queued, make it durable once, answer everyone.
    /// When the channel closes it checkpoints, so a clean shutdown leaves nothing to replay.
    fn writer_loop(db: &Database, mut rx: mpsc::Receiver<WriteOp>, mut wal: Wal) {
        while let Some(first) = rx.blocking_recv() {
            let mut messages = first.message_count();
            let mut batch = vec![first];
            while messages < MAX_BATCH_MESSAGES {
                match rx.try_recv() {
                    Ok(op) => {
                        messages += op.message_count();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            run_batch(db, &mut wal, batch);
        }
        if wal.poisoned.is_none() {
            if let Err(e) = wal.checkpoint(db) {
                tracing::warn!(error = %e, "final checkpoint failed; the commit log will be replayed at the next open");
            }
        }
        tracing::debug!("embedded store writer stopped");
    }

    /// Every [`FLUSH_INTERVAL`] until stopped: fdatasync the redb file. Batches committed
    /// through the commit log leave their B-tree pages dirty in the page cache; writing them
    /// back continuously, off the writer thread, leaves little for the next checkpoint's
    /// fsync, which otherwise stalls every writer behind it. Flushing pages early never
    /// changes what a crash recovers: only a durable commit writes the header that makes
    /// pages reachable (the kernel's own writeback may flush them at any time as well).
    fn flusher_loop(file: &std::fs::File, stop: &std::sync::mpsc::Receiver<()>) {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            stop.recv_timeout(FLUSH_INTERVAL)
        {
            if let Err(e) = file.sync_data() {
                // Not a durability problem (checkpoints fsync themselves), only a lost optimisation.
                tracing::debug!(error = %e, "embedded store flusher: fdatasync failed");
            }
        }
    }

    /// Applies `batch` in one transaction. If the batch fails as a whole, each op is retried
    /// in a transaction of its own so one bad op cannot fail its neighbours.
    fn run_batch(db: &Database, wal: &mut Wal, batch: Vec<WriteOp>) {
        let size = batch.len();
        match commit_ops(db, wal, &batch) {
            Ok(answers) => {
                tracing::trace!(ops = size, "group commit");
                for (op, ans) in batch.into_iter().zip(answers) {
                    op.answer(Ok(ans));
                }
            }
            Err(e) if size == 1 => {
                if let Some(op) = batch.into_iter().next() {
                    op.answer(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(ops = size, error = %e, "batch commit failed; retrying ops one by one");
                for op in batch {
                    let single = std::slice::from_ref(&op);
                    let res = commit_ops(db, wal, single).map(|mut a| a.remove(0));
                    op.answer(res);
                }
            }
        }
    }

    /// Applies `ops` in one write transaction and makes it durable — through the commit log
    /// or as a checkpoint — before returning the answers in op order.
    fn commit_ops(
        db: &Database,
        wal: &mut Wal,
        ops: &[WriteOp],
    ) -> Result<Vec<Answer>, StoreError> {
        if let Some(reason) = &wal.poisoned {
            return Err(StoreError::Io {
                op: "writing (commit log unusable since an earlier failure)",
                path: wal.path.clone(),
                source: std::io::Error::other(reason.clone()),
            });
        }
        let checkpoint = ops.iter().any(|op| matches!(op, WriteOp::Barrier { .. }))
            || wal.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL
            || wal.off >= CHECKPOINT_BYTES;
        let first_lsn = wal.log.next_lsn;
        let (txn, answers) = match apply_all(db, ops, &mut wal.log, checkpoint) {
            Ok(x) => x,
            Err(e) => {
                wal.log.discard(first_lsn);
                return Err(e);
            }
        };
        if checkpoint {
            // A durable redb commit: the batch's log records are not needed. If it fails
            // nothing happened, and the numbers are reused so the log has no gap.
            if let Err(e) = txn.commit() {
                wal.log.discard(first_lsn);
                return Err(e).ctx("write: commit");
            }
            wal.log.discard(wal.log.next_lsn);
            wal.checkpointed();
            return Ok(answers);
        }
        // Durable first (log fsync), then visible (redb commit without fsync).
        if let Err(e) = wal.append() {
            drop(txn);
            wal.log.discard(first_lsn);
            wal.recover_after_failure(db);
            return Err(e);
        }
        if let Err(e) = txn.commit() {
            // The appended records describe a transaction that did not happen: a checkpoint
            // (new epoch) makes them dead before anything else is logged.
            wal.recover_after_failure(db);
            return Err(e).ctx("write: commit");
        }
        Ok(answers)
    }

    /// One write transaction over `ops`, not yet committed; answers in op order. Its
    /// changes are appended to `log`. A `checkpoint` transaction commits durably and starts
    /// a new log epoch; any other commits without fsync (the log makes it durable).
    fn apply_all(
        db: &Database,
        ops: &[WriteOp],
        log: &mut LogBuf,
        checkpoint: bool,
    ) -> Result<(WriteTransaction, Vec<Answer>), StoreError> {
        let mut txn = db.begin_write().ctx("write: begin")?;
        if !checkpoint {
            txn.set_durability(Durability::None)
                .ctx("write: set durability")?;
        }
        let mut answers = Vec::with_capacity(ops.len());
        {
            let first_lsn = log.next_lsn;
            let mut w = Writer::new(&txn)?;
            for op in ops {
                answers.push(w.apply(op, log)?);
            }
            if log.next_lsn != first_lsn {
                w.meta
                    .insert("wal_lsn", log.next_lsn - 1)
                    .ctx("write: store wal_lsn")?;
            }
            if checkpoint {
                w.meta
                    .insert("wal_epoch", log.epoch + 1)
                    .ctx("write: store wal_epoch")?;
            }
            w.finish()?;
        }
        Ok((txn, answers))
    }

    impl LogBuf {
        /// Appends one record whose body `body` writes.
        fn push(&mut self, body: impl FnOnce(&mut Vec<u8>)) {
            let start = self.buf.len();
            self.buf.extend_from_slice(&WAL_MAGIC.to_be_bytes());
            self.buf.extend_from_slice(&[0; 4]);
            self.buf.extend_from_slice(&self.epoch.to_be_bytes());
            self.buf.extend_from_slice(&self.next_lsn.to_be_bytes());
            body(&mut self.buf);
            // Bodies are bounded by the relay's frame limit, far below u32::MAX.
            let len = (self.buf.len() - start - WAL_HEAD) as u32;
            self.buf[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
            let sum = fnv1a64(&self.buf[start..]);
            self.buf.extend_from_slice(&sum.to_be_bytes());
            self.next_lsn += 1;
        }

        /// Drops the buffered records; the next record gets `next_lsn`.
        fn discard(&mut self, next_lsn: u64) {
            self.buf.clear();
            self.next_lsn = next_lsn;
        }
    }

    impl Wal {
        /// Writes the buffered records at the current position and fsyncs them.
        fn append(&mut self) -> Result<(), StoreError> {
            if self.log.buf.is_empty() {
                return Ok(());
            }
            let io = |op: &'static str, path: &Path| {
                let path = path.to_path_buf();
                move |source| StoreError::Io { op, path, source }
            };
            let end = self.off + self.log.buf.len() as u64;
            if end > self.allocated {
                // Grow by at least doubling, so extensions (and their metadata commits) are rare.
                let target = end.max(self.allocated * 2).max(WAL_GROW_MIN);
                let zeros = vec![0u8; (target - self.allocated) as usize];
                self.file
                    .write_all_at(&zeros, self.allocated)
                    .map_err(io("extending commit log", &self.path))?;
                self.allocated = target;
            }
            self.file
                .write_all_at(&self.log.buf, self.off)
                .map_err(io("writing commit log", &self.path))?;
            self.file
                .sync_data()
                .map_err(io("syncing commit log", &self.path))?;
            self.off += self.log.buf.len() as u64;
            self.log.buf.clear();
            Ok(())
        }

        /// A durable redb commit that starts a new epoch: every record logged so far is in
        /// the database file now, and the log is rewritten from its start.
        fn checkpoint(&mut self, db: &Database) -> Result<(), StoreError> {
            let txn = db.begin_write().ctx("checkpoint: begin")?;
            {
                let mut meta = txn.open_table(META).ctx("checkpoint: open meta")?;
                meta.insert("wal_epoch", self.log.epoch + 1)
                    .ctx("checkpoint: store wal_epoch")?;
            }
            txn.commit().ctx("checkpoint: commit")?;
            self.checkpointed();
            Ok(())
        }

        /// Bookkeeping after a durable commit that stored `wal_epoch = epoch + 1`.
        fn checkpointed(&mut self) {
            self.log.epoch += 1;
            self.log.buf.clear();
            self.off = 0;
            self.last_checkpoint = Instant::now();
        }

        /// After a failed log write or commit: checkpoint so that whatever reached the log
        /// is dead; if even that fails, refuse further writes.
        fn recover_after_failure(&mut self, db: &Database) {
            if let Err(e) = self.checkpoint(db) {
                tracing::error!(error = %e, "embedded store: checkpoint after a failed write failed; refusing further writes");
                self.poisoned = Some(e.to_string());
            }
        }
    }

    impl Writer<'_> {
        /// Applies one queued op and logs every change it made (nothing for a duplicate
        /// put, an ack that removed nothing or a profile that was not newer).
        fn apply(&mut self, op: &WriteOp, log: &mut LogBuf) -> Result<Answer, StoreError> {
            Ok(match op {
                WriteOp::Put { msgs, .. } => {
                    let mut out = Vec::with_capacity(msgs.len());
                    for m in msgs {
                        let outcome = self.put(m)?;
                        if let PutOutcome::Stored { seq } = outcome {
                            log.push(|b| encode_log_put(b, seq, m));
                        }
                        out.push(outcome);
                    }
                    Answer::Outcomes(out)
                }
                WriteOp::Ack {
                    recipient, keys, ..
                } => {
                    let removed = self.ack(recipient, keys)?;
                    if removed > 0 {
                        log.push(|b| encode_log_ack(b, recipient, keys));
                    }
                    Answer::Count(removed)
                }
                WriteOp::Expire {
                    now_ms,
                    max_entries,
                    ..
                } => {
                    let (removed, more) = self.expire(*now_ms, *max_entries)?;
                    let op = LogOp::Expire {
                        now_ms: *now_ms,
                        max_entries: *max_entries as u64,
                    };
                    log.push(|b| encode_log_op(b, &op));
                    Answer::Expired(removed, more)
                }
                WriteOp::PutProfile {
                    key,
                    profile,
                    updated_ms,
                    ..
                } => {
                    let stored = self.put_profile(key, profile, *updated_ms)?;
                    if stored {
                        let op = LogOp::Profile {
                            key: *key,
                            updated_ms: *updated_ms,
                            blob: profile.clone(),
                        };
                        log.push(|b| encode_log_op(b, &op));
                    }
                    Answer::Flag(stored)
                }
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
                    let op = LogOp::Membership {
                        channel: channel.clone(),
                        member: *member,
                        join: *join,
                    };
                    log.push(|b| encode_log_op(b, &op));
                    Answer::Unit
                }
                WriteOp::Barrier { .. } => Answer::Unit,
            })
        }

        fn put(&mut self, m: &StoredMessage) -> Result<PutOutcome, StoreError> {
            let dk = dedup_key(&m.recipient, &m.sender, &m.id);
            if self
                .inbox
                .get(dk.as_slice())
                .ctx("put: read inbox dedup entry")?
                .is_some()
            {
                return Ok(PutOutcome::Duplicate);
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.insert_message(seq, m, &dk)?;
            Ok(PutOutcome::Stored { seq })
        }
    }

    #[async_trait::async_trait]
    impl Store for RedbStore {
        async fn put(&self, msg: StoredMessage) -> Result<PutOutcome, StoreError> {
            validate_message(&msg)?;
            let mut out = self
                .submit("put", |reply| WriteOp::Put {
                    msgs: vec![msg],
                    reply,
                })
                .await?;
            out.pop().ok_or(StoreError::Task {
                op: "put",
                reason: "writer returned no outcome".into(),
            })
        }

        async fn put_many(&self, msgs: Vec<StoredMessage>) -> Result<Vec<PutOutcome>, StoreError> {
            for m in &msgs {
                validate_message(m)?;
            }
            if msgs.is_empty() {
                return Ok(Vec::new());
            }
            self.submit("put_many", |reply| WriteOp::Put { msgs, reply })
                .await
        }

        async fn pending(
            &self,
            recipient: &PublicKey,
            after_seq: u64,
            limit: usize,
            now_ms: i64,
        ) -> Result<Vec<Pending>, StoreError> {
            if after_seq == u64::MAX || limit == 0 {
                return Ok(Vec::new());
            }
            let recipient = *recipient;
            self.read("pending", move |txn| {
                let inbox = txn.open_table(INBOX).ctx("pending: open inbox")?;
                let lo = message_key(&recipient, after_seq + 1);
                let hi = message_key(&recipient, u64::MAX);
                let mut out = Vec::new();
                for entry in inbox
                    .range::<&[u8]>(lo.as_slice()..=hi.as_slice())
                    .ctx("pending: scan inbox")?
                {
                    let (k, rec) = entry.ctx("pending: read inbox")?;
                    let seq = seq_of_message_key(k.value())?;
                    let message =
                        decode_message(rec.value()).map_err(|reason| StoreError::Corrupt {
                            table: "inbox",
                            reason: format!("message seq {seq}: {reason}"),
                        })?;
                    if message.expires_at_ms <= now_ms {
                        continue;
                    }
                    out.push(Pending { seq, message });
                    if out.len() >= limit {
                        break;
                    }
                }
                Ok(out)
            })
            .await
        }

        async fn ack(&self, recipient: &PublicKey, keys: Vec<AckKey>) -> Result<u64, StoreError> {
            if keys.is_empty() {
                return Ok(0);
            }
            let recipient = *recipient;
            let keys: Vec<(PublicKey, String)> =
                keys.into_iter().map(|k| (k.sender, k.id)).collect();
            self.submit("ack", |reply| WriteOp::Ack {
                recipient,
                keys,
                reply,
            })
            .await
        }

        async fn expire(&self, now_ms: i64) -> Result<u64, StoreError> {
            // In chunks, so a large backlog never holds the writer (and every put queued
            // behind it) for one huge transaction.
            let mut total = 0;
            loop {
                let (removed, more) = self
                    .submit("expire", |reply| WriteOp::Expire {
                        now_ms,
                        max_entries: EXPIRE_CHUNK,
                        reply,
                    })
                    .await?;
                total += removed;
                if !more {
                    return Ok(total);
                }
            }
        }

        async fn put_profile(
            &self,
            key: &PublicKey,
            profile: Vec<u8>,
            updated_ms: i64,
        ) -> Result<bool, StoreError> {
            let key = *key;
            self.submit("put_profile", |reply| WriteOp::PutProfile {
                key,
                profile,
                updated_ms,
                reply,
            })
            .await
        }

        async fn get_profile(&self, key: &PublicKey) -> Result<Option<Vec<u8>>, StoreError> {
            let key = *key;
            self.read("get_profile", move |txn| {
                let t = txn.open_table(PROFILES).ctx("get_profile: open profiles")?;
                match t.get(key.as_slice()).ctx("get_profile: read profiles")? {
                    Some(v) => Ok(Some(split_profile(v.value())?.1.to_vec())),
                    None => Ok(None),
                }
            })
            .await
        }

        async fn join_channel(&self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
            validate_channel(channel)?;
            let (channel, member) = (channel.to_owned(), *member);
            self.submit("join_channel", |reply| WriteOp::Membership {
                channel,
                member,
                join: true,
                reply,
            })
            .await
        }

        async fn leave_channel(&self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
            validate_channel(channel)?;
            let (channel, member) = (channel.to_owned(), *member);
            self.submit("leave_channel", |reply| WriteOp::Membership {
                channel,
                member,
                join: false,
                reply,
            })
            .await
        }

        async fn channel_members(&self, channel: &str) -> Result<Vec<PublicKey>, StoreError> {
            validate_channel(channel)?;
            let prefix = channel_prefix(channel);
            self.read("channel_members", move |txn| {
                let t = txn
                    .open_table(MEMBERS)
                    .ctx("channel_members: open members")?;
                let mut out = Vec::new();
                for entry in t
                    .range::<&[u8]>(prefix.as_slice()..)
                    .ctx("channel_members: scan members")?
                {
                    let (k, _) = entry.ctx("channel_members: read members")?;
                    let k = k.value();
                    if !k.starts_with(&prefix) {
                        break;
                    }
                    let (_, member) =
                        split_member_key(k).map_err(|reason| StoreError::Corrupt {
                            table: "members",
                            reason,
                        })?;
                    out.push(member);
                }
                Ok(out)
            })
            .await
        }

        async fn check(&self) -> Result<(), StoreError> {
            self.submit("check", |reply| WriteOp::Barrier { reply })
                .await
        }

        async fn flush(&self) -> Result<(), StoreError> {
            // Every acknowledged write is already durable; the barrier waits for queued
            // writes of callers still waiting to be committed too.
            self.submit("flush", |reply| WriteOp::Barrier { reply })
                .await
        }

        async fn stats(&self) -> Result<StoreStats, StoreError> {
            self.read("stats", |txn| {
                Ok(StoreStats {
                    pending_messages: txn
                        .open_table(META)
                        .ctx("stats: open meta")?
                        .get("pending_count")
                        .ctx("stats: read pending_count")?
                        .map(|v| v.value())
                        .unwrap_or(0),
                    profiles: txn
                        .open_table(PROFILES)
                        .ctx("stats: open profiles")?
                        .len()
                        .ctx("stats: count profiles")?,
                    channels: txn
                        .open_table(CHANNELS)
                        .ctx("stats: open channels")?
                        .len()
                        .ctx("stats: count channels")?,
                })
            })
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    //! Migration from this engine. The data directory is written by a child process
    //! (this test binary re-run) that is killed with SIGKILL, so the migration also has
    //! to replay the old commit log.
    use super::old_writer::RedbStore;
    use super::*;
    use crate::store::{AckKey, EmbeddedStore, PutOutcome, Store, STORE_DIR_NAME};
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    const DIR_ENV: &str = "DCHAT_LEGACY_CRASH_DIR";

    fn key(n: u8) -> PublicKey {
        [n; 32]
    }

    fn msg(recipient: u8, sender: u8, id: &str) -> StoredMessage {
        StoredMessage {
            recipient: key(recipient),
            sender: key(sender),
            id: id.into(),
            channel: None,
            timestamp_ms: 1,
            expires_at_ms: 4_000_000_000_000,
            kind: "text".into(),
            envelope: format!("envelope {id}").into_bytes(),
        }
    }

    fn temp_dir(label: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("dchat-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// The child: one of each kind of write through the old engine, some before a
    /// clean checkpoint (in the redb file) and some after (only in the commit log),
    /// then it waits to be killed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run by a_killed_old_store_is_migrated_with_everything as a child process"]
    async fn legacy_writer_child() {
        let Ok(dir) = std::env::var(DIR_ENV) else {
            return;
        };
        let dir = PathBuf::from(dir);
        {
            let s = RedbStore::open(&dir).unwrap();
            let many: Vec<_> = (0..20).map(|i| msg(1, 2, &format!("m{i}"))).collect();
            s.put_many(many).await.unwrap();
            assert!(s.put_profile(&key(4), b"old".to_vec(), 1).await.unwrap());
            s.join_channel("room", &key(4)).await.unwrap();
        }
        let s = RedbStore::open(&dir).unwrap();
        s.put(msg(3, 2, "other")).await.unwrap();
        let keys: Vec<_> = (0..10)
            .map(|i| AckKey::new(key(2), format!("m{i}")))
            .collect();
        assert_eq!(s.ack(&key(1), keys).await.unwrap(), 10);
        assert!(s.put_profile(&key(4), b"p".to_vec(), 7).await.unwrap());
        s.join_channel("room", &key(5)).await.unwrap();
        s.join_channel("hall", &key(6)).await.unwrap();
        s.leave_channel("hall", &key(6)).await.unwrap();
        println!("DONE");
        std::thread::sleep(Duration::from_secs(60));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_old_store_is_migrated_with_everything() {
        let dir = temp_dir("legacy-migrate");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "store::legacy::tests::legacy_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let done = BufReader::new(stdout)
            .lines()
            .map(|l| l.unwrap())
            .any(|l| l.contains("DONE"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(done, "child finished its writes");
        assert!(dir.join(WAL_FILE_NAME).exists());

        let s = EmbeddedStore::open(&dir).unwrap();
        assert!(dir.join(STORE_DIR_NAME).is_dir());
        assert!(
            dir.join(MIGRATED_FILE_NAME).exists(),
            "old file kept as a backup"
        );
        assert!(!dir.join(DB_FILE_NAME).exists());
        assert!(!dir.join(WAL_FILE_NAME).exists());
        assert!(!dir.join(STAGING_DIR_NAME).exists());
        assert!(!dir.join(MIGRATION_SNAPSHOT_NAME).exists());

        let far = 0;
        let p = s.pending(&key(1), 0, 100, far).await.unwrap();
        let ids: Vec<_> = p.iter().map(|p| p.message.id.clone()).collect();
        assert_eq!(ids, (10..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert_eq!(
            p.iter().map(|p| p.seq).collect::<Vec<_>>(),
            (11..=20).collect::<Vec<_>>(),
            "sequence numbers are kept"
        );
        assert_eq!(p[0].message, msg(1, 2, "m10"));
        let other = s.pending(&key(3), 0, 100, far).await.unwrap();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].seq, 21);
        // Acknowledged ids are still duplicates; new seqs continue after the old ones.
        assert_eq!(s.put(msg(1, 2, "m0")).await.unwrap(), PutOutcome::Duplicate);
        assert_eq!(
            s.put(msg(1, 2, "m15")).await.unwrap(),
            PutOutcome::Duplicate
        );
        assert_eq!(
            s.put(msg(1, 2, "new")).await.unwrap(),
            PutOutcome::Stored { seq: 22 }
        );
        assert_eq!(s.get_profile(&key(4)).await.unwrap(), Some(b"p".to_vec()));
        assert_eq!(
            s.channel_members("room").await.unwrap(),
            vec![key(4), key(5)]
        );
        assert!(s.channel_members("hall").await.unwrap().is_empty());
        let st = s.stats().await.unwrap();
        assert_eq!((st.pending_messages, st.profiles, st.channels), (12, 1, 1));
        drop(s);

        // Reopening does not migrate again and keeps the new write.
        let s = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(s.pending(&key(1), 0, 100, far).await.unwrap().len(), 11);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A migration interrupted after the new database was renamed into place (the old
    /// file still there) finishes by retiring the old file, without importing twice;
    /// one interrupted before that starts over from a clean staging directory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_migration_completes() {
        let dir = temp_dir("legacy-interrupted");
        {
            let s = RedbStore::open(&dir).unwrap();
            s.put(msg(1, 2, "a")).await.unwrap();
        }
        // Interrupted while building: a half-written staging directory is discarded.
        std::fs::create_dir_all(dir.join(STAGING_DIR_NAME)).unwrap();
        std::fs::write(dir.join(STAGING_DIR_NAME).join("junk"), b"x").unwrap();
        let backup = std::fs::read(dir.join(DB_FILE_NAME)).unwrap();
        {
            let s = EmbeddedStore::open(&dir).unwrap();
            assert_eq!(s.pending(&key(1), 0, 10, 0).await.unwrap().len(), 1);
        }
        // Interrupted after the rename: the old file reappears next to the new store.
        std::fs::write(dir.join(DB_FILE_NAME), backup).unwrap();
        let s = EmbeddedStore::open(&dir).unwrap();
        assert!(!dir.join(DB_FILE_NAME).exists());
        assert_eq!(s.pending(&key(1), 0, 10, 0).await.unwrap().len(), 1);
        assert_eq!(s.stats().await.unwrap().pending_messages, 1);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod migration_bench {
    //! How long the migration takes for a large old store (run by hand, release build;
    //! prints a table, asserts only that everything arrived):
    //! `DCHAT_MIGRATION_MESSAGES=500000 cargo test --release -p dchat-relay --lib
    //! migration_throughput -- --ignored --nocapture`
    use super::old_writer::RedbStore;
    use super::*;
    use crate::store::{EmbeddedStore, Store};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, run by hand (docs/performance.md)"]
    async fn migration_throughput() {
        let n: usize = std::env::var("DCHAT_MIGRATION_MESSAGES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let dir = std::env::temp_dir().join(format!("dchat-migrate-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            let s = RedbStore::open(&dir).unwrap();
            for chunk in 0..n.div_ceil(1000) {
                let msgs = (chunk * 1000..((chunk + 1) * 1000).min(n))
                    .map(|i| StoredMessage {
                        recipient: [(i % 251) as u8; 32],
                        sender: [(i % 241) as u8; 32],
                        id: format!("m{i}"),
                        channel: None,
                        timestamp_ms: 1,
                        expires_at_ms: 4_000_000_000_000,
                        kind: "text".into(),
                        envelope: vec![0x5A; 350],
                    })
                    .collect();
                s.put_many(msgs).await.unwrap();
            }
        }
        let old_bytes = std::fs::metadata(dir.join(DB_FILE_NAME)).unwrap().len();
        let started = Instant::now();
        let s = EmbeddedStore::open(&dir).unwrap();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(s.stats().await.unwrap().pending_messages, n as u64);
        drop(s);
        println!("| messages | redb file MB | migration s | msgs/s |");
        println!("|--:|--:|--:|--:|");
        println!(
            "| {n} | {:.0} | {secs:.1} | {:.0} |",
            old_bytes as f64 / 1e6,
            n as f64 / secs
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

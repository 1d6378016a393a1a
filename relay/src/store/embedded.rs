//! The embedded store: an LSM-tree database (fjall) in the data directory.
//!
//! Writes go through a single writer thread fed by a bounded channel. The thread takes
//! whatever has queued up while the previous batch was being made durable, applies all
//! of it as one atomic fjall write batch whose commit fsyncs the journal, and only then
//! answers each caller. That is group commit: throughput grows with concurrency while
//! every acknowledged write is durable. The batch becomes visible to readers only after
//! the fsync, so nothing a reader sees can be lost by a crash.
//!
//! Why an LSM tree (see docs/storage.md, "Engine"): every stored message lands in the
//! inbox of one of many recipients. A B-tree pays one random leaf rewrite per message;
//! an LSM tree appends to its journal and memtable and sorts in the background.
//!
//! While a batch is being built its writes are staged in memory next to the fjall
//! batch, so later operations of the same batch (a duplicate id, an ack of a message
//! stored a moment ago) see them. Reads run on the blocking pool and never wait for
//! the writer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use fjall::config::{BlockSizePolicy, PinningPolicy};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use tokio::sync::{mpsc, oneshot};

use super::codec::{
    channel_prefix, decode_message, dedup_key, dedup_value, encode_message, expiry_key, member_key,
    message_key, split_dedup_value, split_member_key,
};
use super::snapshot::{
    self, is_message_key, seq_of_message_key, split_profile, Apply, MergeSummary, SnapshotCounts,
    SnapshotSummary, SnapshotWriter,
};
use super::{
    validate_channel, validate_message, AckKey, Pending, PublicKey, PutOutcome, Store, StoreError,
    StoreStats, StoredMessage,
};

/// Directory of the database inside the data directory.
pub const STORE_DIR_NAME: &str = "dchat.store";

/// Layout version stored in META at creation: 4 is the layout of the first release
/// (0.1.0); lower numbers were never released. A store of another version is refused.
const SCHEMA_VERSION: u64 = 4;
/// The database file of pre-release builds. A data directory holding it is refused
/// ([`StoreError::PreReleaseData`]): no release wrote that layout.
const PRE_RELEASE_FILE_NAME: &str = "dchat.redb";
/// Queued write operations before callers wait (backpressure beyond this).
const QUEUE_CAPACITY: usize = 4096;
/// Upper bound on messages applied in one batch, to bound commit latency.
const MAX_BATCH_MESSAGES: usize = 8192;
/// Expiry-index entries removed per batch by `expire`.
const EXPIRE_CHUNK: usize = 5000;
/// Records a restore applies per committed chunk (bounds its memory to a few tens of MB).
#[cfg(not(test))]
const RESTORE_CHUNK_RECORDS: usize = 50_000;
/// Small in unit tests, so that a test restore spans several chunks.
#[cfg(test)]
const RESTORE_CHUNK_RECORDS: usize = 7;
/// META key present while a restore is being applied (see [`apply_snapshot_locked`]).
const RESTORE_MARKER: &str = "restore_incomplete";
/// Smallest journal budget: journals beyond it make fjall flush memtables early so old
/// journals can be dropped (it is twice the write buffer otherwise); bounds what a
/// restart replays.
const MIN_JOURNAL_BYTES: u64 = 64 << 20;
/// Memtable size of the small keyspaces (profiles, memberships, counters), and the
/// smallest of any.
const MIN_MEMTABLE_BYTES: u64 = 4 << 20;

/// Tuning of the embedded store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Memory for recently stored messages (the inbox's memtable) before they are
    /// written out to sorted files in the background; the expiry index gets a quarter
    /// of it besides. Messages acknowledged while still in memory cost no disk reads
    /// and little compaction, so this is what keeps a reconnect drain fast. While a full
    /// buffer is written out a new one fills, so peak use is about twice this.
    pub write_buffer_bytes: u64,
}

impl EmbeddedOptions {
    /// Default write buffer: 128 MiB.
    pub const DEFAULT_WRITE_BUFFER_BYTES: u64 = 128 << 20;
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            write_buffer_bytes: Self::DEFAULT_WRITE_BUFFER_BYTES,
        }
    }
}
/// Most entries `pending` reserves room for up front (the relay reads pages of 128).
const PENDING_PREALLOC: usize = 128;
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
enum Table {
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
const TABLES: [(Table, &str); 6] = [
    (Table::Inbox, "inbox"),
    (Table::Expiry, "expiry"),
    (Table::Profiles, "profiles"),
    (Table::Members, "members"),
    (Table::Channels, "channels"),
    (Table::Meta, "meta"),
];

/// Maps a fjall error into [`StoreError::Embedded`] naming the operation.
trait Ctx<T> {
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
    db: Database,
    keyspaces: Vec<Keyspace>,
}

impl Tables {
    /// Opens (creating if needed) the database in `path`.
    fn open(path: &Path, options: &EmbeddedOptions) -> Result<Tables, StoreError> {
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

    fn ks(&self, table: Table) -> &Keyspace {
        &self.keyspaces[table as usize]
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.ks(Table::Meta).get(key).ctx("read meta")? {
            None => Ok(None),
            Some(v) => decode_u64(&v, "meta").map(Some),
        }
    }

    /// Empties every data keyspace and puts back the counters the store had before a
    /// restore began (it was empty then), clearing the restore marker; durable.
    fn undo_restore(&self, before: Counters) -> Result<(), StoreError> {
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
    fn init(&self) -> Result<Counters, StoreError> {
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

fn decode_u64(v: &[u8], table: &'static str) -> Result<u64, StoreError> {
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
const DEDUP_PENDING: u8 = 0;
/// Dedup entry state: the message is known to be gone (a tombstone restored or merged
/// from a snapshot); the entry only guards against a retry of the same id until it
/// expires.
const DEDUP_ACKED: u8 = 1;

/// A dedup entry's value: seq ‖ expires_at_ms ‖ state.
fn dedup_record(seq: u64, expires_at_ms: i64, state: u8) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[..16].copy_from_slice(&dedup_value(seq, expires_at_ms));
    v[16] = state;
    v
}

/// Splits a dedup entry's value into (seq, expires_at_ms, stored): `stored` is the
/// [`DEDUP_PENDING`] state, so the message is pending only if its record still exists.
fn split_dedup_record(v: &[u8]) -> Result<(u64, i64, bool), StoreError> {
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

/// Counts the writer keeps in memory and persists in META with every batch, so that
/// `stats` and new sequence numbers need no scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) next_seq: u64,
    pending: u64,
    profiles: u64,
    channels: u64,
    /// The latest `now` an expiry pass of this process ran with (in memory only): a
    /// message read later, or expiring after it, has not been removed by expiry.
    expired_through_ms: i64,
}

/// What the writer thread and restore/merge share: the tables and the committed
/// counters. Holding the lock is holding the (single) write path.
struct Engine {
    tables: Tables,
    counters: Counters,
}

/// The embedded store. Cheap to share behind an `Arc`; dropping the last handle stops
/// the writer thread after it has committed everything queued, and closes the database.
pub struct EmbeddedStore {
    tables: Tables,
    engine: Arc<Mutex<Engine>>,
    path: PathBuf,
    tx: Option<mpsc::Sender<WriteOp>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
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
        keys: Vec<AckKey>,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Removes at most `max_entries` due expiry-index entries; answers (pending
    /// messages removed, whether due entries remain). Always applied in a batch of its
    /// own: it scans the committed expiry index.
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
    /// Answers once everything queued before it is durable and the journal accepted an
    /// fsync: proves the disk takes writes. Used by `flush` and `check`.
    Barrier {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// What an applied op will answer once its batch is durable.
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

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`: the database is the directory
    /// `dir/dchat.store`. After a crash fjall replays its journal up to the last
    /// complete batch. A corrupt or foreign database is a typed error, never a panic,
    /// and so is a data directory written by a pre-release build
    /// ([`StoreError::PreReleaseData`]).
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        Self::open_with(dir, &EmbeddedOptions::default())
    }

    /// [`EmbeddedStore::open`] with explicit tuning.
    pub fn open_with(dir: &Path, options: &EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            op: "creating data directory",
            path: dir.to_path_buf(),
            source,
        })?;
        // Checked before anything is created beside it.
        if dir.join(PRE_RELEASE_FILE_NAME).exists() {
            return Err(StoreError::PreReleaseData {
                dir: dir.to_path_buf(),
                file: PRE_RELEASE_FILE_NAME,
            });
        }
        let path = dir.join(STORE_DIR_NAME);
        let tables = Tables::open(&path, options)?;
        let counters = tables.init()?;
        let engine = Arc::new(Mutex::new(Engine {
            tables: tables.clone(),
            counters,
        }));
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let writer_engine = engine.clone();
        let writer = std::thread::Builder::new()
            .name("dchat-store-writer".into())
            .spawn(move || writer_loop(&writer_engine, rx))
            .map_err(|source| StoreError::Io {
                op: "spawning writer thread for",
                path: path.clone(),
                source,
            })?;
        tracing::info!(path = %path.display(), pending = counters.pending, "embedded store opened");
        Ok(EmbeddedStore {
            tables,
            engine,
            path,
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a consistent snapshot (one read view) of everything the store holds to
    /// `out`: header, records, SHA-256 trailer (format in docs/storage.md). Blocking;
    /// call from a blocking thread. Concurrent writes continue and are not included.
    pub fn snapshot(
        &self,
        out: &mut (impl std::io::Write + Send),
    ) -> Result<SnapshotSummary, StoreError> {
        write_snapshot(&self.tables, out)
    }

    /// Loads a snapshot into this store, which must be empty ([`StoreError::NotEmpty`]
    /// otherwise). All or nothing: if the trailer's checksum or the header's counts do
    /// not verify, or the process dies on the way, the store is empty again afterwards
    /// (at the latest at the next open). Applied in chunks, so memory stays bounded
    /// whatever the snapshot's size. Blocking; writes wait.
    pub fn restore(
        &self,
        input: &mut (impl std::io::Read + Send),
    ) -> Result<SnapshotSummary, StoreError> {
        let mut engine = lock(&self.engine, "restore")?;
        apply_snapshot_locked(&mut engine, input, Apply::Restore).map(|m| m.snapshot)
    }

    /// Merges a snapshot into this store, which may hold data: what a blue-green slot
    /// handover does on the receiving relay. Messages it already has are skipped, so
    /// repeating a merge is harmless; nothing is committed unless the whole stream
    /// verified, so the merge is held in memory until then (about twice the stream's
    /// size). Blocking; writes wait.
    pub fn merge(
        &self,
        input: &mut (impl std::io::Read + Send),
    ) -> Result<MergeSummary, StoreError> {
        let mut engine = lock(&self.engine, "merge")?;
        apply_snapshot_locked(&mut engine, input, Apply::Merge)
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
        f: impl FnOnce(&Tables) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let tables = self.tables.clone();
        tokio::task::spawn_blocking(move || f(&tables))
            .await
            .map_err(|e| StoreError::Task {
                op,
                reason: e.to_string(),
            })?
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish the queued batches and exit; joining
        // it releases its handles so the directory can be reopened at once.
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(path = %self.path.display(), "embedded store writer panicked");
            }
        }
    }
}

/// The engine lock. A panic while it was held (a bug) leaves the committed state
/// intact, but the in-memory counters may be off: refuse rather than guess.
fn lock<'a>(
    engine: &'a Mutex<Engine>,
    op: &'static str,
) -> Result<MutexGuard<'a, Engine>, StoreError> {
    engine.lock().map_err(|_| StoreError::Task {
        op,
        reason: "the embedded store writer panicked earlier".into(),
    })
}

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
fn apply_snapshot_locked(
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

/// The recipient an inbox or dedup key begins with; a shorter key is corrupt (`what` in
/// `table`).
fn recipient_of(key: &[u8], table: &'static str, what: &str) -> Result<PublicKey, StoreError> {
    key.get(..32)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt {
            table,
            reason: format!("{what} of {} bytes", key.len()),
        })
}

/// The writer thread: batch everything queued, make it durable once, answer everyone.
fn writer_loop(engine: &Mutex<Engine>, mut rx: mpsc::Receiver<WriteOp>) {
    let mut carried: Option<WriteOp> = None;
    loop {
        let first = match carried.take() {
            Some(op) => op,
            None => match rx.blocking_recv() {
                Some(op) => op,
                None => break,
            },
        };
        let alone = matches!(first, WriteOp::Expire { .. });
        let mut messages = first.message_count();
        let mut batch = vec![first];
        while !alone && messages < MAX_BATCH_MESSAGES {
            match rx.try_recv() {
                // An expiry scan reads the committed index: it starts the next batch.
                Ok(op @ WriteOp::Expire { .. }) => {
                    carried = Some(op);
                    break;
                }
                Ok(op) => {
                    messages += op.message_count();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        run_batch(engine, batch);
    }
    match lock(engine, "close") {
        Ok(e) => {
            if let Err(e) = e.tables.db.persist(PersistMode::SyncAll) {
                tracing::warn!(error = %e, "embedded store: final journal sync failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "embedded store: closing"),
    }
    tracing::debug!("embedded store writer stopped");
}

/// Applies `batch` as one atomic write. If the batch fails as a whole, each op is
/// retried in a batch of its own so one bad op cannot fail its neighbours.
fn run_batch(engine: &Mutex<Engine>, batch: Vec<WriteOp>) {
    let mut engine = match lock(engine, "write") {
        Ok(e) => e,
        Err(e) => {
            for op in batch {
                op.answer(Err(StoreError::Task {
                    op: "write",
                    reason: e.to_string(),
                }));
            }
            return;
        }
    };
    let size = batch.len();
    match commit_ops(&mut engine, &batch) {
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
                let res = commit_ops(&mut engine, single).map(|mut a| a.remove(0));
                op.answer(res);
            }
        }
    }
}

/// Applies `ops` in one batch and makes it durable before returning the answers in op
/// order. On error nothing of `ops` was written and the counters are unchanged.
fn commit_ops(engine: &mut Engine, ops: &[WriteOp]) -> Result<Vec<Answer>, StoreError> {
    let mut w = Writer::new(&engine.tables, engine.counters);
    let mut answers = Vec::with_capacity(ops.len());
    for op in ops {
        answers.push(w.apply(op)?);
    }
    let barrier = ops.iter().any(|op| matches!(op, WriteOp::Barrier { .. }));
    engine.counters = w.commit()?;
    if barrier {
        engine
            .tables
            .db
            .persist(PersistMode::SyncAll)
            .ctx("barrier: sync journal")?;
    }
    Ok(answers)
}

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
    staged: [foldhash::HashMap<Slice, Option<Slice>>; 6],
    /// `counters.next_seq` when the batch began: a message with a seq from here on was
    /// written in this batch.
    first_seq: u64,
    dirty: bool,
    /// Counters as of the end of this batch.
    pub(crate) counters: Counters,
}

impl<'t> Writer<'t> {
    fn new(tables: &'t Tables, counters: Counters) -> Self {
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
    fn still_pending(
        &self,
        recipient: &PublicKey,
        seq: u64,
        stored: bool,
    ) -> Result<bool, StoreError> {
        Ok(stored && self.message_stored(recipient, seq)?)
    }

    fn insert(&mut self, table: Table, key: &[u8], value: &[u8]) {
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

    fn remove(&mut self, table: Table, key: &[u8]) {
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
    fn commit(mut self) -> Result<Counters, StoreError> {
        self.commit_batch(PersistMode::SyncData)?;
        Ok(self.counters)
    }

    /// Commits what is batched so far (with the counters) and starts a new batch; a
    /// restore does this every [`RESTORE_CHUNK_RECORDS`] records so that its memory
    /// stays bounded (see [`apply_snapshot_locked`] for how it stays all-or-nothing).
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
        for (table, what) in [
            (Table::Inbox, "inbox entries (messages or dedup)"),
            (Table::Profiles, "profiles"),
            (Table::Members, "channel memberships"),
        ] {
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
    fn apply(&mut self, op: &WriteOp) -> Result<Answer, StoreError> {
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

    fn put(&mut self, m: &StoredMessage) -> Result<PutOutcome, StoreError> {
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
    fn ack(&mut self, recipient: &PublicKey, keys: &[AckKey]) -> Result<u64, StoreError> {
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

#[async_trait::async_trait]
impl Store for EmbeddedStore {
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
        self.read("pending", move |tables| {
            let lo = message_key(&recipient, after_seq + 1);
            let hi = message_key(&recipient, u64::MAX);
            // Growing from empty cost a reallocation per doubling, each into fresh memory.
            let mut out = Vec::with_capacity(limit.min(PENDING_PREALLOC));
            for entry in tables.ks(Table::Inbox).range(lo..=hi) {
                let (k, rec) = entry.into_inner().ctx("pending: scan inbox")?;
                let seq = seq_of_message_key(&k)?;
                let message = decode_message(&rec).map_err(|reason| StoreError::Corrupt {
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
        self.submit("ack", |reply| WriteOp::Ack {
            recipient,
            keys,
            reply,
        })
        .await
    }

    async fn expire(&self, now_ms: i64) -> Result<u64, StoreError> {
        // In chunks, so a large backlog never holds the writer (and every put queued
        // behind it) for one huge batch.
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
        self.read("get_profile", move |tables| {
            match tables
                .ks(Table::Profiles)
                .get(key)
                .ctx("get_profile: read profiles")?
            {
                Some(v) => Ok(Some(split_profile(&v)?.1.to_vec())),
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
        self.read("channel_members", move |tables| {
            let mut out = Vec::new();
            for entry in tables.ks(Table::Members).prefix(&prefix) {
                let k = entry.key().ctx("channel_members: scan members")?;
                let (_, member) = split_member_key(&k).map_err(|reason| StoreError::Corrupt {
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
        self.read("stats", |tables| {
            Ok(StoreStats {
                pending_messages: tables.meta_u64("pending_count")?.unwrap_or(0),
                profiles: tables.meta_u64("profile_count")?.unwrap_or(0),
                channels: tables.meta_u64("channel_count")?.unwrap_or(0),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("dchat-emb-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    fn msg(recipient: u8, id: &str) -> StoredMessage {
        StoredMessage {
            recipient: [recipient; 32],
            sender: [9; 32],
            id: id.into(),
            channel: None,
            timestamp_ms: 1,
            expires_at_ms: 4_000_000_000_000,
            kind: "text".into(),
            envelope: id.as_bytes().to_vec(),
        }
    }

    fn read_pending(tables: &Tables, recipient: u8) -> Vec<u64> {
        tables
            .ks(Table::Inbox)
            .prefix([recipient; 32])
            .map(|g| g.into_inner().unwrap())
            .filter(|(k, _)| is_message_key(k))
            .map(|(k, _)| seq_of_message_key(&k).unwrap())
            .collect()
    }

    /// Writes to one key twice in one batch (a put and the ack of the same message,
    /// a restore marker set and cleared) share the batch's seqno in fjall: the later
    /// write must win, in memory and after the journal is replayed.
    #[test]
    fn the_last_write_to_a_key_in_one_batch_wins() {
        let dir = temp_dir("last-write");
        {
            let tables = Tables::open(&dir, &EmbeddedOptions::default()).unwrap();
            let counters = tables.init().unwrap();
            let mut w = Writer::new(&tables, counters);
            assert_eq!(w.put(&msg(1, "a")).unwrap(), PutOutcome::Stored { seq: 1 });
            assert_eq!(w.put(&msg(1, "b")).unwrap(), PutOutcome::Stored { seq: 2 });
            assert_eq!(w.ack(&[1; 32], &[AckKey::new([9; 32], "a")]).unwrap(), 1);
            assert_eq!(w.put(&msg(1, "a")).unwrap(), PutOutcome::Duplicate);
            // Acked again in the same batch: it is gone now.
            assert_eq!(w.ack(&[1; 32], &[AckKey::new([9; 32], "a")]).unwrap(), 0);
            // Only what the writer reads back is staged: the two dedup entries and the
            // removal of the acknowledged message (not the messages written).
            assert!(w.staged[Table::Expiry as usize].is_empty());
            let inbox = &w.staged[Table::Inbox as usize];
            assert_eq!(inbox.len(), 3);
            assert_eq!(
                inbox.get(message_key(&[1; 32], 1).as_slice()),
                Some(&None),
                "the removal is staged"
            );
            assert!(inbox.iter().all(|(k, v)| !is_message_key(k) || v.is_none()));
            w.insert(Table::Meta, RESTORE_MARKER.as_bytes(), &1u64.to_be_bytes());
            w.remove(Table::Meta, RESTORE_MARKER.as_bytes());
            let counters = w.commit().unwrap();
            assert_eq!(counters.pending, 1);
            assert_eq!(read_pending(&tables, 1), vec![2]);
            assert_eq!(tables.meta_u64(RESTORE_MARKER).unwrap(), None);
        }
        // Reopened: the journal replays the batch the same way.
        let tables = Tables::open(&dir, &EmbeddedOptions::default()).unwrap();
        let counters = tables.init().unwrap();
        assert_eq!((counters.next_seq, counters.pending), (3, 1));
        assert_eq!(read_pending(&tables, 1), vec![2]);
        // The ack removed the message and left the dedup entry as the put wrote it.
        let dk = dedup_key(&[1; 32], &[9; 32], "a");
        let v = tables.ks(Table::Inbox).get(&dk).unwrap().unwrap();
        assert_eq!(
            split_dedup_record(&v).unwrap(),
            (1, 4_000_000_000_000, true)
        );
        let w = Writer::new(&tables, counters);
        assert!(!w.still_pending(&[1; 32], 1, true).unwrap());
        assert!(w.still_pending(&[1; 32], 2, true).unwrap());
        drop(w);
        drop(tables);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn snapshot_of(n: usize) -> Vec<u8> {
        let dir = temp_dir("snap-src");
        let store = EmbeddedStore::open(&dir).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let msgs = (0..n)
            .map(|i| msg((i % 5) as u8, &format!("m{i}")))
            .collect();
        rt.block_on(store.put_many(msgs)).unwrap();
        let mut out = Vec::new();
        store.snapshot(&mut out).unwrap();
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    /// A restore larger than one chunk that fails verification at the end leaves the
    /// store empty, although chunks were committed on the way.
    #[test]
    fn a_failed_chunked_restore_leaves_the_store_empty() {
        let mut snap = snapshot_of(40);
        let last = snap.len() - 1;
        snap[last] ^= 0xFF; // the checksum trailer: detected only after every record
        let dir = temp_dir("restore-fail");
        let store = EmbeddedStore::open(&dir).unwrap();
        let err = store.restore(&mut snap.as_slice()).unwrap_err();
        assert!(
            matches!(err, StoreError::SnapshotChecksum { .. }),
            "{err:?}"
        );
        assert_eq!(read_pending(&store.tables, 0), Vec::<u64>::new());
        assert!(store.tables.ks(Table::Inbox).is_empty().unwrap());
        assert!(store.tables.ks(Table::Expiry).is_empty().unwrap());
        assert_eq!(store.tables.meta_u64("pending_count").unwrap(), Some(0));
        assert_eq!(store.tables.meta_u64(RESTORE_MARKER).unwrap(), None);
        // And a good stream restores afterwards.
        snap[last] ^= 0xFF;
        let summary = store.restore(&mut snap.as_slice()).unwrap();
        assert_eq!(summary.messages, 40);
        assert_eq!(read_pending(&store.tables, 0).len(), 8);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A restore interrupted by a crash (its marker still set) is rolled back at open.
    #[test]
    fn an_interrupted_restore_is_rolled_back_at_open() {
        let dir = temp_dir("restore-crash");
        {
            let path = dir.join(STORE_DIR_NAME);
            let tables = Tables::open(&path, &EmbeddedOptions::default()).unwrap();
            let counters = tables.init().unwrap();
            let mut w = Writer::new(&tables, counters);
            w.insert(Table::Meta, RESTORE_MARKER.as_bytes(), &1u64.to_be_bytes());
            w.insert_message(5, &msg(1, "half"), &dedup_key(&[1; 32], &[9; 32], "half"));
            w.counters.next_seq = 6;
            w.commit().unwrap();
        }
        let store = EmbeddedStore::open(&dir).unwrap();
        assert!(store.tables.ks(Table::Inbox).is_empty().unwrap());
        assert!(store.tables.ks(Table::Expiry).is_empty().unwrap());
        assert_eq!(store.tables.meta_u64(RESTORE_MARKER).unwrap(), None);
        let c = lock(&store.engine, "test").unwrap().counters;
        assert_eq!((c.next_seq, c.pending), (6, 0), "seqs never go back");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

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
//!
//! The files, in the order a write takes:
//! - this file: [`EmbeddedStore`] (open, the [`Store`] methods, snapshot entry points)
//!   and its tuning ([`EmbeddedOptions`]);
//! - `writer.rs`: the writer thread and group commit (queued [`WriteOp`]s, one batch
//!   per wake-up, answers after the commit);
//! - `batch.rs`: one batch being built ([`Writer`]): staging and every write operation;
//! - `tables.rs`: the keyspaces, their layout version and the counters kept in META;
//! - `snapshot.rs`: snapshots of this engine (one read view) and applying one (restore,
//!   merge) under the writer's lock; the stream format is [`super::snapshot`].

mod batch;
mod snapshot;
mod tables;
#[cfg(test)]
mod tests;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::codec::{channel_prefix, decode_message, message_key, split_member_key};
use super::snapshot::{seq_of_message_key, split_profile, Apply, MergeSummary, SnapshotSummary};
use super::{
    validate_channel, validate_message, AckKey, Pending, PublicKey, PutOutcome, Store, StoreError,
    StoreStats, StoredMessage,
};
pub(crate) use batch::Writer;
use snapshot::{apply_snapshot_locked, write_snapshot};
use tables::{Ctx, Table, Tables};
use writer::{lock, writer_loop, Engine, WriteOp};

/// Directory of the database inside the data directory.
pub const STORE_DIR_NAME: &str = "dchat.store";

/// The database file of pre-release builds. A data directory holding it is refused
/// ([`StoreError::PreReleaseData`]): no release wrote that layout.
const PRE_RELEASE_FILE_NAME: &str = "dchat.redb";
/// Queued write operations before callers wait (backpressure beyond this).
const QUEUE_CAPACITY: usize = 4096;
/// Expiry-index entries removed per batch by `expire`.
const EXPIRE_CHUNK: usize = 5000;
/// Most entries `pending` reserves room for up front (the relay reads pages of 128).
const PENDING_PREALLOC: usize = 128;

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

    /// What a restore would find in this store and refuse for (the words of
    /// [`StoreError::NotEmpty`]), or `None` when it is empty: one emptiness check per
    /// table, so dedup entries of acknowledged messages count too. Blocking (reads);
    /// call from a blocking thread.
    pub fn contents(&self) -> Result<Option<String>, StoreError> {
        let mut found = Vec::new();
        for (table, what) in tables::CONTENTS {
            if !self
                .tables
                .ks(table)
                .is_empty()
                .ctx("contents: check empty")?
            {
                found.push(what);
            }
        }
        Ok((!found.is_empty()).then(|| found.join(", ")))
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
        let keys = super::ackable(keys);
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

//! Durable storage for the relay: messages held for offline recipients, signed
//! profiles and persistent channel membership.
//!
//! One [`Store`] trait, two implementations:
//! - [`EmbeddedStore`] (default, one relay): an LSM-tree database (fjall) in the data
//!   directory, every write fsync'd before it returns, concurrent writes group-committed
//!   by a single writer thread.
//! - [`PostgresStore`] (clusters): a PostgreSQL database shared by all relays, schema
//!   migrations embedded in the binary and applied at connect.
//!
//! The behaviour both must share (dedup, ordering, acknowledgement, expiry) is pinned by
//! one test suite, `relay/tests/store_suite.rs`, run against each backend. The on-disk
//! layout, durability model and snapshot format are described in `docs/storage.md`.

mod codec;
mod embedded;
mod error;
mod postgres;
mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;

pub use embedded::{EmbeddedOptions, EmbeddedStore, STORE_DIR_NAME};
pub use error::StoreError;
pub use postgres::{PostgresConfig, PostgresStore};
pub use snapshot::{MergeSummary, SnapshotSummary, SNAPSHOT_FORMAT_VERSION};

/// An Ed25519 public key (raw 32 bytes): identities and routing keys.
pub type PublicKey = [u8; 32];

/// Longest accepted client-chosen message id, in bytes. The id is part of the dedup
/// key in both backends, so it is bounded to keep index entries small.
pub const MAX_MESSAGE_ID_BYTES: usize = 256;

/// Longest accepted channel name, in bytes (part of the membership key).
pub const MAX_CHANNEL_NAME_BYTES: usize = 256;

/// Longest accepted message kind label, in bytes.
pub const MAX_KIND_BYTES: usize = 64;

/// A message held for a recipient who was offline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Key of the user the message is for.
    pub recipient: PublicKey,
    /// Key of the user who sent it.
    pub sender: PublicKey,
    /// Client-chosen id; unique per sender. Dedup key is (recipient, sender, id).
    pub id: String,
    /// Channel the message was sent to, if any (fan-out copies carry it).
    pub channel: Option<String>,
    /// Sender's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// When the relay may drop the message, milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
    /// Message kind label ("text", "image", ...), for metrics only.
    pub kind: String,
    /// The full serialized envelope, opaque to the store.
    pub envelope: Vec<u8>,
}

/// One pending message with the store-assigned sequence (monotonic per store;
/// with PostgreSQL, global across relays). Ordering by seq gives per-sender order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Store-assigned sequence number; strictly increasing in commit order of one writer.
    pub seq: u64,
    /// The stored message.
    pub message: StoredMessage,
}

/// One acknowledged message: its (sender, id) and, when the caller delivered it from
/// a read of this store, where that read found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckKey {
    /// Sender key of the message.
    pub sender: PublicKey,
    /// The sender's message id.
    pub id: String,
    /// What [`Store::pending`] returned for it, if the caller delivered it from there.
    pub read_as: Option<ReadAs>,
}

impl AckKey {
    /// A key known only by (sender, id): the store looks the message up.
    pub fn new(sender: PublicKey, id: impl Into<String>) -> AckKey {
        AckKey {
            sender,
            id: id.into(),
            read_as: None,
        }
    }
}

/// Where a read ([`Store::pending`]) found a message, quoted back in its [`AckKey`]: a
/// store may then remove it without looking its id up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadAs {
    /// The message's [`Pending::seq`].
    pub seq: u64,
    /// The message's expiry as read.
    pub expires_at_ms: i64,
}

impl Pending {
    /// This message's [`ReadAs`].
    pub fn read_as(&self) -> ReadAs {
        ReadAs {
            seq: self.seq,
            expires_at_ms: self.message.expires_at_ms,
        }
    }
}

/// Result of storing one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Newly stored under this sequence number.
    Stored {
        /// Sequence number assigned to the message.
        seq: u64,
    },
    /// A message with the same (recipient, sender, id) was already stored (or was
    /// stored and acknowledged, and has not expired yet); nothing was written.
    Duplicate,
}

/// One send to record with [`Store::accept`]: its (sender, id) and the copies to store
/// for the recipients it is not pushed to live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRecord {
    /// Key of the user who sent it.
    pub sender: PublicKey,
    /// The sender's message id.
    pub id: String,
    /// Until when the (sender, id) stays recorded: the message's expiry.
    pub expires_at_ms: i64,
    /// Copies to store if the send is accepted (none for a message only pushed live);
    /// each has this sender and id.
    pub copies: Vec<StoredMessage>,
}

/// What [`Store::accept`] decided for one [`SendRecord`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// The first send of this (sender, id): now recorded, and its copies were stored in
    /// the same commit (one outcome per copy, in order; a copy is `Duplicate` only when
    /// it had been stored already, e.g. by an earlier attempt of this very send).
    Accepted(Vec<PutOutcome>),
    /// A send of this (sender, id) was accepted before and has not expired; nothing was
    /// written.
    Duplicate,
}

/// Counts for the admin API and gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Messages stored and not yet acknowledged or expired.
    pub pending_messages: u64,
    /// Stored profiles.
    pub profiles: u64,
    /// Channels with at least one persistent member.
    pub channels: u64,
}

/// The storage interface the relay core uses. Every method is durable before it
/// returns: once a write returns `Ok`, it survives a crash (kill -9, power loss on
/// the embedded store's fsync guarantee).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores durably (fsync'd / committed) before returning. Concurrent calls are
    /// group-committed by the implementation.
    async fn put(&self, msg: StoredMessage) -> Result<PutOutcome, StoreError>;
    /// Many messages in one durable commit (channel fan-out); outcome per input, same order.
    async fn put_many(&self, msgs: Vec<StoredMessage>) -> Result<Vec<PutOutcome>, StoreError>;
    /// Unexpired messages for `recipient` with seq > after_seq, ascending seq, at most `limit`.
    async fn pending(
        &self,
        recipient: &PublicKey,
        after_seq: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Pending>, StoreError>;
    /// Removes acknowledged messages identified by (sender, id); returns how many were
    /// removed. A key's `read_as`, when given, must be what `pending` returned to the
    /// caller for that message, and the caller acknowledges a message it read at most
    /// once with it; a store may then skip looking the message up.
    async fn ack(&self, recipient: &PublicKey, keys: Vec<AckKey>) -> Result<u64, StoreError>;
    /// Deletes messages with expires_at_ms <= now_ms; returns the count removed.
    async fn expire(&self, now_ms: i64) -> Result<u64, StoreError>;
    /// Stores a signed profile blob if `updated_ms` is newer than the stored one.
    async fn put_profile(
        &self,
        key: &PublicKey,
        profile: Vec<u8>,
        updated_ms: i64,
    ) -> Result<bool, StoreError>;
    /// The stored profile blob of `key`, if any.
    async fn get_profile(&self, key: &PublicKey) -> Result<Option<Vec<u8>>, StoreError>;
    /// Persistent channel membership (so offline members receive channel messages).
    async fn join_channel(&self, channel: &str, member: &PublicKey) -> Result<(), StoreError>;
    /// Removes a persistent membership; leaving a channel one is not in is not an error.
    async fn leave_channel(&self, channel: &str, member: &PublicKey) -> Result<(), StoreError>;
    /// Members of `channel`, in ascending key order.
    async fn channel_members(&self, channel: &str) -> Result<Vec<PublicKey>, StoreError>;
    /// Readiness: the storage is reachable and writable.
    async fn check(&self) -> Result<(), StoreError>;
    /// Flushes everything buffered; called on drain before exit.
    async fn flush(&self) -> Result<(), StoreError>;
    /// Current counts.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Whether this store decides which sends are duplicates for every relay that shares
    /// it ([`Store::accept`]). False for a store only one relay uses: that relay decides
    /// itself (its recent-id cache and the copies' dedup key).
    fn records_sends(&self) -> bool {
        false
    }

    /// Records each send's (sender, id) unless a send of it was accepted before (and has
    /// not expired), and stores the copies of those it records — per send atomically,
    /// durable before it returns, one outcome per input in order. Of inputs with the same
    /// (sender, id), only the first can be accepted. Two relays recording the same
    /// (sender, id) at the same moment get one `Accepted` and one `Duplicate`.
    ///
    /// An error means the sends were not recorded, unless
    /// [`StoreError::outcome_unknown`] says the store may have committed them.
    async fn accept(&self, sends: Vec<SendRecord>) -> Result<Vec<Acceptance>, StoreError> {
        let _ = sends;
        Err(StoreError::Unsupported { op: "accept" })
    }
}

/// Which backend to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded store in this directory (created if missing).
    Embedded {
        /// Data directory; the database is the directory `dchat.store` inside it.
        dir: PathBuf,
        /// Engine tuning.
        options: EmbeddedOptions,
    },
    /// A shared PostgreSQL database.
    Postgres(PostgresConfig),
}

/// Opens the configured backend. For PostgreSQL this connects and applies the embedded
/// migrations, so it fails early (with the failing setting named) when the database is
/// unreachable.
pub async fn open(cfg: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match cfg {
        StoreConfig::Embedded { dir, options } => Ok(Arc::new(open_embedded(dir, options).await?)),
        StoreConfig::Postgres(pg) => Ok(Arc::new(PostgresStore::connect(pg).await?)),
    }
}

/// Opens the embedded store on the blocking pool: opening may replay the journal, which
/// must not stall the runtime.
pub async fn open_embedded(
    dir: &std::path::Path,
    options: &EmbeddedOptions,
) -> Result<EmbeddedStore, StoreError> {
    let (dir, options) = (dir.to_path_buf(), *options);
    tokio::task::spawn_blocking(move || EmbeddedStore::open_with(&dir, &options))
        .await
        .map_err(|e| StoreError::Task {
            op: "open embedded store",
            reason: e.to_string(),
        })?
}

/// Checks the field limits shared by both backends before anything is written, so an
/// oversized id is a typed error instead of an index failure deep in the backend.
pub(crate) fn validate_message(msg: &StoredMessage) -> Result<(), StoreError> {
    validate_id(&msg.id)?;
    if let Some(channel) = &msg.channel {
        validate_channel(channel)?;
    }
    // PostgreSQL TEXT cannot hold NUL; refuse it in both backends so they agree.
    if msg.kind.contains('\0') {
        return Err(StoreError::InvalidInput {
            field: "kind",
            reason: "contains a NUL character".into(),
        });
    }
    if msg.kind.len() > MAX_KIND_BYTES {
        return Err(StoreError::InvalidInput {
            field: "kind",
            reason: format!(
                "kind label is {} bytes, limit {MAX_KIND_BYTES}",
                msg.kind.len()
            ),
        });
    }
    Ok(())
}

/// The keys of an `ack` that can name a stored message: an id validation would refuse
/// (empty, too long, NUL) was never stored, so it matches nothing and does not reach the
/// backend (where a key longer than its index allows would fail the whole store).
pub(crate) fn ackable(keys: Vec<AckKey>) -> Vec<AckKey> {
    keys.into_iter()
        .filter(|k| validate_id(&k.id).is_ok())
        .collect()
}

/// Checks a message id against [`MAX_MESSAGE_ID_BYTES`]; NUL is refused because
/// PostgreSQL TEXT cannot hold it.
fn validate_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::InvalidInput {
            field: "id",
            reason: "message id is empty".into(),
        });
    }
    if id.len() > MAX_MESSAGE_ID_BYTES {
        return Err(StoreError::InvalidInput {
            field: "id",
            reason: format!(
                "message id is {} bytes, limit {MAX_MESSAGE_ID_BYTES}",
                id.len()
            ),
        });
    }
    if id.contains('\0') {
        return Err(StoreError::InvalidInput {
            field: "id",
            reason: "contains a NUL character".into(),
        });
    }
    Ok(())
}

/// Checks a send to record: its id like a message id, and every copy is a valid message
/// of that sender and id.
pub(crate) fn validate_send(send: &SendRecord) -> Result<(), StoreError> {
    validate_id(&send.id)?;
    for copy in &send.copies {
        validate_message(copy)?;
        if copy.sender != send.sender || copy.id != send.id {
            return Err(StoreError::InvalidInput {
                field: "copies",
                reason: "a copy's sender and id must be the send's".into(),
            });
        }
    }
    Ok(())
}

/// Checks a channel name against [`MAX_CHANNEL_NAME_BYTES`].
pub(crate) fn validate_channel(channel: &str) -> Result<(), StoreError> {
    if channel.is_empty() || channel.len() > MAX_CHANNEL_NAME_BYTES {
        return Err(StoreError::InvalidInput {
            field: "channel",
            reason: format!(
                "channel name is {} bytes, must be 1..={MAX_CHANNEL_NAME_BYTES}",
                channel.len()
            ),
        });
    }
    if channel.contains('\0') {
        return Err(StoreError::InvalidInput {
            field: "channel",
            reason: "contains a NUL character".into(),
        });
    }
    Ok(())
}

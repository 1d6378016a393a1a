//! Snapshot and restore of the PostgreSQL store, in the embedded store's snapshot format
//! (docs/storage.md, "Snapshot format"), so a backup of either backend restores into
//! either.
//!
//! - [`PostgresStore::snapshot`] reads the relay's tables in one `REPEATABLE READ, READ
//!   ONLY` transaction — an exact cut of committed state while relays keep writing — and
//!   streams the records in the order the embedded store writes them, so equal content
//!   gives equal bytes whichever backend holds it.
//! - [`PostgresStore::restore`] loads a stream into an empty database in one transaction
//!   that is committed only after the stream's trailer, its counts and whatever the
//!   caller's reader checks at its end (a backup's object checksum) verified.
//!
//! Rows are streamed, never collected: a snapshot holds at most one fetched row and a
//! 1 MiB output buffer besides the driver's socket buffer (tokio-postgres stops reading
//! the socket while the consumer is busy), and a restore at most one insert batch.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_postgres::IsolationLevel;

use super::{key_from_db, pg, seq_from_db, PostgresStore};
use crate::store::codec::{encode_message, member_key};
use crate::store::snapshot::{
    Record, SnapshotCounts, SnapshotReader, SnapshotSummary, SnapshotWriter,
};
use crate::store::{StoreError, StoredMessage};

/// Output buffered before it is written to the async sink.
const OUT_CHUNK: usize = 1 << 20;
/// Rows per insert statement on restore.
const INSERT_ROWS: usize = 1000;
/// Bytes of message records per insert statement on restore (envelopes can be large).
const INSERT_BYTES: usize = 8 << 20;
/// Records parsed ahead of the inserts (the reader runs on a blocking thread).
const RECORD_QUEUE: usize = 256;

fn count(v: i64) -> u64 {
    v.max(0) as u64
}

impl PostgresStore {
    /// Streams a consistent snapshot of the database to `out`: the header (counts taken
    /// in the same transaction), messages, acknowledged messages' dedup entries
    /// (tombstones), profiles and memberships, the end tag and the SHA-256 trailer.
    ///
    /// Everything is read in one `REPEATABLE READ, READ ONLY` transaction, so the
    /// snapshot is an exact cut of what was committed when it started; relays keep
    /// writing meanwhile. `next_seq` is one past the highest seq the snapshot holds or
    /// the identity sequence handed out, whichever is higher, so seqs keep increasing
    /// after a restore.
    pub async fn snapshot<W: AsyncWrite + Unpin + Send>(
        &self,
        out: &mut W,
    ) -> Result<SnapshotSummary, StoreError> {
        let started = Instant::now();
        let mut client = self.client("snapshot").await?;
        let txn = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg("snapshot: begin repeatable read transaction"))?;
        // The first statement fixes the transaction's view: count in it.
        let row = txn
            .query_one(
                "SELECT count(*) FILTER (WHERE NOT acked),
                        count(*) FILTER (WHERE acked),
                        COALESCE(max(seq), 0),
                        (SELECT count(*) FROM profiles),
                        (SELECT count(*) FROM channel_members),
                        COALESCE(pg_sequence_last_value(
                            pg_get_serial_sequence('messages', 'seq')::regclass), 0)
                   FROM messages",
                &[],
            )
            .await
            .map_err(pg("snapshot: count rows"))?;
        let op = "snapshot: decode counts";
        let get = |i: usize| -> Result<i64, StoreError> { row.try_get(i).map_err(pg(op)) };
        let counts = SnapshotCounts {
            next_seq: count(get(2)?.max(get(5)?)) + 1,
            messages: count(get(0)?),
            tombstones: count(get(1)?),
            profiles: count(get(3)?),
            memberships: count(get(4)?),
        };
        let mut w = SnapshotWriter::start(Vec::with_capacity(OUT_CHUNK + (256 << 10)), counts)?;

        // The order of each section is the embedded store's key order, so the same
        // content gives the same bytes: inbox keys (recipient, seq), dedup keys
        // (recipient, sender, id bytes), profile keys, and membership keys (name length,
        // name bytes, member). COLLATE "C" compares text byte by byte.
        let stmt = txn
            .prepare(
                "SELECT seq, recipient, sender, msg_id, channel, timestamp_ms, expires_at_ms,
                        kind, envelope
                   FROM messages WHERE NOT acked ORDER BY recipient, seq",
            )
            .await
            .map_err(pg("snapshot: prepare select from messages"))?;
        let rows = txn
            .query_raw(&stmt, std::iter::empty::<i64>())
            .await
            .map_err(pg("snapshot: select from messages"))?;
        let mut rows = std::pin::pin!(rows);
        let op = "snapshot: read messages row";
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(pg(op))?
        {
            let recipient: &[u8] = row.try_get(1).map_err(pg(op))?;
            let sender: &[u8] = row.try_get(2).map_err(pg(op))?;
            let msg = StoredMessage {
                recipient: key_from_db(recipient, "messages", "recipient")?,
                sender: key_from_db(sender, "messages", "sender")?,
                id: row.try_get(3).map_err(pg(op))?,
                channel: row.try_get(4).map_err(pg(op))?,
                timestamp_ms: row.try_get(5).map_err(pg(op))?,
                expires_at_ms: row.try_get(6).map_err(pg(op))?,
                kind: row.try_get(7).map_err(pg(op))?,
                envelope: row.try_get(8).map_err(pg(op))?,
            };
            let seq = seq_from_db(row.try_get(0).map_err(pg(op))?, op)?;
            w.message(seq, &encode_message(&msg))?;
            drain(&mut w, out).await?;
        }

        let stmt = txn
            .prepare(
                "SELECT seq, expires_at_ms, recipient, sender, msg_id
                   FROM messages WHERE acked
                  ORDER BY recipient, sender, msg_id COLLATE \"C\"",
            )
            .await
            .map_err(pg("snapshot: prepare select acknowledged messages"))?;
        let rows = txn
            .query_raw(&stmt, std::iter::empty::<i64>())
            .await
            .map_err(pg("snapshot: select acknowledged messages"))?;
        let mut rows = std::pin::pin!(rows);
        let op = "snapshot: read acknowledged messages row";
        let mut key = Vec::new();
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(pg(op))?
        {
            let seq = seq_from_db(row.try_get(0).map_err(pg(op))?, op)?;
            let expires: i64 = row.try_get(1).map_err(pg(op))?;
            let recipient: &[u8] = row.try_get(2).map_err(pg(op))?;
            let sender: &[u8] = row.try_get(3).map_err(pg(op))?;
            let id: &str = row.try_get(4).map_err(pg(op))?;
            key.clear();
            key.extend_from_slice(&key_from_db(recipient, "messages", "recipient")?);
            key.push(crate::store::codec::INBOX_DEDUP);
            key.extend_from_slice(&key_from_db(sender, "messages", "sender")?);
            key.extend_from_slice(id.as_bytes());
            w.tombstone(&key, seq, expires)?;
            drain(&mut w, out).await?;
        }

        let stmt = txn
            .prepare("SELECT key, updated_ms, profile FROM profiles ORDER BY key")
            .await
            .map_err(pg("snapshot: prepare select from profiles"))?;
        let rows = txn
            .query_raw(&stmt, std::iter::empty::<i64>())
            .await
            .map_err(pg("snapshot: select from profiles"))?;
        let mut rows = std::pin::pin!(rows);
        let op = "snapshot: read profiles row";
        let mut stored = Vec::new();
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(pg(op))?
        {
            let key: &[u8] = row.try_get(0).map_err(pg(op))?;
            let key = key_from_db(key, "profiles", "key")?;
            let updated: i64 = row.try_get(1).map_err(pg(op))?;
            let blob: &[u8] = row.try_get(2).map_err(pg(op))?;
            stored.clear();
            stored.extend_from_slice(&updated.to_be_bytes());
            stored.extend_from_slice(blob);
            w.profile(&key, &stored)?;
            drain(&mut w, out).await?;
        }

        let stmt = txn
            .prepare(
                "SELECT channel, member FROM channel_members
                  ORDER BY octet_length(channel), channel COLLATE \"C\", member",
            )
            .await
            .map_err(pg("snapshot: prepare select from channel_members"))?;
        let rows = txn
            .query_raw(&stmt, std::iter::empty::<i64>())
            .await
            .map_err(pg("snapshot: select from channel_members"))?;
        let mut rows = std::pin::pin!(rows);
        let op = "snapshot: read channel_members row";
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows)
            .await
            .map_err(pg(op))?
        {
            let channel: &str = row.try_get(0).map_err(pg(op))?;
            let member: &[u8] = row.try_get(1).map_err(pg(op))?;
            // A name the relay could not have stored cannot be encoded faithfully.
            crate::store::validate_channel(channel)?;
            let member = key_from_db(member, "channel_members", "member")?;
            w.membership(&member_key(channel, &member))?;
            drain(&mut w, out).await?;
        }

        txn.commit()
            .await
            .map_err(pg("snapshot: end transaction"))?;
        let (summary, mut rest) = w.finish_into()?;
        write_out(out, &mut rest).await?;
        out.flush().await.map_err(|source| StoreError::SnapshotIo {
            op: "write",
            source,
        })?;
        tracing::info!(
            messages = summary.messages,
            tombstones = summary.tombstones,
            profiles = summary.profiles,
            memberships = summary.memberships,
            bytes = summary.bytes,
            secs = started.elapsed().as_secs_f64(),
            "postgres snapshot written"
        );
        Ok(summary)
    }

    /// Loads a snapshot stream into this database, which must hold no messages (pending
    /// or acknowledged), profiles or memberships ([`StoreError::NotEmpty`] naming what
    /// it holds otherwise).
    ///
    /// One transaction: it locks the relay's tables against writes (relays may read),
    /// checks they are empty, inserts the records as they stream in — messages and
    /// tombstones keep their seqs, and their (sender, id) are recorded in `sent_ids` —
    /// and commits only after the stream's trailer and
    /// counts verified and `input` reached its end without an error. `input` may fail
    /// its last read to veto the commit (a backup download whose object checksum does
    /// not match). Any error rolls everything back. The identity sequence is moved past
    /// the snapshot's `next_seq`, so seqs keep increasing.
    pub async fn restore<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        input: R,
    ) -> Result<SnapshotSummary, StoreError> {
        let started = Instant::now();
        let mut client = self.client("restore").await?;
        let txn = client
            .transaction()
            .await
            .map_err(pg("restore: begin transaction"))?;
        // EXCLUSIVE: relays may still read, but none writes until the commit, so the
        // emptiness checked here is still true when the rows land.
        txn.batch_execute(
            "LOCK TABLE messages, sent_ids, profiles, channel_members IN EXCLUSIVE MODE",
        )
        .await
        .map_err(pg("restore: lock tables"))?;
        let row = txn
            .query_one(
                "SELECT (SELECT count(*) FROM messages WHERE NOT acked),
                        (SELECT count(*) FROM messages WHERE acked),
                        (SELECT count(*) FROM profiles),
                        (SELECT count(*) FROM channel_members)",
                &[],
            )
            .await
            .map_err(pg("restore: check the database is empty"))?;
        let mut found = Vec::new();
        for (i, what) in [
            (0, "messages"),
            (1, "acknowledged messages (dedup entries)"),
            (2, "profiles"),
            (3, "channel memberships"),
        ] {
            let n: i64 = row.try_get(i).map_err(pg("restore: decode counts"))?;
            if n > 0 {
                found.push(format!("{n} {what}"));
            }
        }
        if !found.is_empty() {
            return Err(StoreError::NotEmpty {
                what: found.join(", "),
            });
        }

        // The stream is parsed on a blocking thread (the snapshot reader is synchronous)
        // and its records are inserted here as they come. Dropping the receiver (an
        // insert failed) makes the reader stop at its next record.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Record>(RECORD_QUEUE);
        let bridge = tokio_util::io::SyncIoBridge::new(input);
        let reader = tokio::task::spawn_blocking(move || -> Result<SnapshotSummary, StoreError> {
            let mut r = SnapshotReader::open(bridge)?;
            while let Some(record) = r.next_record()? {
                if tx.blocking_send(record).is_err() {
                    return Err(StoreError::Task {
                        op: "restore",
                        reason: "inserting stopped".into(),
                    });
                }
            }
            drop(tx);
            r.finish()
        });

        let mut batch = Batch::default();
        let mut inserted = Ok(());
        while let Some(record) = rx.recv().await {
            if !batch.accepts(&record) {
                if let Err(e) = batch.insert(&txn).await {
                    inserted = Err(e);
                    break;
                }
            }
            batch.push(record);
        }
        if inserted.is_ok() {
            inserted = batch.insert(&txn).await;
        }
        drop(rx);
        let read = reader.await.map_err(|e| StoreError::Task {
            op: "restore: read snapshot",
            reason: e.to_string(),
        })?;
        // An insert failure is the cause; the reader then only saw the queue close.
        inserted?;
        let summary = read?;

        // Which sends were accepted is what `sent_ids` records for every relay sharing
        // the database: each restored message and dedup entry was an accepted send, so
        // a sender's retry of it stays a duplicate, also to a recipient who is online.
        // (The snapshot does not carry sends that were only pushed live.) Attempt 0
        // names no relay's attempt in practice: relays start theirs at a random value.
        txn.execute(
            "INSERT INTO sent_ids AS s (sender, msg_id, expires_at_ms, attempt)
             SELECT sender, msg_id, max(expires_at_ms), 0 FROM messages
              GROUP BY sender, msg_id
             ON CONFLICT (sender, msg_id) DO UPDATE
               SET expires_at_ms = GREATEST(s.expires_at_ms, EXCLUDED.expires_at_ms)",
            &[],
        )
        .await
        .map_err(pg("restore: insert into sent_ids"))?;
        let next_seq =
            i64::try_from(summary.next_seq).map_err(|_| StoreError::SnapshotInvalid {
                reason: format!(
                    "next_seq {} does not fit PostgreSQL's BIGINT",
                    summary.next_seq
                ),
            })?;
        // setval is not transactional; moving the sequence forward without the rows (a
        // failed commit) only skips numbers.
        txn.query_one(
            "SELECT setval(pg_get_serial_sequence('messages', 'seq'),
                           GREATEST($1::bigint,
                                    (SELECT COALESCE(max(seq), 0) + 1 FROM messages),
                                    COALESCE(pg_sequence_last_value(
                                        pg_get_serial_sequence('messages', 'seq')::regclass), 0) + 1),
                           false)",
            &[&next_seq],
        )
        .await
        .map_err(pg("restore: advance the seq identity"))?;
        txn.commit().await.map_err(pg("restore: commit"))?;
        tracing::info!(
            messages = summary.messages,
            tombstones = summary.tombstones,
            profiles = summary.profiles,
            memberships = summary.memberships,
            bytes = summary.bytes,
            secs = started.elapsed().as_secs_f64(),
            "postgres restore committed"
        );
        Ok(summary)
    }
}

/// Writes what the snapshot writer buffered to `out` once there is at least
/// [`OUT_CHUNK`] of it.
async fn drain<W: AsyncWrite + Unpin>(
    w: &mut SnapshotWriter<Vec<u8>>,
    out: &mut W,
) -> Result<(), StoreError> {
    let buf = w.sink()?;
    if buf.len() >= OUT_CHUNK {
        write_out(out, buf).await?;
    }
    Ok(())
}

async fn write_out<W: AsyncWrite + Unpin>(
    out: &mut W,
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    out.write_all(buf)
        .await
        .map_err(|source| StoreError::SnapshotIo {
            op: "write",
            source,
        })?;
    buf.clear();
    Ok(())
}

fn seq_to_db(seq: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(seq)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| StoreError::SnapshotInvalid {
            reason: format!("{what} seq {seq} is outside PostgreSQL's BIGINT identity range"),
        })
}

/// Records of one kind collected for one insert statement.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    bytes: usize,
}

fn kind(r: &Record) -> u8 {
    match r {
        Record::Message { .. } => 1,
        Record::Tombstone { .. } => 2,
        Record::Profile { .. } => 3,
        Record::Membership { .. } => 4,
    }
}

impl Batch {
    /// Whether `r` may join this batch (same kind, and the batch is not full).
    fn accepts(&self, r: &Record) -> bool {
        match self.records.first() {
            None => true,
            Some(first) => {
                kind(first) == kind(r)
                    && self.records.len() < INSERT_ROWS
                    && self.bytes < INSERT_BYTES
            }
        }
    }

    fn push(&mut self, r: Record) {
        self.bytes += match &r {
            Record::Message { message, .. } => message.envelope.len() + message.id.len() + 100,
            Record::Profile { blob, .. } => blob.len() + 40,
            _ => 100,
        };
        self.records.push(r);
    }

    /// Inserts the batch (one statement) and empties it.
    async fn insert(&mut self, txn: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
        let records = std::mem::take(&mut self.records);
        self.bytes = 0;
        let Some(first) = records.first() else {
            return Ok(());
        };
        match kind(first) {
            1 => insert_messages(txn, &records).await,
            2 => insert_tombstones(txn, &records).await,
            3 => insert_profiles(txn, &records).await,
            _ => insert_memberships(txn, &records).await,
        }
    }
}

async fn insert_messages(
    txn: &tokio_postgres::Transaction<'_>,
    records: &[Record],
) -> Result<(), StoreError> {
    let mut seqs = Vec::with_capacity(records.len());
    let mut msgs = Vec::with_capacity(records.len());
    for r in records {
        if let Record::Message { seq, message } = r {
            seqs.push(seq_to_db(*seq, "message")?);
            msgs.push(message);
        }
    }
    let recipients: Vec<&[u8]> = msgs.iter().map(|m| m.recipient.as_slice()).collect();
    let senders: Vec<&[u8]> = msgs.iter().map(|m| m.sender.as_slice()).collect();
    let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
    let channels: Vec<Option<&str>> = msgs.iter().map(|m| m.channel.as_deref()).collect();
    let timestamps: Vec<i64> = msgs.iter().map(|m| m.timestamp_ms).collect();
    let expiries: Vec<i64> = msgs.iter().map(|m| m.expires_at_ms).collect();
    let kinds: Vec<&str> = msgs.iter().map(|m| m.kind.as_str()).collect();
    let envelopes: Vec<&[u8]> = msgs.iter().map(|m| m.envelope.as_slice()).collect();
    txn.execute(
        "INSERT INTO messages
           (seq, recipient, sender, msg_id, channel, timestamp_ms, expires_at_ms, kind, envelope)
         OVERRIDING SYSTEM VALUE
         SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::text[], $5::text[],
                              $6::int8[], $7::int8[], $8::text[], $9::bytea[])",
        &[
            &seqs,
            &recipients,
            &senders,
            &ids,
            &channels,
            &timestamps,
            &expiries,
            &kinds,
            &envelopes,
        ],
    )
    .await
    .map_err(pg("restore: insert into messages"))?;
    Ok(())
}

async fn insert_tombstones(
    txn: &tokio_postgres::Transaction<'_>,
    records: &[Record],
) -> Result<(), StoreError> {
    let (mut seqs, mut expiries, mut recipients, mut senders, mut ids) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in records {
        if let Record::Tombstone {
            seq,
            expires_at_ms,
            recipient,
            sender,
            id,
        } = r
        {
            seqs.push(seq_to_db(*seq, "tombstone")?);
            expiries.push(*expires_at_ms);
            recipients.push(recipient.as_slice());
            senders.push(sender.as_slice());
            ids.push(id.as_str());
        }
    }
    // An acknowledged row keeps only what dedup and expiry read: the snapshot does not
    // carry its timestamp or kind, and its envelope was dropped at the ack.
    txn.execute(
        "INSERT INTO messages
           (seq, recipient, sender, msg_id, channel, timestamp_ms, expires_at_ms, kind, envelope,
            acked)
         OVERRIDING SYSTEM VALUE
         SELECT seq, recipient, sender, msg_id, NULL, 0, expires_at_ms, '', ''::bytea, TRUE
           FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::text[], $5::int8[])
                AS u(seq, recipient, sender, msg_id, expires_at_ms)",
        &[&seqs, &recipients, &senders, &ids, &expiries],
    )
    .await
    .map_err(pg("restore: insert acknowledged messages"))?;
    Ok(())
}

async fn insert_profiles(
    txn: &tokio_postgres::Transaction<'_>,
    records: &[Record],
) -> Result<(), StoreError> {
    let (mut keys, mut updated, mut blobs) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        if let Record::Profile {
            key,
            updated_ms,
            blob,
        } = r
        {
            keys.push(key.as_slice());
            updated.push(*updated_ms);
            blobs.push(blob.as_slice());
        }
    }
    txn.execute(
        "INSERT INTO profiles (key, updated_ms, profile)
         SELECT * FROM unnest($1::bytea[], $2::int8[], $3::bytea[])",
        &[&keys, &updated, &blobs],
    )
    .await
    .map_err(pg("restore: insert into profiles"))?;
    Ok(())
}

async fn insert_memberships(
    txn: &tokio_postgres::Transaction<'_>,
    records: &[Record],
) -> Result<(), StoreError> {
    let (mut channels, mut members) = (Vec::new(), Vec::new());
    for r in records {
        if let Record::Membership { channel, member } = r {
            channels.push(channel.as_str());
            members.push(member.as_slice());
        }
    }
    txn.execute(
        "INSERT INTO channel_members (channel, member)
         SELECT * FROM unnest($1::text[], $2::bytea[])",
        &[&channels, &members],
    )
    .await
    .map_err(pg("restore: insert into channel_members"))?;
    Ok(())
}

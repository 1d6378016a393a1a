//! The PostgreSQL store, shared by every relay of a cluster.
//!
//! Connections come from a deadpool pool; a connection that broke (server restart,
//! network drop) fails its one operation with a typed error and is replaced on the next
//! checkout. Schema migrations are compiled into the binary and applied at connect in a
//! transaction holding an advisory lock, so relays starting together serialize on it and
//! each migration runs exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::NoTls;

mod snapshot;

use super::{
    validate_channel, validate_message, validate_send, Acceptance, AckKey, Pending, PublicKey,
    PutOutcome, SendRecord, Store, StoreError, StoreStats, StoredMessage,
};

/// Embedded migrations: (version, name, SQL). Append only; never edit a shipped one.
const MIGRATIONS: &[(i32, &str, &str)] = &[(1, "init", include_str!("migrations/0001_init.sql"))];

/// Rows inserted per statement by `put_many`; larger batches use several statements
/// in one transaction.
const PUT_CHUNK: usize = 1000;

/// Rows deleted per statement by `expire`.
const EXPIRE_CHUNK: i64 = 5000;

/// Advisory lock key held while migrating ("dchatmig" as bytes).
const MIGRATION_LOCK: i64 = 0x6463_6861_746d_6967;

/// Connection settings (from `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`, `DB_PASSWORD`).
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Server host name or IP (`DB_HOST`).
    pub host: String,
    /// Server port (`DB_PORT`).
    pub port: u16,
    /// Database name (`DB_NAME`).
    pub dbname: String,
    /// Role to connect as (`DB_USER`).
    pub user: String,
    /// Password (`DB_PASSWORD`); may be empty for trust authentication. Never logged.
    pub password: String,
    /// Pool size: the most connections this relay opens.
    pub max_connections: usize,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// The PostgreSQL store. Cloning shares the pool and the writers.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Queue of single puts for the group-commit writers.
    puts: mpsc::Sender<PutRequest>,
    /// Queue of `accept` calls for their group-commit writers.
    accepts: mpsc::Sender<AcceptRequest>,
    /// The next `sent_ids.attempt` value; starts at a random value so that attempts of
    /// different relays (and restarts) do not meet.
    next_attempt: Arc<AtomicI64>,
}

/// One queued `put` and the channel its caller waits on.
struct PutRequest {
    msg: StoredMessage,
    reply: oneshot::Sender<Result<PutOutcome, StoreError>>,
}

/// One queued `accept` call and the channel its caller waits on.
struct AcceptRequest {
    sends: Vec<SendRecord>,
    /// One `sent_ids.attempt` per send, fixed when the call was queued: a writer that
    /// repeats the insert after losing its connection finds out whether the first one
    /// was committed (the row then carries this attempt).
    attempts: Vec<i64>,
    reply: oneshot::Sender<Result<Vec<Acceptance>, StoreError>>,
}

/// Queued puts before callers wait (backpressure beyond this).
const PUT_QUEUE: usize = 4096;
/// Most put writers (each one statement, hence one commit, in flight at a time).
const MAX_PUT_WRITERS: usize = 4;
/// Queued `accept` calls before callers wait.
const ACCEPT_QUEUE: usize = 4096;
/// Most `accept` writers, as for puts.
const MAX_ACCEPT_WRITERS: usize = 4;
/// Sends (and, separately, copies) one `accept` writer collects into one statement
/// before it stops taking more calls; a single call is never split.
const ACCEPT_CHUNK: usize = 1000;

/// `accept` in one statement, so that recording the (sender, id) of every send and
/// storing the copies of those that won commit together.
///
/// `claimed` inserts the (sender, id) rows. On a conflict the row is returned only if it
/// carries this very attempt (a repeat of an insert whose answer was lost); a row of
/// another attempt is locked and skipped — that send is a duplicate. Rows are inserted
/// in key order, so two statements racing over the same ids wait for each other in one
/// order instead of deadlocking. `stored` inserts the copies of the sends `claimed`
/// returned, in input order (seq order = input order); a copy that is already there
/// (stored by the lost first attempt) is skipped. The result lists the claimed ids
/// (`seq` NULL) and then the stored copies.
const ACCEPT_SQL: &str = "
WITH claimed AS (
    INSERT INTO sent_ids AS s (sender, msg_id, expires_at_ms, attempt)
    SELECT sender, msg_id, expires_at_ms, attempt
      FROM unnest($1::bytea[], $2::text[], $3::int8[], $4::int8[])
           AS c(sender, msg_id, expires_at_ms, attempt)
     ORDER BY sender, msg_id
    ON CONFLICT (sender, msg_id) DO UPDATE SET attempt = s.attempt
       WHERE s.attempt = EXCLUDED.attempt
    RETURNING sender, msg_id
),
stored AS (
    INSERT INTO messages
      (recipient, sender, msg_id, channel, timestamp_ms, expires_at_ms, kind, envelope)
    SELECT u.recipient, u.sender, u.msg_id, u.channel, u.timestamp_ms, u.expires_at_ms,
           u.kind, u.envelope
      FROM unnest($5::bytea[], $6::bytea[], $7::text[], $8::text[], $9::int8[],
                  $10::int8[], $11::text[], $12::bytea[])
           WITH ORDINALITY AS u(recipient, sender, msg_id, channel, timestamp_ms,
                                expires_at_ms, kind, envelope, ord)
      JOIN claimed c ON c.sender = u.sender AND c.msg_id = u.msg_id
     ORDER BY u.ord
    ON CONFLICT ON CONSTRAINT messages_dedup DO NOTHING
    RETURNING seq, recipient, sender, msg_id
)
SELECT NULL::int8 AS seq, sender, msg_id, NULL::bytea AS recipient FROM claimed
UNION ALL
SELECT seq, sender, msg_id, recipient FROM stored";

/// [`ACCEPT_SQL`] for a batch without copies (only live pushes): the same insert of the
/// (sender, id) rows, without the second insert and the union, which cost the server
/// time in every statement even when they have nothing to do.
const ACCEPT_IDS_SQL: &str = "
INSERT INTO sent_ids AS s (sender, msg_id, expires_at_ms, attempt)
SELECT sender, msg_id, expires_at_ms, attempt
  FROM unnest($1::bytea[], $2::text[], $3::int8[], $4::int8[])
       AS c(sender, msg_id, expires_at_ms, attempt)
 ORDER BY sender, msg_id
ON CONFLICT (sender, msg_id) DO UPDATE SET attempt = s.attempt
   WHERE s.attempt = EXCLUDED.attempt
RETURNING NULL::int8 AS seq, sender, msg_id, NULL::bytea AS recipient";

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("pool", &self.pool.status())
            .finish()
    }
}

/// Wraps a driver error with the failing operation.
fn pg(op: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |source| StoreError::Postgres { op, source }
}

/// Converts a u64 sequence to the BIGINT column type; a cursor beyond i64 is past
/// everything the database can hold.
fn seq_to_db(seq: u64) -> Option<i64> {
    i64::try_from(seq).ok()
}

fn seq_from_db(seq: i64, op: &'static str) -> Result<u64, StoreError> {
    u64::try_from(seq).map_err(|_| StoreError::Corrupt {
        table: "messages",
        reason: format!("{op}: negative seq {seq}"),
    })
}

fn key_from_db(bytes: &[u8], table: &'static str, column: &str) -> Result<PublicKey, StoreError> {
    PublicKey::try_from(bytes).map_err(|_| StoreError::Corrupt {
        table,
        reason: format!("{column} is {} bytes, expected 32", bytes.len()),
    })
}

impl PostgresStore {
    /// Connects, verifies the server is reachable, and applies pending migrations.
    ///
    /// Spawns the put writer tasks on the current tokio runtime: call it from the
    /// runtime that will use the store (puts fail with `WriterClosed` once that runtime
    /// is gone).
    pub async fn connect(cfg: &PostgresConfig) -> Result<PostgresStore, StoreError> {
        if cfg.host.is_empty() {
            return Err(StoreError::Config {
                field: "DB_HOST",
                reason: "empty".into(),
            });
        }
        if cfg.dbname.is_empty() {
            return Err(StoreError::Config {
                field: "DB_NAME",
                reason: "empty".into(),
            });
        }
        if cfg.user.is_empty() {
            return Err(StoreError::Config {
                field: "DB_USER",
                reason: "empty".into(),
            });
        }
        if cfg.port == 0 {
            return Err(StoreError::Config {
                field: "DB_PORT",
                reason: "must be 1..=65535".into(),
            });
        }
        if cfg.max_connections == 0 {
            return Err(StoreError::Config {
                field: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        let mut pc = tokio_postgres::Config::new();
        pc.host(&cfg.host)
            .port(cfg.port)
            .dbname(&cfg.dbname)
            .user(&cfg.user)
            .application_name("dchat-relay")
            .connect_timeout(Duration::from_secs(10))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        if !cfg.password.is_empty() {
            pc.password(&cfg.password);
        }
        let mgr = Manager::from_config(
            pc,
            NoTls,
            ManagerConfig {
                // Verified recycling runs a trivial query on checkout, so a connection
                // the server dropped is discarded instead of failing the next statement.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(cfg.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(15)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Config {
                field: "max_connections",
                reason: format!("building the connection pool: {e}"),
            })?;
        let (puts, rx) = mpsc::channel(PUT_QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (accepts, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        let accept_rx = Arc::new(tokio::sync::Mutex::new(accept_rx));
        let mut seed = [0u8; 8];
        // Uniqueness, not secrecy: fall back to the clock if the OS has no randomness.
        if getrandom::fill(&mut seed).is_err() {
            seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                .to_le_bytes();
        }
        let store = PostgresStore {
            pool,
            puts,
            accepts,
            next_attempt: Arc::new(AtomicI64::new(i64::from_le_bytes(seed))),
        };
        store.migrate().await?;
        // Writers stop when the last store handle (and so the last sender) is dropped.
        for _ in 0..cfg.max_connections.clamp(1, MAX_PUT_WRITERS) {
            tokio::spawn(put_writer(store.pool.clone(), rx.clone()));
        }
        for _ in 0..cfg.max_connections.clamp(1, MAX_ACCEPT_WRITERS) {
            tokio::spawn(accept_writer(store.pool.clone(), accept_rx.clone()));
        }
        tracing::info!(host = %cfg.host, port = cfg.port, db = %cfg.dbname, "postgres store connected");
        Ok(store)
    }

    async fn client(&self, op: &'static str) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|source| StoreError::Pool { op, source })
    }

    /// [`Store::accept`] with the given `sent_ids.attempt` per send instead of fresh
    /// ones — what the writer does when it repeats an insert whose answer it lost. For
    /// tests of that path; relays call `accept`.
    #[doc(hidden)]
    pub async fn accept_as(
        &self,
        sends: Vec<SendRecord>,
        attempts: Vec<i64>,
    ) -> Result<Vec<Acceptance>, StoreError> {
        for s in &sends {
            validate_send(s)?;
        }
        if sends.len() != attempts.len() {
            return Err(StoreError::InvalidInput {
                field: "attempts",
                reason: format!("{} attempts for {} sends", attempts.len(), sends.len()),
            });
        }
        if sends.is_empty() {
            return Ok(Vec::new());
        }
        self.queue_accept(sends, attempts).await
    }

    /// Hands validated sends to the `accept` writers and waits for their answer.
    async fn queue_accept(
        &self,
        sends: Vec<SendRecord>,
        attempts: Vec<i64>,
    ) -> Result<Vec<Acceptance>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.accepts
            .send(AcceptRequest {
                sends,
                attempts,
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterClosed { op: "accept" })?;
        rx.await
            .map_err(|_| StoreError::WriterClosed { op: "accept" })?
    }

    /// Applies the embedded migrations not yet recorded, under the advisory lock.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.client("migrate").await?;
        let txn = client.transaction().await.map_err(pg("migrate: begin"))?;
        // Transaction-scoped: released by commit or by the connection dying.
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg("migrate: take advisory lock"))?;
        txn.batch_execute(
            "CREATE TABLE IF NOT EXISTS dchat_schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg("migrate: create dchat_schema_migrations"))?;
        let row = txn
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM dchat_schema_migrations",
                &[],
            )
            .await
            .map_err(pg("migrate: read dchat_schema_migrations"))?;
        let current: i32 = row.try_get(0).map_err(pg("migrate: read version"))?;
        let supported = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
        if current > supported {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported,
            });
        }
        for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            txn.batch_execute(sql)
                .await
                .map_err(|source| StoreError::Migration {
                    version,
                    name,
                    source,
                })?;
            txn.execute(
                "INSERT INTO dchat_schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await
            .map_err(|source| StoreError::Migration {
                version,
                name,
                source,
            })?;
            tracing::info!(version, name, "applied postgres migration");
        }
        txn.commit().await.map_err(pg("migrate: commit"))?;
        Ok(())
    }

    /// Inserts `msgs` with one statement on `client` (inside the caller's transaction,
    /// if any) and reports an outcome per input, in input order.
    ///
    /// The rows are fed through `unnest ... WITH ORDINALITY ORDER BY ord`, so identity
    /// values are drawn in input order (seq order = input order, as with the embedded
    /// store). `ON CONFLICT DO NOTHING` skips rows already stored and later copies of a
    /// key within the batch; `RETURNING` names the rows that were inserted.
    async fn insert_batch(
        client: &impl deadpool_postgres::GenericClient,
        msgs: &[StoredMessage],
        op: &'static str,
    ) -> Result<Vec<PutOutcome>, StoreError> {
        let stmt = client
            .prepare_cached(
                "INSERT INTO messages
                   (recipient, sender, msg_id, channel, timestamp_ms, expires_at_ms, kind, envelope)
                 SELECT recipient, sender, msg_id, channel, timestamp_ms, expires_at_ms, kind, envelope
                   FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::text[], $5::int8[],
                               $6::int8[], $7::text[], $8::bytea[])
                        WITH ORDINALITY AS u(recipient, sender, msg_id, channel, timestamp_ms,
                                             expires_at_ms, kind, envelope, ord)
                  ORDER BY ord
                 ON CONFLICT ON CONSTRAINT messages_dedup DO NOTHING
                 RETURNING seq, recipient, sender, msg_id",
            )
            .await
            .map_err(pg("put: prepare insert into messages"))?;
        let recipients: Vec<&[u8]> = msgs.iter().map(|m| m.recipient.as_slice()).collect();
        let senders: Vec<&[u8]> = msgs.iter().map(|m| m.sender.as_slice()).collect();
        let ids: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
        let channels: Vec<Option<&str>> = msgs.iter().map(|m| m.channel.as_deref()).collect();
        let timestamps: Vec<i64> = msgs.iter().map(|m| m.timestamp_ms).collect();
        let expiries: Vec<i64> = msgs.iter().map(|m| m.expires_at_ms).collect();
        let kinds: Vec<&str> = msgs.iter().map(|m| m.kind.as_str()).collect();
        let envelopes: Vec<&[u8]> = msgs.iter().map(|m| m.envelope.as_slice()).collect();
        let rows = client
            .query(
                &stmt,
                &[
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
            .map_err(pg(op))?;
        let mut inserted: HashMap<(PublicKey, PublicKey, String), u64> =
            HashMap::with_capacity(rows.len());
        for row in &rows {
            let seq = seq_from_db(row.try_get(0).map_err(pg(op))?, op)?;
            let r: &[u8] = row.try_get(1).map_err(pg(op))?;
            let s: &[u8] = row.try_get(2).map_err(pg(op))?;
            let id: String = row.try_get(3).map_err(pg(op))?;
            inserted.insert(
                (
                    key_from_db(r, "messages", "recipient")?,
                    key_from_db(s, "messages", "sender")?,
                    id,
                ),
                seq,
            );
        }
        // The first input with an inserted key got the row; any later copy is a duplicate.
        Ok(msgs
            .iter()
            .map(
                |m| match inserted.remove(&(m.recipient, m.sender, m.id.clone())) {
                    Some(seq) => PutOutcome::Stored { seq },
                    None => PutOutcome::Duplicate,
                },
            )
            .collect())
    }
}

/// Group commit for single puts: takes everything queued (up to [`PUT_CHUNK`]) and
/// stores it with one `insert_batch` statement — one commit, one WAL flush — then
/// answers each caller. Several writers run so that batches overlap; a writer holds the
/// queue only while collecting a batch, not while it is being committed.
async fn put_writer(pool: Pool, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<PutRequest>>>) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < PUT_CHUNK {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            batch
        };
        let (msgs, replies): (Vec<StoredMessage>, Vec<_>) =
            batch.into_iter().map(|r| (r.msg, r.reply)).unzip();
        match put_batch(&pool, &msgs).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // A caller that gave up is not an error: its message is stored anyway.
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(e) if replies.len() == 1 => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
            Err(e) => {
                // Each caller gets its own answer. A batch whose commit outcome is unknown
                // (connection lost) is safe to retry: stored rows come back as Duplicate.
                tracing::warn!(puts = msgs.len(), error = %e, "batched put failed; retrying one by one");
                for (m, reply) in msgs.iter().zip(replies) {
                    let r = put_batch(&pool, std::slice::from_ref(m))
                        .await
                        .and_then(|mut o| {
                            o.pop().ok_or(StoreError::Task {
                                op: "put",
                                reason: "no outcome".into(),
                            })
                        });
                    let _ = reply.send(r);
                }
            }
        }
    }
}

/// One autocommit statement for `msgs` on a pooled connection.
async fn put_batch(pool: &Pool, msgs: &[StoredMessage]) -> Result<Vec<PutOutcome>, StoreError> {
    let client = pool
        .get()
        .await
        .map_err(|source| StoreError::Pool { op: "put", source })?;
    PostgresStore::insert_batch(&client, msgs, "put: insert into messages").await
}

/// Group commit for `accept`: takes the calls queued (up to [`ACCEPT_CHUNK`] sends or
/// copies) and records them with one [`ACCEPT_SQL`] statement — one commit — then
/// answers each caller, as [`put_writer`] does for puts.
///
/// When the statement fails, each call is repeated on its own with the same attempts,
/// so one call cannot fail the others, and a call whose outcome the failure left open
/// (the connection broke after the statement was sent) learns it: rows it did commit
/// come back as its own. Only if the repeat fails too does the caller get an error,
/// [`StoreError::OutcomeUnknown`] when the first failure left the outcome open.
async fn accept_writer(pool: Pool, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<AcceptRequest>>>) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut sends = first.sends.len();
            let mut copies: usize = first.sends.iter().map(|s| s.copies.len()).sum();
            let mut batch = vec![first];
            while sends < ACCEPT_CHUNK && copies < ACCEPT_CHUNK {
                match rx.try_recv() {
                    Ok(r) => {
                        sends += r.sends.len();
                        copies += r.sends.iter().map(|s| s.copies.len()).sum::<usize>();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let inputs: Vec<(&SendRecord, i64)> = batch
            .iter()
            .flat_map(|r| r.sends.iter().zip(r.attempts.iter().copied()))
            .collect();
        let result = accept_batch(&pool, &inputs).await;
        drop(inputs);
        match result {
            Ok(mut outcomes) => {
                for r in batch {
                    let rest = outcomes.split_off(r.sends.len().min(outcomes.len()));
                    // A caller that gave up is not an error: its sends are recorded anyway.
                    let _ = r.reply.send(Ok(std::mem::replace(&mut outcomes, rest)));
                }
            }
            Err(e) if batch.len() == 1 && !e.outcome_unknown() => {
                // Nothing was written, and repeating it alone would only fail again
                // (or wait for the pool once more).
                if let Some(r) = batch.into_iter().next() {
                    let _ = r.reply.send(Err(e));
                }
            }
            Err(e) => {
                let first_unknown = e.outcome_unknown();
                tracing::warn!(calls = batch.len(), error = %e, "accept failed; repeating each call alone");
                for r in batch {
                    let inputs: Vec<(&SendRecord, i64)> =
                        r.sends.iter().zip(r.attempts.iter().copied()).collect();
                    let result = match accept_batch(&pool, &inputs).await {
                        Ok(o) => Ok(o),
                        Err(again) if first_unknown && !again.outcome_unknown() => {
                            Err(StoreError::OutcomeUnknown {
                                op: "accept: insert into sent_ids",
                                reason: format!("{e}; repeating it: {again}"),
                            })
                        }
                        Err(again) => Err(again),
                    };
                    drop(inputs);
                    let _ = r.reply.send(result);
                }
            }
        }
    }
}

/// Runs [`ACCEPT_SQL`] for `inputs` (send, attempt) on a pooled connection and maps the
/// rows back to one [`Acceptance`] per input, in input order.
async fn accept_batch(
    pool: &Pool,
    inputs: &[(&SendRecord, i64)],
) -> Result<Vec<Acceptance>, StoreError> {
    let op = "accept: insert into sent_ids and messages";
    // Of inputs with the same (sender, id) only the first goes to the database (an
    // upsert may not touch one row twice in a statement); the others are duplicates of
    // it, whichever way the database decides it.
    let mut seen: HashSet<(&PublicKey, &str)> = HashSet::with_capacity(inputs.len());
    let first: Vec<bool> = inputs
        .iter()
        .map(|(s, _)| seen.insert((&s.sender, s.id.as_str())))
        .collect();
    let claims = || {
        inputs
            .iter()
            .zip(&first)
            .filter(|(_, f)| **f)
            .map(|(i, _)| i)
    };
    let c_senders: Vec<&[u8]> = claims().map(|(s, _)| s.sender.as_slice()).collect();
    let c_ids: Vec<&str> = claims().map(|(s, _)| s.id.as_str()).collect();
    let c_expiries: Vec<i64> = claims().map(|(s, _)| s.expires_at_ms).collect();
    let c_attempts: Vec<i64> = claims().map(|(_, a)| *a).collect();
    let copies = || claims().flat_map(|(s, _)| s.copies.iter());
    let recipients: Vec<&[u8]> = copies().map(|m| m.recipient.as_slice()).collect();
    let senders: Vec<&[u8]> = copies().map(|m| m.sender.as_slice()).collect();
    let ids: Vec<&str> = copies().map(|m| m.id.as_str()).collect();
    let channels: Vec<Option<&str>> = copies().map(|m| m.channel.as_deref()).collect();
    let timestamps: Vec<i64> = copies().map(|m| m.timestamp_ms).collect();
    let expiries: Vec<i64> = copies().map(|m| m.expires_at_ms).collect();
    let kinds: Vec<&str> = copies().map(|m| m.kind.as_str()).collect();
    let envelopes: Vec<&[u8]> = copies().map(|m| m.envelope.as_slice()).collect();

    let client = pool.get().await.map_err(|source| StoreError::Pool {
        op: "accept",
        source,
    })?;
    let rows = if recipients.is_empty() {
        let stmt = client
            .prepare_cached(ACCEPT_IDS_SQL)
            .await
            .map_err(pg("accept: prepare insert into sent_ids"))?;
        client
            .query(&stmt, &[&c_senders, &c_ids, &c_expiries, &c_attempts])
            .await
            .map_err(pg("accept: insert into sent_ids"))?
    } else {
        let stmt = client
            .prepare_cached(ACCEPT_SQL)
            .await
            .map_err(pg("accept: prepare insert into sent_ids and messages"))?;
        client
            .query(
                &stmt,
                &[
                    &c_senders,
                    &c_ids,
                    &c_expiries,
                    &c_attempts,
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
            .map_err(pg(op))?
    };
    let mut won: HashSet<(PublicKey, String)> = HashSet::with_capacity(c_ids.len());
    let mut stored: HashMap<(PublicKey, PublicKey, String), u64> = HashMap::new();
    for row in &rows {
        let seq: Option<i64> = row.try_get(0).map_err(pg(op))?;
        let sender: &[u8] = row.try_get(1).map_err(pg(op))?;
        let sender = key_from_db(sender, "sent_ids", "sender")?;
        let id: String = row.try_get(2).map_err(pg(op))?;
        match seq {
            None => {
                won.insert((sender, id));
            }
            Some(seq) => {
                let recipient: &[u8] = row.try_get(3).map_err(pg(op))?;
                let recipient = key_from_db(recipient, "messages", "recipient")?;
                stored.insert((recipient, sender, id), seq_from_db(seq, op)?);
            }
        }
    }
    Ok(inputs
        .iter()
        .zip(first)
        .map(|((s, _), first)| {
            if !first || !won.contains(&(s.sender, s.id.clone())) {
                return Acceptance::Duplicate;
            }
            Acceptance::Accepted(
                s.copies
                    .iter()
                    .map(
                        |m| match stored.remove(&(m.recipient, m.sender, m.id.clone())) {
                            Some(seq) => PutOutcome::Stored { seq },
                            None => PutOutcome::Duplicate,
                        },
                    )
                    .collect(),
            )
        })
        .collect())
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn put(&self, msg: StoredMessage) -> Result<PutOutcome, StoreError> {
        validate_message(&msg)?;
        let (reply, rx) = oneshot::channel();
        self.puts
            .send(PutRequest { msg, reply })
            .await
            .map_err(|_| StoreError::WriterClosed { op: "put" })?;
        rx.await
            .map_err(|_| StoreError::WriterClosed { op: "put" })?
    }

    async fn put_many(&self, msgs: Vec<StoredMessage>) -> Result<Vec<PutOutcome>, StoreError> {
        for m in &msgs {
            validate_message(m)?;
        }
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let mut client = self.client("put_many").await?;
        if msgs.len() <= PUT_CHUNK {
            // One statement is atomic on its own.
            return Self::insert_batch(&client, &msgs, "put_many: insert into messages").await;
        }
        let txn = client.transaction().await.map_err(pg("put_many: begin"))?;
        let mut out = Vec::with_capacity(msgs.len());
        for chunk in msgs.chunks(PUT_CHUNK) {
            out.extend(Self::insert_batch(&txn, chunk, "put_many: insert into messages").await?);
        }
        txn.commit().await.map_err(pg("put_many: commit"))?;
        Ok(out)
    }

    async fn pending(
        &self,
        recipient: &PublicKey,
        after_seq: u64,
        limit: usize,
        now_ms: i64,
    ) -> Result<Vec<Pending>, StoreError> {
        let Some(after) = seq_to_db(after_seq) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client("pending").await?;
        let stmt = client
            .prepare_cached(
                "SELECT seq, sender, msg_id, channel, timestamp_ms, expires_at_ms, kind, envelope
                   FROM messages
                  WHERE recipient = $1 AND NOT acked AND seq > $2 AND expires_at_ms > $3
                  ORDER BY seq
                  LIMIT $4",
            )
            .await
            .map_err(pg("pending: prepare select from messages"))?;
        let rows = client
            .query(&stmt, &[&recipient.as_slice(), &after, &now_ms, &limit])
            .await
            .map_err(pg("pending: select from messages"))?;
        let op = "pending: decode messages row";
        rows.iter()
            .map(|row| {
                let sender: &[u8] = row.try_get(1).map_err(pg(op))?;
                Ok(Pending {
                    seq: seq_from_db(row.try_get(0).map_err(pg(op))?, op)?,
                    message: StoredMessage {
                        recipient: *recipient,
                        sender: key_from_db(sender, "messages", "sender")?,
                        id: row.try_get(2).map_err(pg(op))?,
                        channel: row.try_get(3).map_err(pg(op))?,
                        timestamp_ms: row.try_get(4).map_err(pg(op))?,
                        expires_at_ms: row.try_get(5).map_err(pg(op))?,
                        kind: row.try_get(6).map_err(pg(op))?,
                        envelope: row.try_get(7).map_err(pg(op))?,
                    },
                })
            })
            .collect()
    }

    async fn ack(&self, recipient: &PublicKey, keys: Vec<AckKey>) -> Result<u64, StoreError> {
        // An id validation refuses (NUL, which PostgreSQL TEXT cannot even carry; empty;
        // too long) cannot have been stored: such keys match nothing, as in the embedded
        // store. Reads are not quoted back: with several relays on one database, another
        // one may have acknowledged or expired the message since.
        let keys = super::ackable(keys);
        let keys: Vec<&AckKey> = keys.iter().collect();
        if keys.is_empty() {
            return Ok(0);
        }
        let senders: Vec<&[u8]> = keys.iter().map(|k| k.sender.as_slice()).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        let client = self.client("ack").await?;
        // The row stays (envelope dropped) until expiry so a late retry is a duplicate.
        let stmt = client
            .prepare_cached(
                "UPDATE messages m SET acked = TRUE, envelope = ''::bytea
                   FROM unnest($2::bytea[], $3::text[]) AS k(sender, msg_id)
                  WHERE m.recipient = $1 AND m.sender = k.sender AND m.msg_id = k.msg_id
                    AND NOT m.acked",
            )
            .await
            .map_err(pg("ack: prepare update messages"))?;
        client
            .execute(&stmt, &[&recipient.as_slice(), &senders, &ids])
            .await
            .map_err(pg("ack: update messages"))
    }

    async fn expire(&self, now_ms: i64) -> Result<u64, StoreError> {
        let client = self.client("expire").await?;
        // In chunks (via the expiry index) so a large backlog is never one long
        // transaction holding locks that concurrent puts and acks wait on.
        let stmt = client
            .prepare_cached(
                "WITH d AS (
                   DELETE FROM messages WHERE seq IN (
                     SELECT seq FROM messages WHERE expires_at_ms <= $1 LIMIT $2)
                   RETURNING acked)
                 SELECT count(*), count(*) FILTER (WHERE NOT acked) FROM d",
            )
            .await
            .map_err(pg("expire: prepare delete from messages"))?;
        let chunk = EXPIRE_CHUNK;
        let mut total = 0u64;
        loop {
            let row = client
                .query_one(&stmt, &[&now_ms, &chunk])
                .await
                .map_err(pg("expire: delete from messages"))?;
            let deleted: i64 = row.try_get(0).map_err(pg("expire: read count"))?;
            let pending: i64 = row.try_get(1).map_err(pg("expire: read count"))?;
            total += pending.max(0) as u64;
            if deleted < chunk {
                break;
            }
        }
        // Records of sends go at the message's expiry too: until then a repeat of the
        // (sender, id) is a duplicate, afterwards the id may be used again.
        let stmt = client
            .prepare_cached(
                "DELETE FROM sent_ids WHERE (sender, msg_id) IN (
                   SELECT sender, msg_id FROM sent_ids WHERE expires_at_ms <= $1 LIMIT $2)",
            )
            .await
            .map_err(pg("expire: prepare delete from sent_ids"))?;
        loop {
            let deleted = client
                .execute(&stmt, &[&now_ms, &chunk])
                .await
                .map_err(pg("expire: delete from sent_ids"))?;
            if deleted < chunk as u64 {
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
        let client = self.client("put_profile").await?;
        let n = client
            .execute(
                "INSERT INTO profiles (key, profile, updated_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO UPDATE
                   SET profile = EXCLUDED.profile, updated_ms = EXCLUDED.updated_ms
                   WHERE profiles.updated_ms < EXCLUDED.updated_ms",
                &[&key.as_slice(), &profile, &updated_ms],
            )
            .await
            .map_err(pg("put_profile: upsert profiles"))?;
        Ok(n == 1)
    }

    async fn get_profile(&self, key: &PublicKey) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client("get_profile").await?;
        let row = client
            .query_opt(
                "SELECT profile FROM profiles WHERE key = $1",
                &[&key.as_slice()],
            )
            .await
            .map_err(pg("get_profile: select from profiles"))?;
        row.map(|r| r.try_get(0).map_err(pg("get_profile: decode profile")))
            .transpose()
    }

    async fn join_channel(&self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
        validate_channel(channel)?;
        let client = self.client("join_channel").await?;
        client
            .execute(
                "INSERT INTO channel_members (channel, member) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&channel, &member.as_slice()],
            )
            .await
            .map_err(pg("join_channel: insert into channel_members"))?;
        Ok(())
    }

    async fn leave_channel(&self, channel: &str, member: &PublicKey) -> Result<(), StoreError> {
        validate_channel(channel)?;
        let client = self.client("leave_channel").await?;
        client
            .execute(
                "DELETE FROM channel_members WHERE channel = $1 AND member = $2",
                &[&channel, &member.as_slice()],
            )
            .await
            .map_err(pg("leave_channel: delete from channel_members"))?;
        Ok(())
    }

    async fn channel_members(&self, channel: &str) -> Result<Vec<PublicKey>, StoreError> {
        validate_channel(channel)?;
        let client = self.client("channel_members").await?;
        let rows = client
            .query(
                "SELECT member FROM channel_members WHERE channel = $1 ORDER BY member",
                &[&channel],
            )
            .await
            .map_err(pg("channel_members: select from channel_members"))?;
        rows.iter()
            .map(|r| {
                let m: &[u8] = r.try_get(0).map_err(pg("channel_members: decode member"))?;
                key_from_db(m, "channel_members", "member")
            })
            .collect()
    }

    async fn check(&self) -> Result<(), StoreError> {
        let client = self.client("check").await?;
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(pg("check: query server state"))?;
        let read_only: bool = row.try_get(0).map_err(pg("check: decode"))?;
        if read_only {
            return Err(StoreError::Config {
                field: "DB_HOST",
                reason: "the server is a read-only standby (in recovery)".into(),
            });
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every write is committed before its call returns; nothing is buffered here.
        Ok(())
    }

    fn records_sends(&self) -> bool {
        true
    }

    async fn accept(&self, sends: Vec<SendRecord>) -> Result<Vec<Acceptance>, StoreError> {
        for s in &sends {
            validate_send(s)?;
        }
        if sends.is_empty() {
            return Ok(Vec::new());
        }
        let attempts = sends
            .iter()
            .map(|_| self.next_attempt.fetch_add(1, Ordering::Relaxed))
            .collect();
        self.queue_accept(sends, attempts).await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let client = self.client("stats").await?;

        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM messages WHERE NOT acked),
                        (SELECT count(*) FROM profiles),
                        (SELECT count(DISTINCT channel) FROM channel_members)",
                &[],
            )
            .await
            .map_err(pg("stats: count rows"))?;
        let get = |i: usize| -> Result<u64, StoreError> {
            let n: i64 = row.try_get(i).map_err(pg("stats: decode count"))?;
            Ok(n.max(0) as u64)
        };
        Ok(StoreStats {
            pending_messages: get(0)?,
            profiles: get(1)?,
            channels: get(2)?,
        })
    }
}

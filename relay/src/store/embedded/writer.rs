//! The writer thread: every write is queued to it, it applies whatever has queued up
//! as one batch, commits that durably once (group commit) and only then answers each
//! caller. Restore and merge take the same lock ([`Engine`]), so there is one write path.

use std::sync::{Mutex, MutexGuard};

use fjall::PersistMode;
use tokio::sync::{mpsc, oneshot};

use super::batch::Writer;
use super::tables::{Counters, Ctx, Tables};
use crate::store::{AckKey, PublicKey, PutOutcome, StoreError, StoredMessage};

/// Upper bound on messages applied in one batch, to bound commit latency.
const MAX_BATCH_MESSAGES: usize = 8192;

/// What the writer thread and restore/merge share: the tables and the committed
/// counters. Holding the lock is holding the (single) write path.
pub(super) struct Engine {
    pub(super) tables: Tables,
    pub(super) counters: Counters,
}

/// The engine lock. A panic while it was held (a bug) leaves the committed state
/// intact, but the in-memory counters may be off: refuse rather than guess.
pub(super) fn lock<'a>(
    engine: &'a Mutex<Engine>,
    op: &'static str,
) -> Result<MutexGuard<'a, Engine>, StoreError> {
    engine.lock().map_err(|_| StoreError::Task {
        op,
        reason: "the embedded store writer panicked earlier".into(),
    })
}

/// One queued write and the channel its caller waits on.
pub(super) enum WriteOp {
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
pub(super) enum Answer {
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

/// The writer thread: batch everything queued, make it durable once, answer everyone.
pub(super) fn writer_loop(engine: &Mutex<Engine>, mut rx: mpsc::Receiver<WriteOp>) {
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

//! Deliveries to a session's client: the in-flight window (what was written and not yet
//! acknowledged), live pushes from the session's queue, the pump that reads stored
//! messages, acknowledgements, and storing what is still in flight when the session ends.

use std::collections::hash_map::Entry;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{info, warn};

use super::connection::{now_ms, Conn, End};
use super::router::{is_new, Message};
use super::session::Session;
use crate::protocol::frame::MAX_ACK_BATCH;
use crate::protocol::{encode_deliver, AckRef, ErrorCode, KeyHex, ServerFrame};
use crate::store::{AckKey, ReadAs};

/// Live pushes written per wake-up before flushing the socket.
const PUSH_BATCH: usize = 64;
/// Page size when reading stored messages.
const PAGE: usize = 128;
/// Catch-up reads per pump before a session that could not go live waits for the
/// wake-up of the store that overlapped its read.
const GO_LIVE_ATTEMPTS: usize = 4;

/// Where a delivery in flight came from (decides what an ack removes).
pub(super) enum Origin {
    /// Pushed live: held only in memory; re-stored if the connection ends unacked.
    Live(Arc<Message>),
    /// Read from storage (as this); an ack deletes it there.
    Stored(ReadAs),
}

impl Session {
    /// Whether storage can hold nothing for this session that is not in flight here:
    /// its last read reached the end, and it has been live since, so every message for
    /// it has been pushed — a store for it would have taken it off live pushes
    /// ([`SessionHandle::fall_behind_for_store`](super::router::SessionHandle::fall_behind_for_store)) or woken it. Only where seqs are
    /// assigned in commit order (one writer, this process; a shared database has
    /// writers this relay does not see) and no snapshot was loaded since. Spares a
    /// caught-up session's `fetch` (a reconnect drain ends with one) a storage read.
    pub(super) fn nothing_stored_unseen(&self, c: &Conn) -> bool {
        c.shared.seqs_in_commit_order()
            && self.floor_generation == c.shared.store_generation.load(Ordering::Acquire)
            && self
                .read_to_end
                .is_some_and(|mark| self.handle.caught_up_since(mark))
    }
    /// Whether the in-flight window has room for another delivery.
    pub(super) fn window_open(&self, c: &Conn) -> bool {
        self.inflight.len() < c.shared.cfg.max_inflight
    }
    /// Writes a batch of live pushes (as many as are queued, up to [`PUSH_BATCH`], while
    /// the in-flight window has room) for the caller to flush once.
    pub(super) async fn push_batch(
        &mut self,
        c: &mut Conn,
        first: Arc<Message>,
    ) -> Result<(), End> {
        self.push_one(c, first).await?;
        for _ in 1..PUSH_BATCH {
            if !self.window_open(c) {
                break;
            }
            match self.rx.try_recv() {
                Ok(msg) => self.push_one(c, msg).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }
    /// Writes one live push taken from the queue.
    ///
    /// A queued push is always delivered live, also when this session has fallen
    /// behind since it was queued: it was accepted before anything stored for this
    /// session afterwards, and storing it now would give it a later seq than those —
    /// a later message of the same sender would overtake it. When the push fills the
    /// in-flight window the session falls behind: a client that stopped acknowledging
    /// is behind, and its senders store what comes next instead of waiting for it;
    /// what is already queued stays there until acknowledgements make room.
    async fn push_one(&mut self, c: &mut Conn, msg: Arc<Message>) -> Result<(), End> {
        c.shared.metrics.outbound_queue_depth.dec();
        // One lookup for both the duplicate check and the insert.
        let slot = match self.inflight.entry((msg.sender, msg.id.clone())) {
            // Already delivered and awaiting its ack on this connection: a second
            // copy (in memory or in storage) would only be a duplicate.
            Entry::Occupied(_) => {
                c.shared.metrics.duplicates.inc();
                return Ok(());
            }
            Entry::Vacant(slot) => slot,
        };
        let (frame, received, kind) = (msg.frame.clone(), msg.received, msg.kind);
        // In flight before it is written: if the write fails, the end of the connection
        // stores it again like any unacknowledged push.
        slot.insert(Origin::Live(msg));
        c.shared.metrics.inflight.inc();
        c.feed(frame).await?;
        c.shared
            .metrics
            .delivery_latency
            .observe(received.elapsed().as_secs_f64());
        c.shared.metrics.delivered_kind(kind).inc();
        if !self.window_open(c) {
            self.handle.fall_behind();
        }
        Ok(())
    }
    /// Delivers stored messages not already in flight, oldest first, up to the in-flight
    /// window (and `limit`). Returns (delivered, more pending).
    pub(super) async fn pump(
        &mut self,
        c: &mut Conn,
        limit: Option<u32>,
    ) -> Result<(u32, bool), End> {
        let max = c.shared.cfg.max_inflight;
        let generation = c.shared.store_generation.load(Ordering::Acquire);
        if !c.shared.seqs_in_commit_order() || generation != self.floor_generation {
            self.stored_floor = 0;
            self.floor_generation = generation;
        }
        // Pushes still queued were accepted before anything stored since this session
        // fell behind: they go first, and nothing stored goes out while any is left.
        while self.window_open(c) {
            match self.rx.try_recv() {
                Ok(msg) => self.push_one(c, msg).await?,
                Err(_) => break,
            }
        }
        if !self.rx.is_empty() {
            return Ok((0, true));
        }
        let mut count = 0u32;
        let mut more = false;
        // Going live needs a read that no store for this session overlapped (see
        // `SessionHandle::go_live`); under load one often does, so read again (only
        // what is new, on the embedded store) a few times before waiting for a wake-up.
        for _ in 0..GO_LIVE_ATTEMPTS {
            let mark = self.handle.catch_up_mark();
            let mut after = self.stored_floor;
            // The floor moves up over messages that are in flight as stored copies or
            // delivered now, and stops at the first one that stays behind (a stored copy
            // of a live push still unacknowledged here, delivered once that is
            // acknowledged).
            let mut raise_floor = c.shared.seqs_in_commit_order();
            'pages: loop {
                let page = match c.shared.pending(&self.key, after, PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(error = %e, "reading pending messages failed");
                        return Err(End::Close(
                            ErrorCode::StorageUnavailable,
                            "storage unavailable".into(),
                        ));
                    }
                };
                let full = page.len() == PAGE;
                for mut p in page {
                    after = p.seq;
                    let read = p.read_as();
                    // The id moves into the key: the page is consumed here.
                    let k = (KeyHex(p.message.sender), std::mem::take(&mut p.message.id));
                    if let Some(origin) = self.inflight.get(&k) {
                        match origin {
                            Origin::Stored(_) if raise_floor => self.stored_floor = p.seq,
                            Origin::Stored(_) => {}
                            Origin::Live(_) => raise_floor = false,
                        }
                        continue;
                    }
                    if self.inflight.len() >= max || limit.is_some_and(|l| count >= l) {
                        more = true;
                        break 'pages;
                    }
                    let Ok(env) = std::str::from_utf8(&p.message.envelope) else {
                        warn!(seq = p.seq, "stored envelope is not UTF-8; skipping");
                        continue;
                    };
                    c.feed(encode_deliver(Some(p.seq), env)).await?;
                    let age_ms = now_ms().saturating_sub(p.message.timestamp_ms).max(0);
                    c.shared
                        .metrics
                        .delivery_latency
                        .observe(age_ms as f64 / 1000.0);
                    let kind = crate::protocol::Kind::ALL
                        .into_iter()
                        .find(|k| k.as_str() == p.message.kind)
                        .unwrap_or(crate::protocol::Kind::Text);
                    c.shared.metrics.delivered_kind(kind).inc();
                    c.shared.metrics.inflight.inc();
                    self.inflight.insert(k, Origin::Stored(read));
                    if raise_floor {
                        self.stored_floor = p.seq;
                    }
                    count += 1;
                }
                if !full {
                    break;
                }
            }
            // Not when a stored copy of a live push still in flight was passed: it is
            // delivered once that push is acknowledged, by the next read.
            self.read_to_end = (!more && raise_floor).then_some(mark);
            // Go live before flushing: once the client has read these frames (or the
            // welcome buffered ahead of them), new messages must be pushed, not stored.
            if more || limit.is_some() || self.handle.go_live(mark) {
                break;
            }
        }
        Ok((count, more))
    }
    /// Forgets acknowledged messages (live ones from the in-flight window, stored ones
    /// from the store) and answers `acked`, unless the client asked for a `quiet` ack:
    /// then only a failure is answered (with an `error` frame).
    pub(super) async fn ack(
        &mut self,
        c: &mut Conn,
        refs: Vec<AckRef>,
        quiet: bool,
    ) -> Result<(), End> {
        if refs.len() > MAX_ACK_BATCH {
            return c
                .error_frame(
                    ErrorCode::BadFrame,
                    format!("at most {MAX_ACK_BATCH} messages per ack"),
                    Some("ack".into()),
                    quiet,
                )
                .await;
        }
        let mut live = 0u64;
        let mut keys = Vec::with_capacity(refs.len());
        // The store may trust a quoted read only if no other session of this key can
        // acknowledge the same message: not after this one was replaced, nor when the
        // one before it did not hand over in time.
        let quote_reads = self.sole_reader && !self.handle.kicked.is_cancelled();
        for r in refs {
            let k = (r.from, r.id);
            match self.inflight.remove(&k) {
                Some(Origin::Live(_)) => {
                    c.shared.metrics.inflight.dec();
                    live += 1;
                }
                Some(Origin::Stored(read)) => {
                    c.shared.metrics.inflight.dec();
                    keys.push(AckKey {
                        sender: k.0 .0,
                        id: k.1,
                        read_as: quote_reads.then_some(read),
                    });
                }
                // Delivered on an earlier connection: it can only be in storage.
                None => keys.push(AckKey::new(k.0 .0, k.1)),
            }
        }
        let mut removed = live;
        if !keys.is_empty() {
            c.flush_pending().await?;
            match c
                .shared
                .timed("ack", c.shared.store.ack(&self.key.0, keys))
                .await
            {
                Ok(n) => removed += n,
                Err(e) => {
                    warn!(error = %e, "ack failed");
                    // These are out of the in-flight window but still stored: the next
                    // pump must find them again.
                    self.stored_floor = 0;
                    self.read_to_end = None;
                    return c
                        .error_frame(
                            ErrorCode::StorageUnavailable,
                            "ack not recorded; retry",
                            Some("ack".into()),
                            quiet,
                        )
                        .await;
                }
            }
        }
        c.shared.metrics.acked.inc_by(removed);
        if !quiet {
            c.send_frame(ServerFrame::Acked { removed }).await?;
        }
        if !self.handle.is_live() && self.inflight.len() <= c.shared.cfg.max_inflight / 2 {
            self.pump(c, None).await?;
        }
        Ok(())
    }
    /// On disconnect: live messages that were pushed but not acknowledged (or still
    /// queued) go to storage, so the recipient gets them on its next connection.
    pub(super) async fn rehome(&mut self, c: &mut Conn) {
        let expires = now_ms().saturating_add(c.shared.cfg.message_ttl.as_millis() as i64);
        let mut msgs = Vec::new();
        for (_, origin) in self.inflight.drain() {
            c.shared.metrics.inflight.dec();
            if let Origin::Live(m) = origin {
                msgs.push(m.to_stored(self.key, expires));
            }
        }
        self.rx.close();
        // `recv` on the closed queue ends only once it is empty and no sender holds
        // room in it: a sender that reserved room before the close (while the shared
        // store records its send, see `Session::send_recorded`) pushes into it
        // afterwards, and that message must be stored here, not dropped with the queue.
        // Room is held only for the time of one store call. On a single relay nobody
        // holds room across a wait, so this ends as soon as the queue is empty.
        while let Some(m) = self.rx.recv().await {
            c.shared.metrics.outbound_queue_depth.dec();
            msgs.push(m.to_stored(self.key, expires));
        }
        if msgs.is_empty() {
            return;
        }
        let n = msgs.len();
        match c.shared.put_many(msgs).await {
            Ok(outcomes) => {
                info!(
                    count = n,
                    "stored unacknowledged live messages of a closed session"
                );
                if outcomes.iter().any(is_new) {
                    // A newer session of the same key may already be live (here or on
                    // another relay) and must pick these up now, not at its next wake.
                    c.shared.wake_local(&self.key);
                    c.shared.cluster.wake(self.key);
                }
            }
            Err(e) => warn!(error = %e, count = n, "could not store unacknowledged live messages"),
        }
    }
}

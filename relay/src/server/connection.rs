//! One client connection: challenge/response authentication, then the session loop
//! that handles requests, pushes live messages and drains stored ones.

use std::collections::hash_map::Entry;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures::{FutureExt, SinkExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, info, warn};

use super::limits::TokenBucket;
use super::router::{
    is_new, recent_key, FastMap, Message, Offer, RecentKey, Reserve, Reserved, Seen, SessionHandle,
    StoreTicket,
};
use super::Shared;
use crate::metrics::ReasonLabel;
use crate::protocol::frame::{
    valid_channel, FEATURE_QUIET_ACK, MAX_ACK_BATCH, MAX_FETCH_LIMIT, MAX_PROFILE_BYTES,
};
use crate::protocol::{
    auth_message, decode_client_frame, encode_deliver, profile_message, verify_signature, AckRef,
    Base64Bytes, ClientFrame, Envelope, ErrorCode, KeyHex, Limits, ProfileDoc, SendStatus,
    ServerFrame, SigHex, PROTOCOL_VERSION,
};
use crate::store::{Acceptance, AckKey, PutOutcome, ReadAs, SendRecord, StoreError};

/// Consecutive refused frames after which a flooding client is disconnected.
const MAX_STRIKES: u32 = 64;
/// Live pushes written per wake-up before flushing the socket.
const PUSH_BATCH: usize = 64;
/// Further ready events (inbound frames, batches of pushes) handled after the one that
/// woke the session, before the single flush of everything they wrote.
const READY_BURST: usize = 32;
/// Direct sends to offline recipients stored in one durable batch at most (see
/// [`Session::store_batch`]).
const STORE_BATCH: usize = 64;
/// Page size when reading stored messages.
const PAGE: usize = 128;
/// How long a new session of a key waits for the previous one to hand over.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);
/// Catch-up reads per pump before a session that could not go live waits for the
/// wake-up of the store that overlapped its read.
const GO_LIVE_ATTEMPTS: usize = 4;
/// Frames (bytes of text) a session reads ahead and holds while a send waits for room
/// in a recipient's queue, so quiet acks queued behind them still get through; at this
/// much it stops reading until the send is done.
const HELD_BYTES: usize = 64 * 1024;

/// Current wall-clock time in ms since the epoch (storage timestamps).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed or the socket failed; no close frame to send.
    Gone,
    /// The relay closes with this code and reason.
    Close(ErrorCode, String),
}

/// Where a delivery in flight came from (decides what an ack removes).
enum Origin {
    /// Pushed live: held only in memory; re-stored if the connection ends unacked.
    Live(Arc<Message>),
    /// Read from storage (as this); an ack deletes it there.
    Stored(ReadAs),
}

/// The stored form of a profile: the signed document exactly as published.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredProfile {
    data: Base64Bytes,
    sig: SigHex,
}

struct Conn {
    shared: Arc<Shared>,
    ws: WebSocket,
    peer: SocketAddr,
    bucket: TokenBucket,
    strikes: u32,
    idle_deadline: Instant,
    /// Frames were buffered in the socket since the last flush.
    unflushed: bool,
}

/// Runs one upgraded WebSocket connection to completion.
pub async fn run(shared: Arc<Shared>, ws: WebSocket, peer: SocketAddr) {
    shared.metrics.connections.inc();
    shared.metrics.connections_total.inc();
    let bucket = TokenBucket::new(shared.cfg.rate_per_sec, shared.cfg.rate_burst);
    let idle_deadline = Instant::now() + shared.cfg.idle_timeout;
    let mut conn = Conn {
        shared: shared.clone(),
        ws,
        peer,
        bucket,
        strikes: 0,
        idle_deadline,
        unflushed: false,
    };
    // The handshake and the close run once per connection: boxed, their state does not
    // add to what every idle connection keeps (see `Session::run`).
    let end = match Box::pin(conn.authenticate()).await {
        Ok(key) => conn.session(key).await,
        Err(end) => end,
    };
    Box::pin(conn.finish(end)).await;
    shared.metrics.connections.dec();
}

impl Conn {
    fn m(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }

    /// Buffers one text frame. Frames reach the socket at the next flush: the session
    /// loop flushes once per wake-up after everything ready has been handled, so
    /// answers and pushes that are due together leave in one write.
    async fn feed(&mut self, text: impl Into<Utf8Bytes>) -> Result<(), End> {
        let text = text.into();
        self.shared.metrics.bytes_out.inc_by(text.len() as u64);
        self.unflushed = true;
        match timeout(
            self.shared.cfg.write_timeout,
            self.ws.feed(WsMessage::Text(text)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(
                ErrorCode::SlowConsumer,
                "client is not reading; disconnected".into(),
            )),
        }
    }

    /// Writes everything buffered, disconnecting a reader that does not take it in time.
    async fn flush(&mut self) -> Result<(), End> {
        match timeout(self.shared.cfg.write_timeout, self.ws.flush()).await {
            Ok(Ok(())) => {
                self.unflushed = false;
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(
                ErrorCode::SlowConsumer,
                "client is not reading; disconnected".into(),
            )),
        }
    }

    /// Flushes if anything is buffered. Called before waiting (for the client or for
    /// storage), so nothing already answered waits behind a slow operation.
    async fn flush_pending(&mut self) -> Result<(), End> {
        if self.unflushed {
            self.flush().await
        } else {
            Ok(())
        }
    }

    async fn send_frame(&mut self, f: ServerFrame) -> Result<(), End> {
        self.feed(f.to_json()).await
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<String>,
    ) -> Result<(), End> {
        self.m().reject(code);
        self.send_frame(ServerFrame::Error {
            code,
            message: message.into(),
            reference,
        })
        .await
    }

    /// What a read from the client's socket gave: a frame (the connection is not idle
    /// then), or how the connection ended.
    fn received(&mut self, m: Option<Result<WsMessage, axum::Error>>) -> Result<WsMessage, End> {
        self.idle_deadline = Instant::now() + self.shared.cfg.idle_timeout;
        match m {
            None => Err(End::Gone),
            Some(Err(e)) => Err(self.classify(e)),
            Some(Ok(msg)) => Ok(msg),
        }
    }

    /// Maps a transport error from the socket to the way the connection ends.
    fn classify(&self, err: axum::Error) -> End {
        let inner = err.into_inner();
        match inner.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            Some(tokio_tungstenite::tungstenite::Error::Capacity(c)) => {
                End::Close(ErrorCode::FrameTooLarge, format!("frame too large: {c}"))
            }
            Some(tokio_tungstenite::tungstenite::Error::Utf8(_)) => End::Close(
                ErrorCode::InvalidUtf8,
                "text frame is not valid UTF-8".into(),
            ),
            Some(tokio_tungstenite::tungstenite::Error::Protocol(p)) => {
                debug!(peer = %self.peer, error = %p, "websocket protocol error");
                End::Close(ErrorCode::BadFrame, "websocket protocol violation".into())
            }
            _ => End::Gone,
        }
    }

    /// Applies the rate limit; Err ends the connection after too many refusals.
    async fn admit(&mut self, frame_type: Option<&str>) -> Result<bool, End> {
        if self.take_token() {
            return Ok(true);
        }
        self.refuse(frame_type).await?;
        Ok(false)
    }

    /// Takes one token of the rate limit; false when the client is over it.
    fn take_token(&mut self) -> bool {
        let ok = self.bucket.take();
        if ok {
            self.strikes = 0;
        }
        ok
    }

    /// Answers a frame refused by the rate limit; Err ends a flooding connection.
    async fn refuse(&mut self, frame_type: Option<&str>) -> Result<(), End> {
        self.strikes += 1;
        if self.strikes >= MAX_STRIKES {
            return Err(End::Close(
                ErrorCode::RateLimited,
                "request flood; disconnected".into(),
            ));
        }
        self.error(
            ErrorCode::RateLimited,
            "rate limit exceeded; slow down",
            frame_type.map(str::to_string),
        )
        .await
    }

    /// Challenge/response. Returns the proven key.
    async fn authenticate(&mut self) -> Result<KeyHex, End> {
        let mut nonce = [0u8; 32];
        if getrandom::fill(&mut nonce).is_err() {
            return Err(End::Close(ErrorCode::Internal, "no randomness".into()));
        }
        let ttl = self.shared.cfg.auth_timeout;
        self.send_frame(ServerFrame::Challenge {
            v: PROTOCOL_VERSION,
            nonce: Base64Bytes(nonce.to_vec()),
            expires_in_ms: ttl.as_millis() as u64,
        })
        .await?;
        let deadline = Instant::now() + ttl;
        let shutdown = self.shared.shutdown.clone();
        loop {
            self.flush_pending().await?;
            let msg = tokio::select! {
                _ = shutdown.cancelled() => {
                    return Err(End::Close(ErrorCode::Draining, DRAIN_REASON.into()));
                }
                _ = sleep_until(deadline) => {
                    self.m().auth_failures.get_or_create(&ReasonLabel { reason: "timeout" }).inc();
                    return Err(End::Close(ErrorCode::ChallengeExpired, "challenge expired before auth".into()));
                }
                m = self.ws.recv() => m,
            };
            let text = match msg {
                None => return Err(End::Gone),
                Some(Err(e)) => return Err(self.classify(e)),
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Binary(_))) => {
                    self.m().bytes_in.inc();
                    if self.admit(None).await? {
                        self.error(ErrorCode::BinaryFrame, "protocol v1 uses text frames", None)
                            .await?;
                    }
                    continue;
                }
                Some(Ok(WsMessage::Close(_))) => return Err(End::Gone),
                Some(Ok(_)) => continue,
            };
            self.m().bytes_in.inc_by(text.len() as u64);
            let frame = match decode_client_frame(text.as_str()) {
                Ok(f) => f,
                Err(e) => {
                    if self.admit(None).await? {
                        self.error(e.code(), e.to_string(), None).await?;
                    }
                    continue;
                }
            };
            if !self.admit(Some(frame.type_name())).await? {
                continue;
            }
            match frame {
                ClientFrame::Auth { key, sig } => {
                    if verify_signature(&key, &auth_message(&nonce), &sig) {
                        return Ok(key);
                    }
                    self.m()
                        .auth_failures
                        .get_or_create(&ReasonLabel {
                            reason: "bad_signature",
                        })
                        .inc();
                    self.error(
                        ErrorCode::AuthFailed,
                        "signature does not verify for this key and challenge",
                        Some("auth".into()),
                    )
                    .await?;
                    // The challenge is single-use: a failed attempt ends the connection.
                    return Err(End::Close(
                        ErrorCode::AuthFailed,
                        "authentication failed".into(),
                    ));
                }
                ClientFrame::Ping { nonce } => self.send_frame(ServerFrame::Pong { nonce }).await?,
                other => {
                    self.error(
                        ErrorCode::NotAuthenticated,
                        "authenticate first (answer the challenge with an auth frame)",
                        Some(other.type_name().into()),
                    )
                    .await?
                }
            }
        }
    }

    /// Sends the close frame (if any), and counts.
    async fn finish(&mut self, end: End) {
        if let End::Close(code, reason) = end {
            self.m().close(code);
            let mut reason = reason;
            // Close reasons are limited to 123 bytes by RFC 6455.
            while reason.len() > 120 {
                reason.pop();
            }
            let frame = CloseFrame {
                code: code.close_code(),
                reason: Utf8Bytes::from(reason),
            };
            let _ = timeout(
                Duration::from_secs(1),
                self.ws.send(WsMessage::Close(Some(frame))),
            )
            .await;
            // Complete the closing handshake: read (and discard) what the client still
            // sends until its close reply. Dropping the socket with unread input would
            // make the kernel send a reset, and the client would never see our reason.
            let _ = timeout(Duration::from_secs(1), async {
                while let Some(Ok(m)) = self.ws.recv().await {
                    if matches!(m, WsMessage::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }

    /// The authenticated session loop.
    async fn session(&mut self, key: KeyHex) -> End {
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel(shared.cfg.outbound_queue);
        let handle = Arc::new(SessionHandle::new(
            shared.next_session.fetch_add(1, Ordering::Relaxed),
            tx,
        ));
        let mut sole_reader = true;
        if let Some(old) = shared.sessions.insert(key, handle.clone()) {
            old.kicked.cancel();
            // Let the old session store its unacknowledged messages first: delivered from
            // storage ahead of anything newer, they keep per-sender order.
            if timeout(HANDOVER_WAIT, old.finished.cancelled())
                .await
                .is_err()
            {
                warn!(key = %key, "previous session did not finish in time; continuing");
                sole_reader = false;
            }
        }
        shared.metrics.sessions.inc();
        debug!(peer = %self.peer, key = %key, "session started");
        let mut s = Session {
            key,
            handle: handle.clone(),
            rx,
            inflight: FastMap::default(),
            batch: Vec::new(),
            stored_floor: 0,
            floor_generation: 0,
            read_to_end: None,
            sole_reader,
            pushed_live: false,
            held: VecDeque::new(),
            held_bytes: 0,
        };
        let end = s.run(self).await;
        // Store unacknowledged messages while still registered, so that a new session
        // of this key (which waits for `finished`) finds them in storage.
        Box::pin(s.rehome(self)).await;
        shared.sessions.remove(&key, handle.id);
        handle.finished.cancel();
        shared.metrics.sessions.dec();
        end
    }
}

/// Close reason sent to every client on drain: it tells them to reconnect.
pub const DRAIN_REASON: &str = "relay draining: reconnect to the service";

struct Session {
    key: KeyHex,
    handle: Arc<SessionHandle>,
    rx: mpsc::Receiver<Arc<Message>>,
    inflight: FastMap<(KeyHex, String), Origin>,
    /// Direct sends read in this wake-up that must be stored, not answered yet: stored
    /// together (one durable write instead of one per message) before the next answer.
    batch: Vec<Deferred>,
    /// Every stored message up to this seq is in flight on this session or gone
    /// (acknowledged, expired), so the pump reads after it instead of from the start
    /// (only where [`Shared::seqs_in_commit_order`]; 0 otherwise).
    stored_floor: u64,
    /// The [`Shared::store_generation`] that `stored_floor` belongs to.
    floor_generation: u64,
    /// The catch-up mark ([`SessionHandle::catch_up_mark`]) of the last read that
    /// reached the end of this session's stored messages, which were then all in flight
    /// here. While the session has stayed live since, a `fetch` has nothing to read.
    read_to_end: Option<u64>,
    /// No other session of this key is still running (the previous one handed over in
    /// time), so acks may quote the reads of this one (see [`Session::ack`]).
    sole_reader: bool,
    /// A send read since the last flush was pushed to a recipient's session on this
    /// relay: the flush of this connection's answers waits until that session has run.
    pushed_live: bool,
    /// Frames read from the client while a send waited for room in a recipient's
    /// queue, handled before anything else is read (see [`Session::push_when_room`]).
    held: VecDeque<WsMessage>,
    /// Bytes of text in `held`.
    held_bytes: usize,
}

/// What [`Session::push_when_room`] woke up for.
enum Room {
    /// A frame from this session's own client.
    Frame(Option<Result<WsMessage, axum::Error>>),
    /// Room in the recipient's queue (`None`: its session has closed the queue).
    Permit(Option<mpsc::OwnedPermit<Arc<Message>>>),
    /// The push wait is over.
    Late,
    /// A push for this session itself (`None`: its queue was closed).
    Own(Option<Arc<Message>>),
}

/// A direct send waiting in [`Session::batch`] to be stored.
struct Deferred {
    msg: Arc<Message>,
    to: KeyHex,
    /// Its entry in the recent-id cache; `None` where the store decides duplicates.
    in_flight: Option<InFlight>,
    /// Keeps a recipient connected here off live pushes until this is stored (its
    /// presence also marks the store as one for a recipient that fell behind).
    ticket: Option<StoreTicket>,
}

impl Session {
    async fn run(&mut self, c: &mut Conn) -> End {
        let welcome = ServerFrame::Welcome {
            key: self.key,
            session: format!("{}-{}", c.shared.instance_id, self.handle.id),
            limits: Limits {
                max_frame_bytes: c.shared.cfg.max_message_bytes,
                rate_per_sec: c.shared.cfg.rate_per_sec,
                burst: c.shared.cfg.rate_burst,
                max_inflight: c.shared.cfg.max_inflight,
                idle_timeout_secs: c.shared.cfg.idle_timeout.as_secs(),
            },
            features: vec![FEATURE_QUIET_ACK.to_string()],
        };
        // Welcome is only buffered here and flushed together with the stored backlog
        // after the pump. So when the client sees `welcome` with nothing pending, this
        // session is already live and a message sent right after is pushed, not stored.
        let welcome = welcome.to_json();
        if let Err(e) = c.feed(welcome).await {
            return e;
        }
        if let Err(e) = Box::pin(self.pump(c, None)).await {
            return e;
        }
        if let Err(e) = c.flush().await {
            return e;
        }
        let shutdown = c.shared.shutdown.clone();
        let kicked = self.handle.kicked.clone();
        let handle = self.handle.clone();
        // The long-lived futures are created once, not per loop iteration: re-creating
        // a timer and two cancellation waiters for every frame is measurable at high
        // message rates. Activity only moves `idle_deadline`; the timer is re-armed when
        // it fires early.
        //
        // What the loop awaits per event (a frame, a batch of pushes, a pump) is boxed:
        // that costs one allocation per event, but this future is what every idle
        // connection keeps in memory, and inline those handlers (with their storage
        // calls) would make it several KiB larger (issue 3, S4: RSS per connection).
        let drained = shutdown.cancelled();
        let replaced = kicked.cancelled();
        let idle = sleep_until(c.idle_deadline);
        let woken = handle.wake.notified();
        tokio::pin!(drained, replaced, idle, woken);
        loop {
            let mut read_frame = false;
            let step = if let Some(msg) = self.take_held() {
                read_frame = true;
                Box::pin(self.inbound(c, msg)).await
            } else {
                tokio::select! {
                    biased;
                    _ = &mut drained => Err(End::Close(ErrorCode::Draining, DRAIN_REASON.into())),
                    _ = &mut replaced => Err(End::Close(ErrorCode::Replaced, "another connection authenticated with this key".into())),
                    _ = &mut idle => {
                        if Instant::now() >= c.idle_deadline {
                            Err(End::Close(ErrorCode::IdleTimeout, "idle timeout".into()))
                        } else {
                            idle.as_mut().reset(c.idle_deadline);
                            Ok(())
                        }
                    }
                    m = c.ws.recv() => {
                        read_frame = true;
                        match c.received(m) {
                            Ok(msg) => Box::pin(self.inbound(c, msg)).await,
                            Err(end) => Err(end),
                        }
                    }
                    // A full in-flight window leaves live pushes in the queue (in order,
                    // ahead of anything stored meanwhile) until acknowledgements make room.
                    Some(first) = self.rx.recv(), if self.window_open(c) => Box::pin(self.push_batch(c, first)).await,
                    _ = &mut woken => {
                        woken.set(handle.wake.notified());
                        Box::pin(self.pump(c, None)).await.map(|_| ())
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
            // Handle what else is ready without waiting, then write it all at once.
            if let Err(end) = self.handle_ready(c, read_frame).await {
                return end;
            }
            if !self.batch.is_empty() {
                if let Err(end) = Box::pin(self.store_batch(c)).await {
                    return end;
                }
            }
            if std::mem::take(&mut self.pushed_live) {
                // The recipient's session was woken by the push and runs next: letting it
                // write the `deliver` before this connection writes `sent` takes one
                // socket write (and the client's handling of `sent`) off the delivery's
                // path.
                tokio::task::yield_now().await;
            }
            if let Err(end) = c.flush_pending().await {
                return end;
            }
        }
    }

    /// Handles up to [`READY_BURST`] inbound frames and push batches that are ready
    /// now (no waiting). Their answers stay buffered for the caller's flush.
    ///
    /// The socket is polled again only while frames keep coming (`reading`): a client
    /// that just sent one frame often sent more (a send and an ack, a burst of sends),
    /// whereas after a push the extra poll would nearly always find nothing and costs
    /// about as much user-space work as a small frame.
    async fn handle_ready(&mut self, c: &mut Conn, mut reading: bool) -> Result<(), End> {
        for _ in 0..READY_BURST {
            // Polling once is cancel-safe: a stream's `next` keeps partial frames in the
            // socket's buffer. Pending here costs no system call when the last read
            // drained the socket (tokio then knows it is not readable).
            let polled = if let Some(msg) = self.take_held() {
                Some(Some(Ok(msg)))
            } else if reading {
                c.ws.recv().now_or_never()
            } else {
                None
            };
            reading = polled.is_some();
            if let Some(m) = polled {
                let msg = c.received(m)?;
                Box::pin(self.inbound(c, msg)).await?;
                continue;
            }
            if !self.window_open(c) {
                break;
            }
            match self.rx.try_recv() {
                Ok(first) => Box::pin(self.push_batch(c, first)).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// The oldest frame held back while a send waited, if any.
    fn take_held(&mut self) -> Option<WsMessage> {
        let msg = self.held.pop_front()?;
        if let WsMessage::Text(t) = &msg {
            self.held_bytes -= t.len();
        }
        Some(msg)
    }

    /// Whether storage can hold nothing for this session that is not in flight here:
    /// its last read reached the end, and it has been live since, so every message for
    /// it has been pushed — a store for it would have taken it off live pushes
    /// ([`SessionHandle::fall_behind_for_store`]) or woken it. Only where seqs are
    /// assigned in commit order (one writer, this process; a shared database has
    /// writers this relay does not see) and no snapshot was loaded since. Spares a
    /// caught-up session's `fetch` (a reconnect drain ends with one) a storage read.
    fn nothing_stored_unseen(&self, c: &Conn) -> bool {
        c.shared.seqs_in_commit_order()
            && self.floor_generation == c.shared.store_generation.load(Ordering::Acquire)
            && self
                .read_to_end
                .is_some_and(|mark| self.handle.caught_up_since(mark))
    }

    /// Whether the in-flight window has room for another delivery.
    fn window_open(&self, c: &Conn) -> bool {
        self.inflight.len() < c.shared.cfg.max_inflight
    }

    /// Writes a batch of live pushes (as many as are queued, up to [`PUSH_BATCH`], while
    /// the in-flight window has room) for the caller to flush once.
    async fn push_batch(&mut self, c: &mut Conn, first: Arc<Message>) -> Result<(), End> {
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
    async fn pump(&mut self, c: &mut Conn, limit: Option<u32>) -> Result<(u32, bool), End> {
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

    async fn inbound(&mut self, c: &mut Conn, msg: WsMessage) -> Result<(), End> {
        let text = match msg {
            WsMessage::Text(t) => t,
            WsMessage::Binary(b) => {
                c.m().bytes_in.inc_by(b.len() as u64);
                self.store_batch(c).await?;
                if c.admit(None).await? {
                    c.error(ErrorCode::BinaryFrame, "protocol v1 uses text frames", None)
                        .await?;
                }
                return Ok(());
            }
            WsMessage::Close(_) => return Err(End::Gone),
            _ => return Ok(()),
        };
        c.m().bytes_in.inc_by(text.len() as u64);
        let frame = match decode_client_frame(text.as_str()) {
            Ok(f) => f,
            Err(e) => {
                self.store_batch(c).await?;
                if c.admit(None).await? {
                    c.error(e.code(), e.to_string(), None).await?;
                }
                return Ok(());
            }
        };
        // Answers go out in request order: whatever is batched is answered first.
        if !matches!(frame, ClientFrame::Send { .. }) {
            self.store_batch(c).await?;
        }
        if !c.take_token() {
            self.store_batch(c).await?;
            return c.refuse(Some(frame.type_name())).await;
        }
        match frame {
            ClientFrame::Auth { .. } => {
                c.error(
                    ErrorCode::AlreadyAuthenticated,
                    "already authenticated",
                    Some("auth".into()),
                )
                .await
            }
            ClientFrame::Ping { nonce } => c.send_frame(ServerFrame::Pong { nonce }).await,
            ClientFrame::Send { envelope } => self.send(c, envelope).await,
            ClientFrame::Join { channel } => self.membership(c, channel, true).await,
            ClientFrame::Leave { channel } => self.membership(c, channel, false).await,
            ClientFrame::Ack { messages, quiet } => self.ack(c, messages, quiet).await,
            ClientFrame::Fetch { limit } => {
                let limit = limit.unwrap_or(100).clamp(1, MAX_FETCH_LIMIT);
                let (count, more) = if self.nothing_stored_unseen(c) {
                    (0, false)
                } else {
                    self.pump(c, Some(limit)).await?
                };
                c.send_frame(ServerFrame::Fetched { count, more }).await
            }
            ClientFrame::ProfilePublish { data, sig } => self.publish_profile(c, data, sig).await,
            ClientFrame::ProfileGet { key } => self.get_profile(c, key).await,
        }
    }

    /// Routes one `send`. A direct message for a recipient that is not connected here
    /// joins [`Session::batch`] and is answered when the batch is stored; every other
    /// outcome first stores and answers the batch, so answers keep request order.
    async fn send(&mut self, c: &mut Conn, mut env: Envelope) -> Result<(), End> {
        let id = env.id.clone();
        if let Err(e) = env.validate() {
            return self
                .refuse_send(c, ErrorCode::InvalidEnvelope, e.to_string(), id)
                .await;
        }
        match env.from {
            Some(f) if f != self.key => {
                return self
                    .refuse_send(
                        c,
                        ErrorCode::SenderMismatch,
                        "envelope.from must be the authenticated key",
                        id,
                    )
                    .await;
            }
            _ => env.from = Some(self.key),
        }
        if c.shared.overload.shedding() {
            // Past saturation every accepted send makes the overload worse (see
            // `overload`); a refused one costs this answer, and the client retries
            // the same id later, which dedup makes safe.
            return self
                .refuse_send(
                    c,
                    ErrorCode::Overloaded,
                    "relay overloaded; retry this send (same id) after a backoff",
                    id,
                )
                .await;
        }
        let kind = env.kind;
        c.shared.metrics.routed_kind(kind).inc();
        if c.shared.sends_recorded {
            return self.send_recorded(c, env).await;
        }
        let recent = recent_key(self.key, &id);
        let mut seen = c.shared.recent.begin(&recent);
        if matches!(seen, Seen::InFlight) && !self.batch.is_empty() {
            // The earlier attempt may be waiting in this connection's own batch.
            self.store_batch(c).await?;
            seen = c.shared.recent.begin(&recent);
        }
        if !matches!(seen, Seen::New) {
            self.store_batch(c).await?;
        }
        match seen {
            Seen::New => {}
            Seen::Settled => {
                c.shared.metrics.duplicates.inc();
                return c.send_frame(duplicate_frame(&id)).await;
            }
            // Acknowledging now could acknowledge a message whose first attempt then
            // fails to store; routing it again could deliver it twice.
            Seen::InFlight => return c
                .error(
                    ErrorCode::StorageUnavailable,
                    "an earlier send with this id is still being stored; retry with the same id",
                    Some(id),
                )
                .await,
        }
        // Forgets the id unless the send succeeds — also when this task is cancelled
        // mid-store (the connection was replaced), so a retry is never stuck in flight.
        let in_flight = Some(InFlight {
            shared: c.shared.clone(),
            recent,
            settled: false,
        });
        let msg = Arc::new(Message::new(&env, self.key));
        if !self.batch.is_empty() && env.to.is_none_or(|to| c.shared.sessions.get(&to).is_some()) {
            // A channel message, or a recipient connected here that could get this one
            // pushed ahead of an earlier message still in the batch.
            self.store_batch(c).await?;
        }
        let result = match (env.to, env.channel.as_deref()) {
            (Some(to), _) => match c.shared.sessions.offer(&to, &msg) {
                Offer::Full(h) => {
                    let (pushed, _, _ticket) =
                        self.push_when_room(c, &msg, vec![(to, h)], None).await?;
                    if pushed == 1 {
                        Ok(delivered_frame(&id))
                    } else {
                        c.flush_pending().await?;
                        let store = c.shared.store_direct(&msg, to);
                        c.shared.overload.measure_store(true, store).await
                    }
                }
                Offer::Pushed => {
                    c.shared.metrics.outbound_queue_depth.inc();
                    self.pushed_live = true;
                    self.store_batch(c).await?;
                    Ok(delivered_frame(&id))
                }
                Offer::Store(ticket) => {
                    self.batch.push(Deferred {
                        msg,
                        to,
                        in_flight,
                        ticket,
                    });
                    if self.batch.len() >= STORE_BATCH {
                        self.store_batch(c).await?;
                    }
                    return Ok(());
                }
            },
            (None, Some(ch)) => match c.shared.channel_fan_out(&msg, ch, false).await {
                Ok(mut fan) => {
                    if !fan.full.is_empty() {
                        let full = std::mem::take(&mut fan.full);
                        let (pushed, behind, tickets) =
                            self.push_when_room(c, &msg, full, None).await?;
                        fan.delivered += pushed;
                        fan.rest.extend(behind);
                        fan.tickets.extend(tickets);
                    }
                    if fan.rest.is_empty() {
                        Ok(fan.sent_frame(&msg, 0))
                    } else {
                        c.flush_pending().await?;
                        c.shared.store_fan_out(&msg, fan).await
                    }
                }
                Err(e) => Err(e),
            },
            (None, None) => Err(RouteError::NotMember),
        };
        answer_send(c, in_flight, &id, result).await
    }

    /// Routes one `send` where the shared store decides duplicates (relays on one
    /// PostgreSQL database): nothing is pushed, stored or answered before the store has
    /// recorded the send's (sender, id) ([`crate::store::Store::accept`]), so that a
    /// repeat through any relay of the cluster is a duplicate — whatever this process
    /// remembers. Room in the queues of live recipients here is reserved first, so
    /// that once the send is recorded its pushes cannot fail; copies for everyone else
    /// are stored in the same commit as the record. Direct sends to recipients that
    /// are not pushed to join [`Session::batch`] as on a single relay.
    async fn send_recorded(&mut self, c: &mut Conn, env: Envelope) -> Result<(), End> {
        let id = env.id.clone();
        let msg = Arc::new(Message::new(&env, self.key));
        if !self.batch.is_empty() && env.to.is_none_or(|to| c.shared.sessions.get(&to).is_some()) {
            // As in `send`: nothing may overtake an earlier message still in the batch.
            self.store_batch(c).await?;
        }
        let result = match (env.to, env.channel.as_deref()) {
            (Some(to), _) => {
                let (room, ticket) = match c.shared.sessions.reserve(&to) {
                    Reserve::Room(room) => (Some(room), None),
                    Reserve::Full(h) => {
                        let mut held = Vec::new();
                        let (_, _, mut tickets) = self
                            .push_when_room(c, &msg, vec![(to, h)], Some(&mut held))
                            .await?;
                        (held.pop(), tickets.pop())
                    }
                    Reserve::Store(ticket) => {
                        self.batch.push(Deferred {
                            msg,
                            to,
                            in_flight: None,
                            ticket,
                        });
                        if self.batch.len() >= STORE_BATCH {
                            self.store_batch(c).await?;
                        }
                        return Ok(());
                    }
                };
                c.flush_pending().await?;
                match room {
                    Some(room) => {
                        let recorded = c.shared.accept_and_push(&msg, vec![room], &[]).await;
                        self.pushed_live |= recorded.pushed() > 0;
                        recorded.direct_answer(&c.shared, &msg, to)
                    }
                    // The queue stayed full: stored for the recipient, which falls behind.
                    None => {
                        let store = c.shared.store_direct(&msg, to);
                        let r = c
                            .shared
                            .overload
                            .measure_store(ticket.is_some(), store)
                            .await;
                        drop(ticket);
                        r
                    }
                }
            }
            (None, Some(ch)) => match c.shared.channel_fan_out(&msg, ch, true).await {
                Ok(mut fan) => {
                    if !fan.full.is_empty() {
                        let full = std::mem::take(&mut fan.full);
                        let (_, behind, tickets) = self
                            .push_when_room(c, &msg, full, Some(&mut fan.held))
                            .await?;
                        fan.rest.extend(behind);
                        fan.tickets.extend(tickets);
                    }
                    c.flush_pending().await?;
                    let held = std::mem::take(&mut fan.held);
                    let accept = c.shared.accept_and_push(&msg, held, &fan.rest);
                    let recorded = c
                        .shared
                        .overload
                        .measure_store(!fan.tickets.is_empty(), accept)
                        .await;
                    self.pushed_live |= recorded.pushed() > 0;
                    recorded.fan_out_answer(&c.shared, &msg, fan)
                }
                Err(e) => Err(e),
            },
            (None, None) => Err(RouteError::NotMember),
        };
        answer_send(c, None, &id, result).await
    }

    /// Answers the send `id` with an error. Sends waiting in the batch are stored and
    /// answered first, so answers keep request order.
    async fn refuse_send(
        &mut self,
        c: &mut Conn,
        code: ErrorCode,
        message: impl Into<String>,
        id: String,
    ) -> Result<(), End> {
        self.store_batch(c).await?;
        c.error(code, message, Some(id)).await
    }

    /// Backpressure for recipients connected here whose queue is full: waits (up to
    /// [`Config::push_wait`](crate::config::Config::push_wait) in all) for room in each
    /// queue and pushes `msg` there. This connection reads no new frame meanwhile, so a
    /// client sending faster than its recipients read is slowed down instead of the
    /// relay storing every copy — storing costs far more than a push, and under
    /// overload that turned saturation into collapse. Returns how many were pushed,
    /// the recipients whose queue stayed full — those fall behind (their later
    /// messages go through storage until they caught up) and get this one from storage
    /// too — and the tickets to hold until it is stored for them.
    ///
    /// While waiting, this session keeps writing its own queue to its client: two
    /// sessions sending to each other would otherwise each wait for the other's room.
    ///
    /// With `hold` (where the send is not decided yet, see [`Session::send_recorded`])
    /// the room found is only reserved, into `hold`, and counted as pushed; the caller
    /// pushes once the send is recorded.
    async fn push_when_room(
        &mut self,
        c: &mut Conn,
        msg: &Arc<Message>,
        full: Vec<(KeyHex, Arc<SessionHandle>)>,
        mut hold: Option<&mut Vec<Reserved>>,
    ) -> Result<(u32, Vec<KeyHex>, Vec<StoreTicket>), End> {
        // Answers already buffered must not wait for other clients to catch up.
        c.flush_pending().await?;
        let deadline = Instant::now() + c.shared.cfg.push_wait;
        let mut pushed = 0u32;
        let mut behind = Vec::new();
        let mut tickets = Vec::new();
        let mut own_open = true;
        for (key, h) in full {
            c.shared.metrics.push_waits.inc();
            loop {
                // Past the deadline (or with no wait configured) only room that is
                // there now counts; a timer would first yield to the recipient.
                let room = if Instant::now() >= deadline {
                    match h.tx.clone().try_reserve_owned() {
                        Ok(permit) => Room::Permit(Some(permit)),
                        Err(mpsc::error::TrySendError::Full(_)) => Room::Late,
                        Err(mpsc::error::TrySendError::Closed(_)) => Room::Permit(None),
                    }
                } else {
                    let reading = self.held_bytes < HELD_BYTES;
                    tokio::select! {
                        biased;
                        permit = h.tx.clone().reserve_owned() => Room::Permit(permit.ok()),
                        _ = sleep_until(deadline) => Room::Late,
                        own = self.rx.recv(), if own_open && self.window_open(c) => Room::Own(own),
                        m = c.ws.recv(), if reading => Room::Frame(m),
                    }
                };
                match room {
                    Room::Permit(Some(permit)) => {
                        match hold.as_deref_mut() {
                            Some(held) => held.push(Reserved::new(permit)),
                            None => {
                                permit.send(msg.clone());
                                c.shared.metrics.outbound_queue_depth.inc();
                            }
                        }
                        pushed += 1;
                    }
                    // The recipient's session is ending: it stores what is queued,
                    // and this copy is stored like any other for an absent key.
                    Room::Permit(None) => behind.push(key),
                    Room::Late => {
                        c.shared.metrics.push_wait_timeouts.inc();
                        tickets.push(h.fall_behind_for_store());
                        behind.push(key);
                    }
                    Room::Own(Some(first)) => {
                        Box::pin(self.push_batch(c, first)).await?;
                        c.flush_pending().await?;
                        continue;
                    }
                    Room::Own(None) => {
                        own_open = false;
                        continue;
                    }
                    Room::Frame(m) => {
                        let msg = c.received(m)?;
                        Box::pin(self.while_waiting(c, msg)).await?;
                        continue;
                    }
                }
                break;
            }
        }
        Ok((pushed, behind, tickets))
    }

    /// A frame read while a send waits for room: a quiet acknowledgement (no answer,
    /// so handling it early keeps answers in order) is handled at once — it frees this
    /// session's in-flight window, and the client may have queued it behind sends
    /// that wait here, so holding it could stall this session's own deliveries. Any
    /// other frame is held and handled, in order, once the send is done.
    async fn while_waiting(&mut self, c: &mut Conn, msg: WsMessage) -> Result<(), End> {
        if let WsMessage::Text(t) = &msg {
            // Also ahead of held frames sent before it: an acknowledgement only
            // removes messages its sender has already received, which no earlier
            // frame of the same client can depend on.
            if let Ok(ClientFrame::Ack {
                messages,
                quiet: true,
            }) = decode_client_frame(t.as_str())
            {
                c.m().bytes_in.inc_by(t.len() as u64);
                if !c.take_token() {
                    return c.refuse(Some("ack")).await;
                }
                return self.ack(c, messages, true).await;
            }
            self.held_bytes += t.len();
        }
        self.held.push_back(msg);
        Ok(())
    }

    /// Stores the batched direct sends with one durable write, then answers each of
    /// them in order. If the batch fails, each message is stored on its own, so one
    /// that cannot be stored does not fail the others and each gets its own answer.
    async fn store_batch(&mut self, c: &mut Conn) -> Result<(), End> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        // Answers already written must not wait for this storage round trip.
        c.flush_pending().await?;
        let expires = now_ms().saturating_add(c.shared.cfg.message_ttl.as_millis() as i64);
        let stored = batch
            .iter()
            .map(|d| d.msg.to_stored(d.to, expires))
            .collect();
        let behind = batch.iter().any(|d| d.ticket.is_some());
        let outcomes = if c.shared.sends_recorded {
            // Each send recorded with its copy in one commit; the outcome of an
            // accepted send is its copy's.
            let sends = batch
                .iter()
                .zip(stored)
                .map(|(d, copy)| SendRecord {
                    sender: d.msg.sender.0,
                    id: d.msg.id.clone(),
                    expires_at_ms: expires,
                    copies: vec![copy],
                })
                .collect();
            let accept = c.shared.accept(sends);
            c.shared
                .overload
                .measure_store(behind, accept)
                .await
                .map(|all| all.into_iter().map(copy_outcome).collect::<Vec<_>>())
        } else {
            let put = c.shared.put_many(stored);
            c.shared.overload.measure_store(behind, put).await
        };
        match outcomes {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                // Every id is settled before the first answer is written: if writing
                // fails part-way, a retry of a stored message must still be a duplicate.
                let answers: Vec<_> = batch
                    .into_iter()
                    .zip(outcomes)
                    .map(|(mut d, outcome)| {
                        if let Some(f) = d.in_flight.as_mut() {
                            f.settle();
                        }
                        c.shared.stored_direct(&d.msg, d.to, outcome)
                    })
                    .collect();
                for frame in answers {
                    count_duplicate(c, &frame);
                    c.send_frame(frame).await?;
                }
            }
            failed => {
                if let Err(e) = failed {
                    warn!(error = %e, count = batch.len(), "storing a batch of messages failed; storing them one by one");
                }
                for d in batch {
                    let result = c.shared.store_direct(&d.msg, d.to).await;
                    answer_send(c, d.in_flight, &d.msg.id, result).await?;
                }
            }
        }
        Ok(())
    }

    async fn membership(&mut self, c: &mut Conn, channel: String, join: bool) -> Result<(), End> {
        if !valid_channel(&channel) {
            return c
                .error(
                    ErrorCode::InvalidEnvelope,
                    "channel must match [A-Za-z0-9._-]{1,64}",
                    Some(channel),
                )
                .await;
        }
        c.flush_pending().await?;
        let r = if join {
            c.shared
                .timed(
                    "join_channel",
                    c.shared.store.join_channel(&channel, &self.key.0),
                )
                .await
        } else {
            c.shared
                .timed(
                    "leave_channel",
                    c.shared.store.leave_channel(&channel, &self.key.0),
                )
                .await
        };
        // After the store write (and whatever its outcome): a list read before it must
        // not be served from the cache afterwards.
        c.shared.channels.invalidate(&channel);
        match r {
            Ok(()) if join => c.send_frame(ServerFrame::Joined { channel }).await,
            Ok(()) => c.send_frame(ServerFrame::Left { channel }).await,
            Err(e) => {
                warn!(error = %e, "channel membership update failed");
                c.error(
                    ErrorCode::StorageUnavailable,
                    "storage unavailable",
                    Some(channel),
                )
                .await
            }
        }
    }

    /// Forgets acknowledged messages (live ones from the in-flight window, stored ones
    /// from the store) and answers `acked`, unless the client asked for a `quiet` ack:
    /// then only a failure is answered (with an `error` frame).
    async fn ack(&mut self, c: &mut Conn, refs: Vec<AckRef>, quiet: bool) -> Result<(), End> {
        if refs.len() > MAX_ACK_BATCH {
            return c
                .error(
                    ErrorCode::BadFrame,
                    format!("at most {MAX_ACK_BATCH} messages per ack"),
                    Some("ack".into()),
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
                        .error(
                            ErrorCode::StorageUnavailable,
                            "ack not recorded; retry",
                            Some("ack".into()),
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

    async fn publish_profile(
        &mut self,
        c: &mut Conn,
        data: Base64Bytes,
        sig: SigHex,
    ) -> Result<(), End> {
        let r = Some("profile_publish".to_string());
        if data.0.len() > MAX_PROFILE_BYTES {
            return c
                .error(
                    ErrorCode::InvalidProfile,
                    format!("profile document larger than {MAX_PROFILE_BYTES} bytes"),
                    r,
                )
                .await;
        }
        if !verify_signature(&self.key, &profile_message(&data.0), &sig) {
            return c
                .error(
                    ErrorCode::InvalidProfile,
                    "profile signature does not verify for the session key",
                    r,
                )
                .await;
        }
        let doc: ProfileDoc = match serde_json::from_slice(&data.0) {
            Ok(d) => d,
            Err(e) => {
                return c
                    .error(
                        ErrorCode::InvalidProfile,
                        format!("profile document: {e}"),
                        r,
                    )
                    .await
            }
        };
        let name_len = doc.name.chars().count();
        if doc.key != self.key || name_len == 0 || name_len > 64 {
            return c
                .error(
                    ErrorCode::InvalidProfile,
                    "profile key must be the session key and name 1..=64 characters",
                    r,
                )
                .await;
        }
        let blob = match serde_json::to_vec(&StoredProfile { data, sig }) {
            Ok(b) => b,
            Err(e) => return c.error(ErrorCode::Internal, e.to_string(), r).await,
        };
        c.flush_pending().await?;
        match c
            .shared
            .timed(
                "put_profile",
                c.shared
                    .store
                    .put_profile(&self.key.0, blob, doc.updated_ms),
            )
            .await
        {
            Ok(updated) => c.send_frame(ServerFrame::ProfileStored { updated }).await,
            Err(e) => {
                warn!(error = %e, "storing profile failed");
                c.error(ErrorCode::StorageUnavailable, "storage unavailable", r)
                    .await
            }
        }
    }

    async fn get_profile(&mut self, c: &mut Conn, key: KeyHex) -> Result<(), End> {
        let r = Some(key.to_hex());
        c.flush_pending().await?;
        match c
            .shared
            .timed("get_profile", c.shared.store.get_profile(&key.0))
            .await
        {
            Ok(Some(blob)) => match serde_json::from_slice::<StoredProfile>(&blob) {
                Ok(p) => {
                    c.send_frame(ServerFrame::Profile {
                        key,
                        data: p.data,
                        sig: p.sig,
                    })
                    .await
                }
                Err(e) => c.error(ErrorCode::Internal, e.to_string(), r).await,
            },
            Ok(None) => {
                c.error(ErrorCode::NotFound, "no profile for this key", r)
                    .await
            }
            Err(e) => {
                warn!(error = %e, "reading profile failed");
                c.error(ErrorCode::StorageUnavailable, "storage unavailable", r)
                    .await
            }
        }
    }

    /// On disconnect: live messages that were pushed but not acknowledged (or still
    /// queued) go to storage, so the recipient gets them on its next connection.
    async fn rehome(&mut self, c: &mut Conn) {
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

/// The `sent` answer for a direct message pushed live to its recipient.
fn delivered_frame(id: &str) -> ServerFrame {
    ServerFrame::Sent {
        id: id.to_string(),
        status: SendStatus::Delivered,
        seq: None,
        delivered: None,
        stored: None,
    }
}

/// The `sent` answer for a repeat of an id that was already accepted.
fn duplicate_frame(id: &str) -> ServerFrame {
    ServerFrame::Sent {
        id: id.to_string(),
        status: SendStatus::Duplicate,
        seq: None,
        delivered: None,
        stored: None,
    }
}

/// Counts a `sent` answer that reports a duplicate.
fn count_duplicate(c: &Conn, frame: &ServerFrame) {
    if let ServerFrame::Sent {
        status: SendStatus::Duplicate,
        ..
    } = frame
    {
        c.shared.metrics.duplicates.inc();
    }
}

/// Answers the routed `send` `id`: settles its entry in the recent-id cache (if it has
/// one) on success (a retry is then `duplicate`), forgets it otherwise (a retry is
/// routed again).
async fn answer_send(
    c: &mut Conn,
    in_flight: Option<InFlight>,
    id: &str,
    result: Result<ServerFrame, RouteError>,
) -> Result<(), End> {
    let id = id.to_string();
    match result {
        Ok(frame) => {
            if let Some(mut f) = in_flight {
                f.settle();
            }
            count_duplicate(c, &frame);
            c.send_frame(frame).await
        }
        Err(RouteError::NotMember) => {
            drop(in_flight);
            c.error(
                ErrorCode::NotMember,
                "join the channel before sending to it",
                Some(id),
            )
            .await
        }
        Err(RouteError::Store(e)) => {
            drop(in_flight);
            warn!(error = %e, "storing a message failed");
            c.error(
                ErrorCode::StorageUnavailable,
                "message not stored; retry with the same id",
                Some(id),
            )
            .await
        }
    }
}

/// Result of pushing a channel message to the members connected here.
#[derive(Debug)]
pub struct FanOut {
    /// Members it was pushed to.
    pub delivered: u32,
    /// Members it must be stored for (offline, elsewhere, or behind).
    pub rest: Vec<KeyHex>,
    /// Members connected here whose queue was full: the sender waits for room
    /// (backpressure) or lets them fall behind and stores it for them.
    pub full: Vec<(KeyHex, Arc<SessionHandle>)>,
    /// Held until the copies in `rest` are stored (members connected here that are
    /// behind).
    pub tickets: Vec<StoreTicket>,
    /// Room reserved in the queues of live members (instead of pushing at once), for
    /// a send that the shared store has yet to record.
    pub held: Vec<Reserved>,
}

impl FanOut {
    /// The `sent` answer for this fan-out with `stored` copies written.
    pub fn sent_frame(&self, msg: &Message, stored: u32) -> ServerFrame {
        ServerFrame::Sent {
            id: msg.id.clone(),
            status: SendStatus::Fanout,
            seq: None,
            delivered: Some(self.delivered),
            stored: Some(stored),
        }
    }
}

/// Why routing failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// Channel send by a non-member.
    #[error("sender is not a member of the channel")]
    NotMember,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Shared {
    /// Stores a message for `to` (not pushed live) and wakes it wherever it is.
    pub async fn store_direct(
        &self,
        msg: &Arc<Message>,
        to: KeyHex,
    ) -> Result<ServerFrame, RouteError> {
        let expires = now_ms().saturating_add(self.cfg.message_ttl.as_millis() as i64);
        let copy = msg.to_stored(to, expires);
        let outcome = if self.sends_recorded {
            let send = SendRecord {
                sender: msg.sender.0,
                id: msg.id.clone(),
                expires_at_ms: expires,
                copies: vec![copy],
            };
            let mut all = self.accept(vec![send]).await?;
            all.pop().map_or(PutOutcome::Duplicate, copy_outcome)
        } else {
            self.put(copy).await?
        };
        Ok(self.stored_direct(msg, to, outcome))
    }

    /// Where the store decides duplicates: records the send of `msg` together with its
    /// copies for `rest` (one commit), and only if it was accepted pushes it into the
    /// `held` room. If the store may have recorded it without saying so (the connection
    /// failed after the write was sent), it is pushed all the same: a recorded message
    /// that nobody pushes would be lost (a retry is a duplicate), whereas one pushed
    /// without a record can at worst be delivered again by a retry, which clients
    /// de-duplicate by (`from`, `id`) anyway.
    async fn accept_and_push(
        &self,
        msg: &Arc<Message>,
        held: Vec<Reserved>,
        rest: &[KeyHex],
    ) -> Recorded {
        let expires = now_ms().saturating_add(self.cfg.message_ttl.as_millis() as i64);
        let send = SendRecord {
            sender: msg.sender.0,
            id: msg.id.clone(),
            expires_at_ms: expires,
            copies: rest.iter().map(|k| msg.to_stored(*k, expires)).collect(),
        };
        match self.accept(vec![send]).await.map(|mut all| all.pop()) {
            Ok(Some(Acceptance::Accepted(copies))) => Recorded::Accepted {
                pushed: self.push_held(msg, held),
                copies,
            },
            // Dropping the held room frees it.
            Ok(Some(Acceptance::Duplicate)) => Recorded::Duplicate,
            Ok(None) => Recorded::Failed(StoreError::Task {
                op: "accept",
                reason: "no outcome for the send".into(),
            }),
            Err(error) if error.outcome_unknown() => {
                warn!(error = %error, id = %msg.id, "send may or may not be recorded; pushing it");
                Recorded::Unknown {
                    pushed: self.push_held(msg, held),
                    error,
                }
            }
            Err(error) => Recorded::Failed(error),
        }
    }

    /// Pushes `msg` into every held room; returns how many.
    fn push_held(&self, msg: &Arc<Message>, held: Vec<Reserved>) -> u32 {
        let n = held.len();
        for room in held {
            room.push(msg.clone());
        }
        self.metrics.outbound_queue_depth.inc_by(n as i64);
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Records sends in the shared store ([`crate::store::Store::accept`]), timed.
    pub async fn accept(&self, sends: Vec<SendRecord>) -> Result<Vec<Acceptance>, StoreError> {
        self.timed("accept", self.store.accept(sends)).await
    }

    /// After a direct message for `to` was stored: counts it, wakes `to` wherever it
    /// is, and returns the sender's `sent` answer.
    fn stored_direct(&self, msg: &Message, to: KeyHex, outcome: PutOutcome) -> ServerFrame {
        let (status, seq) = match outcome {
            PutOutcome::Stored { seq } => {
                self.metrics.stored_kind(msg.kind).inc();
                self.wake_local(&to);
                self.cluster.wake(to);
                (SendStatus::Stored, Some(seq))
            }
            PutOutcome::Duplicate => (SendStatus::Duplicate, None),
        };
        ServerFrame::Sent {
            id: msg.id.clone(),
            status,
            seq,
            delivered: None,
            stored: None,
        }
    }

    /// Fans a channel message out: pushes it to every member (except the sender)
    /// connected here and keeping up; the others are returned for the sender to wait
    /// for ([`FanOut::full`]) or to store ([`Shared::store_fan_out`]).
    ///
    /// With `hold`, room in the live members' queues is only reserved
    /// ([`FanOut::held`]) and nothing is pushed yet.
    pub async fn channel_fan_out(
        &self,
        msg: &Arc<Message>,
        channel: &str,
        hold: bool,
    ) -> Result<FanOut, RouteError> {
        let members = self.members(channel).await?;
        if members.binary_search(&msg.sender).is_err() {
            return Err(RouteError::NotMember);
        }
        let mut delivered = 0u32;
        let mut rest = Vec::new();
        let mut full = Vec::new();
        let mut tickets = Vec::new();
        let mut held = Vec::new();
        for k in members.iter() {
            if *k == msg.sender {
                continue;
            }
            if hold {
                match self.sessions.reserve(k) {
                    Reserve::Room(room) => held.push(room),
                    Reserve::Full(h) => full.push((*k, h)),
                    Reserve::Store(ticket) => {
                        rest.push(*k);
                        tickets.extend(ticket);
                    }
                }
                continue;
            }
            match self.sessions.offer(k, msg) {
                Offer::Pushed => delivered += 1,
                Offer::Full(h) => full.push((*k, h)),
                Offer::Store(ticket) => {
                    rest.push(*k);
                    tickets.extend(ticket);
                }
            }
        }
        self.metrics
            .outbound_queue_depth
            .inc_by(i64::from(delivered));
        Ok(FanOut {
            delivered,
            rest,
            full,
            tickets,
            held,
        })
    }

    /// After [`Shared::channel_fan_out`]: stores the copies for members that were not
    /// pushed live, in one durable batch, and wakes them.
    pub async fn store_fan_out(
        &self,
        msg: &Arc<Message>,
        fan: FanOut,
    ) -> Result<ServerFrame, RouteError> {
        let mut stored = 0u32;
        if !fan.rest.is_empty() {
            let expires = now_ms().saturating_add(self.cfg.message_ttl.as_millis() as i64);
            let to_store = fan
                .rest
                .iter()
                .map(|k| msg.to_stored(*k, expires))
                .collect();
            let behind = !fan.tickets.is_empty();
            let put = self.put_many(to_store);
            let outcomes = self.overload.measure_store(behind, put).await?;
            for (o, k) in outcomes.iter().zip(&fan.rest) {
                if is_new(o) {
                    stored += 1;
                    self.wake_local(k);
                    self.cluster.wake(*k);
                }
            }
            self.metrics.stored_kind(msg.kind).inc_by(u64::from(stored));
        }
        Ok(fan.sent_frame(msg, stored))
    }

    /// Tells a local session (if any) that stored messages are waiting.
    pub fn wake_local(&self, key: &KeyHex) {
        if let Some(h) = self.sessions.get(key) {
            h.wake.notify_one();
        }
    }
}

/// What became of a send the shared store was asked to record
/// ([`Shared::accept_and_push`]).
enum Recorded {
    /// Recorded: pushed into the held room (`pushed` recipients) and stored for the
    /// others (`copies`, one outcome each).
    Accepted {
        pushed: u32,
        copies: Vec<PutOutcome>,
    },
    /// An earlier send of this (sender, id) was recorded; nothing was done.
    Duplicate,
    /// Maybe recorded, maybe not; pushed into the held room all the same.
    Unknown { pushed: u32, error: StoreError },
    /// Not recorded; nothing was pushed.
    Failed(StoreError),
}

impl Recorded {
    /// Recipients it was pushed to.
    fn pushed(&self) -> u32 {
        match self {
            Recorded::Accepted { pushed, .. } | Recorded::Unknown { pushed, .. } => *pushed,
            Recorded::Duplicate | Recorded::Failed(_) => 0,
        }
    }

    /// The answer to a direct send pushed live (or not) to `to`.
    fn direct_answer(
        self,
        shared: &Shared,
        msg: &Message,
        to: KeyHex,
    ) -> Result<ServerFrame, RouteError> {
        match self {
            Recorded::Accepted { pushed: 1.., .. } => Ok(delivered_frame(&msg.id)),
            Recorded::Accepted { copies, .. } => Ok(shared.stored_direct(
                msg,
                to,
                copies.first().copied().unwrap_or(PutOutcome::Duplicate),
            )),
            Recorded::Duplicate => Ok(duplicate_frame(&msg.id)),
            // Pushed: `delivered` is true whether or not the record was committed, and
            // spares the client a retry that could deliver it a second time.
            Recorded::Unknown { pushed: 1.., .. } => Ok(delivered_frame(&msg.id)),
            Recorded::Unknown { error, .. } | Recorded::Failed(error) => Err(error.into()),
        }
    }

    /// The answer to a channel send: counts the stored copies and wakes their
    /// recipients (as [`Shared::store_fan_out`]).
    fn fan_out_answer(
        self,
        shared: &Shared,
        msg: &Message,
        mut fan: FanOut,
    ) -> Result<ServerFrame, RouteError> {
        match self {
            Recorded::Accepted { pushed, copies } => {
                let mut stored = 0u32;
                for (o, k) in copies.iter().zip(&fan.rest) {
                    if is_new(o) {
                        stored += 1;
                        shared.wake_local(k);
                        shared.cluster.wake(*k);
                    }
                }
                shared
                    .metrics
                    .stored_kind(msg.kind)
                    .inc_by(u64::from(stored));
                fan.delivered = pushed;
                Ok(fan.sent_frame(msg, stored))
            }
            Recorded::Duplicate => Ok(duplicate_frame(&msg.id)),
            // The copies may or may not be stored: the client retries, and a recorded
            // send is then a duplicate.
            Recorded::Unknown { error, .. } | Recorded::Failed(error) => Err(error.into()),
        }
    }
}

/// The outcome of an accepted send's only copy, or `Duplicate` for a send that was not
/// accepted (a retry of an earlier one).
fn copy_outcome(a: Acceptance) -> PutOutcome {
    match a {
        Acceptance::Accepted(copies) => copies.first().copied().unwrap_or(PutOutcome::Duplicate),
        Acceptance::Duplicate => PutOutcome::Duplicate,
    }
}

/// A send's (sender, id) recorded in flight in [`Shared::recent`]: settled when the send
/// succeeded, forgotten otherwise (on drop).
struct InFlight {
    shared: Arc<Shared>,
    recent: RecentKey,
    settled: bool,
}

impl InFlight {
    fn settle(&mut self) {
        self.shared.recent.settle(&self.recent);
        self.settled = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.recent.remove(&self.recent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the future an `async fn` taking three arguments returns, without calling it.
    fn future_size<A, B, C, F: std::future::Future>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection keeps this future (plus its buffers) in memory, so S4's
    /// RSS per connection depends on it: the per-event handlers are boxed to keep it
    /// small (it was 4,600 bytes with them inline). Checked on optimized builds only
    /// (`cargo test --release`): unoptimized futures do not share slots between
    /// suspension points, so their size says nothing about the shipped binary.
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "future layout is representative only when optimized"
    )]
    fn idle_connection_future_stays_small() {
        let n = future_size(run);
        assert!(n <= 2560, "connection future is {n} bytes");
    }
}

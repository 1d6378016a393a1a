//! The authenticated session: taking over from an earlier session of the same key, the
//! event loop (requests from the client, live pushes, wake-ups, timers) with one flush
//! per wake-up, and the dispatch of each request to its handler.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tracing::{debug, warn};

use super::connection::{Conn, End, DRAIN_REASON};
use super::delivery::Origin;
use super::router::{FastMap, Message, SessionHandle};
use super::send::Deferred;
use crate::protocol::frame::{FEATURE_QUIET_ACK, MAX_FETCH_LIMIT};
use crate::protocol::{
    decode_request, ClientFrame, ErrorCode, FrameHint, KeyHex, Limits, Request, ServerFrame,
};

/// Further ready events (inbound frames, batches of pushes) handled after the one that
/// woke the session, before the single flush of everything they wrote.
const READY_BURST: usize = 32;
/// How long a new session of a key waits for the previous one to hand over.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

impl Conn {
    /// The authenticated session loop.
    pub(super) async fn session(&mut self, key: KeyHex) -> End {
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
        // Sends read before the end and waiting in the batch are stored and settled also
        // when the connection failed: they were read, so a retry must find them
        // (`duplicate`), never deliver them twice. Their answers go out if the socket
        // still takes them.
        if !s.batch.is_empty() {
            let _ = Box::pin(s.store_batch(self)).await;
        }
        // Store unacknowledged messages while still registered, so that a new session
        // of this key (which waits for `finished`) finds them in storage.
        Box::pin(s.rehome(self)).await;
        shared.sessions.remove(&key, handle.id);
        handle.finished.cancel();
        shared.metrics.sessions.dec();
        end
    }
}

/// One authenticated session: what it keeps between events.
pub(super) struct Session {
    pub(super) key: KeyHex,
    pub(super) handle: Arc<SessionHandle>,
    pub(super) rx: mpsc::Receiver<Arc<Message>>,
    pub(super) inflight: FastMap<(KeyHex, String), Origin>,
    /// Direct sends read in this wake-up that must be stored, not answered yet: stored
    /// together (one durable write instead of one per message) before the next answer.
    pub(super) batch: Vec<Deferred>,
    /// Every stored message up to this seq is in flight on this session or gone
    /// (acknowledged, expired), so the pump reads after it instead of from the start
    /// (only where [`Shared::seqs_in_commit_order`](super::Shared::seqs_in_commit_order);
    /// 0 otherwise).
    pub(super) stored_floor: u64,
    /// The [`Shared::store_generation`](super::Shared::store_generation) that `stored_floor` belongs to.
    pub(super) floor_generation: u64,
    /// The catch-up mark ([`SessionHandle::catch_up_mark`]) of the last read that
    /// reached the end of this session's stored messages, which were then all in flight
    /// here. While the session has stayed live since, a `fetch` has nothing to read.
    pub(super) read_to_end: Option<u64>,
    /// No other session of this key is still running (the previous one handed over in
    /// time), so acks may quote the reads of this one (see [`Session::ack`]).
    pub(super) sole_reader: bool,
    /// A send read since the last flush was pushed to a recipient's session on this
    /// relay: the flush of this connection's answers waits until that session has run.
    pub(super) pushed_live: bool,
    /// Frames read from the client while a send waited for room in a recipient's
    /// queue, handled before anything else is read (see [`Session::push_when_room`]).
    pub(super) held: VecDeque<WsMessage>,
    /// Bytes of text in `held`.
    pub(super) held_bytes: usize,
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
                    m = c.ws.next(), if c.reading() => {
                        read_frame = true;
                        match c.received(m) {
                            Some(msg) => Box::pin(self.inbound(c, msg)).await,
                            None => Ok(()),
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
            // The client's side ended (its close frame, the end of the stream, a read
            // error) and everything read before is handled and answered: now the
            // session ends that way.
            if self.held.is_empty() {
                if let Some(end) = c.take_input_end() {
                    return end;
                }
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
            } else if reading && c.reading() {
                c.ws.next().now_or_never()
            } else {
                None
            };
            reading = polled.is_some();
            if let Some(m) = polled {
                if let Some(msg) = c.received(m) {
                    Box::pin(self.inbound(c, msg)).await?;
                }
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
    async fn inbound(&mut self, c: &mut Conn, msg: WsMessage) -> Result<(), End> {
        let text = match msg {
            WsMessage::Text(t) => t,
            WsMessage::Binary(b) => {
                c.m().bytes_in.inc_by(b.len() as u64);
                self.store_batch(c).await?;
                if c.admit(FrameHint::default()).await? {
                    c.error(ErrorCode::BinaryFrame, "protocol v1 uses text frames", None)
                        .await?;
                }
                return Ok(());
            }
            // Not seen: `Conn::received` takes a close as the end of the client's side.
            WsMessage::Close(_) => return Err(End::Closed),
            _ => return Ok(()),
        };
        c.m().bytes_in.inc_by(text.len() as u64);
        let request = match decode_request(text.as_str()) {
            Ok(r) => r,
            Err(e) => {
                self.store_batch(c).await?;
                return c.undecodable(text.as_str(), e).await;
            }
        };
        // Answers go out in request order: whatever is batched is answered first.
        if !request.is_send() {
            self.store_batch(c).await?;
        }
        if !c.take_token() {
            self.store_batch(c).await?;
            return c.refuse(request.hint()).await;
        }
        let frame = match request {
            Request::Send(envelope) => return self.send(c, envelope).await,
            Request::Frame(frame) => frame,
        };
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
            ClientFrame::Send { envelope } => self.send(c, envelope.into()).await,
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
}

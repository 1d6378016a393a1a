//! The `send` request: routing a message to a recipient's live session or to storage,
//! waiting for room in full queues (backpressure), storing the direct sends of one
//! wake-up together, and answering each send in request order.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tracing::warn;

use super::connection::{now_ms, Conn, End};
use super::fan_out::{copy_outcome, delivered_frame, duplicate_frame, RouteError};
use super::router::{
    recent_key, Message, Offer, RecentKey, Reserve, Reserved, Seen, SessionHandle, StoreTicket,
};
use super::session::Session;
use super::Shared;
use crate::protocol::{
    decode_client_frame, ClientFrame, ErrorCode, FrameHint, KeyHex, RelayEnvelope, SendStatus,
    ServerFrame,
};
use crate::store::SendRecord;

/// Direct sends to offline recipients stored in one durable batch at most (see
/// [`Session::store_batch`]).
const STORE_BATCH: usize = 64;
/// Frames (bytes of text) a session reads ahead and holds while a send waits for room
/// in a recipient's queue, so quiet acks queued behind them still get through; at this
/// much it stops reading until the send is done.
const HELD_BYTES: usize = 64 * 1024;

/// What [`Session::push_when_room`] woke up for.
enum Room {
    /// A frame from this session's own client.
    Frame(Option<Result<WsMessage, WsError>>),
    /// Room in the recipient's queue (`None`: its session has closed the queue).
    Permit(Option<mpsc::OwnedPermit<Arc<Message>>>),
    /// The push wait is over.
    Late,
    /// A push for this session itself (`None`: its queue was closed).
    Own(Option<Arc<Message>>),
}

/// A direct send waiting in [`Session::batch`] to be stored.
pub(super) struct Deferred {
    msg: Arc<Message>,
    to: KeyHex,
    /// Its entry in the recent-id cache; `None` where the store decides duplicates.
    in_flight: Option<InFlight>,
    /// Keeps a recipient connected here off live pushes until this is stored (its
    /// presence also marks the store as one for a recipient that fell behind).
    ticket: Option<StoreTicket>,
}

impl Session {
    /// Routes one `send`. A direct message for a recipient that is not connected here
    /// joins [`Session::batch`] and is answered when the batch is stored; every other
    /// outcome first stores and answers the batch, so answers keep request order.
    pub(super) async fn send(&mut self, c: &mut Conn, mut env: RelayEnvelope) -> Result<(), End> {
        // The id is copied only for an answer that refuses the send: an accepted one is
        // answered with the routed message's id (one copy fewer per message).
        if let Err(e) = env.validate() {
            return self
                .refuse_send(c, ErrorCode::InvalidEnvelope, e.to_string(), env.id)
                .await;
        }
        match env.from {
            Some(f) if f != self.key => {
                return self
                    .refuse_send(
                        c,
                        ErrorCode::SenderMismatch,
                        "envelope.from must be the authenticated key",
                        env.id,
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
                    env.id,
                )
                .await;
        }
        let kind = env.kind;
        c.shared.metrics.routed_kind(kind).inc();
        if c.shared.sends_recorded {
            return self.send_recorded(c, env).await;
        }
        let recent = recent_key(self.key, &env.id);
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
                return c.send_frame(duplicate_frame(&env.id)).await;
            }
            // Acknowledging now could acknowledge a message whose first attempt then
            // fails to store; routing it again could deliver it twice.
            Seen::InFlight => return c
                .error(
                    ErrorCode::StorageUnavailable,
                    "an earlier send with this id is still being stored; retry with the same id",
                    Some(env.id),
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
        let to = env.to;
        let msg = Arc::new(Message::new(env, self.key));
        if !self.batch.is_empty() && to.is_none_or(|to| c.shared.sessions.get(&to).is_some()) {
            // A channel message, or a recipient connected here that could get this one
            // pushed ahead of an earlier message still in the batch.
            self.store_batch(c).await?;
        }
        let result = match (to, msg.channel.as_deref()) {
            (Some(to), _) => match c.shared.sessions.offer(&to, &msg) {
                Offer::Full(h) => {
                    let (pushed, _, _ticket) =
                        self.push_when_room(c, &msg, vec![(to, h)], None).await?;
                    if pushed == 1 {
                        Ok(delivered_frame(&msg.id))
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
                    Ok(delivered_frame(&msg.id))
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
        answer_send(c, in_flight, &msg.id, result).await
    }
    /// Routes one `send` where the shared store decides duplicates (relays on one
    /// PostgreSQL database): nothing is pushed, stored or answered before the store has
    /// recorded the send's (sender, id) ([`crate::store::Store::accept`]), so that a
    /// repeat through any relay of the cluster is a duplicate — whatever this process
    /// remembers. Room in the queues of live recipients here is reserved first, so
    /// that once the send is recorded its pushes cannot fail; copies for everyone else
    /// are stored in the same commit as the record. Direct sends to recipients that
    /// are not pushed to join [`Session::batch`] as on a single relay.
    pub(super) async fn send_recorded(
        &mut self,
        c: &mut Conn,
        env: RelayEnvelope,
    ) -> Result<(), End> {
        let to = env.to;
        let msg = Arc::new(Message::new(env, self.key));
        if !self.batch.is_empty() && to.is_none_or(|to| c.shared.sessions.get(&to).is_some()) {
            // As in `send`: nothing may overtake an earlier message still in the batch.
            self.store_batch(c).await?;
        }
        let result = match (to, msg.channel.as_deref()) {
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
        answer_send(c, None, &msg.id, result).await
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
    pub(super) async fn push_when_room(
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
                        m = c.ws.next(), if reading && c.reading() => Room::Frame(m),
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
                    // The end of the client's side does not end the wait: the send was
                    // read, and is routed as if nothing had ended.
                    Room::Frame(m) => {
                        if let Some(msg) = c.received(m) {
                            Box::pin(self.while_waiting(c, msg)).await?;
                        }
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
                    return c
                        .refuse(FrameHint {
                            frame_type: Some("ack"),
                            quiet_ack: true,
                        })
                        .await;
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
    pub(super) async fn store_batch(&mut self, c: &mut Conn) -> Result<(), End> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        // Answers already written must not wait for this storage round trip. The batch
        // is stored whether or not that write works: these sends were read, and one
        // that the store accepted must be settled (a retry is `duplicate`), not lost.
        let flushed = c.flush_pending().await;
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
                flushed?;
                for frame in answers {
                    count_duplicate(c, &frame);
                    c.send_frame(frame).await?;
                }
            }
            failed => {
                if let Err(e) = failed {
                    warn!(error = %e, count = batch.len(), "storing a batch of messages failed; storing them one by one");
                }
                let mut written = flushed;
                for d in batch {
                    let result = c.shared.store_direct(&d.msg, d.to).await;
                    if written.is_ok() {
                        written = answer_send(c, d.in_flight, &d.msg.id, result).await;
                    } else if let (Ok(_), Some(mut f)) = (result, d.in_flight) {
                        // Settled also when the answer cannot be written.
                        f.settle();
                    }
                }
                written?;
            }
        }
        Ok(())
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
                Some(id.to_string()),
            )
            .await
        }
        Err(RouteError::Store(e)) => {
            drop(in_flight);
            warn!(error = %e, "storing a message failed");
            c.error(
                ErrorCode::StorageUnavailable,
                "message not stored; retry with the same id",
                Some(id.to_string()),
            )
            .await
        }
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

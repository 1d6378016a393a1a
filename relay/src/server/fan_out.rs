//! Where a routed message goes beyond the sender's session ([`Shared`] methods): a
//! channel message pushed to the members connected here, copies stored for everyone
//! else (direct or channel), sends recorded first where the shared store decides
//! duplicates, and the recipients of stored copies woken here and on peer relays. Also
//! the `sent` answers these produce.

use std::sync::Arc;

use tracing::warn;

use super::connection::now_ms;
use super::router::{is_new, Message, Offer, Reserve, Reserved, SessionHandle, StoreTicket};
use super::Shared;
use crate::protocol::{KeyHex, SendStatus, ServerFrame};
use crate::store::{Acceptance, PutOutcome, SendRecord, StoreError};

/// The `sent` answer for a direct message pushed live to its recipient.
pub(super) fn delivered_frame(id: &str) -> ServerFrame {
    ServerFrame::Sent {
        id: id.to_string(),
        status: SendStatus::Delivered,
        seq: None,
        delivered: None,
        stored: None,
    }
}

/// The `sent` answer for a repeat of an id that was already accepted.
pub(super) fn duplicate_frame(id: &str) -> ServerFrame {
    ServerFrame::Sent {
        id: id.to_string(),
        status: SendStatus::Duplicate,
        seq: None,
        delivered: None,
        stored: None,
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
    pub(super) async fn accept_and_push(
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
    pub(super) fn stored_direct(
        &self,
        msg: &Message,
        to: KeyHex,
        outcome: PutOutcome,
    ) -> ServerFrame {
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
pub(super) enum Recorded {
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
    pub(super) fn pushed(&self) -> u32 {
        match self {
            Recorded::Accepted { pushed, .. } | Recorded::Unknown { pushed, .. } => *pushed,
            Recorded::Duplicate | Recorded::Failed(_) => 0,
        }
    }

    /// The answer to a direct send pushed live (or not) to `to`.
    pub(super) fn direct_answer(
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
    pub(super) fn fan_out_answer(
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
pub(super) fn copy_outcome(a: Acceptance) -> PutOutcome {
    match a {
        Acceptance::Accepted(copies) => copies.first().copied().unwrap_or(PutOutcome::Duplicate),
        Acceptance::Duplicate => PutOutcome::Duplicate,
    }
}

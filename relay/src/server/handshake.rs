//! The connections of one listener that are not WebSockets: the bound on them and who
//! makes room when it is reached.
//!
//! Every accepted TCP connection takes a place in its listener's [`HandshakePool`]
//! (`DCHAT_MAX_HANDSHAKES` places) until it becomes a WebSocket or closes; a plain
//! HTTP connection keeps its place while it lives. Upgraded clients are bounded by
//! `DCHAT_MAX_CONNECTIONS` instead, so sockets that never finish a handshake can
//! neither take the places of clients nor use up the process's file descriptors.
//!
//! When the pool is full, a new connection takes the place of the connection that has
//! waited longest for a request (a fresh one that has sent nothing complete, or a
//! keep-alive one between requests): that one is closed. A real client completes its
//! request head within a round trip of connecting, so under a flood of silent or
//! dripping sockets it is their oldest that go, while an honest newcomer keeps its
//! place; rejecting newcomers instead would leave real clients nothing until the
//! flood's sockets time out. A connection whose request is being served is never
//! closed for room; only when every place holds one is the newcomer refused.
//!
//! The pool is synchronous and does no I/O: `accept.rs` asks it at accept and tells it
//! when requests start and responses end, and waits on [`Slot::evicted`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

use crate::metrics::{ListenerLabel, Metrics};

/// What a connection in the pool is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accepted; no complete request head yet.
    Waiting,
    /// A request is being served (the WebSocket upgrade, or an HTTP response that has
    /// not been written out yet).
    Busy,
    /// Keep-alive: its last response is written, the next request has not arrived.
    Idle,
}

/// One connection's entry.
struct Entry {
    phase: Phase,
    /// Bumped each time the connection goes back to waiting (Idle), so that its older
    /// places in the eviction queue are recognised as stale.
    turn: u64,
    /// Whether a request head has ever arrived (the handshake deadline's question).
    seen_request: bool,
    /// Woken when the connection is evicted.
    evict: Arc<Notify>,
}

struct PoolState {
    /// Connections holding a place (entries plus places handed from an evicted
    /// connection to its successor, which are the same number: eviction removes the
    /// entry and admits the successor in one step).
    entries: HashMap<u64, Entry>,
    /// Candidates for eviction, oldest first: (connection, turn). An item is stale when
    /// the connection is gone, has started a request, or has a newer turn; stale items
    /// are dropped when they reach the front or in a compaction.
    queue: VecDeque<(u64, u64)>,
    next_id: u64,
}

/// The handshake places of one listener (see the module documentation).
pub struct HandshakePool {
    limit: usize,
    state: Mutex<PoolState>,
    /// `dchat_handshake_connections{listener}`.
    open: Gauge,
    /// `dchat_handshakes_evicted_total{listener}`.
    evicted: Counter,
    /// `dchat_handshakes_rejected_total{listener}`.
    rejected: Counter,
    /// `dchat_handshake_timeouts_total{listener}`.
    timeouts: Counter,
}

/// The outcome of [`HandshakePool::admit`].
pub enum Admission {
    /// The connection has a place.
    Admitted(Slot),
    /// Every place holds a connection whose request is being served.
    Full,
}

impl HandshakePool {
    /// A pool of `limit` places whose series carry `listener` (`client` or `metrics`).
    pub fn new(listener: &'static str, limit: usize, metrics: &Metrics) -> Arc<HandshakePool> {
        let label = ListenerLabel { listener };
        Arc::new(HandshakePool {
            limit: limit.max(1),
            state: Mutex::new(PoolState {
                entries: HashMap::new(),
                queue: VecDeque::new(),
                next_id: 0,
            }),
            open: metrics.handshake_connections.get_or_create(&label).clone(),
            evicted: metrics.handshakes_evicted.get_or_create(&label).clone(),
            rejected: metrics.handshakes_rejected.get_or_create(&label).clone(),
            timeouts: metrics.handshake_timeouts.get_or_create(&label).clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state stays consistent across a panic (each step is a few assignments).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a newly accepted connection: a free one, or the place of the
    /// connection that has waited longest for a request (which is woken through
    /// [`Slot::evicted`] and must close), or none.
    pub fn admit(self: &Arc<Self>) -> Admission {
        let mut st = self.lock();
        if st.entries.len() >= self.limit {
            let Some(victim) = pop_evictable(&mut st) else {
                drop(st);
                self.rejected.inc();
                return Admission::Full;
            };
            if let Some(e) = st.entries.remove(&victim) {
                e.evict.notify_one();
            }
            self.evicted.inc();
        }
        let id = st.next_id;
        st.next_id += 1;
        let evict = Arc::new(Notify::new());
        st.entries.insert(
            id,
            Entry {
                phase: Phase::Waiting,
                turn: 0,
                seen_request: false,
                evict: evict.clone(),
            },
        );
        enqueue(&mut st, id, 0);
        self.open.set(st.entries.len() as i64);
        Admission::Admitted(Slot {
            inner: Arc::new(SlotInner {
                pool: self.clone(),
                id,
                evict,
            }),
        })
    }

    /// Connections holding a place now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when no connection holds a place.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a connection closed at the handshake deadline.
    pub fn count_timeout(&self) {
        self.timeouts.inc();
    }
}

/// Removes and returns the oldest connection that is waiting for a request.
fn pop_evictable(st: &mut PoolState) -> Option<u64> {
    while let Some((id, turn)) = st.queue.pop_front() {
        if is_live(st, id, turn) {
            return Some(id);
        }
    }
    None
}

fn is_live(st: &PoolState, id: u64, turn: u64) -> bool {
    st.entries
        .get(&id)
        .is_some_and(|e| e.turn == turn && matches!(e.phase, Phase::Waiting | Phase::Idle))
}

/// Queues `id` as an eviction candidate, first dropping stale items so that the queue
/// stays proportional to the pool: stale items ahead of a live one are dropped when it
/// leaves, and a compaction bounds what collects behind it.
fn enqueue(st: &mut PoolState, id: u64, turn: u64) {
    while let Some(&(front, t)) = st.queue.front() {
        if is_live(st, front, t) {
            break;
        }
        st.queue.pop_front();
    }
    if st.queue.len() > 2 * st.entries.len() + 64 {
        let queue = std::mem::take(&mut st.queue);
        st.queue = queue
            .into_iter()
            .filter(|&(i, t)| is_live(st, i, t))
            .collect();
    }
    st.queue.push_back((id, turn));
}

/// A connection's place in its pool; released when the last clone is dropped.
#[derive(Clone)]
pub struct Slot {
    inner: Arc<SlotInner>,
}

struct SlotInner {
    pool: Arc<HandshakePool>,
    id: u64,
    evict: Arc<Notify>,
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        // An evicted connection's place already belongs to its successor.
        if st.entries.remove(&self.id).is_some() {
            self.pool.open.set(st.entries.len() as i64);
        }
    }
}

impl Slot {
    /// A request head has arrived: the connection is no longer a candidate for eviction.
    pub fn request_started(&self) {
        let mut st = self.inner.pool.lock();
        if let Some(e) = st.entries.get_mut(&self.inner.id) {
            e.phase = Phase::Busy;
            e.seen_request = true;
        }
    }

    /// The response is written out; on a keep-alive connection the next request may
    /// follow, and until it does the connection may be evicted (as the newest candidate).
    pub fn response_done(&self) {
        let mut st = self.inner.pool.lock();
        let turn = match st.entries.get_mut(&self.inner.id) {
            Some(e) if e.phase == Phase::Busy => {
                e.phase = Phase::Idle;
                e.turn += 1;
                e.turn
            }
            _ => return,
        };
        enqueue(&mut st, self.inner.id, turn);
    }

    /// Whether a request head has arrived on this connection.
    pub fn seen_request(&self) -> bool {
        let st = self.inner.pool.lock();
        st.entries
            .get(&self.inner.id)
            .is_some_and(|e| e.seen_request)
    }

    /// Resolves once the connection has been evicted to make room (it must close).
    pub async fn evicted(&self) {
        self.inner.evict.notified().await;
    }

    /// Counts this connection as closed at the handshake deadline.
    pub fn count_timeout(&self) {
        self.inner.pool.count_timeout();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;

    fn pool(limit: usize) -> (Arc<HandshakePool>, Metrics) {
        let m = Metrics::new();
        (HandshakePool::new("client", limit, &m), m)
    }

    fn admit(p: &Arc<HandshakePool>) -> Slot {
        match p.admit() {
            Admission::Admitted(s) => s,
            Admission::Full => panic!("pool refused a connection"),
        }
    }

    fn is_evicted(s: &Slot) -> bool {
        let mut f = pin!(s.evicted());
        matches!(
            f.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(())
        )
    }

    fn metric(m: &Metrics, name: &str) -> String {
        let text = m.encode();
        let prefix = format!("{name}{{listener=\"client\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .to_string()
    }

    #[test]
    fn places_are_taken_and_given_back() {
        let (p, m) = pool(3);
        let a = admit(&p);
        let b = admit(&p);
        assert_eq!(p.len(), 2);
        assert_eq!(metric(&m, "dchat_handshake_connections"), "2");
        drop(a);
        drop(b);
        assert!(p.is_empty());
        assert_eq!(metric(&m, "dchat_handshake_connections"), "0");
    }

    #[test]
    fn a_full_pool_evicts_the_connection_waiting_longest() {
        let (p, m) = pool(2);
        let first = admit(&p);
        let second = admit(&p);
        let third = admit(&p);
        assert!(is_evicted(&first));
        assert!(!is_evicted(&second) && !is_evicted(&third));
        assert_eq!(p.len(), 2);
        // The evicted connection closing does not free its successor's place.
        drop(first);
        assert_eq!(p.len(), 2);
        let _fourth = admit(&p);
        assert!(is_evicted(&second));
        assert_eq!(metric(&m, "dchat_handshakes_evicted_total"), "2");
        assert_eq!(metric(&m, "dchat_handshakes_rejected_total"), "0");
    }

    #[test]
    fn connections_being_served_are_not_evicted_and_a_pool_of_them_refuses() {
        let (p, m) = pool(2);
        let busy = admit(&p);
        busy.request_started();
        let waiting = admit(&p);
        let _new = admit(&p);
        assert!(
            is_evicted(&waiting),
            "the waiting one goes, not the busy one"
        );
        assert!(!is_evicted(&busy));
        _new.request_started();
        assert!(matches!(p.admit(), Admission::Full));
        assert_eq!(metric(&m, "dchat_handshakes_rejected_total"), "1");
        assert_eq!(p.len(), 2);
        // A place frees when a connection closes.
        drop(busy);
        let _later = admit(&p);
    }

    #[test]
    fn keep_alive_connections_between_requests_are_evicted_after_older_waiters() {
        let (p, _m) = pool(3);
        let kept = admit(&p);
        let old = admit(&p);
        let young = admit(&p);
        // `kept` serves a request and goes idle: it is now the newest candidate.
        kept.request_started();
        kept.response_done();
        let _a = admit(&p);
        assert!(is_evicted(&old));
        let _b = admit(&p);
        assert!(is_evicted(&young));
        let _c = admit(&p);
        assert!(is_evicted(&kept));
    }

    #[test]
    fn seen_request_is_remembered_across_responses() {
        let (p, _m) = pool(1);
        let s = admit(&p);
        assert!(!s.seen_request());
        s.request_started();
        s.response_done();
        assert!(s.seen_request());
    }

    #[test]
    fn the_eviction_queue_stays_proportional_to_the_pool() {
        let (p, _m) = pool(4);
        // A waiting connection at the front keeps stale items behind it from being
        // popped; compaction still bounds the queue.
        let _oldest = admit(&p);
        let keep = admit(&p);
        for _ in 0..10_000 {
            keep.request_started();
            keep.response_done();
            let s = admit(&p);
            s.request_started();
            drop(s);
        }
        let len = p.lock().queue.len();
        assert!(len <= 2 * 4 + 64 + 1, "queue grew to {len}");
        assert_eq!(p.len(), 2);
    }
}

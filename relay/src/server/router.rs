//! Routing state shared by all connections: live sessions by key, the recent-id
//! dedup cache, and the routing of one message to a key or a channel.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::protocol::frame::{DELIVER_SUFFIX, LIVE_DELIVER_PREFIX};
use crate::protocol::{encode_live_deliver, KeyHex, Kind, RelayEnvelope};
use crate::store::{PutOutcome, StoredMessage};

/// A routed message, shared (one allocation) by every recipient it is pushed to.
#[derive(Debug)]
pub struct Message {
    /// Authenticated sender.
    pub sender: KeyHex,
    /// Client id.
    pub id: String,
    /// Channel, for channel messages.
    pub channel: Option<String>,
    /// Sender timestamp (ms).
    pub ts: i64,
    /// Kind, for metrics.
    pub kind: Kind,
    /// The complete live `deliver` frame (envelope with `from` set, no `seq`), built
    /// once and shared by reference count with every recipient's socket (a channel
    /// message is pushed to many members without copying it per member).
    pub frame: Utf8Bytes,
    /// When the relay received it.
    pub received: Instant,
}

impl Message {
    /// Builds the routed form of a validated envelope whose `from` is set.
    pub fn new(envelope: RelayEnvelope, sender: KeyHex) -> Message {
        let frame = Utf8Bytes::from(encode_live_deliver(&envelope));
        Message {
            sender,
            id: envelope.id,
            channel: envelope.channel,
            ts: envelope.ts,
            kind: envelope.kind,
            frame,
            received: Instant::now(),
        }
    }

    /// The serialized envelope inside [`Message::frame`].
    pub fn envelope_json(&self) -> &str {
        let f = self.frame.as_str();
        f.get(LIVE_DELIVER_PREFIX.len()..f.len().saturating_sub(DELIVER_SUFFIX.len()))
            .unwrap_or("")
    }

    /// The storage form of this message for `recipient`.
    pub fn to_stored(&self, recipient: KeyHex, expires_at_ms: i64) -> StoredMessage {
        StoredMessage {
            recipient: recipient.0,
            sender: self.sender.0,
            id: self.id.clone(),
            channel: self.channel.clone(),
            timestamp_ms: self.ts,
            expires_at_ms,
            kind: self.kind.as_str().to_string(),
            envelope: self.envelope_json().as_bytes().to_vec(),
        }
    }
}

/// The router's handle on one authenticated connection.
#[derive(Debug)]
pub struct SessionHandle {
    /// Unique per relay process.
    pub id: u64,
    /// Bounded queue of live pushes; full means the reader is behind.
    pub tx: mpsc::Sender<Arc<Message>>,
    /// Tells the connection that stored messages may be waiting for it.
    pub wake: Notify,
    /// Whether new messages are pushed live or stored, and the stores for this
    /// session in progress (see [`SessionHandle::go_live`]).
    push: Mutex<PushState>,
    /// Cancelled when another connection takes over this key.
    pub kicked: CancellationToken,
    /// Cancelled once the session has ended and stored its unacknowledged messages; a
    /// newer session of the same key waits for it so those come before newer ones.
    pub finished: CancellationToken,
}

#[derive(Debug, Default)]
struct PushState {
    /// True once the connection has delivered its stored backlog; until then (and
    /// whenever it falls behind) new messages go through storage so per-sender order
    /// is kept.
    live: bool,
    /// Messages for this session being stored right now ([`StoreTicket`]s alive).
    storing: u32,
    /// Stores for this session finished so far.
    stores_done: u64,
}

impl PushState {
    /// No store for the session is running, and none finished since `mark`.
    fn no_store_since(&self, mark: u64) -> bool {
        self.storing == 0 && self.stores_done == mark
    }
}

impl SessionHandle {
    /// A handle (not live: the session first delivers what is stored) for the
    /// session `id` whose live pushes go to `tx`.
    pub fn new(id: u64, tx: mpsc::Sender<Arc<Message>>) -> SessionHandle {
        SessionHandle {
            id,
            tx,
            wake: Notify::new(),
            push: Mutex::new(PushState::default()),
            kicked: CancellationToken::new(),
            finished: CancellationToken::new(),
        }
    }

    fn push_state(&self) -> std::sync::MutexGuard<'_, PushState> {
        self.push.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether new messages for this session are pushed live.
    pub fn is_live(&self) -> bool {
        self.push_state().live
    }

    /// Switches this session to storage until it has caught up, so that later
    /// messages cannot overtake one that is queued or being stored for it.
    pub fn fall_behind(&self) {
        self.push_state().live = false;
    }

    /// [`SessionHandle::fall_behind`] for a sender about to store a message for this
    /// session: the session does not go live again before that store has finished.
    pub fn fall_behind_for_store(self: &Arc<Self>) -> StoreTicket {
        let mut st = self.push_state();
        st.live = false;
        st.storing += 1;
        drop(st);
        StoreTicket(self.clone())
    }

    /// Taken by the session before it reads its stored messages; see
    /// [`SessionHandle::go_live`].
    pub fn catch_up_mark(&self) -> u64 {
        self.push_state().stores_done
    }

    /// Makes the session live after it has delivered everything it read from storage
    /// since `mark` — unless a store for it is still running or finished after the
    /// mark: that message may have been missed by the read, and a later live push of
    /// the same sender would overtake it. Such a store wakes the session when it is
    /// done, and its next catch-up tries again. Returns whether it is live now.
    pub fn go_live(&self, mark: u64) -> bool {
        let mut st = self.push_state();
        if st.no_store_since(mark) {
            st.live = true;
        }
        st.live
    }

    /// Whether the session is live and no store for it has run since `mark` (taken
    /// before a read that found everything stored for it).
    pub fn caught_up_since(&self, mark: u64) -> bool {
        let st = self.push_state();
        st.live && st.no_store_since(mark)
    }
}

/// Held by a sender while it stores a message for a session on this relay that is
/// behind: the session stays off live pushes until the store is done, and is woken
/// when the ticket is dropped (after the store).
#[derive(Debug)]
pub struct StoreTicket(Arc<SessionHandle>);

impl Drop for StoreTicket {
    fn drop(&mut self) {
        let mut st = self.0.push_state();
        st.storing = st.storing.saturating_sub(1);
        st.stores_done += 1;
        drop(st);
        self.0.wake.notify_one();
    }
}

/// Hash map for the lookups made for every message (sessions by key, recent ids,
/// deliveries in flight): foldhash with a per-process random seed instead of std's
/// SipHash-1-3, which showed up as ~2k instructions per routed message. The keys are
/// client-chosen (public keys, message ids); the random seed keeps them from choosing
/// collisions.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

const SHARDS: usize = 64;

/// Live sessions by key, sharded to keep lock contention low.
pub struct Sessions {
    shards: Vec<RwLock<FastMap<KeyHex, Arc<SessionHandle>>>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(FastMap::default()))
                .collect(),
        }
    }
}

impl Sessions {
    fn shard(&self, key: &KeyHex) -> &RwLock<FastMap<KeyHex, Arc<SessionHandle>>> {
        // Keys are uniformly random (public keys), so one byte spreads them well.
        &self.shards[key.0[0] as usize % SHARDS]
    }

    /// The live session of `key`, if connected here.
    pub fn get(&self, key: &KeyHex) -> Option<Arc<SessionHandle>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is
        // still consistent for reads.
        let g = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        g.get(key).cloned()
    }

    /// Registers `handle` for `key`, returning the session it replaced.
    pub fn insert(&self, key: KeyHex, handle: Arc<SessionHandle>) -> Option<Arc<SessionHandle>> {
        let mut g = self.shard(&key).write().unwrap_or_else(|e| e.into_inner());
        g.insert(key, handle)
    }

    /// Removes `key` only if it is still registered to session `id`.
    pub fn remove(&self, key: &KeyHex, id: u64) {
        let mut g = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        if g.get(key).is_some_and(|h| h.id == id) {
            g.remove(key);
        }
    }

    /// Wakes every local session (after a peer link reconnects, stored messages may
    /// have been written by other relays without a notice reaching us).
    pub fn wake_all(&self) {
        for shard in &self.shards {
            let g = shard.read().unwrap_or_else(|e| e.into_inner());
            for h in g.values() {
                h.wake.notify_one();
            }
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`RecentIds::begin`] found for a (sender, id) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: recorded as in flight; settle or forget it when the send ends.
    New,
    /// An earlier send with this id succeeded: a duplicate.
    Settled,
    /// An earlier send with this id is still being stored; its outcome is not known,
    /// so this one can be neither acknowledged nor routed again yet.
    InFlight,
}

/// Bounded memory of recently seen (sender, id) pairs, so a retried send of a
/// message that was pushed live (never stored) is not delivered twice. A pair is
/// "in flight" until its send succeeded: a retry then must not be told "duplicate",
/// because the first attempt may still fail.
pub struct RecentIds {
    shards: Vec<Mutex<RecentShard>>,
    per_shard: usize,
    hasher: foldhash::fast::RandomState,
}

/// A (sender, id) pair as [`RecentIds`] keeps it. The id is shared by reference count
/// between its map, its eviction queue and the send in flight, so recording a send
/// copies the id once (this runs for every message).
pub type RecentKey = (KeyHex, Arc<str>);

/// The [`RecentKey`] of `id` from `sender`.
pub fn recent_key(sender: KeyHex, id: &str) -> RecentKey {
    (sender, Arc::from(id))
}

#[derive(Default)]
struct RecentShard {
    /// Pair -> settled.
    set: FastMap<RecentKey, bool>,
    order: VecDeque<RecentKey>,
}

impl RecentIds {
    /// Remembers up to `capacity` pairs (oldest forgotten first).
    pub fn new(capacity: usize) -> RecentIds {
        let n = 16;
        RecentIds {
            shards: (0..n).map(|_| Mutex::new(RecentShard::default())).collect(),
            per_shard: capacity.div_ceil(n).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &RecentKey) -> std::sync::MutexGuard<'_, RecentShard> {
        let h = self.hasher.hash_one(key);
        self.shards[(h as usize) % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records the pair as in flight unless it is known already.
    pub fn begin(&self, k: &RecentKey) -> Seen {
        let mut s = self.shard(k);
        // One lookup for both the check and the insert (this runs for every message).
        match s.set.entry(k.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => {
                return if *e.get() {
                    Seen::Settled
                } else {
                    Seen::InFlight
                };
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(false);
            }
        }
        s.order.push_back(k.clone());
        if s.order.len() > self.per_shard {
            if let Some(old) = s.order.pop_front() {
                s.set.remove(&old);
            }
        }
        Seen::New
    }

    /// Marks the pair's send as succeeded: later sends with it are duplicates.
    pub fn settle(&self, k: &RecentKey) {
        if let Some(settled) = self.shard(k).set.get_mut(k) {
            *settled = true;
        }
    }

    /// Records the pair as settled right away (tests, and callers without a store step).
    pub fn insert(&self, sender: KeyHex, id: &str) -> bool {
        let k = recent_key(sender, id);
        let new = self.begin(&k) == Seen::New;
        self.settle(&k);
        new
    }

    /// Forgets the pair (the send failed, so a retry must not count as a duplicate).
    pub fn remove(&self, k: &RecentKey) {
        let mut s = self.shard(k);
        if s.set.remove(k).is_some() {
            s.order.retain(|x| x != k);
        }
    }
}

/// Result of offering a message to a live session.
#[derive(Debug)]
pub enum Offer {
    /// Queued on the recipient's connection.
    Pushed,
    /// The recipient is live but its queue is full right now. The sender either waits
    /// for room ([`SessionHandle::tx`]`.reserve()`, backpressure) or stores the message
    /// with the ticket of [`SessionHandle::fall_behind_for_store`].
    Full(Arc<SessionHandle>),
    /// Not pushed (offline, catching up, or closing): store it, holding the ticket
    /// (if the recipient is connected here) until the store is done.
    Store(Option<StoreTicket>),
}

/// Room held in a live session's queue for one message whose send is not decided yet:
/// a sender reserves it before the shared store records the send
/// ([`Sessions::reserve`]), so that once recorded the push cannot fail. A session that
/// ends meanwhile still receives it (its last drain waits for held room), and dropping
/// it frees the room.
#[derive(Debug)]
pub struct Reserved(mpsc::OwnedPermit<Arc<Message>>);

impl Reserved {
    /// Held room in a queue, from its permit.
    pub fn new(permit: mpsc::OwnedPermit<Arc<Message>>) -> Reserved {
        Reserved(permit)
    }

    /// Pushes `msg` into the held room.
    pub fn push(self, msg: Arc<Message>) {
        self.0.send(msg);
    }
}

/// Result of reserving room for a live push ([`Sessions::reserve`]).
#[derive(Debug)]
pub enum Reserve {
    /// Room is held in the recipient's queue.
    Room(Reserved),
    /// The recipient is live but its queue is full right now (as [`Offer::Full`]).
    Full(Arc<SessionHandle>),
    /// Not to be pushed (as [`Offer::Store`]).
    Store(Option<StoreTicket>),
}

impl Sessions {
    /// Like [`Sessions::offer`], but only reserves room in the queue of `to`'s live
    /// session; the sender pushes into it once the send is decided.
    pub fn reserve(&self, to: &KeyHex) -> Reserve {
        let Some(h) = self.get(to) else {
            return Reserve::Store(None);
        };
        {
            let mut st = h.push_state();
            if !st.live {
                st.storing += 1;
                drop(st);
                return Reserve::Store(Some(StoreTicket(h)));
            }
        }
        match h.tx.clone().try_reserve_owned() {
            Ok(permit) => Reserve::Room(Reserved(permit)),
            Err(mpsc::error::TrySendError::Full(_)) => Reserve::Full(h),
            Err(mpsc::error::TrySendError::Closed(_)) => Reserve::Store(None),
        }
    }

    /// Offers a live push to `to`'s session on this relay without waiting.
    pub fn offer(&self, to: &KeyHex, msg: &Arc<Message>) -> Offer {
        let Some(h) = self.get(to) else {
            return Offer::Store(None);
        };
        {
            let mut st = h.push_state();
            if !st.live {
                st.storing += 1;
                drop(st);
                return Offer::Store(Some(StoreTicket(h)));
            }
        }
        match h.tx.try_send(msg.clone()) {
            Ok(()) => Offer::Pushed,
            Err(mpsc::error::TrySendError::Full(_)) => Offer::Full(h),
            // The session is ending (its queue was closed before it stored what was
            // left in it): this message goes to storage too.
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Store(None),
        }
    }
}

/// In-memory channel membership, so a channel message does not read its member list
/// from storage every time (the S2 fan-out hot path).
///
/// Correctness: the cache is only *enabled* when this process is the only writer of
/// memberships — the embedded store (one process owns its file) and no peer relays —
/// see [`MemberCache::set_enabled`]. Every join and leave goes through this process and
/// invalidates its channel *after* the store write returned, and a list read from the
/// store is only cached if no invalidation happened while it was being read (an epoch
/// check), so a cached list never misses a completed join or shows a completed leave.
/// Entries also expire after the TTL: the admin API can load memberships into the
/// store behind the relay's back (restore, merge), and the TTL bounds how long such a
/// change can go unseen. Relays sharing PostgreSQL read the store as before: a
/// membership change on one relay is invisible to the others' caches until a notice
/// arrives, and a message routed in that window would miss a new member for good.
pub struct MemberCache {
    inner: Mutex<MemberInner>,
    enabled: AtomicBool,
    ttl: Duration,
    max_channels: usize,
}

#[derive(Default)]
struct MemberInner {
    map: HashMap<String, (Arc<[KeyHex]>, Instant)>,
    /// Bumped by every invalidation; a load that started in an older epoch is not cached.
    epoch: u64,
}

/// Answer of [`MemberCache::get`].
pub enum CachedMembers {
    /// The member list, ascending key order.
    Hit(Arc<[KeyHex]>),
    /// Not cached: read the store, then [`MemberCache::insert`] with this ticket.
    Miss(u64),
}

impl MemberCache {
    /// A cache (initially disabled) whose entries live `ttl`, holding at most
    /// `max_channels` channels.
    pub fn new(ttl: Duration, max_channels: usize) -> MemberCache {
        MemberCache {
            inner: Mutex::new(MemberInner::default()),
            enabled: AtomicBool::new(false),
            ttl,
            max_channels,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemberInner> {
        // A poisoned lock means a panic elsewhere mid-update; the map is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns caching on or off (off also empties it).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
        if !on {
            self.clear();
        }
    }

    /// Whether lists are cached.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The cached, unexpired member list of `channel`, or a ticket for inserting one.
    pub fn get(&self, channel: &str) -> CachedMembers {
        let g = self.lock();
        match g.map.get(channel) {
            Some((m, at)) if at.elapsed() < self.ttl => CachedMembers::Hit(m.clone()),
            _ => CachedMembers::Miss(g.epoch),
        }
    }

    /// Caches `members` (ascending order) read from the store after `get` returned
    /// `Miss(ticket)`; ignored if anything was invalidated since, or when disabled.
    pub fn insert(&self, channel: &str, members: Arc<[KeyHex]>, ticket: u64) {
        if !self.enabled() {
            return;
        }
        let mut g = self.lock();
        if g.epoch != ticket {
            return;
        }
        if g.map.len() >= self.max_channels && !g.map.contains_key(channel) {
            let ttl = self.ttl;
            g.map.retain(|_, (_, at)| at.elapsed() < ttl);
            if g.map.len() >= self.max_channels {
                return;
            }
        }
        g.map.insert(channel.to_string(), (members, Instant::now()));
    }

    /// Forgets `channel` (call after its membership changed in the store).
    pub fn invalidate(&self, channel: &str) {
        let mut g = self.lock();
        g.map.remove(channel);
        g.epoch = g.epoch.wrapping_add(1);
    }

    /// Forgets every channel (after memberships changed in bulk, e.g. a restore).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.map.clear();
        g.epoch = g.epoch.wrapping_add(1);
    }

    /// Number of cached channels.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True when a store outcome created a new pending message.
pub fn is_new(o: &PutOutcome) -> bool {
    matches!(o, PutOutcome::Stored { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_a_duplicate_only_once_the_first_send_succeeded() {
        let r = RecentIds::new(16);
        let m = recent_key(KeyHex([3; 32]), "m");
        assert_eq!(r.begin(&m), Seen::New);
        // The first attempt is still being stored: not a duplicate yet.
        assert_eq!(r.begin(&recent_key(KeyHex([3; 32]), "m")), Seen::InFlight);
        // It failed and was forgotten: the retry is a new send.
        r.remove(&m);
        assert_eq!(r.begin(&m), Seen::New);
        r.settle(&m);
        assert_eq!(r.begin(&m), Seen::Settled);
        assert_eq!(r.begin(&recent_key(KeyHex([4; 32]), "m")), Seen::New);
    }

    #[test]
    fn recent_ids_dedup_and_forget_oldest() {
        let r = RecentIds::new(16);
        let k = KeyHex([1; 32]);
        assert!(r.insert(k, "a"));
        assert!(!r.insert(k, "a"));
        assert!(r.insert(KeyHex([2; 32]), "a"));
        r.remove(&recent_key(k, "a"));
        assert!(r.insert(k, "a"));
        for i in 0..1000 {
            r.insert(k, &i.to_string());
        }
        // Bounded: old entries are forgotten.
        let total: usize = r.shards.iter().map(|s| s.lock().unwrap().set.len()).sum();
        assert!(total <= 16, "{total}");
    }

    fn list(keys: &[u8]) -> Arc<[KeyHex]> {
        keys.iter().map(|b| KeyHex([*b; 32])).collect()
    }

    fn hit(c: &MemberCache, ch: &str) -> Option<Arc<[KeyHex]>> {
        match c.get(ch) {
            CachedMembers::Hit(m) => Some(m),
            CachedMembers::Miss(_) => None,
        }
    }

    fn ticket(c: &MemberCache, ch: &str) -> u64 {
        match c.get(ch) {
            CachedMembers::Miss(t) => t,
            CachedMembers::Hit(_) => panic!("expected a miss for {ch}"),
        }
    }

    #[test]
    fn member_cache_disabled_caches_nothing() {
        let c = MemberCache::new(Duration::from_secs(60), 8);
        let t = ticket(&c, "a");
        c.insert("a", list(&[1, 2]), t);
        assert!(hit(&c, "a").is_none());
        c.set_enabled(true);
        let t = ticket(&c, "a");
        c.insert("a", list(&[1, 2]), t);
        assert_eq!(&*hit(&c, "a").unwrap(), &*list(&[1, 2]));
        // Turning it off empties it.
        c.set_enabled(false);
        assert!(c.is_empty());
    }

    #[test]
    fn member_cache_invalidation_wins_over_a_concurrent_load() {
        let c = MemberCache::new(Duration::from_secs(60), 8);
        c.set_enabled(true);
        // A load starts (miss), a join on another channel or this one completes and
        // invalidates, then the load finishes: its (possibly stale) list is not cached.
        let t = ticket(&c, "a");
        c.invalidate("a");
        c.insert("a", list(&[1]), t);
        assert!(hit(&c, "a").is_none());
        let t = ticket(&c, "a");
        c.clear();
        c.insert("a", list(&[1]), t);
        assert!(hit(&c, "a").is_none());
        // A load that started after the invalidation is cached.
        let t = ticket(&c, "a");
        c.insert("a", list(&[1, 3]), t);
        assert_eq!(&*hit(&c, "a").unwrap(), &*list(&[1, 3]));
        // Invalidation removes exactly that channel.
        let t = ticket(&c, "b");
        c.insert("b", list(&[2]), t);
        c.invalidate("a");
        assert!(hit(&c, "a").is_none());
        assert!(hit(&c, "b").is_some());
    }

    #[test]
    fn member_cache_entries_expire_and_size_is_bounded() {
        let c = MemberCache::new(Duration::ZERO, 8);
        c.set_enabled(true);
        let t = ticket(&c, "a");
        c.insert("a", list(&[1]), t);
        // TTL zero: never served.
        assert!(hit(&c, "a").is_none());

        let c = MemberCache::new(Duration::from_secs(60), 2);
        c.set_enabled(true);
        for ch in ["a", "b", "c"] {
            let t = ticket(&c, ch);
            c.insert(ch, list(&[1]), t);
        }
        assert_eq!(c.len(), 2);
        assert!(hit(&c, "c").is_none());
        // Replacing a cached channel is always possible.
        let t = match c.get("a") {
            CachedMembers::Hit(_) => c.lock().epoch,
            CachedMembers::Miss(t) => t,
        };
        c.insert("a", list(&[1, 2]), t);
        assert_eq!(hit(&c, "a").unwrap().len(), 2);
    }
}

//! Routing state shared by all connections: live sessions by key, the recent-id
//! dedup cache, and the routing of one message to a key or a channel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::protocol::{KeyHex, Kind};
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
    /// Serialized envelope (with `from` set).
    pub envelope: Arc<str>,
    /// When the relay received it.
    pub received: Instant,
}

impl Message {
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
            envelope: self.envelope.as_bytes().to_vec(),
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
    /// True once the connection has delivered its stored backlog; until then (and
    /// whenever it falls behind) new messages go through storage so per-sender
    /// order is kept.
    pub live: AtomicBool,
    /// Cancelled when another connection takes over this key.
    pub kicked: CancellationToken,
    /// Cancelled once the session has ended and stored its unacknowledged messages; a
    /// newer session of the same key waits for it so those come before newer ones.
    pub finished: CancellationToken,
}

const SHARDS: usize = 64;

/// Live sessions by key, sharded to keep lock contention low.
pub struct Sessions {
    shards: Vec<RwLock<HashMap<KeyHex, Arc<SessionHandle>>>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }
}

impl Sessions {
    fn shard(&self, key: &KeyHex) -> &RwLock<HashMap<KeyHex, Arc<SessionHandle>>> {
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

/// Bounded memory of recently seen (sender, id) pairs, so a retried send of a
/// message that was pushed live (never stored) is not delivered twice.
pub struct RecentIds {
    shards: Vec<Mutex<RecentShard>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

#[derive(Default)]
struct RecentShard {
    set: HashSet<(KeyHex, String)>,
    order: VecDeque<(KeyHex, String)>,
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

    fn shard(&self, key: &(KeyHex, String)) -> &Mutex<RecentShard> {
        let h = self.hasher.hash_one(key);
        &self.shards[(h as usize) % self.shards.len()]
    }

    /// Records the pair; false if it was already recorded (a duplicate).
    pub fn insert(&self, sender: KeyHex, id: &str) -> bool {
        let k = (sender, id.to_string());
        let mut s = self.shard(&k).lock().unwrap_or_else(|e| e.into_inner());
        if s.set.contains(&k) {
            return false;
        }
        if s.order.len() >= self.per_shard {
            if let Some(old) = s.order.pop_front() {
                s.set.remove(&old);
            }
        }
        s.set.insert(k.clone());
        s.order.push_back(k);
        true
    }

    /// Forgets the pair (the send failed, so a retry must not count as a duplicate).
    pub fn remove(&self, sender: KeyHex, id: &str) {
        let k = (sender, id.to_string());
        let mut s = self.shard(&k).lock().unwrap_or_else(|e| e.into_inner());
        if s.set.remove(&k) {
            s.order.retain(|x| x != &k);
        }
    }
}

/// Result of offering a message to a live session.
pub enum Offer {
    /// Queued on the recipient's connection.
    Pushed,
    /// Not pushed (offline, catching up, or queue full): store it.
    Store,
}

impl Sessions {
    /// Offers a live push to `to`'s session on this relay.
    pub fn offer(&self, to: &KeyHex, msg: &Arc<Message>) -> Offer {
        let Some(h) = self.get(to) else {
            return Offer::Store;
        };
        if !h.live.load(Ordering::Acquire) {
            return Offer::Store;
        }
        match h.tx.try_send(msg.clone()) {
            Ok(()) => Offer::Pushed,
            Err(_) => {
                // Behind: switch this session to storage until it has caught up, so later
                // messages cannot overtake this one.
                h.live.store(false, Ordering::Release);
                Offer::Store
            }
        }
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
    fn recent_ids_dedup_and_forget_oldest() {
        let r = RecentIds::new(16);
        let k = KeyHex([1; 32]);
        assert!(r.insert(k, "a"));
        assert!(!r.insert(k, "a"));
        assert!(r.insert(KeyHex([2; 32]), "a"));
        r.remove(k, "a");
        assert!(r.insert(k, "a"));
        for i in 0..1000 {
            r.insert(k, &i.to_string());
        }
        // Bounded: old entries are forgotten.
        let total: usize = r.shards.iter().map(|s| s.lock().unwrap().set.len()).sum();
        assert!(total <= 16, "{total}");
    }
}

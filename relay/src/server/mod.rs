//! The relay server: listeners, shared state, HTTP endpoints, connection handling
//! and the drain sequence.
//!
//! [`Relay::bind`] opens storage and binds both ports; [`Relay::run`] serves until
//! the shutdown future resolves, then drains (see `docs/relay.md`).
//!
//! The files, from the listener inwards:
//! - this file: [`Relay`] (bind, run, drain), [`Shared`] (the state every connection
//!   and endpoint shares) and the timed storage calls on it;
//! - `accept.rs`, `accept_thread.rs`, `handshake.rs`: accepting connections (on a
//!   low-priority thread per listener) and serving HTTP on them; the bound on
//!   connections that are not WebSockets and the handshake deadline;
//! - `http.rs`, `admin.rs`: the HTTP routes of both ports and the admin API;
//! - `connection.rs`: one client connection: socket writes and flushes, rate limit,
//!   the challenge/response handshake, the close;
//! - `session.rs`: the authenticated session: taking over from an earlier session of
//!   the key, the event loop, the dispatch of each request;
//! - `delivery.rs`: deliveries to the session's client: the in-flight window, live
//!   pushes, the stored-message pump, acks, storing what is left in flight at the end;
//! - `send.rs`: the `send` request: routing, waiting for room, batched stores, answers;
//! - `requests.rs`: join/leave and profile publish/get;
//! - `fan_out.rs`: a routed message beyond the sender's session: channel fan-out,
//!   stored copies, sends recorded in a shared store, wake-ups here and on peers;
//! - `router.rs`: live sessions by key and their push queues, the recent-id cache,
//!   the channel member cache;
//! - `overload.rs`, `limits.rs`: load shedding and the per-connection token bucket.

pub mod accept;
mod accept_thread;
pub mod admin;
pub mod connection;
mod delivery;
pub mod fan_out;
pub mod handshake;
pub mod http;
pub mod limits;
pub mod overload;
mod requests;
pub mod router;
mod send;
mod session;
mod socket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::cluster::{Cluster, LocalSessions};
use crate::config::{Config, StorageSettings};
use crate::metrics::{Metrics, OpErrorLabel, OpLabel};
use crate::store::{
    EmbeddedStore, Pending, PostgresConfig, PostgresStore, PutOutcome, Store, StoreError,
    StoredMessage,
};

pub use connection::DRAIN_REASON;

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Storage could not be opened.
    #[error("opening storage: {0}")]
    Store(#[from] StoreError),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("serving {what}: {source}")]
    Serve {
        /// Which listener.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The storage backends the server holds: the trait object everything routes through,
/// plus the concrete embedded store for snapshot/restore.
#[derive(Clone)]
pub struct Storage {
    /// Store used for all message operations.
    pub store: Arc<dyn Store>,
    /// The embedded store, when that is the backend (admin snapshot/restore).
    pub embedded: Option<Arc<EmbeddedStore>>,
}

impl Storage {
    /// Opens the configured backend.
    pub async fn open(settings: &StorageSettings) -> Result<Storage, StoreError> {
        match settings {
            StorageSettings::Embedded { dir, options } => {
                let store = crate::store::open_embedded(dir, options).await?;
                let store = Arc::new(store);
                Ok(Storage {
                    store: store.clone(),
                    embedded: Some(store),
                })
            }
            StorageSettings::Postgres {
                host,
                port,
                dbname,
                user,
                password,
                max_connections,
            } => {
                let pg = PostgresConfig {
                    host: host.clone(),
                    port: *port,
                    dbname: dbname.clone(),
                    user: user.clone(),
                    password: password.clone(),
                    max_connections: *max_connections,
                };
                Ok(Storage {
                    store: Arc::new(PostgresStore::connect(&pg).await?),
                    embedded: None,
                })
            }
        }
    }
}

/// State shared by every connection and endpoint of one relay process.
pub struct Shared {
    /// Validated configuration.
    pub cfg: Config,
    /// Message storage.
    pub store: Arc<dyn Store>,
    /// Embedded store handle for the admin API.
    pub embedded: Option<Arc<EmbeddedStore>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live sessions by key.
    pub sessions: router::Sessions,
    /// Recent (sender, id) pairs for dedup of live messages; used only where the
    /// store does not decide duplicates (`sends_recorded` false).
    pub recent: router::RecentIds,
    /// The store decides which sends are duplicates for every relay sharing it
    /// (PostgreSQL, [`Store::records_sends`]): a send is pushed, stored and answered only
    /// after the store recorded it, and the recent-id cache is not consulted, so that
    /// no relay answers from its own memory what the shared store knows better.
    pub sends_recorded: bool,
    /// Set first on drain: readiness false, new connections refused.
    pub draining: AtomicBool,
    /// Cancelled to close every connection (drain).
    pub shutdown: CancellationToken,
    /// Tracks connection tasks so drain can wait for them.
    pub tracker: TaskTracker,
    /// Caps concurrent connections.
    pub conn_limit: Arc<Semaphore>,
    /// Peer links (wake notices to the other relays of a cluster).
    pub cluster: Cluster,
    /// Random id of this process (peer links refuse to connect to themselves).
    pub instance_id: String,
    /// Session id allocator.
    pub next_session: AtomicU64,
    /// Channel member lists (enabled only on a single relay with the embedded store;
    /// see [`router::MemberCache`]).
    pub channels: router::MemberCache,
    /// Bumped when the admin API loads a snapshot into the store (restore, merge):
    /// sessions then read their stored messages from the start again.
    pub store_generation: AtomicU64,
    /// Load shedding state (see [`overload`]).
    pub overload: overload::Overload,
}

/// How long a cached channel member list is served before it is read again. Joins and
/// leaves through this relay invalidate at once; the TTL only bounds how long a change
/// made behind the relay's back (admin restore or merge) goes unseen.
pub const MEMBER_CACHE_TTL: Duration = Duration::from_millis(250);
/// Most channels whose member lists are cached.
pub const MEMBER_CACHE_CHANNELS: usize = 4096;

impl Shared {
    /// Times a storage call and counts its errors.
    pub async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let r = fut.await;
        self.metrics
            .store_latency
            .get_or_create(&OpLabel { op })
            .observe(start.elapsed().as_secs_f64());
        if let Err(e) = &r {
            self.metrics
                .store_errors
                .get_or_create(&OpErrorLabel {
                    op,
                    error: e.metric_label(),
                })
                .inc();
        }
        r
    }

    /// Members of `channel` in ascending key order, from the cache when it is enabled.
    pub async fn members(
        &self,
        channel: &str,
    ) -> Result<Arc<[crate::protocol::KeyHex]>, StoreError> {
        let ticket = match self.channels.get(channel) {
            router::CachedMembers::Hit(m) => return Ok(m),
            router::CachedMembers::Miss(t) => t,
        };
        let list = self
            .timed("channel_members", self.store.channel_members(channel))
            .await?;
        let mut list: Vec<crate::protocol::KeyHex> =
            list.into_iter().map(crate::protocol::KeyHex).collect();
        // Routing looks the sender up by binary search; the store already returns
        // ascending order, so this is a linear check in practice.
        list.sort_unstable();
        let list: Arc<[crate::protocol::KeyHex]> = list.into();
        self.channels.insert(channel, list.clone(), ticket);
        Ok(list)
    }

    /// Durable put.
    pub async fn put(&self, m: StoredMessage) -> Result<PutOutcome, StoreError> {
        self.timed("put", self.store.put(m)).await
    }

    /// Durable batch put.
    pub async fn put_many(&self, m: Vec<StoredMessage>) -> Result<Vec<PutOutcome>, StoreError> {
        self.timed("put_many", self.store.put_many(m)).await
    }

    /// Pending messages of `key` after `after`.
    pub async fn pending(
        &self,
        key: &crate::protocol::KeyHex,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Pending>, StoreError> {
        self.timed(
            "pending",
            self.store
                .pending(&key.0, after, limit, connection::now_ms()),
        )
        .await
    }

    /// Stored messages become visible in seq order: the embedded store's one writer
    /// assigns seqs as it commits. A session then never has to read again the stored
    /// messages it has already passed (PostgreSQL commits concurrent inserts in any
    /// order, so a lower seq can appear after a higher one was read).
    pub fn seqs_in_commit_order(&self) -> bool {
        self.embedded.is_some()
    }

    /// True while serving normally (not draining).
    pub fn accepting(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
    }
}

/// What peer links wake: this relay's sessions.
impl LocalSessions for Shared {
    fn wake(&self, key: &crate::protocol::KeyHex) {
        self.wake_local(key);
    }

    fn wake_all(&self) {
        self.sessions.wake_all();
    }
}

/// Binds a listener with `backlog` (`DCHAT_LISTEN_BACKLOG`). tokio's `bind` listens
/// with a backlog of 128 (the standard library's): a burst of connections beyond what
/// the accept loop takes in that time overflows it, and the kernel then drops
/// handshakes — a client may see its connection established and later reset.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted relay rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A bound, not yet running relay.
pub struct Relay {
    shared: Arc<Shared>,
    listener: TcpListener,
    metrics_listener: TcpListener,
    extra_peers: Vec<String>,
}

/// What a drain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open when the grace period ran out (0 = clean).
    pub abandoned_connections: usize,
    /// Whether the final storage flush succeeded.
    pub flushed: bool,
}

impl Relay {
    /// Opens storage and binds the client and metrics listeners.
    pub async fn bind(cfg: Config) -> Result<Relay, ServerError> {
        let storage = Storage::open(&cfg.storage).await?;
        Relay::bind_with_storage(cfg, storage).await
    }

    /// Binds with an already opened storage. An embedded store must not be shared by
    /// two running relays (each caches channel memberships as the store's only writer).
    pub async fn bind_with_storage(cfg: Config, storage: Storage) -> Result<Relay, ServerError> {
        let listener =
            listen(cfg.listen, cfg.listen_backlog).map_err(|source| ServerError::Bind {
                what: "client listener (DCHAT_LISTEN)",
                addr: cfg.listen,
                source,
            })?;
        let metrics_listener =
            listen(cfg.metrics_listen, cfg.listen_backlog).map_err(|source| ServerError::Bind {
                what: "metrics listener (DCHAT_METRICS_LISTEN)",
                addr: cfg.metrics_listen,
                source,
            })?;
        let metrics = Arc::new(Metrics::new());
        let mut id = [0u8; 8];
        // Uniqueness, not secrecy: fall back to the clock if the OS has no randomness.
        if getrandom::fill(&mut id).is_err() {
            id = (connection::now_ms() as u64).to_le_bytes();
        }
        let instance_id = hex::encode(id);
        let cluster = Cluster::new(instance_id.clone(), metrics.clone());
        let sends_recorded = storage.store.records_sends();
        let shared = Arc::new(Shared {
            conn_limit: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            store: storage.store,
            embedded: storage.embedded,
            metrics,
            sessions: router::Sessions::default(),
            recent: router::RecentIds::new(65_536),
            sends_recorded,
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            cluster,
            instance_id,
            next_session: AtomicU64::new(1),
            channels: router::MemberCache::new(MEMBER_CACHE_TTL, MEMBER_CACHE_CHANNELS),
            store_generation: AtomicU64::new(0),
            overload: overload::Overload::default(),
        });
        // Member lists may be cached only where this process is the sole writer of
        // memberships: the embedded store, no other relay ([`Relay::add_peer`] turns
        // it off again).
        shared.channels.set_enabled(
            shared.embedded.is_some()
                && shared.cfg.peers.is_empty()
                && shared.cfg.peer_dns.is_none(),
        );
        Ok(Relay {
            shared,
            listener,
            metrics_listener,
            extra_peers: Vec::new(),
        })
    }

    /// Address of the client listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.shared.cfg.listen)
    }

    /// Address of the metrics/admin listener.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .unwrap_or(self.shared.cfg.metrics_listen)
    }

    /// Adds a peer base URL (`ws://host:port`) besides the configured ones; used when
    /// peer addresses are only known after binding (tests, embedding).
    pub fn add_peer(&mut self, url: impl Into<String>) {
        self.extra_peers.push(url.into());
        self.shared.channels.set_enabled(false);
    }

    /// The shared state (tests, embedding).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then drains: readiness false, stop accepting,
    /// close every client with [`DRAIN_REASON`], store unacknowledged live messages,
    /// flush storage — all within the configured grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<DrainReport, ServerError> {
        let Relay {
            shared,
            listener,
            metrics_listener,
            extra_peers,
        } = self;
        let stop_accept = CancellationToken::new();
        let stop_metrics = CancellationToken::new();
        let background = CancellationToken::new();

        // Each port has its own pool of handshake places, so a flood of one cannot
        // keep the other (probes, scrapes, the admin API) from being served. Each
        // accepts on a low-priority thread of its own (accept_thread.rs), and its
        // connections come to this runtime when their request head is complete.
        let sessions = tokio::runtime::Handle::current();
        let start = |name: &'static str, listener, router, nodelay, stop: &CancellationToken| {
            let pool =
                handshake::HandshakePool::new(name, shared.cfg.max_handshakes, &shared.metrics);
            let settings = accept::ListenerSettings {
                name,
                handshake_timeout: shared.cfg.handshake_timeout,
                nodelay,
            };
            let serve = accept::serve(
                listener,
                router,
                pool,
                settings,
                stop.clone(),
                sessions.clone(),
            );
            accept_thread::AcceptThread::start(name, serve)
                .map_err(|source| ServerError::Serve { what: name, source })
        };
        let client_router = http::client_router(shared.clone());
        let mut serve_task = start("client", listener, client_router, true, &stop_accept)?;
        let metrics_router = http::metrics_router(shared.clone());
        let mut metrics_task = start(
            "metrics",
            metrics_listener,
            metrics_router,
            false,
            &stop_metrics,
        )?;
        let expiry = tokio::spawn(expiry_loop(shared.clone(), background.clone()));
        let load = tokio::spawn(overload::monitor(shared.clone(), background.clone()));
        let peers = shared
            .cfg
            .peers
            .iter()
            .cloned()
            .chain(extra_peers)
            .collect();
        let cluster = shared
            .cluster
            .start(peers, shared.cfg.peer_dns.clone(), background.clone());

        tokio::select! {
            _ = shutdown => {}
            () = serve_task.finished() => {
                // The listener died on its own: drain what we have and report.
                warn!("client listener stopped unexpectedly");
            }
        }

        // ---- drain ----
        let started = tokio::time::Instant::now();
        let grace = shared.cfg.drain_grace;
        info!(
            grace_secs = grace.as_secs(),
            "draining: readiness is now false"
        );
        shared.draining.store(true, Ordering::Release);
        if !shared.cfg.drain_delay.is_zero() {
            tokio::time::sleep(shared.cfg.drain_delay).await;
        }
        stop_accept.cancel();
        shared.shutdown.cancel();
        shared.tracker.close();
        // Keep a share of the grace period for the storage flush.
        let budget = grace.saturating_sub(started.elapsed()).mul_f64(0.8);
        let abandoned = match tokio::time::timeout(budget, shared.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => shared.tracker.len(),
        };
        background.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), serve_task.finished()).await;
        serve_task.abandon();
        expiry.abort();
        load.abort();
        cluster.abort();
        let flushed = match tokio::time::timeout(
            grace
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(500)),
            shared.store.flush(),
        )
        .await
        {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                warn!(error = %e, "storage flush failed during drain");
                false
            }
            Err(_) => {
                warn!("storage flush timed out during drain");
                false
            }
        };
        stop_metrics.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), metrics_task.finished()).await;
        metrics_task.abandon();
        info!(abandoned, flushed, "drain complete");
        Ok(DrainReport {
            abandoned_connections: abandoned,
            flushed,
        })
    }

    /// Starts the relay on a background task (tests, embedding). Dropping the
    /// returned handle does not stop it; call [`RunningRelay::drain`].
    pub fn spawn(self) -> RunningRelay {
        let addr = self.local_addr();
        let metrics_addr = self.metrics_addr();
        let shared = self.shared();
        let trigger = CancellationToken::new();
        let t = trigger.clone();
        let join = tokio::spawn(self.run(async move { t.cancelled().await }));
        RunningRelay {
            addr,
            metrics_addr,
            shared,
            trigger,
            join,
        }
    }
}

/// A relay running on a background task.
pub struct RunningRelay {
    /// Client listener address.
    pub addr: SocketAddr,
    /// Metrics/admin listener address.
    pub metrics_addr: SocketAddr,
    /// Shared state.
    pub shared: Arc<Shared>,
    trigger: CancellationToken,
    join: tokio::task::JoinHandle<Result<DrainReport, ServerError>>,
}

impl RunningRelay {
    /// WebSocket URL of the client endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Base URL (peer links append `/v1/peer`).
    pub fn base_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Drains and waits for the relay to stop.
    pub async fn drain(self) -> Result<DrainReport, ServerError> {
        self.trigger.cancel();
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Serve {
                what: "relay task",
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

/// Deletes expired messages periodically.
async fn expiry_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let every = (shared.cfg.message_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared
            .timed("expire", shared.store.expire(connection::now_ms()))
            .await
        {
            Ok(n) => {
                if n > 0 {
                    shared.metrics.expired.inc_by(n);
                    info!(count = n, "expired stored messages");
                }
            }
            Err(e) => warn!(error = %e, "expiring messages failed"),
        }
    }
}

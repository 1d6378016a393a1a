//! Cluster: relays that share one PostgreSQL database act as one service.
//!
//! Design (see `docs/relay.md`): every message that is not pushed live on the relay
//! that received it is stored in the shared database first. The receiving relay then
//! sends a small *wake notice* (the recipient key) over peer links to every other
//! relay; a relay holding a session for that key reads the key's pending messages
//! from the database and delivers them. Peer links therefore carry no message data:
//! a lost notice only delays delivery until the recipient's next wake, fetch or
//! reconnect, and a forged one only causes a harmless extra read.
//!
//! Peers come from `DCHAT_PEERS` (static URLs) and/or `DCHAT_PEER_DNS` (the headless
//! Service name, re-resolved every [`DNS_INTERVAL`]). Links to oneself are refused
//! by instance id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::protocol::KeyHex;
use crate::server::Shared;

/// How often the peer DNS name is re-resolved.
pub const DNS_INTERVAL: Duration = Duration::from_secs(10);
/// Minimum time between two honoured `wake_all` notices on one link.
const WAKE_ALL_INTERVAL: Duration = Duration::from_secs(1);
/// Most keys in one wake frame.
const WAKE_BATCH: usize = 256;

/// Frames on a peer link (relay to relay, JSON text frames).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerFrame {
    /// Stored messages are waiting for these keys.
    Wake {
        /// Recipient keys.
        keys: Vec<KeyHex>,
    },
    /// Notices may have been lost: every session should re-check storage.
    WakeAll,
}

/// Sending side of the wake notices.
pub struct Cluster {
    tx: broadcast::Sender<KeyHex>,
    instance_id: String,
    metrics: Arc<Metrics>,
}

impl Cluster {
    /// Creates the notice channel; links subscribe to it when they start.
    pub fn new(instance_id: String, metrics: Arc<Metrics>) -> Cluster {
        let (tx, _) = broadcast::channel(8192);
        Cluster {
            tx,
            instance_id,
            metrics,
        }
    }

    /// Tells every peer that `key` has stored messages waiting.
    pub fn wake(&self, key: KeyHex) {
        if self.tx.receiver_count() > 0 && self.tx.send(key).is_ok() {
            self.metrics.peer_wakes_sent.inc();
        }
    }
}

/// Query of the peer endpoint.
#[derive(Deserialize)]
pub struct PeerQuery {
    /// Instance id of the connecting relay.
    #[serde(default)]
    instance: String,
}

/// `GET /v1/peer`: accepts a link from another relay.
pub async fn peer_upgrade(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<PeerQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    if q.instance == shared.instance_id {
        return (StatusCode::CONFLICT, "this is me\n").into_response();
    }
    if !shared.accepting() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    // Peer links count against the same connection cap as clients, so the endpoint
    // cannot be used to exhaust memory.
    let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
    let token = shared.tracker.token();
    crate::server::http::configure_ws(ws, 1 << 20).on_upgrade(move |socket| async move {
        let _permit = permit;
        let _token = token;
        serve_peer(shared, socket, q.instance).await;
    })
}

async fn serve_peer(shared: Arc<Shared>, mut ws: WebSocket, from: String) {
    info!(peer = %from, "peer link accepted");
    // Notices sent while no link existed are lost: have every session re-check.
    shared.sessions.wake_all();
    let stop = shared.shutdown.clone();
    // `wake_all` makes every session re-read storage: it is honoured at most once a
    // second per link (a later one is deferred, never dropped), so a misbehaving peer
    // cannot turn it into a read storm.
    let mut last_wake_all: Option<Instant> = None;
    let mut deferred: Option<Instant> = None;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            _ = async { tokio::time::sleep_until(deferred.unwrap_or_else(Instant::now)).await }, if deferred.is_some() => {
                deferred = None;
                last_wake_all = Some(Instant::now());
                shared.sessions.wake_all();
                continue;
            }
            m = ws.recv() => m,
        };
        let text = match msg {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        match serde_json::from_str::<PeerFrame>(text.as_str()) {
            Ok(PeerFrame::Wake { keys }) => {
                shared.metrics.peer_wakes_received.inc_by(keys.len() as u64);
                for k in keys {
                    shared.wake_local(&k);
                }
            }
            Ok(PeerFrame::WakeAll) => {
                let now = Instant::now();
                match last_wake_all {
                    Some(t) if now.duration_since(t) < WAKE_ALL_INTERVAL => {
                        deferred.get_or_insert(t + WAKE_ALL_INTERVAL);
                    }
                    _ => {
                        last_wake_all = Some(now);
                        shared.sessions.wake_all();
                    }
                }
            }
            Err(e) => debug!(peer = %from, error = %e, "bad peer frame ignored"),
        }
    }
    let _ = ws.send(WsMessage::Close(None)).await;
    info!(peer = %from, "peer link closed");
}

/// Starts the link manager (static peers and DNS discovery).
pub fn start(
    shared: Arc<Shared>,
    extra_peers: Vec<String>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for url in shared.cfg.peers.iter().cloned().chain(extra_peers) {
            tokio::spawn(link(shared.clone(), url, stop.child_token()));
        }
        let Some(name) = shared.cfg.peer_dns.clone() else {
            return;
        };
        let mut links: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        let mut tick = tokio::time::interval(DNS_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(name.as_str()).await {
                Ok(a) => a.collect(),
                Err(e) => {
                    debug!(name = %name, error = %e, "peer DNS lookup failed");
                    continue;
                }
            };
            links.retain(|addr, tok| {
                let keep = addrs.contains(addr);
                if !keep {
                    tok.cancel();
                }
                keep
            });
            for a in addrs {
                links.entry(a).or_insert_with(|| {
                    let tok = stop.child_token();
                    tokio::spawn(link(shared.clone(), format!("ws://{a}"), tok.clone()));
                    tok
                });
            }
        }
    })
}

/// One outgoing link: connects, forwards wake notices, reconnects with backoff.
async fn link(shared: Arc<Shared>, base: String, stop: CancellationToken) {
    let url = format!("{base}/v1/peer?instance={}", shared.cluster.instance_id);
    let mut backoff = Duration::from_millis(100);
    loop {
        // Subscribe before connecting so nothing sent during the handshake is missed.
        let mut rx = shared.cluster.tx.subscribe();
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true) => c,
        };
        match conn {
            Ok((mut ws, _)) => {
                backoff = Duration::from_millis(100);
                info!(peer = %base, "peer link up");
                shared.metrics.peer_links.inc();
                let r = forward(&mut ws, &mut rx, &stop).await;
                shared.metrics.peer_links.dec();
                let _ = ws.close(None).await;
                if r.is_ok() {
                    return;
                }
                info!(peer = %base, "peer link down; reconnecting");
            }
            Err(tungstenite::Error::Http(resp)) if resp.status() == StatusCode::CONFLICT => {
                debug!(peer = %base, "peer is this relay; link not needed");
                return;
            }
            Err(e) => debug!(peer = %base, error = %e, "peer connect failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

type PeerStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Forwards notices until stopped (Ok) or the link fails (Err).
async fn forward(
    ws: &mut PeerStream,
    rx: &mut broadcast::Receiver<KeyHex>,
    stop: &CancellationToken,
) -> Result<(), ()> {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            k = rx.recv() => k,
            m = ws.next() => match m {
                Some(Ok(_)) => continue,
                _ => return Err(()),
            },
        };
        let frame = match first {
            Ok(k) => {
                let mut keys = vec![k];
                while keys.len() < WAKE_BATCH {
                    match rx.try_recv() {
                        Ok(k) => keys.push(k),
                        Err(_) => break,
                    }
                }
                PeerFrame::Wake { keys }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "peer link lagged; asking peer to re-check all sessions"
                );
                PeerFrame::WakeAll
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        let text = serde_json::to_string(&frame).map_err(|_| ())?;
        ws.send(tungstenite::Message::Text(text.into()))
            .await
            .map_err(|_| ())?;
    }
}

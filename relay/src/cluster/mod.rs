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
//!
//! This module does not know the server: the server holds a [`Cluster`], starts its
//! links ([`Cluster::start`]), serves the `/v1/peer` endpoint and hands each accepted
//! link to [`Cluster::serve_peer`] together with its sessions, seen only through
//! [`LocalSessions`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket};
use axum::http::StatusCode;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::protocol::KeyHex;

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

/// What peer links ask of the relay they run in: waking its sessions, which then read
/// their stored messages.
pub trait LocalSessions: Send + Sync {
    /// Stored messages are waiting for `key`: wake its session here, if there is one.
    fn wake(&self, key: &KeyHex);
    /// Notices may have been lost: every session here re-checks storage.
    fn wake_all(&self);
}

/// The peer links of one relay: the sending side of the wake notices, the links it
/// starts ([`Cluster::start`]) and those it serves ([`Cluster::serve_peer`]). Cheap to
/// clone (each outgoing link holds one).
#[derive(Clone)]
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

    /// Serves one link accepted from the relay `from` (`GET /v1/peer`): wakes the sessions
    /// of `local` that its notices name, until `stop` is cancelled or the link closes.
    pub async fn serve_peer(
        &self,
        mut ws: WebSocket,
        from: String,
        local: &impl LocalSessions,
        stop: CancellationToken,
    ) {
        info!(peer = %from, "peer link accepted");
        // Notices sent while no link existed are lost: have every session re-check.
        local.wake_all();
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
                    local.wake_all();
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
                    self.metrics.peer_wakes_received.inc_by(keys.len() as u64);
                    for k in keys {
                        local.wake(&k);
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
                            local.wake_all();
                        }
                    }
                }
                Err(e) => debug!(peer = %from, error = %e, "bad peer frame ignored"),
            }
        }
        let _ = ws.send(WsMessage::Close(None)).await;
        info!(peer = %from, "peer link closed");
    }

    /// Starts the link manager: a link to each of `peers` (base URLs) and, with
    /// `peer_dns`, to every address the name resolves to (re-resolved every
    /// [`DNS_INTERVAL`]).
    pub fn start(
        &self,
        peers: Vec<String>,
        peer_dns: Option<String>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let cluster = self.clone();
        tokio::spawn(async move {
            for url in peers {
                tokio::spawn(link(cluster.clone(), url, stop.child_token()));
            }
            let Some(name) = peer_dns else {
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
                        tokio::spawn(link(cluster.clone(), format!("ws://{a}"), tok.clone()));
                        tok
                    });
                }
            }
        })
    }
}

/// One outgoing link: connects, forwards wake notices, reconnects with backoff.
async fn link(cluster: Cluster, base: String, stop: CancellationToken) {
    let url = format!("{base}/v1/peer?instance={}", cluster.instance_id);
    let mut backoff = Duration::from_millis(100);
    loop {
        // Subscribe before connecting so nothing sent during the handshake is missed.
        let mut rx = cluster.tx.subscribe();
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true) => c,
        };
        match conn {
            Ok((mut ws, _)) => {
                backoff = Duration::from_millis(100);
                info!(peer = %base, "peer link up");
                cluster.metrics.peer_links.inc();
                let r = forward(&mut ws, &mut rx, &stop).await;
                cluster.metrics.peer_links.dec();
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

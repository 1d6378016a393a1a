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

/// How an outgoing link reconnects and notices a dead peer (`docs/relay.md`, "Peer
/// links"). A link that drops is retried after `first_backoff`, then after twice as
/// long each time up to `max_backoff`; each attempt (TCP and WebSocket handshake) has
/// `connect_timeout`. An up link pings every `ping_interval` and is dropped when
/// nothing (no pong, no frame) arrived for `dead_after`: a peer that vanished without
/// closing its TCP connection (node lost, network cut) would otherwise keep a link
/// that takes notices and delivers none until the kernel gives up (many minutes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTiming {
    /// Wait before the first reconnect attempt after a link dropped or failed.
    pub first_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Time allowed for one connection attempt.
    pub connect_timeout: Duration,
    /// How often an up link pings its peer.
    pub ping_interval: Duration,
    /// Silence after which an up link counts as dead.
    pub dead_after: Duration,
}

impl LinkTiming {
    /// The relay's settings.
    pub const DEFAULT: LinkTiming = LinkTiming {
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        ping_interval: Duration::from_secs(5),
        dead_after: Duration::from_secs(15),
    };

    /// The wait after `previous`: twice as long, at most `max_backoff`.
    pub fn next_backoff(&self, previous: Duration) -> Duration {
        (previous * 2).min(self.max_backoff)
    }
}
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
    timing: LinkTiming,
}

impl Cluster {
    /// Creates the notice channel; links subscribe to it when they start.
    pub fn new(instance_id: String, metrics: Arc<Metrics>) -> Cluster {
        let (tx, _) = broadcast::channel(8192);
        Cluster {
            tx,
            instance_id,
            metrics,
            timing: LinkTiming::DEFAULT,
        }
    }

    /// The same cluster with other link timing (tests shorten it).
    pub fn with_timing(mut self, timing: LinkTiming) -> Cluster {
        self.timing = timing;
        self
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
    let timing = cluster.timing;
    let mut backoff = timing.first_backoff;
    loop {
        // Subscribe before connecting so nothing sent during the handshake is missed.
        let mut rx = cluster.tx.subscribe();
        let connect = tokio::time::timeout(
            timing.connect_timeout,
            tokio_tungstenite::connect_async_with_config(url.as_str(), None, true),
        );
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = connect => c,
        };
        match conn {
            Err(_) => debug!(peer = %base, "peer connect timed out"),
            Ok(Ok((mut ws, _))) => {
                backoff = timing.first_backoff;
                info!(peer = %base, "peer link up");
                cluster.metrics.peer_links.inc();
                let r = forward(&mut ws, &mut rx, &stop, &timing).await;
                cluster.metrics.peer_links.dec();
                // Bounded: a dead peer may never take the close frame.
                let _ = tokio::time::timeout(timing.connect_timeout, ws.close(None)).await;
                if r.is_ok() {
                    return;
                }
                info!(peer = %base, "peer link down; reconnecting");
            }
            Ok(Err(tungstenite::Error::Http(resp))) if resp.status() == StatusCode::CONFLICT => {
                debug!(peer = %base, "peer is this relay; link not needed");
                return;
            }
            Ok(Err(e)) => debug!(peer = %base, error = %e, "peer connect failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = timing.next_backoff(backoff);
    }
}

type PeerStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Forwards notices until stopped (Ok) or the link fails (Err): the peer closed it, a
/// write failed, or nothing came back for [`LinkTiming::dead_after`].
async fn forward(
    ws: &mut PeerStream,
    rx: &mut broadcast::Receiver<KeyHex>,
    stop: &CancellationToken,
    timing: &LinkTiming,
) -> Result<(), ()> {
    let mut heard = Instant::now();
    let mut ping = tokio::time::interval(timing.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            k = rx.recv() => k,
            m = ws.next() => match m {
                // The peer sends nothing but pongs and its close.
                Some(Ok(_)) => {
                    heard = Instant::now();
                    continue;
                }
                _ => return Err(()),
            },
            _ = ping.tick() => {
                if heard.elapsed() >= timing.dead_after {
                    warn!("peer link silent for {:?}; reconnecting", timing.dead_after);
                    return Err(());
                }
                send_within(ws, tungstenite::Message::Ping(Default::default()), timing).await?;
                continue;
            }
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
        send_within(ws, tungstenite::Message::Text(text.into()), timing).await?;
    }
}

/// Writes one frame; a peer that takes none for [`LinkTiming::dead_after`] (its TCP
/// window stays closed) counts as dead, like one that stays silent.
async fn send_within(
    ws: &mut PeerStream,
    msg: tungstenite::Message,
    timing: &LinkTiming,
) -> Result<(), ()> {
    match tokio::time::timeout(timing.dead_after, ws.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use tokio::net::TcpListener;

    #[test]
    fn reconnect_waits_double_from_100_ms_up_to_5_s() {
        let t = LinkTiming::DEFAULT;
        let mut waits = vec![t.first_backoff];
        while waits.len() < 9 {
            let last = waits[waits.len() - 1];
            waits.push(t.next_backoff(last));
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(t.connect_timeout, Duration::from_secs(5));
        assert_eq!(t.dead_after, Duration::from_secs(15));
    }

    /// Short timing, so the tests below see several attempts and pings quickly.
    fn quick() -> LinkTiming {
        LinkTiming {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            connect_timeout: Duration::from_millis(200),
            ping_interval: Duration::from_millis(50),
            dead_after: Duration::from_millis(300),
        }
    }

    /// Starts one outgoing link from a fresh cluster to `addr`.
    fn link_to(addr: SocketAddr) -> CancellationToken {
        let cluster =
            Cluster::new("test-instance".into(), Arc::new(Metrics::new())).with_timing(quick());
        let stop = CancellationToken::new();
        cluster.start(vec![format!("ws://{addr}")], None, stop.clone());
        stop
    }

    /// Accepts the next TCP connection, failing the test if none comes.
    async fn next_connection(l: &TcpListener) -> tokio::net::TcpStream {
        tokio::time::timeout(Duration::from_secs(20), l.accept())
            .await
            .expect("the link connects (again)")
            .unwrap()
            .0
    }

    /// A peer that accepts TCP but never answers the WebSocket handshake does not hold
    /// the link: the attempt times out and the link tries again.
    #[tokio::test]
    async fn a_connection_attempt_that_hangs_is_given_up() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = link_to(l.local_addr().unwrap());
        let _first = next_connection(&l).await;
        let _second = next_connection(&l).await;
        stop.cancel();
    }

    /// A peer that completed the handshake and then went silent (never reads, so never
    /// answers pings) is dropped and reconnected; a peer that answers pings is kept.
    #[tokio::test]
    async fn a_silent_peer_is_dropped_and_a_live_one_kept() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = link_to(l.local_addr().unwrap());
        let silent = tokio_tungstenite::accept_async(next_connection(&l).await)
            .await
            .unwrap();
        // The link gives up on it and connects again: this peer reads, and so answers
        // every ping.
        let mut live = tokio_tungstenite::accept_async(next_connection(&l).await)
            .await
            .unwrap();
        drop(silent);
        let mut pings = 0;
        // Twenty pings take four times `dead_after`: long enough for a wrongly dropped
        // link to show up as another connection.
        while pings < 20 {
            match tokio::time::timeout(Duration::from_secs(20), live.next())
                .await
                .expect("pings keep coming")
            {
                Some(Ok(tungstenite::Message::Ping(_))) => pings += 1,
                Some(Ok(_)) => {}
                other => panic!("live link ended: {other:?}"),
            }
        }
        assert!(
            l.accept().now_or_never().is_none(),
            "a link whose peer answers was dropped"
        );
        stop.cancel();
    }
}

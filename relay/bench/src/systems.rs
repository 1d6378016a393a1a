//! Load clients for each system under test. Each connected client becomes an
//! [`Endpoint`] (its writer task's queue); its reader task records every received
//! payload in the shared [`Recorder`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dchat_relay::client::{generate_key, public_key, Client, ClientReader, ClientWriter};
use dchat_relay::protocol::{
    AckRef, Base64Bytes, ClientFrame, Envelope, KeyHex, Kind, ServerFrame,
};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::driver::{Endpoint, Out, Recorder};
use crate::router::{key_hex, key_of};
use crate::BenchError;

/// A system under test and where it listens.
#[derive(Clone, Debug)]
pub enum Target {
    /// The dchat relay (`ws://…/v1/ws`).
    Relay(String),
    /// Several relays of one cluster (one shared database); client `i` connects to
    /// relay `i % n`.
    RelayCluster(Vec<String>),
    /// The bare router (`ws://…/`).
    Router(String),
    /// NATS (`nats://…` for TCP, `ws://…` for WebSocket).
    Nats(String),
    /// Redis pub/sub (`redis://…`).
    Redis(String),
}

impl Target {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Relay(_) | Target::RelayCluster(_) => "relay",
            Target::Router(_) => "bare-router",
            Target::Nats(u) if u.starts_with("ws") => "nats-ws",
            Target::Nats(_) => "nats-tcp",
            Target::Redis(_) => "redis-pubsub",
        }
    }
}

/// Connects `n` clients to `target` (at most `parallel` handshakes at a time). For the
/// relay with `members > 0`, client `i` joins channel `ch{i / members}` first. Relay
/// clients hold acknowledgements back for up to `ack_delay` so that they travel with
/// the client's next frame (see [`ClientWriter::defer_ack`]).
pub async fn connect(
    target: &Target,
    n: usize,
    parallel: usize,
    members: usize,
    ack_delay: Duration,
    rec: &Arc<Recorder>,
) -> Result<Vec<Endpoint>, BenchError> {
    let name = target.name();
    match target {
        Target::Relay(_) | Target::RelayCluster(_) => {
            let urls: Vec<&str> = match target {
                Target::RelayCluster(urls) => urls.iter().map(String::as_str).collect(),
                Target::Relay(url) => vec![url.as_str()],
                _ => Vec::new(),
            };
            if urls.is_empty() {
                return Err(BenchError::Connect {
                    system: name,
                    index: 0,
                    reason: "no relay to connect to".into(),
                });
            }
            let urls = &urls;
            let keys: Vec<_> = (0..n)
                .map(|i| {
                    generate_key().map_err(|e| BenchError::Connect {
                        system: name,
                        index: i,
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?;
            let pubs: Arc<Vec<KeyHex>> = Arc::new(keys.iter().map(public_key).collect());
            let clients: Vec<Result<Client, BenchError>> =
                futures::stream::iter(keys.into_iter().enumerate().map(|(i, k)| async move {
                    let mut c = Client::connect(urls[i % urls.len()], k)
                        .await
                        .map_err(|e| BenchError::Connect {
                            system: name,
                            index: i,
                            reason: e.to_string(),
                        })?;
                    if let Some(ch) = i.checked_div(members) {
                        c.join(&format!("ch{ch}"))
                            .await
                            .map_err(|e| BenchError::Connect {
                                system: name,
                                index: i,
                                reason: format!("join: {e}"),
                            })?;
                    }
                    Ok(c)
                }))
                .buffered(parallel.max(1))
                .collect()
                .await;
            let mut eps = Vec::with_capacity(n);
            for c in clients {
                let (w, r) = c?.split();
                let (tx, rx) = mpsc::unbounded_channel();
                let (ack_tx, ack_rx) = mpsc::unbounded_channel();
                tokio::spawn(relay_writer(
                    w,
                    rx,
                    ack_rx,
                    pubs.clone(),
                    ack_delay,
                    rec.clone(),
                ));
                tokio::spawn(relay_reader(r, ack_tx, rec.clone()));
                eps.push(Endpoint { tx });
            }
            Ok(eps)
        }
        Target::Router(url) => {
            let socks: Vec<Result<_, BenchError>> =
                futures::stream::iter((0..n).map(|i| async move {
                    // Nagle off, as the relay client does: small frames must leave at once.
                    let (mut ws, _) =
                        tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
                            .await
                            .map_err(|e| BenchError::Connect {
                                system: name,
                                index: i,
                                reason: e.to_string(),
                            })?;
                    ws.send(Message::Text(key_hex(&key_of(i)).into()))
                        .await
                        .map_err(|e| BenchError::Connect {
                            system: name,
                            index: i,
                            reason: e.to_string(),
                        })?;
                    Ok(ws)
                }))
                .buffered(parallel.max(1))
                .collect()
                .await;
            let mut eps = Vec::with_capacity(n);
            for ws in socks {
                let (mut sink, mut stream) = ws?.split();
                let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
                let rec_w = rec.clone();
                tokio::spawn(async move {
                    while let Some(o) = rx.recv().await {
                        if let Out::Direct { to, payload, .. } = o {
                            let mut b = Vec::with_capacity(32 + payload.len());
                            b.extend_from_slice(&key_of(to));
                            b.extend_from_slice(&payload);
                            if sink.send(Message::Binary(b.into())).await.is_err() {
                                rec_w.errors.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                });
                let rec_r = rec.clone();
                tokio::spawn(async move {
                    while let Some(Ok(m)) = stream.next().await {
                        if let Message::Binary(b) = m {
                            rec_r.record(&b);
                        }
                    }
                });
                eps.push(Endpoint { tx });
            }
            Ok(eps)
        }
        Target::Nats(url) => {
            let subjects: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("u.{i}")).collect());
            let clients: Vec<Result<_, BenchError>> = futures::stream::iter((0..n).map(|i| {
                let subjects = subjects.clone();
                async move {
                    let err = |e: String| BenchError::Connect {
                        system: name,
                        index: i,
                        reason: e,
                    };
                    let c = async_nats::connect(url.as_str())
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    let sub = c
                        .subscribe(subjects[i].clone())
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    Ok((c, sub))
                }
            }))
            .buffered(parallel.max(1))
            .collect()
            .await;
            let mut eps = Vec::with_capacity(n);
            for c in clients {
                let (client, mut sub) = c?;
                let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
                let rec_w = rec.clone();
                let subjects = subjects.clone();
                tokio::spawn(async move {
                    while let Some(o) = rx.recv().await {
                        if let Out::Direct { to, payload, .. } = o {
                            if client
                                .publish(subjects[to].clone(), payload.into())
                                .await
                                .is_err()
                            {
                                rec_w.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
                let rec_r = rec.clone();
                tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        rec_r.record(&m.payload);
                    }
                });
                eps.push(Endpoint { tx });
            }
            Ok(eps)
        }
        Target::Redis(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|e| BenchError::Connect {
                system: name,
                index: 0,
                reason: e.to_string(),
            })?;
            let channels: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("u.{i}")).collect());
            let conns: Vec<Result<_, BenchError>> = futures::stream::iter((0..n).map(|i| {
                let client = client.clone();
                let channels = channels.clone();
                async move {
                    let err = |e: String| BenchError::Connect {
                        system: name,
                        index: i,
                        reason: e,
                    };
                    let mut ps = client
                        .get_async_pubsub()
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    ps.subscribe(channels[i].as_str())
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    let publ = client
                        .get_multiplexed_async_connection()
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    Ok((ps, publ))
                }
            }))
            .buffered(parallel.max(1))
            .collect()
            .await;
            let mut eps = Vec::with_capacity(n);
            for c in conns {
                let (ps, mut publ) = c?;
                let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
                let rec_w = rec.clone();
                let channels = channels.clone();
                tokio::spawn(async move {
                    while let Some(o) = rx.recv().await {
                        if let Out::Direct { to, payload, .. } = o {
                            let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                                .arg(channels[to].as_str())
                                .arg(payload)
                                .query_async(&mut publ)
                                .await;
                            if r.is_err() {
                                rec_w.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
                let rec_r = rec.clone();
                tokio::spawn(async move {
                    let mut s = ps.into_on_message();
                    while let Some(m) = s.next().await {
                        rec_r.record(m.get_payload_bytes());
                    }
                });
                eps.push(Endpoint { tx });
            }
            Ok(eps)
        }
    }
}

/// Writes a relay client's frames. Acknowledgements wait up to `ack_delay` (or until
/// 64 are queued) for the next `send` to carry them; then they go out on their own.
/// They come on their own queue and are taken first: behind a backlog of sends (the
/// open-loop schedule runs ahead when the relay pushes back) they would hold the
/// client's in-flight window full, as a real client that queued acks behind its
/// outbox would.
async fn relay_writer(
    mut w: ClientWriter,
    mut rx: mpsc::UnboundedReceiver<Out>,
    mut acks: mpsc::UnboundedReceiver<Vec<AckRef>>,
    keys: Arc<Vec<KeyHex>>,
    ack_delay: Duration,
    rec: Arc<Recorder>,
) {
    let ack_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(ack_timer);
    loop {
        let waiting = w.deferred_acks() > 0;
        let o = tokio::select! {
            biased;
            a = acks.recv() => match a {
                Some(a) => Out::Ack(a),
                None => return,
            },
            o = rx.recv() => match o {
                Some(o) => o,
                None => return,
            },
            () = &mut ack_timer, if waiting => {
                if w.flush_acks().await.is_err() {
                    rec.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                continue;
            }
        };
        let frame = match o {
            Out::Direct { to, payload, seq } => ClientFrame::Send {
                envelope: envelope(seq, Some(keys[to]), None, payload),
            },
            Out::Channel {
                channel,
                payload,
                seq,
            } => ClientFrame::Send {
                envelope: envelope(seq, None, Some(format!("ch{channel}")), payload),
            },
            Out::Ack(messages) => {
                if !waiting {
                    ack_timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + ack_delay);
                }
                w.defer_ack(messages);
                let due = ack_delay.is_zero() || w.deferred_acks() >= MAX_DEFERRED_ACKS;
                if due && w.flush_acks().await.is_err() {
                    rec.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                continue;
            }
        };
        if w.write(&frame).await.is_err() {
            rec.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

/// Deferred acknowledgements after which a relay client sends them without waiting.
const MAX_DEFERRED_ACKS: usize = 64;

fn envelope(seq: u64, to: Option<KeyHex>, channel: Option<String>, payload: Vec<u8>) -> Envelope {
    Envelope {
        id: seq.to_string(),
        from: None,
        to,
        channel,
        ts: 0,
        kind: Kind::Text,
        payload: Base64Bytes(payload),
        media: None,
    }
}

/// Reads relay frames, records deliveries and acknowledges them in batches (one `ack`
/// per burst of frames already received, at most 64 refs).
async fn relay_reader(
    mut r: ClientReader,
    acks_tx: mpsc::UnboundedSender<Vec<AckRef>>,
    rec: Arc<Recorder>,
) {
    loop {
        let Ok(first) = r.next_frame().await else {
            return;
        };
        let mut acks = Vec::new();
        relay_frame(first, &mut acks, &rec);
        while acks.len() < 64 {
            match r.next_frame().now_or_never() {
                Some(Ok(f)) => relay_frame(f, &mut acks, &rec),
                Some(Err(_)) => return,
                None => break,
            }
        }
        if !acks.is_empty() && acks_tx.send(acks).is_err() {
            return;
        }
    }
}

fn relay_frame(f: ServerFrame, acks: &mut Vec<AckRef>, rec: &Recorder) {
    match f {
        ServerFrame::Deliver { envelope, .. } => {
            rec.record(&envelope.payload.0);
            if let Some(from) = envelope.from {
                acks.push(AckRef {
                    from,
                    id: envelope.id,
                });
            }
        }
        ServerFrame::Sent { status, stored, .. } => {
            rec.acked_sends.fetch_add(1, Ordering::Relaxed);
            match status {
                dchat_relay::protocol::SendStatus::Stored => {
                    rec.stored.fetch_add(1, Ordering::Relaxed);
                }
                // A channel message: copies stored for members that were behind.
                dchat_relay::protocol::SendStatus::Fanout => {
                    rec.stored
                        .fetch_add(u64::from(stored.unwrap_or(0)), Ordering::Relaxed);
                }
                _ => {}
            }
        }
        // The relay ends the connection (the close frame follows): not a refused request.
        ServerFrame::Error { close: Some(_), .. } => {}
        ServerFrame::Error { .. } => {
            rec.errors.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

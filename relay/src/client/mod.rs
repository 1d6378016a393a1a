//! `dchat_relay::client`: a small async client for protocol v1.
//!
//! One [`Client`] is one authenticated connection. Requests are answered in order;
//! `deliver` frames that arrive while waiting for an answer are queued and returned
//! by [`Client::next_delivery`].

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use ed25519_dalek::{Signer, SigningKey};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::protocol::{
    auth_message, decode_server_frame, profile_message, AckRef, Base64Bytes, ClientFrame, Envelope,
    ErrorCode, KeyHex, Kind, Limits, MediaRef, ProfileDoc, SendStatus, ServerFrame, SigHex,
    FEATURE_QUIET_ACK, MAX_ACK_BATCH,
};

/// Wait before the first resend of a refused send ([`Client::send_retrying`]).
const RETRY_FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between resends.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `d` plus up to a quarter of it, at random.
fn with_jitter(d: Duration) -> Duration {
    let mut r = [0u8; 1];
    // Without randomness the plain backoff still works; jitter only spreads clients.
    let _ = getrandom::fill(&mut r);
    d + d.mul_f64(f64::from(r[0]) / 255.0 / 4.0)
}

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or talking to the relay failed.
    #[error("websocket to {url}: {source}")]
    Transport {
        /// The relay URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The relay answered with an error frame.
    #[error("relay error {code}: {message}")]
    Relay {
        /// Stable code.
        code: ErrorCode,
        /// Detail.
        message: String,
    },
    /// The relay closed the connection, or announced that it does: an `error` frame
    /// with a `close` member gives that close code and, as `reason`, its message (the
    /// relay uses the same text as the close frame's reason).
    #[error("relay closed the connection (code {code}): {reason}")]
    Closed {
        /// Close code (0 when none was given).
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The relay sent something this client does not understand.
    #[error("unexpected frame from relay: {0}")]
    Unexpected(String),
    /// No answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Reading or writing a key file failed.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The path.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// A fresh random identity.
pub fn generate_key() -> Result<SigningKey, ClientError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| ClientError::KeyFile {
        path: "<random>".into(),
        reason: format!("no randomness: {e}"),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Public key of a signing key in wire form.
pub fn public_key(key: &SigningKey) -> KeyHex {
    KeyHex(key.verifying_key().to_bytes())
}

/// Loads a key file: 64 hex digits of the secret seed (whitespace ignored).
pub fn load_key(path: &Path) -> Result<SigningKey, ClientError> {
    let err = |reason: String| ClientError::KeyFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let text = text.trim();
    if text.len() != 64 {
        return Err(err(format!(
            "expected one key of 64 hex digits, found {} characters",
            text.len()
        )));
    }
    let bytes = hex::decode(text).map_err(|e| err(format!("not hex: {e}")))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| err("expected 32 bytes (64 hex digits)".into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a key file (mode 0600 on Unix); refuses to overwrite.
pub fn save_key(path: &Path, key: &SigningKey) -> Result<(), ClientError> {
    use std::io::Write;
    let err = |reason: String| ClientError::KeyFile {
        path: path.display().to_string(),
        reason,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
    writeln!(f, "{}", hex::encode(key.to_bytes())).map_err(|e| err(e.to_string()))
}

/// A message received by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Store sequence when it came from storage.
    pub seq: Option<u64>,
    /// The envelope (`from` set by the relay).
    pub envelope: Envelope,
}

impl Delivery {
    /// The reference to acknowledge this delivery.
    pub fn ack_ref(&self) -> AckRef {
        AckRef {
            from: self.envelope.from.unwrap_or(KeyHex([0; 32])),
            id: self.envelope.id.clone(),
        }
    }
}

/// Result of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendResult {
    /// What the relay did.
    pub status: SendStatus,
    /// Store sequence, when stored.
    pub seq: Option<u64>,
    /// Channel: live deliveries.
    pub delivered: Option<u32>,
    /// Channel: stored copies.
    pub stored: Option<u32>,
}

/// A published profile as fetched (signature already verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The profile document.
    pub doc: ProfileDoc,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// An authenticated connection to a relay.
pub struct Client {
    ws: Ws,
    url: String,
    key: SigningKey,
    /// Limits announced by the relay.
    pub limits: Limits,
    queued: VecDeque<Delivery>,
    timeout: Duration,
    next_id: u64,
    /// `error` frames about a quiet `ack` seen while waiting for another answer.
    failed_quiet_acks: u64,
    /// Optional protocol features the relay announced in `welcome`.
    features: Vec<String>,
}

/// Current time in ms since the epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A failed WebSocket operation on the connection to `url`.
fn transport_error(url: &str, e: tokio_tungstenite::tungstenite::Error) -> ClientError {
    ClientError::Transport {
        url: url.to_string(),
        source: Box::new(e),
    }
}

/// An error frame with a code this client does not know decodes as
/// [`ErrorCode::Unknown`]; its message keeps the code the relay sent, so a person reading
/// `relay error unknown: …` learns which.
fn name_unknown_code(frame: ServerFrame, text: &str) -> ServerFrame {
    match frame {
        ServerFrame::Error {
            code: ErrorCode::Unknown,
            message,
            reference,
            quiet,
            close,
        } => {
            let raw = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_string))
                .unwrap_or_default();
            ServerFrame::Error {
                code: ErrorCode::Unknown,
                message: format!("{message} (code {raw:?})"),
                reference,
                quiet,
                close,
            }
        }
        other => other,
    }
}

/// Longest wait for the relay to answer the WebSocket upgrade.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of queued frames after which tungstenite writes without waiting for a flush.
const WRITE_BUFFER_BYTES: usize = 64 << 10;

/// Opens a WebSocket to `url` without authenticating (tests of raw protocol use this).
pub async fn connect_raw(url: &str) -> Result<Ws, ClientError> {
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 8192;
    // Frames are written out when flushed (every `send` flushes), so a writer can queue
    // several frames with `feed` and put them on the wire in one TCP write.
    cfg.write_buffer_size = WRITE_BUFFER_BYTES;
    // A server that accepts the TCP connection but never answers the upgrade must not
    // hold the client forever.
    let handshake = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true);
    let (ws, _) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ClientError::Timeout("the WebSocket handshake"))?
        .map_err(|e| transport_error(url, e))?;
    Ok(ws)
}

impl Client {
    /// Connects to `url` (e.g. `ws://host:7070/v1/ws`) and authenticates as `key`.
    pub async fn connect(url: &str, key: SigningKey) -> Result<Client, ClientError> {
        let ws = connect_raw(url).await?;
        let mut c = Client {
            ws,
            url: url.to_string(),
            key,
            limits: Limits {
                max_frame_bytes: 0,
                rate_per_sec: 0,
                burst: 0,
                max_inflight: 0,
                idle_timeout_secs: 0,
            },
            queued: VecDeque::new(),
            timeout: Duration::from_secs(10),
            next_id: 0,
            failed_quiet_acks: 0,
            features: Vec::new(),
        };
        let nonce = match c.read_frame("challenge").await? {
            ServerFrame::Challenge { nonce, .. } => nonce,
            other => return Err(ClientError::Unexpected(other.to_json())),
        };
        let sig = c.key.sign(&auth_message(&nonce.0)).to_bytes();
        c.write(&ClientFrame::Auth {
            key: public_key(&c.key),
            sig: SigHex(sig),
        })
        .await?;
        match c.response("welcome").await? {
            ServerFrame::Welcome {
                limits, features, ..
            } => {
                c.limits = limits;
                c.features = features;
            }
            other => return Err(ClientError::Unexpected(other.to_json())),
        }
        Ok(c)
    }

    /// Sets how long requests wait for their answer (default 10 s).
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// The limits the relay announced in `welcome`.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// This client's public key.
    pub fn key(&self) -> KeyHex {
        public_key(&self.key)
    }

    fn transport(&self, e: tokio_tungstenite::tungstenite::Error) -> ClientError {
        transport_error(&self.url, e)
    }

    /// Sends one frame.
    pub async fn write(&mut self, f: &ClientFrame) -> Result<(), ClientError> {
        let text = f
            .to_json()
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| self.transport(e))
    }

    /// Reads the next frame of any type.
    pub async fn read_frame(&mut self, what: &'static str) -> Result<ServerFrame, ClientError> {
        let t = self.timeout;
        loop {
            let msg = tokio::time::timeout(t, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout(what))?;
            match msg {
                None => {
                    return Err(ClientError::Closed {
                        code: 0,
                        reason: String::new(),
                    })
                }
                Some(Err(e)) => return Err(self.transport(e)),
                Some(Ok(Message::Text(t))) => {
                    return decode_server_frame(t.as_str())
                        .map(|frame| name_unknown_code(frame, t.as_str()))
                        .map_err(|e| ClientError::Unexpected(format!("{e}: {}", t.as_str())))
                }
                Some(Ok(Message::Close(f))) => {
                    let (code, reason) = f
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((0, String::new()));
                    return Err(ClientError::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads frames until a non-delivery one (the answer), queueing deliveries.
    async fn response(&mut self, what: &'static str) -> Result<ServerFrame, ClientError> {
        loop {
            match self.read_frame(what).await? {
                ServerFrame::Deliver { seq, envelope } => {
                    self.queued.push_back(Delivery { seq, envelope })
                }
                ServerFrame::Error {
                    close: Some(code),
                    message,
                    ..
                } => {
                    return Err(ClientError::Closed {
                        code,
                        reason: message,
                    })
                }
                // A quiet ack has no answer of its own; its failure is not the answer
                // to whatever is being waited for now. Relays before the `quiet` member
                // only said `ref: "ack"`, which is ambiguous while an ordinary ack waits.
                ServerFrame::Error { quiet: true, .. } => self.failed_quiet_acks += 1,
                ServerFrame::Error {
                    reference: Some(r), ..
                } if r == "ack" && what != "acked" => self.failed_quiet_acks += 1,
                ServerFrame::Error { code, message, .. } => {
                    return Err(ClientError::Relay { code, message })
                }
                other => return Ok(other),
            }
        }
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        format!("{}-{}", hex::encode(r), self.next_id)
    }

    /// Builds an envelope to `to` with a fresh id.
    pub fn envelope_to(&mut self, to: KeyHex, kind: Kind, payload: Vec<u8>) -> Envelope {
        Envelope {
            id: self.fresh_id(),
            from: None,
            to: Some(to),
            channel: None,
            ts: now_ms(),
            kind,
            payload: Base64Bytes(payload),
            media: None,
        }
    }

    /// Builds a channel envelope with a fresh id.
    pub fn envelope_channel(&mut self, channel: &str, kind: Kind, payload: Vec<u8>) -> Envelope {
        Envelope {
            id: self.fresh_id(),
            from: None,
            to: None,
            channel: Some(channel.to_string()),
            ts: now_ms(),
            kind,
            payload: Base64Bytes(payload),
            media: None,
        }
    }

    /// Sends an envelope and waits for the relay's `sent` answer. Retrying with the
    /// same envelope (same id) is safe: the relay answers `duplicate`.
    pub async fn send(&mut self, envelope: Envelope) -> Result<SendResult, ClientError> {
        self.write(&ClientFrame::Send { envelope }).await?;
        match self.response("sent").await? {
            ServerFrame::Sent {
                status,
                seq,
                delivered,
                stored,
                ..
            } => Ok(SendResult {
                status,
                seq,
                delivered,
                stored,
            }),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Sends `envelope`, and sends the same envelope again while the relay refuses it
    /// with a retryable error (`overloaded`, `storage_unavailable`), at most `attempts`
    /// times in all, waiting 100 ms before the first retry and twice as long before each
    /// next one (at most 5 s, with up to 25 % random jitter so that clients refused
    /// together do not come back together). Resending the same id is safe: the relay
    /// keeps at most one copy.
    pub async fn send_retrying(
        &mut self,
        envelope: Envelope,
        attempts: u32,
    ) -> Result<SendResult, ClientError> {
        let mut backoff = RETRY_FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.send(envelope.clone()).await {
                Err(ClientError::Relay { code, .. })
                    if code.is_retryable() && attempt < attempts =>
                {
                    tokio::time::sleep(with_jitter(backoff)).await;
                    backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Sends `text` to `to`.
    pub async fn send_text(&mut self, to: KeyHex, text: &str) -> Result<SendResult, ClientError> {
        let env = self.envelope_to(to, Kind::Text, text.as_bytes().to_vec());
        self.send(env).await
    }

    /// Joins a channel.
    pub async fn join(&mut self, channel: &str) -> Result<(), ClientError> {
        self.write(&ClientFrame::Join {
            channel: channel.into(),
        })
        .await?;
        match self.response("joined").await? {
            ServerFrame::Joined { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Leaves a channel.
    pub async fn leave(&mut self, channel: &str) -> Result<(), ClientError> {
        self.write(&ClientFrame::Leave {
            channel: channel.into(),
        })
        .await?;
        match self.response("left").await? {
            ServerFrame::Left { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Acknowledges deliveries; returns how many the relay removed.
    pub async fn ack(&mut self, refs: Vec<AckRef>) -> Result<u64, ClientError> {
        self.write(&ClientFrame::Ack {
            messages: refs,
            quiet: false,
        })
        .await?;
        match self.response("acked").await? {
            ServerFrame::Acked { removed } => Ok(removed),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Acknowledges deliveries without waiting: the relay sends no answer unless the
    /// ack fails. A failed ack only means the messages stay stored and are delivered
    /// again; [`Client::failed_quiet_acks`] counts the failures seen so far.
    /// A relay that does not announce [`FEATURE_QUIET_ACK`] gets an ordinary `ack`,
    /// whose answer is awaited.
    pub async fn ack_quiet(&mut self, refs: Vec<AckRef>) -> Result<(), ClientError> {
        if !self.features.iter().any(|f| f == FEATURE_QUIET_ACK) {
            return self.ack(refs).await.map(|_| ());
        }
        self.write(&ClientFrame::Ack {
            messages: refs,
            quiet: true,
        })
        .await
    }

    /// Optional protocol features the relay announced (`welcome.features`).
    pub fn features(&self) -> &[String] {
        &self.features
    }

    /// Quiet acks the relay reported as failed (seen while waiting for other answers).
    pub fn failed_quiet_acks(&self) -> u64 {
        self.failed_quiet_acks
    }

    /// Asks for pending messages; returns every delivery received up to the `fetched`
    /// answer (including ones pushed before it) and whether more are pending.
    pub async fn fetch(&mut self, limit: u32) -> Result<(Vec<Delivery>, bool), ClientError> {
        self.write(&ClientFrame::Fetch { limit: Some(limit) })
            .await?;
        match self.response("fetched").await? {
            ServerFrame::Fetched { more, .. } => Ok((self.queued.drain(..).collect(), more)),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// The next delivery (queued or from the socket), waiting up to the timeout.
    pub async fn next_delivery(&mut self) -> Result<Delivery, ClientError> {
        if let Some(d) = self.queued.pop_front() {
            return Ok(d);
        }
        match self.read_frame("delivery").await? {
            ServerFrame::Deliver { seq, envelope } => Ok(Delivery { seq, envelope }),
            // The relay ends the connection: the close frame follows.
            ServerFrame::Error {
                close: Some(code),
                message,
                ..
            } => Err(ClientError::Closed {
                code,
                reason: message,
            }),
            ServerFrame::Error { code, message, .. } => Err(ClientError::Relay { code, message }),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Round trip.
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        self.write(&ClientFrame::Ping {
            nonce: Some("p".into()),
        })
        .await?;
        match self.response("pong").await? {
            ServerFrame::Pong { .. } => Ok(()),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Signs and publishes this identity's profile; returns whether it replaced the stored one.
    pub async fn publish_profile(
        &mut self,
        name: &str,
        avatar: Option<MediaRef>,
        updated_ms: i64,
    ) -> Result<bool, ClientError> {
        let doc = ProfileDoc {
            key: self.key(),
            name: name.to_string(),
            avatar,
            updated_ms,
        };
        let data = serde_json::to_vec(&doc).map_err(|e| ClientError::Unexpected(e.to_string()))?;
        let sig = SigHex(self.key.sign(&profile_message(&data)).to_bytes());
        self.write(&ClientFrame::ProfilePublish {
            data: Base64Bytes(data),
            sig,
        })
        .await?;
        match self.response("profile_stored").await? {
            ServerFrame::ProfileStored { updated } => Ok(updated),
            other => Err(ClientError::Unexpected(other.to_json())),
        }
    }

    /// Fetches and verifies someone's profile; `None` when there is none.
    pub async fn get_profile(&mut self, key: KeyHex) -> Result<Option<Profile>, ClientError> {
        self.write(&ClientFrame::ProfileGet { key }).await?;
        match self.response("profile").await {
            Ok(ServerFrame::Profile { key: k, data, sig }) => {
                if k != key
                    || !crate::protocol::verify_signature(&key, &profile_message(&data.0), &sig)
                {
                    return Err(ClientError::Unexpected("profile signature invalid".into()));
                }
                let doc = ProfileDoc::parse(&data.0).map_err(ClientError::Unexpected)?;
                if doc.key != key {
                    return Err(ClientError::Unexpected("profile key mismatch".into()));
                }
                Ok(Some(Profile { doc }))
            }
            Ok(other) => Err(ClientError::Unexpected(other.to_json())),
            Err(ClientError::Relay {
                code: ErrorCode::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Splits into independent halves for pipelined (open-loop) use: the writer sends
    /// frames without waiting, the reader yields every frame (answers in request order,
    /// deliveries interleaved). Deliveries already queued are handed to the reader.
    pub fn split(self) -> (ClientWriter, ClientReader) {
        let (sink, stream) = self.ws.split();
        (
            ClientWriter {
                sink,
                url: self.url.clone(),
                key: self.key,
                next_id: self.next_id,
                quiet_ack: self.features.iter().any(|f| f == FEATURE_QUIET_ACK),
                deferred_acks: Vec::new(),
            },
            ClientReader {
                stream,
                url: self.url,
                queued: self.queued,
            },
        )
    }

    /// Closes the connection cleanly.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The operator's slot validation: connect with a fresh key, send a message to
/// ourselves, and require it back (and acknowledged) within `within`.
pub async fn smoke(url: &str, within: Duration) -> Result<Duration, ClientError> {
    let start = std::time::Instant::now();
    let run = async {
        let key = generate_key()?;
        let mut c = Client::connect(url, key).await?;
        c.set_timeout(within);
        let me = c.key();
        let env = c.envelope_to(me, Kind::Text, b"dchat smoke test".to_vec());
        let id = env.id.clone();
        c.send(env).await?;
        loop {
            let d = c.next_delivery().await?;
            if d.envelope.id == id && d.envelope.from == Some(me) {
                c.ack(vec![d.ack_ref()]).await?;
                c.close().await;
                return Ok(start.elapsed());
            }
        }
    };
    tokio::time::timeout(within, run)
        .await
        .map_err(|_| ClientError::Timeout("smoke round trip"))?
}

/// Sending half of a split [`Client`].
///
/// It can also delay acknowledgements the way TCP delays its ACKs: [`defer_ack`]
/// queues them, and they go out in front of the next frame this writer sends, in the
/// same TCP write, or when the caller calls [`flush_acks`] (at the latest after the
/// caller's ack delay). The relay then reads one segment where it would have read two.
/// Until an ack arrives the relay keeps the message in flight (and stores it again if
/// the connection ends), so the delay must stay well below the relay's in-flight limit
/// divided by the delivery rate.
///
/// [`defer_ack`]: ClientWriter::defer_ack
/// [`flush_acks`]: ClientWriter::flush_acks
pub struct ClientWriter {
    sink: futures::stream::SplitSink<Ws, Message>,
    url: String,
    key: SigningKey,
    next_id: u64,
    /// The relay announced [`FEATURE_QUIET_ACK`]: deferred acks are sent quietly.
    quiet_ack: bool,
    deferred_acks: Vec<AckRef>,
}

impl ClientWriter {
    /// This client's public key.
    pub fn key(&self) -> KeyHex {
        public_key(&self.key)
    }

    /// A fresh envelope id (unique per client).
    pub fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        format!("{}-{}", hex::encode(r), self.next_id)
    }

    fn transport(&self, e: tokio_tungstenite::tungstenite::Error) -> ClientError {
        transport_error(&self.url, e)
    }

    /// Queues `frame` behind the frames already queued, without writing.
    async fn feed(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let text = frame
            .to_json()
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        let fed = self.sink.feed(Message::Text(text.into())).await;
        fed.map_err(|e| self.transport(e))
    }

    /// Queues the deferred acknowledgements as `ack` frames (at most
    /// [`MAX_ACK_BATCH`] references each), quiet when the relay supports it.
    async fn feed_deferred_acks(&mut self) -> Result<(), ClientError> {
        let refs = std::mem::take(&mut self.deferred_acks);
        for chunk in refs.chunks(MAX_ACK_BATCH) {
            let frame = ClientFrame::Ack {
                messages: chunk.to_vec(),
                quiet: self.quiet_ack,
            };
            self.feed(&frame).await?;
        }
        Ok(())
    }

    /// Sends one frame without waiting for its answer; deferred acknowledgements go
    /// out in front of it, in the same write.
    pub async fn write(&mut self, f: &ClientFrame) -> Result<(), ClientError> {
        self.feed_deferred_acks().await?;
        self.feed(f).await?;
        let flushed = self.sink.flush().await;
        flushed.map_err(|e| self.transport(e))
    }

    /// Sends an envelope without waiting for `sent`.
    pub async fn send(&mut self, envelope: Envelope) -> Result<(), ClientError> {
        self.write(&ClientFrame::Send { envelope }).await
    }

    /// Queues acknowledgements to go out with the next frame this writer sends or at
    /// the next [`ClientWriter::flush_acks`], whichever comes first. On a relay that
    /// does not announce [`FEATURE_QUIET_ACK`] they are sent as ordinary acks, whose
    /// `acked` answers the reader then sees.
    pub fn defer_ack(&mut self, refs: impl IntoIterator<Item = AckRef>) {
        self.deferred_acks.extend(refs);
    }

    /// Acknowledgements queued by [`ClientWriter::defer_ack`] and not yet sent.
    pub fn deferred_acks(&self) -> usize {
        self.deferred_acks.len()
    }

    /// Sends the deferred acknowledgements now (nothing when none are queued).
    pub async fn flush_acks(&mut self) -> Result<(), ClientError> {
        if self.deferred_acks.is_empty() {
            return Ok(());
        }
        self.feed_deferred_acks().await?;
        let flushed = self.sink.flush().await;
        flushed.map_err(|e| self.transport(e))
    }
}

/// Receiving half of a split [`Client`].
pub struct ClientReader {
    stream: futures::stream::SplitStream<Ws>,
    url: String,
    queued: VecDeque<Delivery>,
}

impl ClientReader {
    /// The next frame from the relay (queued deliveries first); `Closed` at the end.
    pub async fn next_frame(&mut self) -> Result<ServerFrame, ClientError> {
        if let Some(d) = self.queued.pop_front() {
            return Ok(ServerFrame::Deliver {
                seq: d.seq,
                envelope: d.envelope,
            });
        }
        loop {
            match self.stream.next().await {
                None => {
                    return Err(ClientError::Closed {
                        code: 0,
                        reason: String::new(),
                    })
                }
                Some(Err(e)) => return Err(transport_error(&self.url, e)),
                Some(Ok(Message::Text(t))) => {
                    return decode_server_frame(t.as_str())
                        .map(|frame| name_unknown_code(frame, t.as_str()))
                        .map_err(|e| ClientError::Unexpected(format!("{e}: {}", t.as_str())))
                }
                Some(Ok(Message::Close(f))) => {
                    let (code, reason) = f
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((0, String::new()));
                    return Err(ClientError::Closed { code, reason });
                }
                Some(Ok(_)) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_holds_exactly_one_key() {
        let dir = std::env::temp_dir().join(format!("dchat-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let key = "ab".repeat(32);
        std::fs::write(&path, format!("  {}\r\n", key.to_uppercase())).unwrap();
        assert!(load_key(&path).is_ok());
        std::fs::write(&path, format!("{key}\n{key}\n")).unwrap();
        let e = load_key(&path).unwrap_err().to_string();
        assert!(e.contains("expected one key of 64 hex digits"), "{e}");
        std::fs::write(&path, "zz".repeat(32)).unwrap();
        let e = load_key(&path).unwrap_err().to_string();
        assert!(e.contains("not hex"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_error_code_keeps_its_name_in_the_message() {
        let text = r#"{"type":"error","code":"brand_new_code","message":"try later"}"#;
        let frame = decode_server_frame(text).unwrap();
        match name_unknown_code(frame, text) {
            ServerFrame::Error { code, message, .. } => {
                assert_eq!(code, ErrorCode::Unknown);
                assert_eq!(message, "try later (code \"brand_new_code\")");
            }
            other => panic!("{other:?}"),
        }
        let known = r#"{"type":"error","code":"overloaded","message":"busy"}"#;
        let frame = decode_server_frame(known).unwrap();
        assert_eq!(name_unknown_code(frame.clone(), known), frame);
    }
}

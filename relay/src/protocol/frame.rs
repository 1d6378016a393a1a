//! Protocol v1 frames: JSON objects in WebSocket text frames, tagged by `type`.

use serde::{Deserialize, Serialize};

use super::error::ErrorCode;
use super::types::{Base64Bytes, Base64Text, KeyHex, SigHex};

/// Protocol version announced in the challenge.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest accepted client message id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 64;
/// Most message references in one `ack` frame.
pub const MAX_ACK_BATCH: usize = 1024;
/// Largest accepted `fetch` limit.
pub const MAX_FETCH_LIMIT: u32 = 1000;
/// Largest accepted signed profile document, in bytes (before base64).
pub const MAX_PROFILE_BYTES: usize = 4096;

/// What a message contains; clients render by kind, the relay only counts by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Text message.
    Text,
    /// Picture.
    Image,
    /// Arbitrary file.
    File,
    /// Voice or audio clip.
    Audio,
    /// Video clip.
    Video,
    /// Sticker.
    Sticker,
}

impl Kind {
    /// All kinds, for metric pre-registration.
    pub const ALL: [Kind; 6] = [
        Kind::Text,
        Kind::Image,
        Kind::File,
        Kind::Audio,
        Kind::Video,
        Kind::Sticker,
    ];

    /// The wire string, also the `kind` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
            Kind::File => "file",
            Kind::Audio => "audio",
            Kind::Video => "video",
            Kind::Sticker => "sticker",
        }
    }
}

/// Reference to media too large for a frame; the bytes live elsewhere (e.g. object storage).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaRef {
    /// Where to download the (usually encrypted) media.
    pub url: String,
    /// SHA-256 of the bytes at `url`, 64 hex digits.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// MIME type, e.g. `image/jpeg`.
    pub mime: String,
}

/// A message as sent by a client and delivered to recipients, with its payload as `P`:
/// [`Envelope`] (decoded bytes) for clients, [`RelayEnvelope`] (the base64 text, not
/// decoded) where the relay routes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename = "Envelope")]
pub struct EnvelopeOf<P> {
    /// Client-chosen id, unique per sender; retries reuse it, the relay deduplicates on it.
    pub id: String,
    /// Sender key; filled in (or checked) by the relay from the authenticated session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<KeyHex>,
    /// Recipient key (exactly one of `to` and `channel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<KeyHex>,
    /// Channel name (exactly one of `to` and `channel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Sender's timestamp, milliseconds since the Unix epoch.
    pub ts: i64,
    /// Content kind.
    pub kind: Kind,
    /// Opaque (end-to-end encrypted) content, base64.
    pub payload: P,
    /// Media carried by reference, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaRef>,
}

/// A message as sent by a client and delivered to recipients.
pub type Envelope = EnvelopeOf<Base64Bytes>;

/// A message as the relay routes it: the payload stays the base64 text it arrived in
/// (checked canonical, see [`Base64Text`]), so it is forwarded without being decoded
/// and encoded again.
pub type RelayEnvelope = EnvelopeOf<Base64Text>;

/// How an envelope's payload is written as JSON: the base64 text of its bytes.
pub trait Base64Payload {
    /// Characters of its base64 text.
    fn base64_len(&self) -> usize;
    /// Appends its base64 text (no quotes) to `out`.
    fn push_base64(&self, out: &mut String);
}

impl Base64Payload for Base64Bytes {
    fn base64_len(&self) -> usize {
        self.0.len().div_ceil(3) * 4
    }
    fn push_base64(&self, out: &mut String) {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode_string(&self.0, out);
    }
}

impl Base64Payload for Base64Text {
    fn base64_len(&self) -> usize {
        self.as_str().len()
    }
    fn push_base64(&self, out: &mut String) {
        out.push_str(self.as_str());
    }
}

impl From<Envelope> for RelayEnvelope {
    fn from(e: Envelope) -> RelayEnvelope {
        RelayEnvelope {
            payload: Base64Text::from(&e.payload),
            id: e.id,
            from: e.from,
            to: e.to,
            channel: e.channel,
            ts: e.ts,
            kind: e.kind,
            media: e.media,
        }
    }
}

/// Why an envelope was refused (maps to [`ErrorCode::InvalidEnvelope`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The id is empty, too long or has control characters.
    #[error("envelope.id must be 1..={MAX_ID_LEN} bytes without control characters")]
    BadId,
    /// Both or neither of `to` and `channel` were given.
    #[error("envelope must have exactly one of `to` and `channel`")]
    BadTarget,
    /// Channel name is not `[A-Za-z0-9._-]{{1,64}}`.
    #[error("envelope.channel must match [A-Za-z0-9._-]{{1,{MAX_CHANNEL_LEN}}}")]
    BadChannel,
    /// Media reference fields are invalid.
    #[error("envelope.media invalid: {0}")]
    BadMedia(&'static str),
}

/// Checks a channel name: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl<P: Base64Payload> EnvelopeOf<P> {
    /// The JSON text of this envelope, byte for byte what `serde_json::to_string` gives.
    ///
    /// Written by hand because it runs for every routed message: serde_json escapes
    /// strings one character at a time, and the payload (base64) and keys (hex) are
    /// most of an envelope yet can never contain a character that needs escaping.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.json_len_hint());
        self.write_json(&mut out);
        out
    }

    /// The length of the JSON of this envelope, exact in the common case (no escapes,
    /// no media; a capacity that holds it without reallocation). A frame built with
    /// exactly its length becomes a shared buffer without another allocation.
    pub fn json_len_hint(&self) -> usize {
        // Each key with its quotes and the value's quotes.
        const KEY: usize = r#","from":"""#.len() + 64;
        r#"{"id":"#.len()
            + plain_json_str_len(&self.id)
            + self.from.map_or(0, |_| KEY)
            + self.to.map_or(0, |_| r#","to":"""#.len() + 64)
            + self
                .channel
                .as_deref()
                .map_or(0, |c| r#","channel":"#.len() + plain_json_str_len(c))
            + r#","ts":"#.len()
            + int_len(self.ts.unsigned_abs(), self.ts < 0)
            + r#","kind":""#.len()
            + self.kind.as_str().len()
            + r#"","payload":""#.len()
            + self.payload.base64_len()
            + r#"""#.len()
            + self
                .media
                .as_ref()
                .map_or(0, |m| 64 + m.url.len() + m.sha256.len() + m.mime.len())
            + 1
    }

    /// Appends the JSON text of this envelope (see [`Envelope::to_json`]) to `out`.
    pub fn write_json(&self, out: &mut String) {
        out.push_str(r#"{"id":"#);
        push_json_str(out, &self.id);
        if let Some(k) = &self.from {
            out.push_str(r#","from":""#);
            push_hex(out, &k.0);
            out.push('"');
        }
        if let Some(k) = &self.to {
            out.push_str(r#","to":""#);
            push_hex(out, &k.0);
            out.push('"');
        }
        if let Some(c) = &self.channel {
            out.push_str(r#","channel":"#);
            push_json_str(out, c);
        }
        out.push_str(r#","ts":"#);
        push_int(out, self.ts);
        out.push_str(r#","kind":""#);
        out.push_str(self.kind.as_str());
        out.push_str(r#"","payload":""#);
        self.payload.push_base64(out);
        out.push('"');
        if let Some(m) = &self.media {
            out.push_str(r#","media":"#);
            // A struct of strings and a number: serializing it cannot fail.
            out.push_str(&serde_json::to_string(m).unwrap_or_else(|_| "null".into()));
        }
        out.push('}');
    }

    /// Validates the rules that JSON decoding cannot express.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN || self.id.chars().any(char::is_control)
        {
            return Err(EnvelopeError::BadId);
        }
        match (&self.to, &self.channel) {
            (Some(_), None) => {}
            (None, Some(c)) => {
                if !valid_channel(c) {
                    return Err(EnvelopeError::BadChannel);
                }
            }
            _ => return Err(EnvelopeError::BadTarget),
        }
        if let Some(m) = &self.media {
            if m.url.is_empty() || m.url.len() > 2048 {
                return Err(EnvelopeError::BadMedia("url must be 1..=2048 bytes"));
            }
            if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(EnvelopeError::BadMedia("sha256 must be 64 hex digits"));
            }
            if m.mime.is_empty() || m.mime.len() > 255 || !m.mime.contains('/') {
                return Err(EnvelopeError::BadMedia("mime must look like type/subtype"));
            }
        }
        Ok(())
    }
}

/// Appends `s` as a JSON string literal (quoted, escaped as serde_json does).
fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes only the quote, the backslash and control characters below
    // U+0020; a string without them (client ids usually) is copied as is.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    // Serializing a string cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// The length of `s` as a JSON string literal when it needs no escapes.
fn plain_json_str_len(s: &str) -> usize {
    s.len() + 2
}

/// Digits (and sign) of an integer of magnitude `n`.
fn int_len(n: u64, negative: bool) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1) + usize::from(negative)
}

/// Appends the decimal form of `n` (as serde_json writes integers) without allocating.
fn push_int(out: &mut String, n: impl std::fmt::Display) {
    use std::fmt::Write as _;
    // Writing into a String cannot fail.
    let _ = write!(out, "{n}");
}

/// Appends lowercase hex of `bytes`.
fn push_hex(out: &mut String, bytes: &[u8]) {
    // Into a stack buffer first, then one append: pushing char by char re-checks the
    // capacity and UTF-8-encodes every digit (a key is 64 of them, two per message).
    let (keys, rest) = bytes.as_chunks::<32>();
    for key in keys {
        // Hex digits are ASCII, so this never fails.
        out.push_str(std::str::from_utf8(&super::types::hex_lower(key)).unwrap_or_default());
    }
    if !rest.is_empty() {
        let mut key = [0u8; 32];
        key[..rest.len()].copy_from_slice(rest);
        let digits = super::types::hex_lower(&key);
        out.push_str(std::str::from_utf8(&digits[..2 * rest.len()]).unwrap_or_default());
    }
}

/// One message reference in an `ack`: the sender and the sender's id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRef {
    /// Sender key of the acknowledged message.
    pub from: KeyHex,
    /// Id of the acknowledged message.
    pub id: String,
}

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Proves the identity `key` by signing the challenge (see `docs/protocol.md`).
    Auth {
        /// The client's Ed25519 public key.
        key: KeyHex,
        /// Signature over `"dchat-auth-v1:" || nonce`.
        sig: SigHex,
    },
    /// Sends a message to a key or a channel.
    Send {
        /// The message.
        envelope: Envelope,
    },
    /// Joins a channel (persistent membership).
    Join {
        /// Channel name.
        channel: String,
    },
    /// Leaves a channel.
    Leave {
        /// Channel name.
        channel: String,
    },
    /// Acknowledges delivered messages; the relay forgets them.
    Ack {
        /// Messages being acknowledged.
        messages: Vec<AckRef>,
        /// When true the relay sends no `acked` answer (a failure is still reported
        /// with an `error` frame whose `ref` is `"ack"`): a client acknowledging every
        /// delivery saves a frame each way.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
    },
    /// Asks for pending (stored) messages not yet delivered on this connection.
    Fetch {
        /// At most this many (default 100, max 1000).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Publishes the caller's signed profile.
    ProfilePublish {
        /// Base64 of the profile JSON document.
        data: Base64Bytes,
        /// Signature over `"dchat-profile-v1:" || data`.
        sig: SigHex,
    },
    /// Fetches someone's signed profile.
    ProfileGet {
        /// Whose profile.
        key: KeyHex,
    },
    /// Keep-alive; answered with `pong`.
    Ping {
        /// Echoed back.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
}

impl ClientFrame {
    /// The frame's `type` string (metrics, logs).
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Join { .. } => "join",
            ClientFrame::Leave { .. } => "leave",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Fetch { .. } => "fetch",
            ClientFrame::ProfilePublish { .. } => "profile_publish",
            ClientFrame::ProfileGet { .. } => "profile_get",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

/// Frame types a client may send, for telling "unknown type" from "bad frame".
pub const CLIENT_FRAME_TYPES: [&str; 9] = [
    "auth",
    "send",
    "join",
    "leave",
    "ack",
    "fetch",
    "profile_publish",
    "profile_get",
    "ping",
];

/// Outcome of a `send` to one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Pushed to the recipient's live connection on this relay (not yet acknowledged by it).
    Delivered,
    /// Stored durably for later delivery (the recipient is offline or on another relay).
    Stored,
    /// The (sender, id) was seen before; nothing was done again.
    Duplicate,
    /// Channel message fanned out; see `delivered` and `stored` counts.
    Fanout,
}

/// Limits the relay enforces on this connection, announced in `welcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest accepted text frame, bytes.
    pub max_frame_bytes: usize,
    /// Sustained requests per second (token bucket refill).
    pub rate_per_sec: u32,
    /// Token bucket size (burst).
    pub burst: u32,
    /// Deliveries the relay keeps in flight (unacknowledged) per connection.
    pub max_inflight: usize,
    /// Seconds of silence after which the relay closes the connection.
    pub idle_timeout_secs: u64,
}

/// `welcome.features` entry: the relay accepts `ack` with `quiet: true`.
pub const FEATURE_QUIET_ACK: &str = "quiet_ack";

/// Frames the relay sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Challenge {
        /// Protocol version (1).
        v: u32,
        /// 32 random bytes, base64; sign `"dchat-auth-v1:" || nonce_bytes`.
        nonce: Base64Bytes,
        /// Milliseconds until the challenge expires.
        expires_in_ms: u64,
    },
    /// Authentication succeeded.
    Welcome {
        /// The authenticated key.
        key: KeyHex,
        /// Opaque session id (logs, support).
        session: String,
        /// Enforced limits.
        limits: Limits,
        /// Optional protocol features this relay supports (see [`FEATURE_QUIET_ACK`]);
        /// a client uses one only when it is listed here.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Result of a `send`.
    Sent {
        /// The envelope id.
        id: String,
        /// What happened.
        status: SendStatus,
        /// Store sequence number when stored.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// For channels: live deliveries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delivered: Option<u32>,
        /// For channels: stored copies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stored: Option<u32>,
    },
    /// A message for this connection's key.
    Deliver {
        /// Store sequence number if it came from storage; absent for live pushes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// The message, `from` filled in by the relay.
        envelope: Envelope,
    },
    /// Result of an `ack`.
    Acked {
        /// Messages found and forgotten.
        removed: u64,
    },
    /// Result of `join`.
    Joined {
        /// Channel name.
        channel: String,
    },
    /// Result of `leave`.
    Left {
        /// Channel name.
        channel: String,
    },
    /// End of the deliveries triggered by a `fetch`.
    Fetched {
        /// Messages delivered for this fetch.
        count: u32,
        /// More pending messages exist beyond the limit or the in-flight window.
        more: bool,
    },
    /// Result of `profile_publish`.
    ProfileStored {
        /// False when an equal-or-newer profile was already stored.
        updated: bool,
    },
    /// Result of `profile_get`.
    Profile {
        /// Whose profile.
        key: KeyHex,
        /// Base64 of the signed profile JSON document.
        data: Base64Bytes,
        /// Signature by `key` over `"dchat-profile-v1:" || data`.
        sig: SigHex,
    },
    /// Answer to `ping`.
    Pong {
        /// Echo of the ping's nonce.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<String>,
    },
    /// A typed error. It ends the connection exactly when it carries `close`.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
        /// The envelope id or frame type the error refers to, when known.
        #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// True when the refused frame was a quiet `ack` (`"quiet": true`): the error is
        /// then not the answer to any other request (see `docs/protocol.md`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        quiet: bool,
        /// Set when the relay ends the connection: the WebSocket close code that
        /// follows. Nothing else follows this frame but the close frame.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        close: Option<u16>,
    },
}

impl ServerFrame {
    /// Encodes to the JSON text of a WebSocket frame.
    pub fn to_json(&self) -> String {
        // The two answers of the message hot path (`sent` for every send, `acked` for
        // every ack) are written by hand, byte for byte what serde_json gives (a property
        // test checks this); serde's derived encoder goes through the generic tagged-enum
        // machinery and formats numbers into temporary buffers.
        match self {
            ServerFrame::Sent {
                id,
                status,
                seq,
                delivered,
                stored,
            } => {
                let status = match status {
                    SendStatus::Delivered => "delivered",
                    SendStatus::Stored => "stored",
                    SendStatus::Duplicate => "duplicate",
                    SendStatus::Fanout => "fanout",
                };
                // Exact without escapes: the frame becomes a shared buffer without
                // another allocation.
                let len = r#"{"type":"sent","id":"#.len()
                    + plain_json_str_len(id)
                    + r#","status":"""#.len()
                    + status.len()
                    + seq.map_or(0, |s| r#","seq":"#.len() + int_len(s, false))
                    + delivered.map_or(0, |d| r#","delivered":"#.len() + int_len(d.into(), false))
                    + stored.map_or(0, |s| r#","stored":"#.len() + int_len(s.into(), false))
                    + 1;
                let mut out = String::with_capacity(len);
                out.push_str(r#"{"type":"sent","id":"#);
                push_json_str(&mut out, id);
                out.push_str(r#","status":""#);
                out.push_str(status);
                out.push('"');
                if let Some(s) = seq {
                    out.push_str(r#","seq":"#);
                    push_int(&mut out, *s);
                }
                if let Some(d) = delivered {
                    out.push_str(r#","delivered":"#);
                    push_int(&mut out, *d);
                }
                if let Some(s) = stored {
                    out.push_str(r#","stored":"#);
                    push_int(&mut out, *s);
                }
                out.push('}');
                out
            }
            ServerFrame::Acked { removed } => {
                let mut out = String::with_capacity(40);
                out.push_str(r#"{"type":"acked","removed":"#);
                push_int(&mut out, *removed);
                out.push('}');
                out
            }
            // Serializing these types cannot fail: no maps with non-string keys, no I/O.
            _ => serde_json::to_string(self).unwrap_or_else(|_| {
                r#"{"type":"error","code":"internal","message":"encode failed"}"#.to_string()
            }),
        }
    }
}

impl ClientFrame {
    /// Encodes to the JSON text of a WebSocket frame.
    ///
    /// `send` and `ack` (a client's hot path: one of each per message, in the worst
    /// case) are written by hand, byte for byte what serde_json gives (a property test
    /// checks this); the rest go through serde.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        match self {
            ClientFrame::Send { envelope } => {
                let mut out =
                    String::with_capacity(SEND_PREFIX.len() + 1 + envelope.json_len_hint());
                out.push_str(SEND_PREFIX);
                envelope.write_json(&mut out);
                out.push('}');
                Ok(out)
            }
            ClientFrame::Ack { messages, quiet } => {
                let per_ref = 90 + messages.first().map_or(0, |m| m.id.len());
                let mut out = String::with_capacity(48 + messages.len() * per_ref);
                out.push_str(r#"{"type":"ack","messages":["#);
                for (i, m) in messages.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(r#"{"from":""#);
                    push_hex(&mut out, &m.from.0);
                    out.push_str(r#"","id":"#);
                    push_json_str(&mut out, &m.id);
                    out.push('}');
                }
                out.push(']');
                if *quiet {
                    out.push_str(r#","quiet":true"#);
                }
                out.push('}');
                Ok(out)
            }
            _ => serde_json::to_string(self),
        }
    }
}

/// Start of a `send` frame; the envelope JSON and `}` follow.
const SEND_PREFIX: &str = r#"{"type":"send","envelope":"#;

/// The server frame types decoded by the client's fast path.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum FastServerTag {
    Deliver,
    Sent,
}

/// A `deliver` or `sent` frame, decoded in one pass (see [`decode_server_frame`]).
/// Unknown keys are skipped, as the tagged enum skips them.
#[derive(Deserialize)]
struct FastServerFrame {
    #[serde(rename = "type")]
    tag: FastServerTag,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    envelope: Option<Envelope>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    status: Option<SendStatus>,
    #[serde(default)]
    delivered: Option<u32>,
    #[serde(default)]
    stored: Option<u32>,
}

/// Decodes one server text frame (the client side of [`decode_client_frame`]).
///
/// `deliver` and `sent` — one per received and one per sent message — take a one-pass
/// path: the tagged enum buffers every key and value of the object into serde's
/// generic `Content` tree before decoding it, which made a benchmark client spend more
/// on decoding deliveries than the relay spent routing them. Only the exact shapes of
/// those two frames are taken from it; anything else (other types, a key of the other
/// frame, duplicates) goes to the general decoder, which decides and reports errors.
pub fn decode_server_frame(text: &str) -> Result<ServerFrame, serde_json::Error> {
    match serde_json::from_str::<FastServerFrame>(text) {
        Ok(FastServerFrame {
            tag: FastServerTag::Deliver,
            seq,
            envelope: Some(envelope),
            id: None,
            status: None,
            delivered: None,
            stored: None,
        }) => return Ok(ServerFrame::Deliver { seq, envelope }),
        Ok(FastServerFrame {
            tag: FastServerTag::Sent,
            seq,
            envelope: None,
            id: Some(id),
            status: Some(status),
            delivered,
            stored,
        }) => {
            return Ok(ServerFrame::Sent {
                id,
                status,
                seq,
                delivered,
                stored,
            })
        }
        _ => {}
    }
    serde_json::from_str(text)
}

/// Start of a live `deliver` frame (no `seq`); the envelope JSON and [`DELIVER_SUFFIX`]
/// follow. One such frame is built per routed message and shared by every recipient.
pub const LIVE_DELIVER_PREFIX: &str = r#"{"type":"deliver","envelope":"#;
/// End of a `deliver` frame.
pub const DELIVER_SUFFIX: &str = "}";

/// Builds a `deliver` frame around an already-serialized envelope without re-encoding it.
pub fn encode_deliver(seq: Option<u64>, envelope_json: &str) -> String {
    let head = match seq {
        Some(s) => r#"{"type":"deliver","seq":,"envelope":"#.len() + int_len(s, false),
        None => LIVE_DELIVER_PREFIX.len(),
    };
    let mut out = String::with_capacity(head + envelope_json.len() + DELIVER_SUFFIX.len());
    match seq {
        Some(s) => {
            out.push_str(r#"{"type":"deliver","seq":"#);
            push_int(&mut out, s);
            out.push_str(r#","envelope":"#);
        }
        None => out.push_str(LIVE_DELIVER_PREFIX),
    }
    out.push_str(envelope_json);
    out.push_str(DELIVER_SUFFIX);
    out
}

/// The live `deliver` frame of `envelope` (as [`encode_deliver`] with no `seq` gives
/// for its JSON), built in one buffer; the envelope JSON is
/// `frame[LIVE_DELIVER_PREFIX.len()..frame.len() - DELIVER_SUFFIX.len()]`.
pub fn encode_live_deliver<P: Base64Payload>(envelope: &EnvelopeOf<P>) -> String {
    let mut out = String::with_capacity(
        LIVE_DELIVER_PREFIX.len() + envelope.json_len_hint() + DELIVER_SUFFIX.len(),
    );
    out.push_str(LIVE_DELIVER_PREFIX);
    envelope.write_json(&mut out);
    out.push_str(DELIVER_SUFFIX);
    out
}

/// Why a client frame could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not JSON, or not matching the schema of its type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A well-formed object with a `type` this version does not know.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
}

impl DecodeError {
    /// The error code sent back to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Malformed(_) => ErrorCode::BadFrame,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

/// The frame types decoded by the fast path.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum FastTag {
    Send,
    Ack,
}

/// A `send` or `ack` frame, decoded in one pass without buffering (see
/// [`decode_client_frame`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, bound = "P: Deserialize<'de>")]
struct FastFrame<P> {
    #[serde(rename = "type")]
    tag: FastTag,
    #[serde(default)]
    envelope: Option<EnvelopeOf<P>>,
    #[serde(default)]
    messages: Option<Vec<AckRef>>,
    #[serde(default)]
    quiet: Option<bool>,
}

/// A client frame as the relay handles it ([`decode_request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// A `send`, its payload kept as base64 text.
    Send(RelayEnvelope),
    /// Any other frame.
    Frame(ClientFrame),
}

impl Request {
    /// Whether this is a `send`.
    pub fn is_send(&self) -> bool {
        matches!(self, Request::Send(_))
    }

    /// What an error about this frame says of it.
    pub fn hint(&self) -> FrameHint {
        match self {
            Request::Send(_) => FrameHint {
                frame_type: Some("send"),
                quiet_ack: false,
            },
            Request::Frame(f) => FrameHint::of_frame(f),
        }
    }
}

/// Decodes one client text frame as the relay handles it: like [`decode_client_frame`]
/// (the same frames accepted, the same errors), except that a `send` keeps its payload
/// as the base64 text it arrived in. The hot frames in the shape clients write them
/// take a hand-written path first ([`super::scan`]). Never panics, whatever the input.
pub fn decode_request(text: &str) -> Result<Request, DecodeError> {
    if let Some(envelope) = super::scan::send(text) {
        return Ok(Request::Send(envelope));
    }
    if let Some((messages, quiet)) = super::scan::ack(text) {
        return Ok(Request::Frame(ClientFrame::Ack { messages, quiet }));
    }
    not_an_object(text)?;
    match decode_fast::<Base64Text>(text) {
        Some(Fast::Send(envelope)) => Ok(Request::Send(envelope)),
        Some(Fast::Ack(messages, quiet)) => {
            Ok(Request::Frame(ClientFrame::Ack { messages, quiet }))
        }
        None => match decode_client_frame(text)? {
            ClientFrame::Send { envelope } => Ok(Request::Send(envelope.into())),
            frame => Ok(Request::Frame(frame)),
        },
    }
}

/// A frame taken by the fast path ([`decode_fast`]).
enum Fast<P> {
    Send(EnvelopeOf<P>),
    Ack(Vec<AckRef>, bool),
}

/// Fast path for the two frames of the message hot path. An internally tagged enum
/// is decoded by first buffering the whole object into serde's generic `Content`
/// tree (an allocation per key and value), then decoding that; this plain struct
/// is decoded in one pass. Only the exact shapes `{type: send, envelope}` and
/// `{type: ack, messages, quiet?}` (no duplicate or other keys) are taken from it, a
/// subset of what `ClientFrame` accepts; for anything else it gives `None` and the
/// general path decides and reports the error.
fn decode_fast<P: serde::de::DeserializeOwned>(text: &str) -> Option<Fast<P>> {
    match serde_json::from_str::<FastFrame<P>>(text) {
        Ok(FastFrame {
            tag: FastTag::Send,
            envelope: Some(envelope),
            messages: None,
            quiet: None,
        }) => Some(Fast::Send(envelope)),
        Ok(FastFrame {
            tag: FastTag::Ack,
            envelope: None,
            messages: Some(messages),
            quiet,
        }) => Some(Fast::Ack(messages, quiet.unwrap_or(false))),
        _ => None,
    }
}

/// Refuses text that is not a JSON object before serde sees it: a derived struct and an
/// internally tagged enum also read a JSON array (`["ping"]` as a ping), which the
/// protocol does not allow.
fn not_an_object(text: &str) -> Result<(), DecodeError> {
    if text.trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(DecodeError::Malformed(
            "a frame must be a JSON object".into(),
        ))
    }
}

/// Decodes one client text frame. Never panics, whatever the input.
pub fn decode_client_frame(text: &str) -> Result<ClientFrame, DecodeError> {
    if let Some((messages, quiet)) = super::scan::ack(text) {
        return Ok(ClientFrame::Ack { messages, quiet });
    }
    not_an_object(text)?;
    match decode_fast::<Base64Bytes>(text) {
        Some(Fast::Send(envelope)) => return Ok(ClientFrame::Send { envelope }),
        Some(Fast::Ack(messages, quiet)) => return Ok(ClientFrame::Ack { messages, quiet }),
        None => {}
    }
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(f) => Ok(f),
        Err(err) => {
            // Only on the error path: find out whether the type itself was the problem.
            #[derive(Deserialize)]
            struct TypeOnly {
                #[serde(rename = "type")]
                kind: String,
            }
            if let Ok(t) = serde_json::from_str::<TypeOnly>(text) {
                if !CLIENT_FRAME_TYPES.contains(&t.kind.as_str()) {
                    return Err(DecodeError::UnknownType(truncate_utf8(t.kind, 64)));
                }
            }
            Err(DecodeError::Malformed(truncate_utf8(err.to_string(), 256)))
        }
    }
}

/// What the relay tells a client about a frame it refuses: the `ref` and `quiet`
/// members of the `error` frame. For a frame that did not decode these come from
/// [`FrameHint::of_text`], for a decoded one from [`FrameHint::of_frame`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHint {
    /// The frame's `type`, when it is one of [`CLIENT_FRAME_TYPES`].
    pub frame_type: Option<&'static str>,
    /// The frame is an `ack` with `"quiet": true`: its error is marked `quiet`, so a
    /// client counting answers does not take it for the answer to another request.
    pub quiet_ack: bool,
}

impl FrameHint {
    /// Reads what it can from a frame that failed to decode: the `type` member of a
    /// JSON object, when it names a v1 frame type, and a `quiet` member that is the
    /// JSON literal `true` in an `ack`. A member given more than once counts by its last
    /// occurrence (as JavaScript's `JSON.parse` reads it), so a duplicate — itself the
    /// reason the frame failed — does not hide what the frame was. Anything that is not a
    /// JSON object gives none.
    ///
    /// Only on the error path: it parses the text a second time.
    pub fn of_text(text: &str) -> FrameHint {
        // serde_json's map keeps the last value of a repeated key.
        let Ok(object) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        else {
            return FrameHint::default();
        };
        let frame_type = object
            .get("type")
            .and_then(serde_json::Value::as_str)
            .and_then(|k| CLIENT_FRAME_TYPES.iter().copied().find(|t| *t == k));
        FrameHint {
            frame_type,
            quiet_ack: frame_type == Some("ack")
                && object.get("quiet") == Some(&serde_json::Value::Bool(true)),
        }
    }

    /// The hint of a decoded frame.
    pub fn of_frame(frame: &ClientFrame) -> FrameHint {
        FrameHint {
            frame_type: Some(frame.type_name()),
            quiet_ack: matches!(frame, ClientFrame::Ack { quiet: true, .. }),
        }
    }

    /// The `ref` of an error about this frame.
    pub fn reference(self) -> Option<String> {
        self.frame_type.map(str::to_string)
    }
}

/// Shortens `s` to at most `max` bytes without splitting a character (`String::truncate`
/// panics inside a multi-byte character, and error text may echo client input).
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Domain-separation prefix of the authentication signature.
pub const AUTH_CONTEXT: &[u8] = b"dchat-auth-v1:";
/// Domain-separation prefix of the profile signature.
pub const PROFILE_CONTEXT: &[u8] = b"dchat-profile-v1:";

/// The bytes a client signs to answer a challenge.
pub fn auth_message(nonce: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(AUTH_CONTEXT.len() + nonce.len());
    m.extend_from_slice(AUTH_CONTEXT);
    m.extend_from_slice(nonce);
    m
}

/// The bytes a client signs to publish a profile.
pub fn profile_message(data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROFILE_CONTEXT.len() + data.len());
    m.extend_from_slice(PROFILE_CONTEXT);
    m.extend_from_slice(data);
    m
}

/// The profile document inside `profile_publish.data`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileDoc {
    /// Owner key; must equal the publishing session's key.
    pub key: KeyHex,
    /// Display name, 1..=64 characters.
    pub name: String,
    /// Avatar image by reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<MediaRef>,
    /// Milliseconds since the epoch; a profile replaces a stored one only if newer.
    pub updated_ms: i64,
}

impl ProfileDoc {
    /// Reads a profile document: a JSON object (serde alone would also read a struct
    /// from a JSON array). The error says what is wrong.
    pub fn parse(bytes: &[u8]) -> Result<ProfileDoc, String> {
        if bytes.trim_ascii_start().first() != Some(&b'{') {
            return Err("the profile document must be a JSON object".into());
        }
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// Verifies an Ed25519 signature (strict: rejects malleable and small-order forms).
pub fn verify_signature(key: &KeyHex, message: &[u8], sig: &SigHex) -> bool {
    let Ok(vk) = ed25519_dalek::VerifyingKey::from_bytes(&key.0) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    vk.verify_strict(message, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyHex {
        KeyHex([7u8; 32])
    }

    #[test]
    fn decodes_send_with_base64_payload() {
        let text = format!(
            r#"{{"type":"send","envelope":{{"id":"m1","to":"{}","ts":5,"kind":"text","payload":"aGk="}}}}"#,
            key()
        );
        let f = decode_client_frame(&text).unwrap();
        let ClientFrame::Send { envelope } = f else {
            panic!("not send")
        };
        assert_eq!(envelope.payload.0, b"hi");
        assert_eq!(envelope.to, Some(key()));
        envelope.validate().unwrap();
    }

    #[test]
    fn classifies_unknown_type_and_malformed() {
        assert_eq!(
            decode_client_frame(r#"{"type":"teleport"}"#),
            Err(DecodeError::UnknownType("teleport".into()))
        );
        assert!(matches!(
            decode_client_frame("{not json"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_client_frame(r#"{"type":"join"}"#),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode_client_frame(r#"{"type":"ping","extra":1}"#),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn envelope_rules() {
        let mut e = Envelope {
            id: "x".into(),
            from: None,
            to: Some(key()),
            channel: Some("c".into()),
            ts: 0,
            kind: Kind::Text,
            payload: Base64Bytes(vec![]),
            media: None,
        };
        assert_eq!(e.validate(), Err(EnvelopeError::BadTarget));
        e.to = None;
        e.channel = Some("bad name!".into());
        assert_eq!(e.validate(), Err(EnvelopeError::BadChannel));
        e.channel = Some("general".into());
        e.id = String::new();
        assert_eq!(e.validate(), Err(EnvelopeError::BadId));
    }

    #[test]
    fn deliver_encoding_round_trips() {
        let env = Envelope {
            id: "a\"b".into(),
            from: Some(key()),
            to: Some(key()),
            channel: None,
            ts: 1,
            kind: Kind::Image,
            payload: Base64Bytes(vec![1, 2, 3]),
            media: Some(MediaRef {
                url: "https://x/y".into(),
                sha256: "a".repeat(64),
                size: 10,
                mime: "image/png".into(),
            }),
        };
        let json = serde_json::to_string(&env).unwrap();
        let frame: ServerFrame = serde_json::from_str(&encode_deliver(Some(9), &json)).unwrap();
        assert_eq!(
            frame,
            ServerFrame::Deliver {
                seq: Some(9),
                envelope: env
            }
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("ééé".into(), 3), "é");
        assert_eq!(truncate_utf8("abc".into(), 5), "abc");
        let long_type = format!(r#"{{"type":"{}"}}"#, "é".repeat(100));
        let Err(DecodeError::UnknownType(t)) = decode_client_frame(&long_type) else {
            panic!("expected unknown type")
        };
        assert!(t.len() <= 64);
    }

    #[test]
    fn error_frame_uses_ref_field() {
        let f = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            reference: Some("m1".into()),
            quiet: false,
            close: None,
        };
        let json = f.to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"rate_limited","message":"slow down","ref":"m1"}"#
        );
        // `quiet` and `close` appear only when set.
        let f = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "request flood; disconnected".into(),
            reference: Some("ack".into()),
            quiet: true,
            close: Some(4008),
        };
        let json = f.to_json();
        assert!(
            json.ends_with(r#","ref":"ack","quiet":true,"close":4008}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ServerFrame>(&json).unwrap(), f);
    }

    /// The `ref` and `quiet` members of the error about a frame that did not decode.
    #[test]
    fn a_profile_document_is_a_json_object() {
        let key = "ab".repeat(32);
        let object = format!(r#" {{"key":"{key}","name":"Bob","updated_ms":12}}"#);
        assert_eq!(ProfileDoc::parse(object.as_bytes()).unwrap().name, "Bob");
        let array = format!(r#"["{key}","Bob",null,12]"#);
        assert!(serde_json::from_slice::<ProfileDoc>(array.as_bytes()).is_ok());
        assert_eq!(
            ProfileDoc::parse(array.as_bytes()),
            Err("the profile document must be a JSON object".to_string())
        );
    }

    #[test]
    fn hints_of_undecodable_frames() {
        let hint = |t: &str| {
            let h = FrameHint::of_text(t);
            (h.frame_type, h.quiet_ack)
        };
        assert_eq!(
            hint(r#"{"type":"ack","messages":7,"quiet":true}"#),
            (Some("ack"), true)
        );
        assert_eq!(
            hint(r#"{"quiet":true,"type":"ack","messages":[{}]}"#),
            (Some("ack"), true)
        );
        // Only the JSON literal `true` makes an ack quiet.
        assert_eq!(
            hint(r#"{"type":"ack","messages":7,"quiet":"yes"}"#),
            (Some("ack"), false)
        );
        assert_eq!(hint(r#"{"type":"ack","messages":7}"#), (Some("ack"), false));
        assert_eq!(
            hint(r#"{"type":"send","quiet":true}"#),
            (Some("send"), false)
        );
        assert_eq!(
            hint(r#"{"type":"auth","key":"zz","sig":1}"#),
            (Some("auth"), false)
        );
        // A repeated member (which fails decoding) counts by its last occurrence.
        assert_eq!(
            hint(r#"{"type":"ack","messages":[],"quiet":true,"quiet":true}"#),
            (Some("ack"), true)
        );
        assert_eq!(
            hint(r#"{"type":"ack","messages":[],"quiet":true,"quiet":false}"#),
            (Some("ack"), false)
        );
        assert_eq!(
            hint(r#"{"type":"send","type":"ping"}"#),
            (Some("ping"), false)
        );
        // Unknown types, other JSON values and text that is not JSON give nothing.
        assert_eq!(hint(r#"{"type":"teleport","quiet":true}"#), (None, false));
        assert_eq!(hint(r#"{"type":7}"#), (None, false));
        assert_eq!(hint(r#"["ack"]"#), (None, false));
        assert_eq!(hint(r#"{"type":"ack","quiet":true"#), (None, false));
        assert_eq!(hint("not json"), (None, false));
        let f = ClientFrame::Ack {
            messages: vec![],
            quiet: true,
        };
        assert_eq!(
            FrameHint::of_frame(&f),
            FrameHint {
                frame_type: Some("ack"),
                quiet_ack: true
            }
        );
    }

    /// How the relay classifies a frame before acting on it, in the order it checks:
    /// decoding (`bad_frame`, `unknown_type`), then the value rules of `send`
    /// (`invalid_envelope`) and of a channel name in `join`/`leave` (also
    /// `invalid_envelope`). The server calls exactly these functions
    /// (`decode_client_frame`, `Envelope::validate`, `valid_channel`);
    /// `relay_server::bad_frame_and_invalid_envelope_table` sends the same rows to a relay.
    fn classify(text: &str) -> Result<(), ErrorCode> {
        // The relay's decoder (hand-written paths, payload kept as text) refuses with
        // exactly the general decoder's error and validates the same envelope.
        let relay = decode_request(text);
        match (&relay, decode_client_frame(text)) {
            (Err(r), Err(e)) => assert_eq!(r, &e, "{text}"),
            (Ok(Request::Send(r)), Ok(ClientFrame::Send { envelope })) => {
                assert_eq!(r.validate(), envelope.validate(), "{text}")
            }
            (Ok(Request::Frame(r)), Ok(f)) => assert_eq!(r, &f, "{text}"),
            (r, e) => panic!("{text}: relay {r:?}, general {e:?}"),
        }
        match decode_client_frame(text).map_err(|e| e.code())? {
            ClientFrame::Send { envelope } => {
                envelope.validate().map_err(|_| ErrorCode::InvalidEnvelope)
            }
            ClientFrame::Join { channel } | ClientFrame::Leave { channel }
                if !valid_channel(&channel) =>
            {
                Err(ErrorCode::InvalidEnvelope)
            }
            _ => Ok(()),
        }
    }

    /// A `send` frame whose envelope has `members` (JSON object members without braces).
    fn send_with(members: &str) -> String {
        format!(r#"{{"type":"send","envelope":{{{members}}}}}"#)
    }

    /// docs/protocol.md, "Decoding": a member given twice is `bad_frame`, at the top
    /// level or inside the envelope or an ack entry; `unknown_type` needs one `type`
    /// member that is a string; a frame is a JSON object, not an array.
    #[test]
    fn repeated_members_non_string_types_and_arrays_are_bad_frame() {
        let to = "ab".repeat(32);
        let from = "cd".repeat(32);
        for text in [
            r#"{"type":"ping","type":"ping"}"#.to_string(),
            r#"{"type":"ack","messages":[],"quiet":true,"quiet":true}"#.to_string(),
            r#"{"type":"ack","messages":[],"messages":[]}"#.to_string(),
            format!(r#"{{"type":"ack","messages":[{{"from":"{from}","id":"a","id":"b"}}]}}"#),
            send_with(&format!(
                r#""id":"m1","id":"m2","to":"{to}","ts":1,"kind":"text","payload":"aGk=""#
            )),
            r#"{"type":"teleport","type":"warp"}"#.to_string(),
            r#"{"type":5}"#.to_string(),
            r#"{"type":null}"#.to_string(),
            // A JSON array is not a frame, though serde would read a struct from it.
            r#"["ping"]"#.to_string(),
            r#"["ack",[]]"#.to_string(),
            format!(r#"["send",{{"id":"m1","to":"{to}","ts":1,"kind":"text","payload":"aGk="}}]"#),
        ] {
            assert!(
                matches!(decode_request(&text), Err(DecodeError::Malformed(_))),
                "{text}: {:?}",
                decode_request(&text)
            );
            assert!(
                matches!(decode_client_frame(&text), Err(DecodeError::Malformed(_))),
                "{text}: {:?}",
                decode_client_frame(&text)
            );
        }
        assert_eq!(
            decode_client_frame(r#"{"type":""}"#),
            Err(DecodeError::UnknownType(String::new()))
        );
    }

    /// The table of `docs/protocol.md` ("Refused frames: bad_frame or invalid_envelope"),
    /// row by row.
    #[test]
    fn bad_frame_and_invalid_envelope_table() {
        use ErrorCode::{BadFrame, InvalidEnvelope};
        let to = "ab".repeat(32);
        let base = |extra: &str| {
            send_with(&format!(
                r#""id":"m1","to":"{to}","ts":1,"kind":"text","payload":"aGk="{extra}"#
            ))
        };
        let media = |m: &str| base(&format!(r#","media":{{{m}}}"#));
        let ok_media =
            format!(r#""url":"https://m/x","sha256":"{to}","size":1,"mime":"image/png""#);
        let rows: Vec<(&str, String, Result<(), ErrorCode>)> = vec![
            ("valid send", base(""), Ok(())),
            ("valid media", media(&ok_media), Ok(())),
            (
                "key in upper case",
                base("").replace(&to, &to.to_uppercase()),
                Ok(()),
            ),
            (
                "bad hex in a key",
                base("").replace(&to, &"zz".repeat(32)),
                Err(BadFrame),
            ),
            (
                "key of 31 bytes",
                base("").replace(&to, &to[2..]),
                Err(BadFrame),
            ),
            ("bad hex in from", base(r#","from":"xyz""#), Err(BadFrame)),
            (
                "bad base64",
                base("").replace("aGk=", "!!!!"),
                Err(BadFrame),
            ),
            (
                "unpadded base64",
                base("").replace("aGk=", "aGk"),
                Err(BadFrame),
            ),
            (
                "base64 with non-zero unused bits",
                base("").replace("aGk=", "aGl="),
                Err(BadFrame),
            ),
            (
                "URL-safe base64 alphabet",
                base("").replace("aGk=", "-_8="),
                Err(BadFrame),
            ),
            (
                "float ts",
                base("").replace(r#""ts":1"#, r#""ts":1.5"#),
                Err(BadFrame),
            ),
            (
                "integral float ts",
                base("").replace(r#""ts":1"#, r#""ts":1.0"#),
                Err(BadFrame),
            ),
            (
                "exponent ts",
                base("").replace(r#""ts":1"#, r#""ts":1e3"#),
                Err(BadFrame),
            ),
            (
                "ts as a string",
                base("").replace(r#""ts":1"#, r#""ts":"1""#),
                Err(BadFrame),
            ),
            (
                "negative ts",
                base("").replace(r#""ts":1"#, r#""ts":-1"#),
                Ok(()),
            ),
            (
                "unknown kind",
                base("").replace(r#""text""#, r#""gif""#),
                Err(BadFrame),
            ),
            (
                "unknown envelope member",
                base(r#","prio":1"#),
                Err(BadFrame),
            ),
            (
                "negative media.size",
                media(&ok_media.replace(r#""size":1"#, r#""size":-1"#)),
                Err(BadFrame),
            ),
            (
                "float media.size",
                media(&ok_media.replace(r#""size":1"#, r#""size":1.5"#)),
                Err(BadFrame),
            ),
            (
                "media.sha256 not hex",
                media(&ok_media.replace(&to, &"zz".repeat(32))),
                Err(InvalidEnvelope),
            ),
            (
                "media.mime without /",
                media(&ok_media.replace("image/png", "png")),
                Err(InvalidEnvelope),
            ),
            (
                "empty media.url",
                media(&ok_media.replace("https://m/x", "")),
                Err(InvalidEnvelope),
            ),
            (
                "empty id",
                base("").replace(r#""id":"m1""#, r#""id":"""#),
                Err(InvalidEnvelope),
            ),
            (
                "id of 129 bytes",
                base("").replace("m1", &"i".repeat(129)),
                Err(InvalidEnvelope),
            ),
            (
                "control character in id",
                base("").replace("m1", "m\\u0001"),
                Err(InvalidEnvelope),
            ),
            (
                "both to and channel",
                base(r#","channel":"c""#),
                Err(InvalidEnvelope),
            ),
            (
                "neither to nor channel",
                send_with(r#""id":"m1","ts":1,"kind":"text","payload":"""#),
                Err(InvalidEnvelope),
            ),
            (
                "bad channel name in an envelope",
                send_with(r#""id":"m1","channel":"a b","ts":1,"kind":"text","payload":"""#),
                Err(InvalidEnvelope),
            ),
            (
                "bad channel name in join",
                r#"{"type":"join","channel":"a b"}"#.into(),
                Err(InvalidEnvelope),
            ),
            (
                "channel name of 65 bytes in leave",
                format!(r#"{{"type":"leave","channel":"{}"}}"#, "c".repeat(65)),
                Err(InvalidEnvelope),
            ),
            (
                "channel that is not a string",
                r#"{"type":"join","channel":7}"#.into(),
                Err(BadFrame),
            ),
            (
                "invalid base64 in profile_publish",
                format!(
                    r#"{{"type":"profile_publish","data":"a","sig":"{}"}}"#,
                    "00".repeat(64)
                ),
                Err(BadFrame),
            ),
            (
                "signature of 63 bytes in profile_publish",
                format!(
                    r#"{{"type":"profile_publish","data":"","sig":"{}"}}"#,
                    "00".repeat(63)
                ),
                Err(BadFrame),
            ),
            (
                "negative fetch limit",
                r#"{"type":"fetch","limit":-1}"#.into(),
                Err(BadFrame),
            ),
            (
                "fetch limit 0 (clamped to 1)",
                r#"{"type":"fetch","limit":0}"#.into(),
                Ok(()),
            ),
            (
                "quiet that is not a bool",
                r#"{"type":"ack","messages":[],"quiet":1}"#.into(),
                Err(BadFrame),
            ),
            ("not JSON", "{".into(), Err(BadFrame)),
            ("no type", r#"{"channel":"c"}"#.into(), Err(BadFrame)),
            (
                "unknown type",
                r#"{"type":"teleport"}"#.into(),
                Err(ErrorCode::UnknownType),
            ),
        ];
        for (what, text, want) in rows {
            assert_eq!(classify(&text), want, "{what}: {text}");
        }
    }
}

/// Fuzzing of the decoder with bounded case counts (runs in about a second in CI).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// A syntactically plausible frame: known or unknown type plus random fields.
    fn plausible_frame() -> impl Strategy<Value = String> {
        let ty = prop_oneof![
            Just("auth".to_string()),
            Just("send".to_string()),
            Just("ack".to_string()),
            Just("fetch".to_string()),
            Just("join".to_string()),
            Just("profile_publish".to_string()),
            Just("ping".to_string()),
            "[a-z_]{0,12}",
            // Long non-ASCII names exercise the truncation of error messages.
            "\\PC{60,90}",
        ];
        let value = prop_oneof![
            Just("null".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "\\PC{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just(r#"{"id":"x","to":"00","ts":1,"kind":"text","payload":"!!"}"#.to_string()),
            Just(format!(
                r#"{{"id":"x","to":"{}","ts":1,"kind":"video","payload":"AA=="}}"#,
                "ab".repeat(32)
            )),
        ];
        let field = ("[a-z_]{1,10}", value);
        (ty, proptest::collection::vec(field, 0..5)).prop_map(|(ty, fields)| {
            let mut s = format!(
                r#"{{"type":{}"#,
                serde_json::to_string(&ty).unwrap_or_default()
            );
            for (k, v) in fields {
                s.push_str(&format!(r#","{k}":{v}"#));
            }
            s.push('}');
            s
        })
    }

    fn key() -> impl Strategy<Value = KeyHex> {
        any::<[u8; 32]>().prop_map(KeyHex)
    }

    fn envelope() -> impl Strategy<Value = Envelope> {
        (
            "[ -~]{1,40}",
            proptest::option::of(key()),
            any::<bool>(),
            key(),
            "[a-z0-9._-]{1,20}",
            any::<i64>(),
            proptest::sample::select(Kind::ALL.to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(id, from, direct, to, ch, ts, kind, payload)| Envelope {
                id,
                from,
                to: direct.then_some(to),
                channel: (!direct).then_some(ch),
                ts,
                kind,
                payload: Base64Bytes(payload),
                media: None,
            })
    }

    fn client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (key(), any::<[u8; 32]>()).prop_map(|(key, s)| {
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&s);
                ClientFrame::Auth {
                    key,
                    sig: SigHex(sig),
                }
            }),
            envelope().prop_map(|envelope| ClientFrame::Send { envelope }),
            "[a-z]{1,10}".prop_map(|channel| ClientFrame::Join { channel }),
            (
                proptest::collection::vec((key(), "[ -~]{1,10}"), 0..4),
                any::<bool>()
            )
                .prop_map(|(v, quiet)| ClientFrame::Ack {
                    messages: v
                        .into_iter()
                        .map(|(from, id)| AckRef { from, id })
                        .collect(),
                    quiet,
                }),
            proptest::option::of(any::<u32>()).prop_map(|limit| ClientFrame::Fetch { limit }),
            proptest::option::of("\\PC{0,10}").prop_map(|nonce| ClientFrame::Ping { nonce }),
        ]
    }

    fn server_frame() -> impl Strategy<Value = ServerFrame> {
        prop_oneof![
            (proptest::option::of(any::<u64>()), envelope())
                .prop_map(|(seq, envelope)| ServerFrame::Deliver { seq, envelope }),
            (
                "[ -~]{1,20}",
                0u8..4,
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>()),
            )
                .prop_map(|(id, st, seq, delivered, stored)| ServerFrame::Sent {
                    id,
                    status: [
                        SendStatus::Delivered,
                        SendStatus::Stored,
                        SendStatus::Duplicate,
                        SendStatus::Fanout,
                    ][usize::from(st)],
                    seq,
                    delivered,
                    stored,
                }),
            any::<u64>().prop_map(|removed| ServerFrame::Acked { removed }),
            "[a-z]{1,10}".prop_map(|channel| ServerFrame::Joined { channel }),
            (any::<u32>(), any::<bool>())
                .prop_map(|(count, more)| ServerFrame::Fetched { count, more }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
            let _ = decode_client_frame(&s);
        }

        #[test]
        fn plausible_frames_decode_or_fail_typed(s in plausible_frame()) {
            match decode_client_frame(&s) {
                Ok(f) => prop_assert!(CLIENT_FRAME_TYPES.contains(&f.type_name())),
                Err(DecodeError::UnknownType(t)) => prop_assert!(!CLIENT_FRAME_TYPES.contains(&t.as_str())),
                Err(DecodeError::Malformed(m)) => prop_assert!(m.len() <= 256),
            }
        }

        #[test]
        fn valid_frames_round_trip(f in client_frame()) {
            let text = serde_json::to_string(&f).unwrap();
            prop_assert_eq!(decode_client_frame(&text), Ok(f));
        }

        /// The hand-written envelope encoder matches serde_json byte for byte.
        #[test]
        fn envelope_to_json_matches_serde(env in envelope(), id in "\\PC{1,20}", escapes in any::<bool>(), media in any::<bool>()) {
            let mut env = env;
            env.id = if escapes { format!("{id}\"\\\u{1f}\u{7f}\n") } else { id };
            if media {
                env.media = Some(MediaRef {
                    url: "https://m.example/a\"b\\c\u{1}".into(),
                    sha256: "ab".repeat(32),
                    size: 7,
                    mime: "image/png".into(),
                });
            }
            prop_assert_eq!(env.to_json(), serde_json::to_string(&env).unwrap());
        }

        /// Frames of the hot path are built with exactly their length (no escapes, no
        /// media), so they become shared buffers without another allocation.
        #[test]
        fn hot_frames_are_built_with_their_exact_length(env in envelope(), seq in proptest::option::of(any::<u64>()),
                                                         delivered in proptest::option::of(any::<u32>()), stored in proptest::option::of(any::<u32>())) {
            let mut env = env;
            env.id.retain(|c| c != '"' && c != '\\');
            prop_assume!(!env.id.is_empty());
            let json = env.to_json();
            prop_assert_eq!(json.len(), env.json_len_hint());
            prop_assert_eq!(json.capacity(), json.len());
            let live = encode_live_deliver(&env);
            prop_assert_eq!(live.capacity(), live.len());
            let stored_frame = encode_deliver(seq, &json);
            prop_assert_eq!(stored_frame.capacity(), stored_frame.len());
            let sent = ServerFrame::Sent { id: env.id.clone(), status: SendStatus::Fanout, seq, delivered, stored }.to_json();
            prop_assert_eq!(sent.capacity(), sent.len());
        }

        /// The hand-written `sent`/`acked` encoders match serde_json byte for byte.
        #[test]
        fn hot_answers_match_serde(id in "\\PC{1,20}", escapes in any::<bool>(), st in 0u8..4,
                                   seq in proptest::option::of(any::<u64>()),
                                   delivered in proptest::option::of(any::<u32>()),
                                   stored in proptest::option::of(any::<u32>()),
                                   removed in any::<u64>()) {
            let id = if escapes { format!("{id}\"\\\u{1f}\n") } else { id };
            let status = [SendStatus::Delivered, SendStatus::Stored, SendStatus::Duplicate, SendStatus::Fanout][usize::from(st)];
            let f = ServerFrame::Sent { id, status, seq, delivered, stored };
            prop_assert_eq!(f.to_json(), serde_json::to_string(&f).unwrap());
            let a = ServerFrame::Acked { removed };
            prop_assert_eq!(a.to_json(), serde_json::to_string(&a).unwrap());
        }

        /// The shared live `deliver` frame equals the general encoder's output, and the
        /// envelope JSON sits where the constants say.
        #[test]
        fn live_deliver_frame_matches(env in envelope(), seq in any::<u64>()) {
            let json = env.to_json();
            let frame = encode_live_deliver(&env);
            prop_assert_eq!(&frame, &encode_deliver(None, &json));
            prop_assert_eq!(&frame[LIVE_DELIVER_PREFIX.len()..frame.len() - DELIVER_SUFFIX.len()], json.as_str());
            let stored = encode_deliver(Some(seq), &json);
            let decoded: ServerFrame = serde_json::from_str(&stored).unwrap();
            prop_assert_eq!(decoded, ServerFrame::Deliver { seq: Some(seq), envelope: env });
        }

        /// The send/ack fast path accepts nothing the general (tagged enum) decoder
        /// rejects, and decodes to the same frame.
        #[test]
        fn fast_path_agrees_with_tagged_decoder(s in prop_oneof![
            plausible_frame(),
            client_frame().prop_map(|f| serde_json::to_string(&f).unwrap()),
            // Valid frames with a duplicated or extra key appended.
            (client_frame(), prop_oneof![Just(r#","type":"send""#), Just(r#","x":1"#), Just(r#","messages":[]"#), Just(r#","quiet":true"#), Just(r#","quiet":"yes""#)])
                .prop_map(|(f, extra)| {
                    let t = serde_json::to_string(&f).unwrap();
                    format!("{}{extra}}}", &t[..t.len() - 1])
                }),
        ]) {
            if let Ok(f) = decode_client_frame(&s) {
                prop_assert_eq!(serde_json::from_str::<ClientFrame>(&s).ok(), Some(f));
            } else {
                prop_assert!(serde_json::from_str::<ClientFrame>(&s).is_err());
            }
        }

        /// The relay's decoder accepts exactly what the general decoder accepts, with the
        /// same errors, and a send's payload text is the base64 of the decoded bytes.
        #[test]
        fn relay_decoder_agrees_with_client_frame_decoder(s in prop_oneof![
            plausible_frame(),
            client_frame().prop_map(|f| serde_json::to_string(&f).unwrap()),
            (envelope(), "[A-Za-z0-9+/=_ -]{0,12}").prop_map(|(e, payload)| {
                let t = serde_json::to_string(&ClientFrame::Send { envelope: e }).unwrap();
                let at = t.find(r#""payload":""#).unwrap() + 11;
                let end = at + t[at..].find('"').unwrap();
                format!("{}{payload}{}", &t[..at], &t[end..])
            }),
        ]) {
            match (decode_request(&s), decode_client_frame(&s)) {
                (Ok(Request::Send(r)), Ok(ClientFrame::Send { envelope })) => {
                    prop_assert_eq!(r.payload.decode(), envelope.payload.clone());
                    prop_assert_eq!(r, RelayEnvelope::from(envelope));
                }
                (Ok(Request::Frame(r)), Ok(f)) => {
                    prop_assert!(!matches!(&f, ClientFrame::Send { envelope: _ }), "send not taken as a send");
                    prop_assert_eq!(r, f);
                }
                (Err(r), Err(e)) => prop_assert_eq!(r, e),
                (r, e) => prop_assert!(false, "{:?} vs {:?}", r, e),
            }
        }

        /// The hand-written `send`/`ack` encoders match serde_json byte for byte, and
        /// every client frame encodes to what the relay decodes back.
        #[test]
        fn client_frame_to_json_matches_serde(f in client_frame(), id in "\\PC{1,20}") {
            prop_assert_eq!(f.to_json().unwrap(), serde_json::to_string(&f).unwrap());
            let escaped = ClientFrame::Ack {
                messages: vec![AckRef { from: KeyHex([9; 32]), id: format!("{id}\"\\\u{1f}\n") }],
                quiet: true,
            };
            prop_assert_eq!(escaped.to_json().unwrap(), serde_json::to_string(&escaped).unwrap());
            prop_assert_eq!(decode_client_frame(&f.to_json().unwrap()), Ok(f));
        }

        /// The client's `deliver`/`sent` fast path accepts nothing the tagged decoder
        /// rejects, and decodes to the same frame.
        #[test]
        fn server_fast_path_agrees_with_tagged_decoder(s in prop_oneof![
            server_frame().prop_map(|f| f.to_json()),
            // Valid frames with a duplicated, foreign or extra key appended.
            (server_frame(), prop_oneof![
                Just(r#","type":"sent""#), Just(r#","x":1"#), Just(r#","seq":null"#), Just(r#","seq":"1""#),
                Just(r#","id":"a""#), Just(r#","status":"stored""#), Just(r#","stored":2"#),
                Just(r#","envelope":null"#), Just(r#","delivered":-1"#),
            ])
                .prop_map(|(f, extra)| {
                    let t = f.to_json();
                    format!("{}{extra}}}", &t[..t.len() - 1])
                }),
            "\\PC{0,120}",
        ]) {
            match decode_server_frame(&s) {
                Ok(f) => prop_assert_eq!(serde_json::from_str::<ServerFrame>(&s).ok(), Some(f)),
                Err(_) => prop_assert!(serde_json::from_str::<ServerFrame>(&s).is_err()),
            }
        }

        #[test]
        fn truncated_valid_frames_are_rejected_not_panicking(f in client_frame(), cut in 0usize..200) {
            let text = serde_json::to_string(&f).unwrap();
            let cut = cut.min(text.len().saturating_sub(1));
            if text.is_char_boundary(cut) {
                prop_assert!(decode_client_frame(&text[..cut]).is_err());
            }
        }
    }
}

/// The worked example in `docs/protocol.md` ("Test vector"), so other-language
/// clients can check their signing against exactly what the relay verifies.
#[cfg(test)]
mod test_vector {
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::Signer;

    #[test]
    fn documented_auth_vector() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1u8; 32]);
        let nonce = [2u8; 32];
        let nonce_b64 = base64::engine::general_purpose::STANDARD.encode(nonce);
        let public = KeyHex(key.verifying_key().to_bytes());
        let sig = SigHex(key.sign(&auth_message(&nonce)).to_bytes());
        assert!(verify_signature(&public, &auth_message(&nonce), &sig));
        assert_eq!(nonce_b64, DOC_NONCE);
        assert_eq!(public.to_hex(), DOC_KEY);
        assert_eq!(hex::encode(sig.0), DOC_SIG);
    }

    const DOC_NONCE: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    const DOC_KEY: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
    const DOC_SIG: &str = "5cd0598750a4e0d0268cebf8baea595ee4c34bbd09bf9b9753ddcb9c9f77553197256ddaed35f021138ea8bab091bd9ea112e96f6c40ead47804d77e748cda06";
}

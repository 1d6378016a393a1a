//! One client connection: the WebSocket with its buffered writes and flushes, the rate
//! limit, the challenge/response handshake and the close. Once authenticated, the
//! connection runs its session (`session.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tracing::debug;

use super::limits::TokenBucket;
use super::socket::{is_peer_closed, ClientSocket};
use super::Shared;
use crate::metrics::ReasonLabel;
use crate::protocol::{
    auth_message, decode_client_frame, verify_signature, Base64Bytes, ClientFrame, ErrorCode,
    FrameHint, KeyHex, ServerFrame, PROTOCOL_VERSION,
};

/// Consecutive frames refused by the rate limit after which a flooding client is
/// disconnected: the last of them is answered by the closing `error` frame.
const MAX_STRIKES: u32 = 64;

/// Current wall-clock time in ms since the epoch (storage timestamps).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a connection ended.
///
/// Every close by the relay is announced the same way (`docs/protocol.md`, "Errors
/// that end the connection"): an `error` frame with the code, the reason as its
/// `message` and the close code as its `close` member, then the close frame with that
/// code and reason.
#[derive(Debug)]
pub(super) enum End {
    /// The socket failed or the client left without a close frame; no close frame to
    /// send.
    Gone,
    /// The client sent a close frame: the relay answers it with its own.
    Closed,
    /// The relay closes with this code and reason.
    Close(ErrorCode, String),
    /// The relay closes because of this frame from the client (a failed `auth`, the
    /// last frame of a flood): the `error` frame refers to it (`ref`, `quiet`).
    CloseOn(ErrorCode, String, FrameHint),
}

/// One client connection: its socket, rate limit and idle deadline. The session
/// (`session.rs`) and the request handlers write to the client through it.
pub(super) struct Conn {
    pub(super) shared: Arc<Shared>,
    pub(super) ws: ClientSocket,
    pub(super) peer: SocketAddr,
    bucket: TokenBucket,
    strikes: u32,
    pub(super) idle_deadline: Instant,
    /// Frames were buffered in the socket since the last flush.
    unflushed: bool,
    /// How the client's side ended (close frame, end of stream, read error), once it
    /// has: nothing more is read, and the session ends this way after handling
    /// everything read before (see [`Conn::received`]).
    input_end: Option<End>,
    /// Writing to the client failed: the socket is gone. What is written from then on
    /// is dropped, while the session still handles what the client wrote before it
    /// left (until reading ends too), as if the answers had gone out.
    output_gone: bool,
}

/// Runs one upgraded WebSocket connection to completion.
pub(super) async fn run(shared: Arc<Shared>, ws: ClientSocket, peer: SocketAddr) {
    shared.metrics.connections.inc();
    shared.metrics.connections_total.inc();
    let bucket = TokenBucket::new(shared.cfg.rate_per_sec, shared.cfg.rate_burst);
    let idle_deadline = Instant::now() + shared.cfg.idle_timeout;
    let mut conn = Conn {
        shared: shared.clone(),
        ws,
        peer,
        bucket,
        strikes: 0,
        idle_deadline,
        unflushed: false,
        input_end: None,
        output_gone: false,
    };
    // The handshake and the close run once per connection: boxed, their state does not
    // add to what every idle connection keeps (see `Session::run`).
    let end = match Box::pin(conn.authenticate()).await {
        Ok(key) => conn.session(key).await,
        Err(end) => end,
    };
    Box::pin(conn.finish(end)).await;
    shared.metrics.connections.dec();
}

impl Conn {
    pub(super) fn m(&self) -> &crate::metrics::Metrics {
        &self.shared.metrics
    }
    /// Buffers one text frame. Frames reach the socket at the next flush: the session
    /// loop flushes once per wake-up after everything ready has been handled, so
    /// answers and pushes that are due together leave in one write.
    pub(super) async fn feed(&mut self, text: impl Into<Utf8Bytes>) -> Result<(), End> {
        if self.output_gone {
            return Ok(());
        }
        let text = text.into();
        self.shared.metrics.bytes_out.inc_by(text.len() as u64);
        self.unflushed = true;
        match timeout(
            self.shared.cfg.write_timeout,
            self.ws.feed(WsMessage::Text(text)),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                self.output_gone();
                Ok(())
            }
            Err(_) => Err(End::Close(
                ErrorCode::SlowConsumer,
                "client is not reading; disconnected".into(),
            )),
        }
    }
    /// Writes everything buffered, disconnecting a reader that does not take it in time.
    pub(super) async fn flush(&mut self) -> Result<(), End> {
        if self.output_gone {
            return Ok(());
        }
        match timeout(self.shared.cfg.write_timeout, self.ws.flush()).await {
            Ok(Ok(())) => {
                self.unflushed = false;
                Ok(())
            }
            Ok(Err(_)) => {
                self.output_gone();
                Ok(())
            }
            Err(_) => Err(End::Close(
                ErrorCode::SlowConsumer,
                "client is not reading; disconnected".into(),
            )),
        }
    }
    /// Writing failed: nothing more is written (see `output_gone`).
    fn output_gone(&mut self) {
        self.output_gone = true;
        self.unflushed = false;
    }
    /// Flushes if anything is buffered. Called before waiting (for the client or for
    /// storage), so nothing already answered waits behind a slow operation.
    pub(super) async fn flush_pending(&mut self) -> Result<(), End> {
        if self.unflushed {
            self.flush().await
        } else {
            Ok(())
        }
    }
    pub(super) async fn send_frame(&mut self, f: ServerFrame) -> Result<(), End> {
        self.feed(f.to_json()).await
    }
    /// Answers with an `error` frame that does not end the connection.
    pub(super) async fn error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<String>,
    ) -> Result<(), End> {
        self.error_frame(code, message, reference, false).await
    }
    /// Answers with an `error` frame that does not end the connection; `quiet` marks
    /// the error about a quiet `ack`.
    pub(super) async fn error_frame(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        reference: Option<String>,
        quiet: bool,
    ) -> Result<(), End> {
        self.m().reject(code);
        self.send_frame(ServerFrame::Error {
            code,
            message: message.into(),
            reference,
            quiet,
            close: None,
        })
        .await
    }
    /// Refuses a frame that did not decode (`bad_frame`, `unknown_type`), unless the
    /// rate limit refuses it first. The error names the frame's type and marks a
    /// quiet ack when the text shows them ([`FrameHint::of_text`]).
    pub(super) async fn undecodable(
        &mut self,
        text: &str,
        err: crate::protocol::DecodeError,
    ) -> Result<(), End> {
        let hint = FrameHint::of_text(text);
        if self.admit(hint).await? {
            self.error_frame(
                err.code(),
                err.to_string(),
                hint.reference(),
                hint.quiet_ack,
            )
            .await?;
        }
        Ok(())
    }
    /// Whether the client's side is still open: once it has ended, nothing more is
    /// read from the socket.
    pub(super) fn reading(&self) -> bool {
        self.input_end.is_none()
    }
    /// How the client's side ended, once it has.
    pub(super) fn take_input_end(&mut self) -> Option<End> {
        self.input_end.take()
    }
    /// What a read from the client's socket gave: a frame (the connection is not idle
    /// then), or `None` when the client's side ended: how is kept for the end of the
    /// session ([`Conn::take_input_end`]), which first handles whatever was read
    /// before (frames read ahead, sends waiting to be stored) as if nothing had ended.
    pub(super) fn received(&mut self, m: Option<Result<WsMessage, WsError>>) -> Option<WsMessage> {
        self.idle_deadline = Instant::now() + self.shared.cfg.idle_timeout;
        let end = match m {
            // Not seen: the socket stops reading before a close frame (`socket.rs`).
            Some(Ok(WsMessage::Close(_))) => End::Closed,
            Some(Ok(msg)) => return Some(msg),
            None => End::Gone,
            Some(Err(e)) => self.classify(e),
        };
        self.input_end.get_or_insert(end);
        None
    }
    /// Maps a transport error from the socket to the way the connection ends.
    fn classify(&self, err: WsError) -> End {
        match err {
            WsError::Io(e) if is_peer_closed(&e) => End::Closed,
            WsError::Capacity(c) => {
                End::Close(ErrorCode::FrameTooLarge, format!("frame too large: {c}"))
            }
            WsError::Utf8(_) => End::Close(
                ErrorCode::InvalidUtf8,
                "text frame is not valid UTF-8".into(),
            ),
            // The client dropped the TCP connection without a close frame: nobody left
            // to tell.
            WsError::Protocol(
                tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => End::Gone,
            WsError::Protocol(p) => {
                debug!(peer = %self.peer, error = %p, "websocket protocol error");
                End::Close(ErrorCode::BadFrame, "websocket protocol violation".into())
            }
            _ => End::Gone,
        }
    }
    /// Applies the rate limit; Err ends the connection after too many refusals.
    pub(super) async fn admit(&mut self, hint: FrameHint) -> Result<bool, End> {
        if self.take_token() {
            return Ok(true);
        }
        self.refuse(hint).await?;
        Ok(false)
    }
    /// Takes one token of the rate limit; false when the client is over it.
    pub(super) fn take_token(&mut self) -> bool {
        let ok = self.bucket.take();
        if ok {
            self.strikes = 0;
        }
        ok
    }
    /// Answers a frame refused by the rate limit; Err ends a flooding connection (the
    /// [`MAX_STRIKES`]th refusal in a row, answered by the closing error frame).
    pub(super) async fn refuse(&mut self, hint: FrameHint) -> Result<(), End> {
        self.strikes += 1;
        if self.strikes >= MAX_STRIKES {
            return Err(End::CloseOn(
                ErrorCode::RateLimited,
                "request flood; disconnected".into(),
                hint,
            ));
        }
        self.error_frame(
            ErrorCode::RateLimited,
            "rate limit exceeded; slow down",
            hint.reference(),
            hint.quiet_ack,
        )
        .await
    }
    /// Challenge/response. Returns the proven key.
    async fn authenticate(&mut self) -> Result<KeyHex, End> {
        let mut nonce = [0u8; 32];
        if getrandom::fill(&mut nonce).is_err() {
            return Err(End::Close(ErrorCode::Internal, "no randomness".into()));
        }
        let ttl = self.shared.cfg.auth_timeout;
        self.send_frame(ServerFrame::Challenge {
            v: PROTOCOL_VERSION,
            nonce: Base64Bytes(nonce.to_vec()),
            expires_in_ms: ttl.as_millis() as u64,
        })
        .await?;
        let deadline = Instant::now() + ttl;
        let shutdown = self.shared.shutdown.clone();
        loop {
            self.flush_pending().await?;
            let msg = tokio::select! {
                _ = shutdown.cancelled() => {
                    return Err(End::Close(ErrorCode::Draining, DRAIN_REASON.into()));
                }
                _ = sleep_until(deadline) => {
                    self.m().auth_failures.get_or_create(&ReasonLabel { reason: "timeout" }).inc();
                    return Err(End::Close(ErrorCode::ChallengeExpired, "challenge expired before auth".into()));
                }
                m = self.ws.next() => m,
            };
            let text = match msg {
                None => return Err(End::Gone),
                Some(Err(e)) => return Err(self.classify(e)),
                Some(Ok(WsMessage::Text(t))) => t,
                Some(Ok(WsMessage::Binary(_))) => {
                    self.m().bytes_in.inc();
                    if self.admit(FrameHint::default()).await? {
                        self.error(ErrorCode::BinaryFrame, "protocol v1 uses text frames", None)
                            .await?;
                    }
                    continue;
                }
                Some(Ok(WsMessage::Close(_))) => return Err(End::Closed),
                Some(Ok(_)) => continue,
            };
            self.m().bytes_in.inc_by(text.len() as u64);
            // Decoding comes first: a frame that does not decode is `bad_frame` (or
            // `unknown_type`) before and after authentication alike, and a malformed
            // `auth` does not use up the challenge.
            let frame = match decode_client_frame(text.as_str()) {
                Ok(f) => f,
                Err(e) => {
                    self.undecodable(text.as_str(), e).await?;
                    continue;
                }
            };
            let hint = FrameHint::of_frame(&frame);
            if !self.admit(hint).await? {
                continue;
            }
            match frame {
                ClientFrame::Auth { key, sig } => {
                    if verify_signature(&key, &auth_message(&nonce), &sig) {
                        return Ok(key);
                    }
                    self.m()
                        .auth_failures
                        .get_or_create(&ReasonLabel {
                            reason: "bad_signature",
                        })
                        .inc();
                    // The challenge is single-use: a failed attempt ends the connection.
                    return Err(End::CloseOn(
                        ErrorCode::AuthFailed,
                        "signature does not verify for this key and challenge".into(),
                        hint,
                    ));
                }
                ClientFrame::Ping { nonce } => self.send_frame(ServerFrame::Pong { nonce }).await?,
                _ => {
                    self.error_frame(
                        ErrorCode::NotAuthenticated,
                        "authenticate first (answer the challenge with an auth frame)",
                        hint.reference(),
                        hint.quiet_ack,
                    )
                    .await?
                }
            }
        }
    }
    /// Announces the close with an `error` frame and sends the close frame (if the
    /// relay ends the connection), and counts. A close frame of the client is answered
    /// with a close frame: everything before it is written already.
    async fn finish(&mut self, end: End) {
        let (code, reason, hint) = match end {
            End::Gone => return,
            End::Closed => {
                let reply = WsMessage::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: Utf8Bytes::from_static(""),
                }));
                let _ = timeout(Duration::from_secs(1), self.ws.send(reply)).await;
                return;
            }
            End::Close(code, reason) => (code, reason, FrameHint::default()),
            End::CloseOn(code, reason, hint) => {
                // A refused frame, counted as every other; closes that refuse no frame
                // (drain, idle timeout, …) count only as closes, so they do not read
                // as client errors on the dashboard, in alerts or in rollout analysis.
                self.m().reject(code);
                (code, reason, hint)
            }
        };
        self.m().close(code);
        // Close reasons are limited to 123 bytes by RFC 6455; the error frame carries
        // the same text.
        let reason = crate::protocol::frame::truncate_utf8(reason, 120);
        let error = ServerFrame::Error {
            code,
            message: reason.clone(),
            reference: hint.reference(),
            quiet: hint.quiet_ack,
            close: Some(code.close_code()),
        }
        .to_json();
        self.m().bytes_out.inc_by(error.len() as u64);
        let frame = CloseFrame {
            code: CloseCode::from(code.close_code()),
            reason: Utf8Bytes::from(reason),
        };
        // Both within one second: a client that does not read (`slow_consumer`) may
        // never get them, and the connection is dropped anyway.
        let _ = timeout(Duration::from_secs(1), async {
            self.ws.feed(WsMessage::Text(error.into())).await?;
            self.ws.send(WsMessage::Close(Some(frame))).await
        })
        .await;
        // Complete the closing handshake: read (and discard) what the client still
        // sends until its close reply. Dropping the socket with unread input would
        // make the kernel send a reset, and the client would never see our reason.
        let _ = timeout(Duration::from_secs(1), async {
            while let Some(Ok(m)) = self.ws.next().await {
                if matches!(m, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Close reason sent to every client on drain: it tells them to reconnect.
pub const DRAIN_REASON: &str = "relay draining: reconnect to the service";

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the future an `async fn` taking three arguments returns, without calling it.
    fn future_size<A, B, C, F: std::future::Future>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection keeps this future (plus its buffers) in memory, so S4's
    /// RSS per connection depends on it: the per-event handlers are boxed to keep it
    /// small (it was 4,600 bytes with them inline). Checked on optimized builds only
    /// (`cargo test --release`): unoptimized futures do not share slots between
    /// suspension points, so their size says nothing about the shipped binary.
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "future layout is representative only when optimized"
    )]
    fn idle_connection_future_stays_small() {
        let n = future_size(run);
        assert!(n <= 2560, "connection future is {n} bytes");
    }
}

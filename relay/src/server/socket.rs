//! The client WebSocket: the upgrade of `/v1/ws` and the socket under it, which holds
//! back the client's close frame until the relay has answered everything it read
//! before it.
//!
//! tungstenite sends nothing more once it has read the peer's close frame (it only
//! queues its close reply). A client may write sends and its close in one burst, and
//! their answers must still reach it (docs/protocol.md, "Closing"). So [`CloseGate`]
//! follows the frame boundaries of what the client writes and stops at the first close
//! frame: tungstenite reads an error ([`PeerClosed`]) where the close frame would have
//! been, the session answers what it read before, and the relay sends its close reply
//! itself (`Conn::finish`).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// A client's WebSocket.
pub(super) type ClientSocket = WebSocketStream<CloseGate<TokioIo<Upgraded>>>;

/// Checks a request to `/v1/ws` as axum's [`WebSocketUpgrade`] does (the same answers to
/// a bad request) and returns the `101 Switching Protocols` response with the upgrade
/// to open once it is sent ([`open`]).
pub(super) async fn accept(req: Request) -> Result<(Response, OnUpgrade), Response> {
    let (mut parts, _body) = req.into_parts();
    // The extractor takes the upgrade out of the request; a clone stays here, as the
    // relay opens the socket itself (axum's upgrade cannot put the gate under it).
    let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
    if let Err(rejection) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        return Err(rejection.into_response());
    }
    let accept_key = parts
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|key| HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok());
    // Both are there after the extractor accepted an HTTP/1.1 request, the only
    // version the client port serves.
    let (Some(on_upgrade), Some(accept_key)) = (on_upgrade, accept_key) else {
        return Err((StatusCode::BAD_REQUEST, "not a WebSocket upgrade\n").into_response());
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept_key);
    Ok((response, on_upgrade))
}

/// The WebSocket on an accepted upgrade, once hyper has handed over the connection
/// (`None` if it did not: the client left first).
pub(super) async fn open(on_upgrade: OnUpgrade, config: WebSocketConfig) -> Option<ClientSocket> {
    let upgraded = on_upgrade.await.ok()?;
    let gate = CloseGate {
        inner: TokioIo::new(upgraded),
        scan: FrameScan::default(),
        closed: false,
    };
    Some(WebSocketStream::from_raw_socket(gate, Role::Server, Some(config)).await)
}

/// The read error in place of the client's close frame: the client closed, and
/// everything it wrote before has been read.
#[derive(Debug)]
pub(super) struct PeerClosed;

impl fmt::Display for PeerClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client sent a close frame")
    }
}

impl std::error::Error for PeerClosed {}

/// Whether a read error is [`PeerClosed`].
pub(super) fn is_peer_closed(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<PeerClosed>())
}

/// A byte stream that ends reading at the first WebSocket close frame of the client:
/// bytes up to it are read as usual, then every read fails with [`PeerClosed`].
/// Writing is untouched.
pub(super) struct CloseGate<S> {
    inner: S,
    scan: FrameScan,
    /// A close frame was reached.
    closed: bool,
}

fn peer_closed() -> io::Error {
    io::Error::other(PeerClosed)
}

impl<S: AsyncRead + Unpin> AsyncRead for CloseGate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(peer_closed()));
        }
        let start = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if let Some(at) = this.scan.close_at(&buf.filled()[start..]) {
            // The close frame and whatever follows it (nothing may) are not read.
            this.closed = true;
            buf.set_filled(start + at);
            if at == 0 {
                return Poll::Ready(Err(peer_closed()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CloseGate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Opcode of a close frame (RFC 6455, 5.5.1), in the low bits of a frame's first byte.
const OP_CLOSE: u8 = 0x8;

/// Where the frames of a WebSocket byte stream begin: only headers are looked at,
/// payloads are skipped. Frames the scan cannot make sense of are tungstenite's to
/// refuse, and it reads them before anything the scan stops at.
#[derive(Default)]
struct FrameScan {
    /// The header read so far of the next frame (at most 14 bytes).
    head: [u8; 14],
    head_len: usize,
    /// Payload bytes of the current frame still to come.
    skip: u64,
}

impl FrameScan {
    /// Follows `data`, the next bytes of the stream; returns the offset in it where a
    /// close frame starts, if one does.
    fn close_at(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            if self.skip > 0 {
                let n = self.skip.min((data.len() - i) as u64);
                self.skip -= n;
                i += n as usize;
                continue;
            }
            if self.head_len == 0 && data[i] & 0x0F == OP_CLOSE {
                return Some(i);
            }
            self.head[self.head_len] = data[i];
            self.head_len += 1;
            i += 1;
            if let Some(payload) = self.complete_header() {
                self.skip = payload;
                self.head_len = 0;
            }
        }
        None
    }
    /// The payload length, once the header read so far is complete.
    fn complete_header(&self) -> Option<u64> {
        let head = &self.head[..self.head_len];
        let second = *head.get(1)?;
        let masked = second & 0x80 != 0;
        let (ext, short) = match second & 0x7F {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        if head.len() < 2 + ext + if masked { 4 } else { 0 } {
            return None;
        }
        Some(short.unwrap_or_else(|| {
            head[2..2 + ext]
                .iter()
                .fold(0u64, |len, b| len << 8 | u64::from(*b))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame with this opcode and payload length (payload zeroes).
    fn frame(opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(0u8, len));
        f
    }

    #[test]
    fn the_scan_stops_at_the_first_close_frame_however_the_bytes_are_split() {
        let mut stream = Vec::new();
        // Text frames of each length encoding, a continuation, a ping whose payload
        // looks like a close opcode, then the close.
        stream.extend(frame(0x1, 5));
        stream.extend(frame(0x1, 300));
        stream.extend(frame(0x1, 70_000));
        stream.extend(frame(0x0, 0));
        let mut ping = frame(0x9, 3);
        let n = ping.len();
        ping[n - 3..].copy_from_slice(&[0x88, 0x88, 0x88]);
        stream.extend(ping);
        let close_at = stream.len();
        stream.extend(frame(0x8, 2));
        stream.extend(frame(0x1, 1));
        for chunk in [1, 2, 3, 7, 13, 1000, stream.len()] {
            let mut scan = FrameScan::default();
            let mut found = None;
            for (k, part) in stream.chunks(chunk).enumerate() {
                if let Some(at) = scan.close_at(part) {
                    found = Some(k * chunk + at);
                    break;
                }
            }
            assert_eq!(found, Some(close_at), "chunks of {chunk}");
        }
    }

    #[test]
    fn a_stream_without_a_close_frame_is_read_to_the_end() {
        let mut scan = FrameScan::default();
        let stream: Vec<u8> = (0..50).flat_map(|i| frame(0x1, i * 7)).collect();
        assert_eq!(scan.close_at(&stream), None);
        assert_eq!((scan.head_len, scan.skip), (0, 0));
    }
}

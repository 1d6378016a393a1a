//! Accepting TCP connections and serving HTTP/1.1 on them, with the bounds on
//! connections that are not (yet) WebSockets (docs/relay.md, "Before the WebSocket").
//!
//! Each listener runs [`serve`] on its own low-priority thread (`accept_thread.rs`):
//! every accepted connection takes a place in the listener's [`HandshakePool`] (or,
//! when every place is serving a request, is closed at once) and must complete its
//! first request head within `DCHAT_HANDSHAKE_TIMEOUT` of being accepted, or it is
//! closed and counted (`dchat_handshake_timeouts_total`). Until then it is read on that
//! thread; once the head is complete (or cannot be one: hyper answers it) the socket
//! moves to the relay's runtime, where hyper serves it with the head already read. On a
//! keep-alive connection each later request head must arrive within the same time
//! after the previous response (hyper's header read timeout; closed quietly, as hyper
//! cannot tell a client idling between requests from one dripping a head). A
//! connection that becomes a WebSocket leaves the pool when the upgrade completes; from
//! then on `DCHAT_MAX_CONNECTIONS`, `DCHAT_AUTH_TIMEOUT` and `DCHAT_IDLE_TIMEOUT` bound
//! it (`connection.rs`).
//!
//! axum's own `serve` cannot set any of this (no timer, no header read timeout, no
//! hook at accept), so this module is the few lines of it the relay needs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, warn};

use super::handshake::{Admission, HandshakePool, Slot};

/// How one listener serves its connections.
#[derive(Clone, Copy, Debug)]
pub struct ListenerSettings {
    /// `client` or `metrics` (logs; the pool carries the metric label).
    pub name: &'static str,
    /// Deadline for each request head (`DCHAT_HANDSHAKE_TIMEOUT`).
    pub handshake_timeout: Duration,
    /// Set `TCP_NODELAY` on accepted sockets.
    pub nodelay: bool,
}

/// What a refused connection is told before it is closed (best effort: the socket is
/// new, so its send buffer is empty and the write does not block).
const REFUSED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// How long accepting pauses after an error that is not about one connection (e.g.
/// `EMFILE`: out of file descriptors; accepting again at once would spin).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` and serves `router` on them until `stop` is
/// cancelled; then stops accepting, lets each connection finish the request it is
/// serving (hyper's graceful shutdown: idle and waiting connections close at once) and
/// returns when they have. WebSockets already upgraded are not waited for: they belong
/// to the relay's drain.
///
/// Runs on the listener's accepting thread; connections whose first request head is
/// complete are served on `sessions` (the relay's runtime).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    pool: Arc<HandshakePool>,
    settings: ListenerSettings,
    stop: CancellationToken,
    sessions: Handle,
) {
    let conns = TaskTracker::new();
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => {
                failing = false;
                c
            }
            // The peer gave up before we accepted; nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if !failing {
                    warn!(listener = settings.name, error = %e, "accepting connections failed; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                }
            }
        };
        let slot = match pool.admit() {
            Admission::Admitted(slot) => slot,
            Admission::Full => {
                refuse(tcp);
                continue;
            }
        };
        if settings.nodelay {
            // Small frames must leave at once: Nagle's algorithm with delayed ACKs
            // would add tens of milliseconds to a push that follows an answer.
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(error = %e, "TCP_NODELAY not set");
            }
        }
        conns.spawn(screen(
            tcp,
            peer,
            slot,
            Handover {
                router: router.clone(),
                settings,
                stop: stop.clone(),
                sessions: sessions.clone(),
                conns: conns.clone(),
            },
        ));
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// What a screened connection needs to be served on the relay's runtime.
struct Handover {
    router: Router,
    settings: ListenerSettings,
    stop: CancellationToken,
    sessions: Handle,
    /// The listener's connections, so that [`serve`] waits for it there too.
    conns: TaskTracker,
}

/// The most a connection may send before its first request head is complete and still
/// be read on the accepting thread; beyond it, hyper decides (`431`).
const MAX_SCREENED_HEAD: usize = 64 * 1024;

/// A newly accepted connection, on the accepting thread: reads until its first request
/// head is complete within the handshake deadline, then moves it to the relay's
/// runtime. Closed at the deadline (counted), when evicted, at `stop`, or when the
/// client leaves first.
async fn screen(mut tcp: TcpStream, peer: SocketAddr, slot: Slot, to: Handover) {
    let name = to.settings.name;
    let accepted = std::time::Instant::now();
    let head = tokio::select! {
        biased;
        () = slot.evicted() => {
            debug!(listener = name, %peer, "closed to make room for a new connection");
            return;
        }
        // Like hyper's graceful shutdown: a connection without a request closes at once.
        () = to.stop.cancelled() => return,
        r = tokio::time::timeout(to.settings.handshake_timeout, read_head(&mut tcp)) => r,
    };
    let head = match head {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(listener = name, %peer, error = %e, "connection ended before a request");
            return;
        }
        Err(_) => {
            slot.count_timeout();
            debug!(listener = name, %peer, "no request within the handshake timeout");
            return;
        }
    };
    // Off this thread's reactor and onto the runtime's: the socket must not depend on
    // a low-priority thread for its readiness once it is a session.
    let std = match tcp.into_std() {
        Ok(std) => std,
        Err(e) => {
            debug!(listener = name, %peer, error = %e, "connection could not be handed over");
            return;
        }
    };
    let remaining = to
        .settings
        .handshake_timeout
        .saturating_sub(accepted.elapsed());
    let Handover {
        router,
        settings,
        stop,
        sessions,
        conns,
    } = to;
    sessions.spawn(conns.track_future(async move {
        match TcpStream::from_std(std) {
            Ok(tcp) => {
                let io = Prefixed {
                    head: Some(head),
                    io: tcp,
                };
                connection(io, peer, router, slot, settings, remaining, stop).await;
            }
            Err(e) => {
                debug!(listener = name, %peer, error = %e, "connection could not be handed over")
            }
        }
    }));
}

/// Reads from `tcp` until what it holds is a complete request head, or cannot become
/// one (hyper answers it), or is [`MAX_SCREENED_HEAD`] long; `None` when the client
/// closed first.
async fn read_head(tcp: &mut TcpStream) -> std::io::Result<Option<Bytes>> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if buf.len() >= MAX_SCREENED_HEAD {
            return Ok(Some(buf.freeze()));
        }
        buf.reserve(1024);
        if tcp.read_buf(&mut buf).await? == 0 {
            return Ok(None);
        }
        if !head_pending(&buf) {
            return Ok(Some(buf.freeze()));
        }
    }
}

/// Whether `buf` is the beginning of a request head that is not complete yet: anything
/// else — a complete head, or bytes hyper would refuse — is hyper's to answer.
fn head_pending(buf: &[u8]) -> bool {
    // hyper's own limit; more headers than this is an error it answers.
    let mut headers = [httparse::EMPTY_HEADER; 100];
    matches!(
        httparse::Request::new(&mut headers).parse(buf),
        Ok(httparse::Status::Partial)
    )
}

/// The connection's socket with the bytes the accepting thread already read from it in
/// front, so that hyper reads the request head it was screened for.
struct Prefixed {
    /// What is left of the screened bytes; `None` once hyper has read them all, so that
    /// a WebSocket living on this socket for hours does not hold the head's buffer
    /// (an empty `Bytes` split off a buffer still keeps the whole buffer alive).
    head: Option<Bytes>,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(head) = self.head.as_mut() {
            let n = head.len().min(buf.remaining());
            buf.put_slice(&head[..n]);
            head.advance(n);
            if head.is_empty() {
                self.head = None;
            }
            if n > 0 {
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Errors of one connection that was closed before it could be accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Tells a connection there is no room and closes it (by dropping it).
fn refuse(tcp: TcpStream) {
    // Without blocking: `try_write` on the fresh socket, nothing if it would wait.
    let _ = tcp.try_write(REFUSED);
}

/// Serves one connection whose first request head has been read (on the relay's
/// runtime): hyper with the header read timeout, plus what is `left` of the first
/// request's deadline, eviction from the pool, and graceful shutdown on `stop`.
async fn connection(
    io: Prefixed,
    peer: SocketAddr,
    router: Router,
    slot: Slot,
    settings: ListenerSettings,
    left: Duration,
    stop: CancellationToken,
) {
    let timeout = settings.handshake_timeout;
    let service_slot = slot.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        call(router.clone(), service_slot.clone(), peer, req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeout);
    let mut conn = pin!(builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades());
    // The rest of the first request's deadline. The head is already read, so hyper
    // parses it at once; the deadline still bounds a request that hyper has not
    // started to serve (e.g. a runtime too busy to get to it).
    let mut deadline = pin!(tokio::time::sleep(left));
    let mut first = true;
    let mut stopping = false;
    loop {
        tokio::select! {
            biased;
            () = slot.evicted() => {
                debug!(listener = settings.name, %peer, "closed to make room for a new connection");
                return;
            }
            () = &mut deadline, if first => {
                if slot.seen_request() {
                    first = false;
                    continue;
                }
                slot.count_timeout();
                debug!(listener = settings.name, %peer, "no request within the handshake timeout");
                return;
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            r = conn.as_mut() => {
                // hyper's header read timeout ends a keep-alive connection with the same
                // error whether the client idled between requests (what keep-alive is
                // for) or started a head it did not finish, so it is not counted. Before
                // the first request it is the handshake deadline that expired: on a busy
                // runtime hyper's timer can be seen to fire a moment before `deadline`
                // (same length, armed a moment later), and the connection still counts.
                if let Err(e) = r {
                    if first && e.is_timeout() && !slot.seen_request() {
                        slot.count_timeout();
                    }
                    debug!(listener = settings.name, %peer, error = %e, "connection ended");
                }
                return;
            }
        }
    }
}

/// One request: marks the connection busy, serves it through `router`, and has the
/// response body mark the connection idle again once it is written out. A `101
/// Switching Protocols` keeps the connection busy: it leaves the pool when the upgrade
/// completes and its task ends.
async fn call(
    mut router: Router,
    slot: Slot,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    slot.request_started();
    let mut req = req.map(Body::new);
    req.extensions_mut().insert(ConnectInfo(peer));
    let res = router.call(req).await?;
    if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(res);
    }
    Ok(res.map(|body| {
        Body::new(Tracked {
            body,
            slot: Some(slot),
        })
    }))
}

/// A response body that tells the pool when hyper is done with it (written out, or
/// dropped with the connection).
struct Tracked {
    body: Body,
    slot: Option<Slot>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.response_done();
        }
    }
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const UPGRADE: &[u8] = b"GET /v1/ws HTTP/1.1\r\nhost: relay\r\nupgrade: websocket\r\n\
connection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
sec-websocket-version: 13\r\n\r\n";

    #[test]
    fn a_head_is_pending_until_its_empty_line_arrives() {
        for end in 0..UPGRADE.len() {
            assert!(head_pending(&UPGRADE[..end]), "pending at {end} bytes");
        }
        assert!(!head_pending(UPGRADE));
        // Bytes after the head (a body, or frames sent before the answer) change nothing.
        assert!(!head_pending(&[UPGRADE, b"\x81\x05hello"].concat()));
    }

    #[test]
    fn bytes_hyper_would_refuse_are_handed_over_at_once() {
        // A TLS ClientHello, a bad method, a bad header name: hyper answers 400.
        assert!(!head_pending(
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        ));
        assert!(!head_pending(b"G(T / HTTP/1.1\r\n"));
        assert!(!head_pending(b"GET / HTTP/1.1\r\nbad header: x\r\n"));
        // More headers than hyper accepts (it answers 431).
        let many: Vec<u8> = (0..101)
            .flat_map(|i| format!("x-{i}: v\r\n").into_bytes())
            .collect();
        assert!(!head_pending(
            &[b"GET / HTTP/1.1\r\n".as_slice(), &many].concat()
        ));
    }

    #[test]
    fn bare_line_feeds_end_a_head_too() {
        assert!(!head_pending(b"GET /health HTTP/1.1\nhost: x\n\n"));
        assert!(head_pending(b"GET /health HTTP/1.1\nhost: x\n"));
    }

    #[tokio::test]
    async fn read_head_returns_the_head_and_what_followed_it_or_none_when_the_client_left() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            // One byte at a time, as a dripping client would, then a frame with the end.
            for b in &UPGRADE[..10] {
                c.write_all(&[*b]).await.expect("write");
                tokio::task::yield_now().await;
            }
            c.write_all(&[&UPGRADE[10..], b"frame".as_slice()].concat())
                .await
                .expect("write");
            let mut leaving = TcpStream::connect(addr).await.expect("connect");
            leaving.write_all(b"GET / HT").await.expect("write");
            c
        });
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let head = read_head(&mut tcp).await.expect("read").expect("a head");
        assert_eq!(&head[..], [UPGRADE, b"frame".as_slice()].concat());
        let _kept_open = client.await.expect("client");
        let (mut left, _) = listener.accept().await.expect("accept");
        assert_eq!(read_head(&mut left).await.expect("read"), None);
    }

    #[tokio::test]
    async fn prefixed_reads_the_screened_bytes_first_then_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        client.write_all(b" world").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut io = Prefixed {
            head: Some(Bytes::from(b"hello".to_vec())),
            io: tcp,
        };
        let mut first = [0u8; 3];
        io.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"hel");
        let mut second = [0u8; 2];
        io.read_exact(&mut second).await.expect("read");
        assert_eq!(&second, b"lo");
        assert!(io.head.is_none(), "the head's buffer is released once read");
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b" world");
        io.write_all(b"answer").await.expect("write");
        drop(io);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        assert_eq!(answer, b"answer");
    }
}

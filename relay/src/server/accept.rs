//! Accepting TCP connections and serving HTTP/1.1 on them, with the bounds on
//! connections that are not (yet) WebSockets (docs/relay.md, "Before the WebSocket").
//!
//! Each listener runs [`serve`]: every accepted connection takes a place in the
//! listener's [`HandshakePool`] (or, when every place is serving a request, is closed
//! at once) and is served by hyper on its own task. A connection must complete its
//! first request head within `DCHAT_HANDSHAKE_TIMEOUT` of being accepted, or it is
//! closed and counted (`dchat_handshake_timeouts_total`); on a keep-alive connection
//! each later request head must arrive within the same time after the previous
//! response (hyper's header read timeout; closed quietly, as hyper cannot tell a
//! client idling between requests from one dripping a head). A connection that becomes a WebSocket leaves
//! the pool when the upgrade completes; from then on `DCHAT_MAX_CONNECTIONS`,
//! `DCHAT_AUTH_TIMEOUT` and `DCHAT_IDLE_TIMEOUT` bound it (`connection.rs`).
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
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
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
pub async fn serve(
    listener: TcpListener,
    router: Router,
    pool: Arc<HandshakePool>,
    settings: ListenerSettings,
    stop: CancellationToken,
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
        conns.spawn(connection(
            tcp,
            peer,
            router.clone(),
            slot,
            settings,
            stop.clone(),
        ));
    }
    drop(listener);
    conns.close();
    conns.wait().await;
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

/// Serves one connection: hyper with the header read timeout, plus the first request's
/// deadline, eviction from the pool, and graceful shutdown on `stop`.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    slot: Slot,
    settings: ListenerSettings,
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
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades());
    // The deadline of the first request head. hyper's header read timeout has the same
    // length and starts a moment later; this one is checked first, so a connection that
    // never sent a request is counted here rather than closed quietly by hyper (which
    // cannot tell that from a client that hung up).
    let mut deadline = pin!(tokio::time::sleep(timeout));
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

//! HTTP surface: the client port (`/v1/ws`, `/v1/peer`, `/health`, `/ready`) and the
//! metrics port (`/health`, `/metrics` and the admin API).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{admin, connection, socket, Shared};
use crate::metrics::CodeLabel;

/// tungstenite's default read buffer is 128 KiB per connection, allocated and touched
/// for every connection. Chat frames are small and the buffer grows on demand for a
/// large frame, so 1 KiB keeps idle connections cheap (measured: about 8 KiB RSS per
/// idle authenticated connection in a debug build, all buffers included).
const READ_BUFFER: usize = 1024;
/// Small write buffer target: frames are flushed explicitly after each batch.
const WRITE_BUFFER: usize = 8192;

/// Routes of the client port.
pub fn client_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/ws", get(ws_upgrade))
        .route("/v1/peer", get(peer_upgrade))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(shared)
}

/// Routes of the metrics port. It answers `/health` too: it has its own handshake
/// places, so a liveness check there is not queued behind a flood of the client port.
///
/// The admin routes exist only when `DCHAT_ADMIN_TOKEN` is set (404 otherwise, whatever
/// the method), and the token is checked before anything else about the request, so a
/// caller without it learns nothing — not even which methods a path takes (405).
pub fn metrics_router(shared: Arc<Shared>) -> Router {
    let mut router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    if shared.cfg.admin_token.is_some() {
        let admin = Router::new()
            .route("/admin/stats", get(admin::stats))
            .route("/admin/snapshot", get(admin::snapshot))
            .route("/admin/restore", post(admin::restore))
            .route("/admin/import", post(admin::import))
            .route("/admin/quiesce", post(admin::quiesce))
            // `layer`, not `route_layer`: it also wraps each path's 405 answer.
            .layer(axum::middleware::from_fn_with_state(
                shared.clone(),
                admin::require_token,
            ));
        router = router.merge(admin);
    }
    router.with_state(shared)
}

async fn health() -> &'static str {
    "ok\n"
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if !shared.accepting() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), shared.store.check()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage unavailable: {}\n", e.metric_label()),
        )
            .into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "storage check timed out\n").into_response(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
        .into_response()
}

/// Frame size limits for a WebSocket upgrade, from the configuration.
pub fn configure_ws(ws: WebSocketUpgrade, max_frame: usize) -> WebSocketUpgrade {
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_write_buffer(max_frame))
        .max_message_size(max_frame)
        .max_frame_size(max_frame)
}

/// The same settings as [`configure_ws`], for the client socket the relay opens itself
/// (`socket.rs`).
fn client_ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_write_buffer(max_frame))
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

fn max_write_buffer(max_frame: usize) -> usize {
    max_frame.saturating_mul(4).max(1 << 20)
}

async fn ws_upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    // A request that is not a WebSocket upgrade is refused first, as axum's extractor
    // would.
    let (switching, on_upgrade) = match socket::accept(req).await {
        Ok(accepted) => accepted,
        Err(refused) => return refused,
    };
    if !shared.accepting() {
        shared
            .metrics
            .closed
            .get_or_create(&CodeLabel { code: "draining" })
            .inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "draining; reconnect\n").into_response();
    }
    let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
        shared
            .metrics
            .closed
            .get_or_create(&CodeLabel {
                code: "too_many_connections",
            })
            .inc();
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
    let token = shared.tracker.token();
    let config = client_ws_config(shared.cfg.max_message_bytes);
    tokio::spawn(async move {
        let _permit = permit;
        let _token = token;
        if let Some(ws) = socket::open(on_upgrade, config).await {
            connection::run(shared, ws, peer).await;
        }
    });
    switching
}

/// Query of the peer endpoint.
#[derive(serde::Deserialize)]
struct PeerQuery {
    /// Instance id of the connecting relay.
    #[serde(default)]
    instance: String,
}

/// `GET /v1/peer`: accepts a link from another relay; the cluster serves it.
async fn peer_upgrade(
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
    configure_ws(ws, 1 << 20).on_upgrade(move |socket| async move {
        let _permit = permit;
        let _token = token;
        let stop = shared.shutdown.clone();
        shared
            .cluster
            .serve_peer(socket, q.instance, &*shared, stop)
            .await;
    })
}

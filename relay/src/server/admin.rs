//! Admin API on the metrics port: bearer token (`DCHAT_ADMIN_TOKEN`, compared in
//! constant time, by [`require_token`] before anything else); its routes do not exist
//! (404) when no token is configured.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Shared;
use crate::store::StoreError;

/// Middleware of every admin route: the request goes on only with the bearer token
/// (`Authorization: Bearer <token>`, compared in constant time); otherwise 401.
pub async fn require_token(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    // The routes exist only with a token configured (see `http::metrics_router`).
    let Some(expected) = shared.cfg.admin_token.as_deref() else {
        return (StatusCode::NOT_FOUND, "admin API disabled\n").into_response();
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "invalid or missing bearer token\n",
        )
            .into_response()
    }
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// `GET /admin/stats`: store counts and live connection numbers. For the embedded store
/// also `contents`: what a restore would refuse it for (`null` when it is empty, which
/// the counts alone cannot tell: dedup entries of acknowledged messages are not counted).
pub async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let contents = match shared.embedded.clone() {
        Some(store) => match tokio::task::spawn_blocking(move || store.contents()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": e.metric_label(), "message": e.to_string()}),
                )
            }
            Err(e) => {
                return json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "task", "message": e.to_string()}),
                )
            }
        },
        None => None,
    };
    match shared.timed("stats", shared.store.stats()).await {
        Ok(s) => json_response(
            StatusCode::OK,
            json!({
                "store": s,
                "contents": contents,
                "backend": if shared.embedded.is_some() { "embedded" } else { "postgres" },
                "sessions": shared.sessions.len(),
                "connections": shared.metrics.connections.get(),
                "draining": !shared.accepting(),
                "instance": shared.instance_id,
            }),
        ),
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.metric_label(), "message": e.to_string()}),
        ),
    }
}

/// Adapts a bounded channel to `std::io::Write` for the blocking snapshot writer.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

/// `GET /admin/snapshot`: streams a consistent, checksummed snapshot of the embedded
/// store. A failure mid-stream aborts the response, so the client sees a truncated
/// stream that fails the checksum instead of a silently incomplete backup.
pub async fn snapshot(State(shared): State<Arc<Shared>>) -> Response {
    let Some(store) = shared.embedded.clone() else {
        return json_response(
            StatusCode::CONFLICT,
            json!({"error": "not_embedded", "message": "snapshots are of the embedded store; back up PostgreSQL with its own tools"}),
        );
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::new(),
        };
        let r = store.snapshot(&mut w).and_then(|s| {
            w.flush().map_err(|e| StoreError::Task {
                op: "snapshot stream",
                reason: e.to_string(),
            })?;
            Ok(s)
        });
        match r {
            Ok(s) => info!(bytes = s.bytes, sha256 = %s.sha256, "snapshot streamed"),
            Err(e) => {
                warn!(error = %e, "snapshot failed");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Adapts a channel of body chunks to `std::io::Read` for the blocking restore.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// How a posted snapshot is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    /// `POST /admin/restore`: into an empty store.
    Restore,
    /// `POST /admin/import`: merged into a store that may hold data.
    Merge,
}

/// `POST /admin/restore`: loads a snapshot (the request body) into the embedded
/// store, which must be empty. 409 when not empty, 400 for a corrupt stream.
pub async fn restore(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    load(shared, body, Load::Restore).await
}

/// `POST /admin/import`: merges a snapshot (the request body) into the embedded store,
/// which may hold data — the receiving side of a blue-green slot handover. Messages the
/// store already has are skipped, so a repeated import is harmless; nothing is applied
/// unless the whole stream verified (400 otherwise). Local sessions are woken so
/// connected recipients get imported messages at once.
pub async fn import(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    load(shared, body, Load::Merge).await
}

async fn load(shared: Arc<Shared>, body: Body, how: Load) -> Response {
    let Some(store) = shared.embedded.clone() else {
        return json_response(
            StatusCode::CONFLICT,
            json!({"error": "not_embedded", "message": "restore and import target the embedded store; relays on PostgreSQL share their messages already"}),
        );
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(4);
    let forward = tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let item = chunk.map_err(|e| e.to_string());
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    let result = tokio::task::spawn_blocking(move || {
        let mut r = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        match how {
            Load::Restore => store.restore(&mut r).map(|s| json!({ "restored": s })),
            Load::Merge => store.merge(&mut r).map(|s| json!({ "imported": s })),
        }
    })
    .await;
    forward.abort();
    match result {
        Ok(Ok(summary)) => {
            info!(?how, %summary, "snapshot applied");
            // Memberships came in behind the member cache's back, and messages behind
            // the sessions' read positions.
            shared.channels.clear();
            shared
                .store_generation
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            if how == Load::Merge {
                shared.sessions.wake_all();
            }
            json_response(StatusCode::OK, summary)
        }
        Ok(Err(e)) => {
            let status = match e {
                StoreError::NotEmpty { .. } => StatusCode::CONFLICT,
                StoreError::SnapshotInvalid { .. }
                | StoreError::SnapshotChecksum { .. }
                | StoreError::SnapshotIo { .. } => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            json_response(
                status,
                json!({"error": e.metric_label(), "message": e.to_string()}),
            )
        }
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "task", "message": e.to_string()}),
        ),
    }
}

/// `POST /admin/quiesce`: the sending side of a slot handover. Readiness turns false,
/// new client connections are refused, every client is closed with the drain reason
/// (so it reconnects through the Service to the serving slot), their unacknowledged
/// live messages are stored and the store is flushed — but the process keeps running,
/// so the admin API can still stream a snapshot that no client can change any more.
/// Idempotent; a restart of the process ends it.
pub async fn quiesce(State(shared): State<Arc<Shared>>) -> Response {
    let already = shared.draining.swap(true, Ordering::AcqRel);
    if !already {
        info!("quiescing for a handover: readiness false, closing clients");
    }
    shared.shutdown.cancel();
    shared.tracker.close();
    let grace = shared.cfg.drain_grace;
    let closed = tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_ok();
    let open = shared.tracker.len();
    match shared.timed("flush", shared.store.flush()).await {
        Ok(()) if closed => json_response(
            StatusCode::OK,
            json!({"quiesced": true, "already": already, "open_connections": open}),
        ),
        Ok(()) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "connections_open", "message": format!("{open} connection(s) still open after {}s; retry", grace.as_secs())}),
        ),
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": e.metric_label(), "message": e.to_string()}),
        ),
    }
}

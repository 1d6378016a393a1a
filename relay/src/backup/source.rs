//! Where snapshots come from and where they are restored to.
//!
//! - The embedded store lives inside one relay process, so it is reached through that
//!   relay's admin API on the metrics port: `GET /admin/snapshot` streams a consistent
//!   snapshot, `POST /admin/restore` loads one into an empty store (and verifies its
//!   trailer and counts before the final commit; docs/storage.md).
//! - PostgreSQL is read and written directly with the relay's `DB_*` settings
//!   ([`PostgresStore::snapshot`], [`PostgresStore::restore`]).
//! - `verify` restores into a scratch embedded store in a temporary directory.
//!
//! All of them stream: nothing here holds a snapshot in memory.

use std::path::Path;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncRead;
use tokio::task::JoinHandle;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::store::{
    EmbeddedOptions, PostgresConfig, PostgresStore, SnapshotSummary, StoreError, StoreStats,
};

/// Largest error body read from a relay.
const MAX_SMALL_BODY: usize = 64 * 1024;

/// Why reading from or writing to a store failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A setting is missing or unusable (named: a flag or environment variable).
    #[error("{field}: {reason}")]
    Config {
        /// The flag or variable.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The relay's admin API could not be reached, or the connection broke.
    #[error("relay admin API {step} {url}: {reason}")]
    Admin {
        /// The request (`snapshot`, `restore`).
        step: &'static str,
        /// Its URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The relay refused the request.
    #[error("relay admin API {step} {url}: HTTP {status}: {body}")]
    Refused {
        /// The request.
        step: &'static str,
        /// Its URL.
        url: String,
        /// HTTP status (409: the target is not empty or not embedded; 400: the stream
        /// did not verify; 401: wrong token).
        status: u16,
        /// The relay's error body.
        body: String,
    },
    /// The store failed (PostgreSQL snapshot or restore, the scratch store).
    #[error("{what}: {source}")]
    Store {
        /// What was being done, e.g. `restore into PostgreSQL`.
        what: &'static str,
        /// The store's error (names the table and operation); boxed, it is large.
        #[source]
        source: Box<StoreError>,
    },
}

/// Wraps a store error with what was being done.
fn store_err(what: &'static str) -> impl FnOnce(StoreError) -> SourceError {
    move |source| SourceError::Store {
        what,
        source: Box::new(source),
    }
}

impl SourceError {
    /// If the target refused because it already holds data: what it holds, in the
    /// store's own words.
    pub fn not_empty(&self) -> Option<String> {
        match self {
            SourceError::Refused {
                status: 409, body, ..
            } => {
                let v: serde_json::Value = serde_json::from_str(body).ok()?;
                (v["error"] == "not_empty")
                    .then(|| v["message"].as_str().unwrap_or(body).to_string())
            }
            SourceError::Store { source, .. } => match &**source {
                StoreError::NotEmpty { what } => Some(what.clone()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Reads the admin token: the file's content (trimmed) if `file` is given, else
/// `DCHAT_ADMIN_TOKEN`.
pub fn admin_token(file: Option<&Path>) -> Result<String, SourceError> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| SourceError::Config {
            field: "--admin-token-file",
            reason: format!("reading {}: {e}", path.display()),
        })?,
        None => std::env::var("DCHAT_ADMIN_TOKEN").unwrap_or_default(),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(SourceError::Config {
            field: "--admin-token-file (or DCHAT_ADMIN_TOKEN)",
            reason: "no admin token given (the relays' DCHAT_ADMIN_TOKEN)".into(),
        });
    }
    Ok(token)
}

/// The relay's PostgreSQL settings from `DB_HOST`, `DB_PORT` (5432), `DB_NAME`
/// (`dchat`), `DB_USER` (`dchat`) and `DB_PASSWORD`, with the relay's defaults.
pub fn postgres_from_env() -> Result<PostgresConfig, SourceError> {
    let var = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string());
    let host = var("DB_HOST").filter(|h| !h.is_empty()).ok_or(SourceError::Config {
        field: "DB_HOST",
        reason: "is not set (PostgreSQL is reached with the relay's DB_HOST, DB_PORT, DB_NAME, DB_USER and DB_PASSWORD)".into(),
    })?;
    let port = match var("DB_PORT").filter(|p| !p.is_empty()) {
        None => 5432,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or(SourceError::Config {
                field: "DB_PORT",
                reason: format!("{p:?} is not a port number"),
            })?,
    };
    Ok(PostgresConfig {
        host,
        port,
        dbname: var("DB_NAME")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "dchat".into()),
        user: var("DB_USER")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "dchat".into()),
        // Not trimmed: a password may end in whitespace.
        password: std::env::var("DB_PASSWORD").unwrap_or_default(),
        max_connections: 2,
    })
}

/// Connects to PostgreSQL (applying the relay's migrations, so an empty database gets
/// the relay's tables and a restore can go into it).
pub async fn connect_postgres(cfg: &PostgresConfig) -> Result<PostgresStore, SourceError> {
    PostgresStore::connect(cfg)
        .await
        .map_err(store_err("connecting to PostgreSQL"))
}

/// Starts a PostgreSQL snapshot; returns the stream to read and the task whose result
/// says whether the stream is complete. A failed snapshot ends the stream early, which
/// the stream's check catches; the task's error says why.
pub fn postgres_snapshot(
    store: PostgresStore,
) -> (
    impl AsyncRead + Unpin + Send + 'static,
    JoinHandle<Result<SnapshotSummary, SourceError>>,
) {
    let (mut writer, reader) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn(async move {
        let r = store.snapshot(&mut writer).await;
        drop(writer);
        r.map_err(store_err("PostgreSQL snapshot"))
    });
    (reader, task)
}

/// Restores a stream into PostgreSQL (see [`PostgresStore::restore`]).
pub async fn restore_postgres(
    store: &PostgresStore,
    input: impl AsyncRead + Unpin + Send + 'static,
) -> Result<SnapshotSummary, SourceError> {
    store
        .restore(input)
        .await
        .map_err(store_err("restore into PostgreSQL"))
}

/// Restores a stream into a new embedded store in `dir` (which must not hold one) and
/// returns what the restore saw and the store's own counts afterwards. The store is
/// closed before this returns; the caller removes `dir`.
pub async fn restore_scratch(
    dir: &Path,
    input: impl AsyncRead + Unpin + Send + 'static,
) -> Result<(SnapshotSummary, StoreStats), SourceError> {
    // A scratch store needs no large write buffer; this keeps verify's memory small.
    let options = EmbeddedOptions {
        write_buffer_bytes: 16 << 20,
    };
    let store = crate::store::open_embedded(dir, &options)
        .await
        .map_err(store_err("opening the scratch store"))?;
    let store = std::sync::Arc::new(store);
    let restoring = store.clone();
    let mut bridge = tokio_util::io::SyncIoBridge::new(input);
    let summary = tokio::task::spawn_blocking(move || restoring.restore(&mut bridge))
        .await
        .map_err(|e| {
            store_err("restore into the scratch store")(StoreError::Task {
                op: "restore",
                reason: e.to_string(),
            })
        })?
        .map_err(store_err("restore into the scratch store"))?;
    let stats = crate::store::Store::stats(&*store)
        .await
        .map_err(store_err("counting the scratch store"))?;
    // Dropping the last handle joins the writer thread (on a blocking thread: it syncs).
    let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    Ok((summary, stats))
}

type ReqBody = BoxBody<Bytes, std::io::Error>;

/// A relay's admin API (`http://host:9090`, bearer token).
#[derive(Clone)]
pub struct Admin {
    base: String,
    token: String,
    client: Client<HttpConnector, ReqBody>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Checks `url` (`http://host:port`, no path) and builds the client.
    pub fn new(url: &str, token: String) -> Result<Admin, SourceError> {
        let bad = |reason: &str| SourceError::Config {
            field: "--admin-url",
            reason: format!("{url:?}: {reason}"),
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("must be an http:// URL (the relay's metrics port)"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("has no host"));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("give only scheme, host and port (no path)"));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        Ok(Admin {
            base: url.trim_end_matches('/').to_string(),
            token,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The admin base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    async fn call(
        &self,
        step: &'static str,
        method: Method,
        path: &str,
        body: ReqBody,
    ) -> Result<(String, Response<Incoming>), SourceError> {
        let url = format!("{}{path}", self.base);
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(body)
            .map_err(|e| SourceError::Admin {
                step,
                url: url.clone(),
                reason: e.to_string(),
            })?;
        match self.client.request(req).await {
            Ok(resp) => Ok((url, resp)),
            Err(e) => Err(SourceError::Admin {
                step,
                url,
                reason: error_chain(&e),
            }),
        }
    }

    /// `GET /admin/stats`: the relay's store counts and backend.
    pub async fn stats(&self) -> Result<serde_json::Value, SourceError> {
        let (url, resp) = self
            .call("stats", Method::GET, "/admin/stats", empty())
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(refused("stats", url, resp).await);
        }
        let body = read_small(resp)
            .await
            .map_err(|reason| SourceError::Admin {
                step: "stats",
                url: url.clone(),
                reason,
            })?;
        serde_json::from_slice(&body).map_err(|e| SourceError::Admin {
            step: "stats",
            url,
            reason: format!("answer is not JSON: {e}"),
        })
    }

    /// `GET /admin/snapshot`: the embedded store's snapshot as a stream. A relay that
    /// fails mid-stream aborts the response, which this stream reports as a read error.
    pub async fn snapshot(&self) -> Result<impl AsyncRead + Unpin + Send + 'static, SourceError> {
        let (url, resp) = self
            .call("snapshot", Method::GET, "/admin/snapshot", empty())
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(refused("snapshot", url, resp).await);
        }
        let stream = futures::TryStreamExt::map_err(resp.into_body().into_data_stream(), |e| {
            std::io::Error::other(error_chain(&e))
        });
        Ok(StreamReader::new(stream))
    }

    /// `POST /admin/restore`: streams `input` into the relay's (empty) embedded store.
    /// Returns the relay's summary (`{"restored": {...}}`).
    pub async fn restore(
        &self,
        input: impl AsyncRead + Unpin + Send + Sync + 'static,
    ) -> Result<serde_json::Value, SourceError> {
        use futures::TryStreamExt as _;
        let body =
            StreamBody::new(ReaderStream::with_capacity(input, 256 << 10).map_ok(Frame::data));
        let (url, resp) = self
            .call(
                "restore",
                Method::POST,
                "/admin/restore",
                BodyExt::boxed(body),
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(refused("restore", url, resp).await);
        }
        let body = read_small(resp)
            .await
            .map_err(|reason| SourceError::Admin {
                step: "restore",
                url: url.clone(),
                reason,
            })?;
        serde_json::from_slice(&body).map_err(|e| SourceError::Admin {
            step: "restore",
            url,
            reason: format!("answer is not JSON: {e}"),
        })
    }
}

fn empty() -> ReqBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

async fn read_small(resp: Response<Incoming>) -> Result<Bytes, String> {
    http_body_util::Limited::new(resp.into_body(), MAX_SMALL_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string())
}

async fn refused(step: &'static str, url: String, resp: Response<Incoming>) -> SourceError {
    let status = resp.status().as_u16();
    let body = match read_small(resp).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(e) => format!("(body unreadable: {e})"),
    };
    SourceError::Refused {
        step,
        url,
        status,
        body,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

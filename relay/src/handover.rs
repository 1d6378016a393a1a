//! Slot handover between two relays on the embedded store (`dchat handover`).
//!
//! During a blue-green rollout the old slot's relay keeps the messages it stored for
//! offline users on its own volume. Before that slot is scaled to zero, the operator
//! runs `dchat handover --from <old admin URL> --to <new admin URL>`, which
//!
//! 1. quiesces the old relay (`POST /admin/quiesce`): it stops accepting clients,
//!    closes the ones still connected so they reconnect to the serving slot, stores
//!    their unacknowledged live messages and flushes — after this nothing changes its
//!    store any more;
//! 2. streams its snapshot (`GET /admin/snapshot`) straight into the new relay's
//!    merge import (`POST /admin/import`), which skips messages it already has and
//!    applies nothing unless the whole checksummed stream arrived.
//!
//! Every step is idempotent, so a failed attempt is simply run again (the Job retries).

use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest error or summary body read from a relay (the snapshot itself is streamed).
const MAX_SMALL_BODY: usize = 64 * 1024;

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// An admin URL is not `http://host:port` (TLS is not used on the metrics port), or
    /// names the same relay twice.
    #[error("{flag}: {url:?}: {reason}")]
    BadUrl {
        /// Which option.
        flag: &'static str,
        /// What was given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The relay could not be reached or the connection broke.
    #[error("{step} {url}: {reason}")]
    Transport {
        /// Which request.
        step: &'static str,
        /// Where to.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The relay answered with an error status.
    #[error("{step} {url}: HTTP {status}: {body}")]
    Refused {
        /// Which request.
        step: &'static str,
        /// Where to.
        url: String,
        /// HTTP status.
        status: u16,
        /// The relay's error body (JSON with `error` and `message`).
        body: String,
    },
    /// A step did not finish in time.
    #[error("{step} {url}: no answer within {secs}s")]
    Timeout {
        /// Which request.
        step: &'static str,
        /// Where to.
        url: String,
        /// The limit.
        secs: u64,
    },
}

/// What a handover did: the receiving relay's import summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoverReport {
    /// The JSON `imported` object of `POST /admin/import` (counts of imported and
    /// duplicate messages, the snapshot's size and checksum).
    pub imported: serde_json::Value,
}

impl HandoverReport {
    /// Messages added to the receiving relay.
    pub fn imported_messages(&self) -> u64 {
        self.imported["imported"].as_u64().unwrap_or(0)
    }
}

type ReqBody = BoxBody<Bytes, hyper::Error>;

/// Moves the undelivered messages (and profiles and channel memberships) of the relay
/// whose admin API is at `from` into the one at `to`. `token` is the shared
/// `DCHAT_ADMIN_TOKEN`; `timeout` bounds each step.
pub async fn handover(
    from: &str,
    to: &str,
    token: &str,
    timeout: Duration,
) -> Result<HandoverReport, HandoverError> {
    let from = base_url("--from", from)?;
    let to = base_url("--to", to)?;
    if from == to {
        // Quiescing a relay and importing into itself would only take it out of service.
        return Err(HandoverError::BadUrl {
            flag: "--to",
            url: to,
            reason: "must name a different relay than --from".into(),
        });
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    let client: Client<HttpConnector, ReqBody> =
        Client::builder(TokioExecutor::new()).build(connector);
    let auth = format!("Bearer {token}");
    let call = |step: &'static str, method: Method, url: String, body: ReqBody| {
        let client = client.clone();
        let auth = auth.clone();
        async move {
            let req = Request::builder()
                .method(method)
                .uri(&url)
                .header(hyper::header::AUTHORIZATION, auth)
                .body(body)
                .map_err(|e| HandoverError::Transport {
                    step,
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
            match tokio::time::timeout(timeout, client.request(req)).await {
                Err(_) => Err(HandoverError::Timeout {
                    step,
                    url,
                    secs: timeout.as_secs(),
                }),
                Ok(Err(e)) => Err(HandoverError::Transport {
                    step,
                    url,
                    reason: error_chain(&e),
                }),
                Ok(Ok(resp)) => Ok((url, resp)),
            }
        }
    };

    let (url, resp) = call(
        "quiesce",
        Method::POST,
        format!("{from}/admin/quiesce"),
        empty(),
    )
    .await?;
    expect_ok("quiesce", url, resp, timeout).await?;
    tracing::info!(%from, "old relay quiesced");

    let (url, snapshot) = call(
        "snapshot",
        Method::GET,
        format!("{from}/admin/snapshot"),
        empty(),
    )
    .await?;
    if snapshot.status() != StatusCode::OK {
        return Err(refused("snapshot", url, snapshot, timeout).await);
    }
    // The snapshot streams from one relay into the other without being held here; a
    // stream cut short fails the importer's checksum, so nothing partial is applied.
    let (url, resp) = call(
        "import",
        Method::POST,
        format!("{to}/admin/import"),
        snapshot.into_body().boxed(),
    )
    .await?;
    let body = expect_ok("import", url.clone(), resp, timeout).await?;
    let mut summary: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| HandoverError::Transport {
            step: "import",
            url: url.clone(),
            reason: format!("answer is not JSON: {e}"),
        })?;
    let imported = summary["imported"].take();
    if !imported.is_object() {
        return Err(HandoverError::Transport {
            step: "import",
            url,
            reason: "answer has no `imported` summary".into(),
        });
    }
    Ok(HandoverReport { imported })
}

fn empty() -> ReqBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

fn base_url(flag: &'static str, url: &str) -> Result<String, HandoverError> {
    let bad = |reason: &str| HandoverError::BadUrl {
        flag,
        url: url.to_string(),
        reason: format!("not an http:// URL with a host: {reason}"),
    };
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("the scheme must be http"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("give only scheme, host and port (no path)"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

async fn read_small(
    step: &'static str,
    url: &str,
    resp: Response<Incoming>,
    timeout: Duration,
) -> Result<Bytes, HandoverError> {
    let limited = http_body_util::Limited::new(resp.into_body(), MAX_SMALL_BODY);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(HandoverError::Timeout {
            step,
            url: url.to_string(),
            secs: timeout.as_secs(),
        }),
        Ok(Err(e)) => Err(HandoverError::Transport {
            step,
            url: url.to_string(),
            reason: e.to_string(),
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

async fn refused(
    step: &'static str,
    url: String,
    resp: Response<Incoming>,
    timeout: Duration,
) -> HandoverError {
    let status = resp.status().as_u16();
    let body = match read_small(step, &url, resp, timeout).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(e) => format!("(body unreadable: {e})"),
    };
    HandoverError::Refused {
        step,
        url,
        status,
        body,
    }
}

async fn expect_ok(
    step: &'static str,
    url: String,
    resp: Response<Incoming>,
    timeout: Duration,
) -> Result<Bytes, HandoverError> {
    if resp.status() != StatusCode::OK {
        return Err(refused(step, url, resp, timeout).await);
    }
    read_small(step, &url, resp, timeout).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_must_be_plain_http_without_a_path() {
        assert_eq!(
            base_url("--from", "http://chat-blue-0.chat-blue:9090/").unwrap(),
            "http://chat-blue-0.chat-blue:9090"
        );
        for bad in [
            "https://x:9090",
            "x:9090",
            "http://x:9090/admin",
            "not a url",
            "",
        ] {
            let e = base_url("--to", bad).unwrap_err();
            assert!(e.to_string().starts_with("--to: "), "{bad}: {e}");
            assert!(e.to_string().contains("not an http:// URL"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn the_same_relay_twice_is_refused_as_such() {
        let e = handover(
            "http://x:9090",
            "http://x:9090/",
            "token-0123456789abcdef",
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--to: \"http://x:9090\": must name a different relay than --from"
        );
    }
}

//! In-process relays on 127.0.0.1:0 and a minimal HTTP client for the tests.
//!
//! Include with `#[path = "support/relay.rs"] mod relay_support;` (needs
//! `#[path = "support/tempdir.rs"] mod tempdir;` in the same test crate).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use dchat_relay::client::{generate_key, Client};
use dchat_relay::config::Config;
use dchat_relay::server::{Relay, RunningRelay};
use ed25519_dalek::SigningKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tempdir::TempDir;

/// A running in-process relay with its own embedded store directory.
pub struct TestRelay {
    pub relay: RunningRelay,
    pub dir: TempDir,
}

impl TestRelay {
    pub fn url(&self) -> String {
        self.relay.ws_url()
    }

    /// Connects and authenticates a new random identity.
    pub async fn client(&self) -> Client {
        Client::connect(&self.url(), generate_key().unwrap())
            .await
            .unwrap()
    }

    /// Connects as a given identity.
    pub async fn client_as(&self, key: &SigningKey) -> Client {
        Client::connect(&self.url(), key.clone()).await.unwrap()
    }

    /// Current value of a metric line starting with `prefix` (0 if absent).
    pub fn metric(&self, prefix: &str) -> f64 {
        metric_value(&self.relay.shared.metrics.encode(), prefix)
    }

    /// Polls the metric until it reaches `at_least` (true) or `within` has passed.
    pub async fn metric_reaches(&self, prefix: &str, at_least: f64, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.metric(prefix) >= at_least {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Starts a relay on an embedded store in a fresh temp dir; `tweak` adjusts the config.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestRelay {
    let dir = TempDir::new("relay");
    let mut cfg = Config::for_test(dir.path());
    tweak(&mut cfg);
    let relay = Relay::bind(cfg).await.unwrap().spawn();
    TestRelay { relay, dir }
}

/// Finds `prefix` in a Prometheus exposition and parses its value.
pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A parsed HTTP response.
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close`; handles chunked responses.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("http header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut rest = raw[split + 4..].to_vec();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        rest = dechunk(&rest);
    }
    HttpResponse { status, body: rest }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_str = String::from_utf8_lossy(&data[..eol]).to_string();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

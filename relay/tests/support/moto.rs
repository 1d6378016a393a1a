//! A real AWS API emulator (moto: S3 and RDS) for tests.
//!
//! Under `scripts/with-moto.sh`, `DCHAT_TEST_S3_ENDPOINT` names a running moto server and
//! that one is used. When the variable is unset (plain `cargo test`), the first test that
//! needs it starts a private `moto_server` from the repository's `.venv` (installed by
//! `scripts/ensure-deps.sh`) on a free port — so these tests never silently skip; without
//! moto installed they fail and say how to get it. A watchdog process stops that server
//! once the test process has exited.
//!
//! Include with `#[path = "support/moto.rs"] mod moto;`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Region every test uses.
pub const REGION: &str = "us-east-1";

static ENDPOINT: OnceLock<String> = OnceLock::new();

/// The emulator's endpoint URL (started on first use when the environment has none).
pub fn endpoint() -> &'static str {
    ENDPOINT.get_or_init(|| match std::env::var("DCHAT_TEST_S3_ENDPOINT") {
        Ok(url) if !url.is_empty() => url,
        _ => start_private_server(),
    })
}

/// Environment for a `dchat backup` process talking to the emulator: test credentials,
/// the region, the endpoint for RDS (S3 gets `--s3-endpoint`), no instance metadata.
pub fn env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", REGION.into()),
        ("AWS_ENDPOINT_URL", endpoint().into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

fn moto_server() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join(".venv/bin/moto_server");
    assert!(
        bin.exists(),
        "{} not found: the backup tests need moto (an AWS API emulator); run scripts/ensure-deps.sh, \
         or run the tests under scripts/with-moto.sh",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

/// Whether an HTTP server answers on `port`.
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

// The server must outlive this function (it serves every test of the process); the
// watchdog stops it, so it is deliberately not waited for on success.
#[allow(clippy::zombie_processes)]
fn start_private_server() -> String {
    let bin = moto_server();
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        // The watchdog outlives us: when this test process is gone it stops moto.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; kill {moto} 2>/dev/null",
            pid = std::process::id(),
            moto = child.id()
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("({script}) </dev/null >/dev/null 2>&1 &"))
            .status();
        for _ in 0..300 {
            if answers(port) {
                eprintln!("test moto server on 127.0.0.1:{port}");
                return format!("http://127.0.0.1:{port}");
            }
            if let Ok(Some(status)) = child.try_wait() {
                last = format!("moto_server exited with {status}");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start a test moto server: {last}");
}

async fn sdk_config() -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint())
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await
}

/// An S3 client of the emulator (path-style).
pub async fn s3() -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(&sdk_config().await)
        .force_path_style(true)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// An RDS client of the emulator.
pub async fn rds() -> aws_sdk_rds::Client {
    aws_sdk_rds::Client::new(&sdk_config().await)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique name (lowercase letters, digits and hyphens) for a bucket or an instance.
pub fn unique(label: &str) -> String {
    format!(
        "{label}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 100_000)
            .unwrap_or(0)
    )
}

/// Creates an empty bucket for one test.
pub async fn fresh_bucket() -> String {
    let name = unique("dchat-test");
    s3().await
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create bucket {name}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
    name
}

/// Creates a PostgreSQL DB instance in the emulator; returns its identifier.
pub async fn fresh_db_instance() -> String {
    let id = unique("dchat-db");
    rds()
        .await
        .create_db_instance()
        .db_instance_identifier(&id)
        .engine("postgres")
        .db_instance_class("db.t3.micro")
        .master_username("dchat")
        .master_user_password("password123")
        .allocated_storage(20)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create DB instance {id}: {}",
                aws_sdk_rds::error::DisplayErrorContext(&e)
            )
        });
    id
}

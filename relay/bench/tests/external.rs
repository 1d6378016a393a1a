//! `dchat-loadgen external` against a relay this test starts itself: the report of a
//! clean run, a threshold breach making the command fail with the threshold and the
//! measured value named, bad flags refused with exit code 2, and `wss://` going through
//! TLS. Asserts what was counted and decided, never how fast anything was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use dchat_bench::external::{self, Breach, ExternalArgs};
use dchat_relay::config::Config;
use dchat_relay::server::{Relay, RunningRelay};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ExternalArgs,
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dchat-bench-external-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn relay(dir: &Path, rate_per_sec: Option<u32>) -> RunningRelay {
    let mut cfg = Config::for_test(dir.join("data"));
    if let Some(rate) = rate_per_sec {
        cfg.rate_per_sec = rate;
        cfg.rate_burst = rate;
    }
    Relay::bind(cfg).await.unwrap().spawn()
}

/// A short run: 1 s measured at 100 msgs/s between `clients` clients.
fn args(url: &str, clients: &str, extra: &[&str]) -> ExternalArgs {
    let mut all = vec![
        "dchat-loadgen",
        "--url",
        url,
        "--clients",
        clients,
        "--rate",
        "100",
        "--warmup",
        "200ms",
        "--duration",
        "1s",
        "--drain",
        "10s",
        "--parallel",
        "4",
    ];
    all.extend_from_slice(extra);
    Cli::try_parse_from(all).unwrap().args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_relay_passes_and_every_message_is_counted() {
    let dir = scratch("pass");
    let relay = relay(&dir, None).await;
    let report_path = dir.join("report.json");
    let summary_path = dir.join("summary.md");
    let mut a = args(
        &relay.ws_url(),
        "8",
        // No message may be lost; the latency bound is far above any machine's.
        &["--max-error-rate", "0", "--max-p99-ms", "60000"],
    );
    a.report = Some(report_path.clone());
    a.summary = Some(summary_path.clone());
    external::main(a).await.unwrap();

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(json["passed"], true, "{json}");
    let sent = json["sent"].as_u64().unwrap();
    assert!(sent > 20, "{json}");
    assert_eq!(json["delivered"].as_u64(), Some(sent), "{json}");
    assert_eq!(json["error_frames"], 0, "{json}");
    assert_eq!(json["clients"], 8);
    assert!(json["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{json}");
    let summary = std::fs::read_to_string(&summary_path).unwrap();
    assert!(summary.contains(": passed"), "{summary}");
    relay.drain().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sends_breach_the_error_rate() {
    let dir = scratch("errors");
    // 5 requests a second per connection; each of 4 clients offers about 25.
    let relay = relay(&dir, Some(5)).await;
    let mut a = args(&relay.ws_url(), "4", &["--max-error-rate", "0.05"]);
    // Refused messages never arrive: do not wait long for them.
    a.drain = Duration::from_secs(1);
    let report = external::run(&a).await.unwrap();
    let breaches = report.breaches();
    assert!(
        matches!(breaches.as_slice(), [Breach::ErrorRate { measured, .. }] if *measured > 0.05),
        "{report:?}: {breaches:?}"
    );
    assert!(
        report.error_frames > 0 || report.undelivered() > 0,
        "{report:?}"
    );
    let err = external::main(a).await.unwrap_err().to_string();
    assert!(
        err.contains("is above --max-error-rate 0.05") && err.contains("not delivered"),
        "{err}"
    );
    relay.drain().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dchat-loadgen"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_fails_naming_the_breached_threshold_and_still_writes_its_report() {
    let dir = scratch("cli");
    let relay = relay(&dir, None).await;
    let report_path = dir.join("report.json");
    let url = relay.ws_url();
    let report_arg = report_path.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        loadgen()
            .args([
                "external",
                "--url",
                &url,
                "--clients",
                "4",
                "--rate",
                "50",
                "--warmup",
                "200ms",
                "--duration",
                "1s",
                // No delivery takes less than a nanosecond.
                "--max-p99-ms",
                "0.000001",
                "--report",
                &report_arg,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("p99 delivery latency")
            && stderr.contains("is above --max-p99-ms 0.000001"),
        "{stderr}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(json["passed"], false);
    assert!(json["breaches"][0]
        .as_str()
        .unwrap()
        .starts_with("p99 delivery latency"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAILED: p99 delivery latency"), "{stdout}");
    relay.drain().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let out = loadgen()
        .args(["external", "--url", "http://relay/v1/ws"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--url"));
    let out = loadgen()
        .args([
            "external",
            "--url",
            "ws://127.0.0.1:1/v1/ws",
            "--max-error-rate",
            "2",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-error-rate"));
}

/// `wss://` is spoken with TLS: against a plain WebSocket port the TLS handshake fails
/// (a build without TLS would refuse the scheme instead), and the run fails naming the
/// client that could not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_urls_use_tls() {
    let dir = scratch("tls");
    let relay = relay(&dir, None).await;
    let url = format!("wss://{}/v1/ws", relay.addr);
    let a = args(&url, "2", &[]);
    let err = tokio::time::timeout(Duration::from_secs(60), external::run(&a))
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(err.contains("connecting client"), "{err}");
    assert!(!err.contains("TLS support not compiled in"), "{err}");
    relay.drain().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

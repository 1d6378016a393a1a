//! `dchat-loadgen external`: a short load test of a relay someone else runs (staging,
//! after a deploy), judged against thresholds.
//!
//! It connects `--clients` load clients to `--url` (`ws://` or `wss://`; each client
//! makes a fresh Ed25519 identity and signs the relay's challenge, so no account or
//! secret is needed), sends 1:1 messages between them at `--rate` (open-loop Poisson,
//! see [`crate::driver`]) for `--warmup` plus `--duration`, and measures the delivery
//! latency of the messages scheduled in the measured window and how many of them never
//! arrived. The result is written as JSON (`--report`) and Markdown (`--summary`, and on
//! stdout); a breached threshold makes the command fail, naming the threshold and the
//! measured value.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use crate::driver::{run_step, Pattern, Recorder, Rng, Step, StepResult};
use crate::systems::{connect, Target};
use crate::BenchError;

/// Command-line arguments of `dchat-loadgen external`. Invalid values are refused by
/// the parser (exit code 2) with the flag named.
#[derive(Args, Clone, Debug)]
pub struct ExternalArgs {
    /// Client WebSocket URL of the relay, e.g. wss://relay.staging.example/v1/ws.
    #[arg(long, value_parser = parse_url)]
    pub url: String,
    /// Connected load clients (each sends to and receives from the others).
    #[arg(long, default_value = "20", value_parser = clap::value_parser!(u32).range(2..=100_000))]
    pub clients: u32,
    /// Offered messages per second, over all clients. Keep `rate / clients` well below
    /// the relay's per-connection limit (`DCHAT_RATE_PER_SEC`, default 200).
    #[arg(long, default_value = "50", value_parser = parse_rate)]
    pub rate: f64,
    /// Warm-up before measuring (sent, not measured), e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_span)]
    pub warmup: Duration,
    /// Measured window, e.g. 60s or 2m.
    #[arg(long, default_value = "60s", value_parser = parse_span)]
    pub duration: Duration,
    /// How long to wait for the last deliveries after the window; a message not
    /// delivered by then counts as failed.
    #[arg(long, default_value = "10s", value_parser = parse_span)]
    pub drain: Duration,
    /// Payload bytes per message.
    #[arg(long, default_value = "256", value_parser = clap::value_parser!(u32).range(16..=65_536))]
    pub payload: u32,
    /// Concurrent handshakes while connecting.
    #[arg(long, default_value = "16", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub parallel: u32,
    /// Longest time a client holds an acknowledgement back for its next frame.
    #[arg(long, default_value = "200")]
    pub ack_delay_ms: u64,
    /// Fail when the p99 delivery latency (scheduled send to receipt) is above this many
    /// milliseconds.
    #[arg(long, default_value = "500", value_parser = parse_positive_ms)]
    pub max_p99_ms: f64,
    /// Fail when the error rate is above this fraction (0 to 1): the larger of the
    /// messages not delivered and the error frames received, per message sent.
    #[arg(long, default_value = "0.01", value_parser = parse_fraction)]
    pub max_error_rate: f64,
    /// Write the result as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write the result as Markdown here (it is also printed on stdout).
    #[arg(long)]
    pub summary: Option<PathBuf>,
}

fn parse_url(s: &str) -> Result<String, String> {
    if !(s.starts_with("ws://") || s.starts_with("wss://")) || s.len() <= "wss://".len() {
        return Err(format!(
            "{s:?} is not a WebSocket URL (ws://host[:port]/v1/ws or wss://host/v1/ws)"
        ));
    }
    Ok(s.to_string())
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1_000_000.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a rate in messages per second (0 < rate ≤ 1000000)"
        )),
    }
}

fn parse_span(s: &str) -> Result<Duration, String> {
    let d = dchat_relay::config::parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(24 * 3600) {
        return Err(format!("{s:?} must be more than 0 and at most 24h"));
    }
    Ok(d)
}

fn parse_positive_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of milliseconds")),
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a fraction between 0 and 1 (0.01 = 1%)"
        )),
    }
}

/// What one external load test measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The relay URL.
    pub url: String,
    /// Connected clients.
    pub clients: u32,
    /// Offered messages per second.
    pub rate: f64,
    /// Measured window.
    pub duration: Duration,
    /// Messages scheduled in the window.
    pub sent: u64,
    /// Messages sent in the whole run, warm-up included (what error frames are counted
    /// against).
    pub dispatched: u64,
    /// Of those, delivered before the drain ended.
    pub delivered: u64,
    /// Error frames (and failed writes) seen by the clients during the whole run,
    /// warm-up included.
    pub error_frames: u64,
    /// Deliveries per second in the window.
    pub delivered_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    /// p99 latency (ms).
    pub p99_ms: f64,
    /// p99.9 latency (ms).
    pub p999_ms: f64,
    /// Largest latency (ms).
    pub max_ms: f64,
    /// The p99 threshold (ms).
    pub max_p99_ms: f64,
    /// The error-rate threshold (fraction).
    pub max_error_rate: f64,
}

/// A threshold the run did not meet.
#[derive(Clone, Debug, PartialEq)]
pub enum Breach {
    /// p99 latency above `--max-p99-ms`.
    P99 {
        /// Measured p99 (ms).
        measured_ms: f64,
        /// Threshold (ms).
        max_ms: f64,
    },
    /// Error rate above `--max-error-rate`.
    ErrorRate {
        /// Measured rate.
        measured: f64,
        /// Threshold.
        max: f64,
        /// Messages not delivered.
        undelivered: u64,
        /// Error frames.
        error_frames: u64,
        /// Messages sent in the window.
        sent: u64,
        /// Messages sent in the whole run.
        dispatched: u64,
    },
    /// Nothing was sent in the window, so nothing was measured.
    NothingSent,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Breach::P99 {
                measured_ms,
                max_ms,
            } => write!(
                f,
                "p99 delivery latency {measured_ms:.1} ms is above --max-p99-ms {max_ms}"
            ),
            Breach::ErrorRate {
                measured,
                max,
                undelivered,
                error_frames,
                sent,
                dispatched,
            } => write!(
                f,
                "error rate {measured:.4} ({undelivered} of {sent} measured messages not \
                 delivered; {error_frames} error frames for {dispatched} messages sent) is \
                 above --max-error-rate {max}"
            ),
            Breach::NothingSent => write!(f, "no message was sent in the measured window"),
        }
    }
}

impl Report {
    /// Builds the report of one measured step.
    pub fn new(
        args: &ExternalArgs,
        step: &StepResult,
        dispatched: u64,
        error_frames: u64,
    ) -> Report {
        Report {
            url: args.url.clone(),
            clients: args.clients,
            rate: args.rate,
            duration: args.duration,
            sent: step.sent,
            dispatched: dispatched.max(step.sent),
            delivered: step.received.min(step.expected),
            error_frames,
            delivered_per_sec: step.delivered_per_sec,
            p50_ms: step.p50_us / 1000.0,
            p99_ms: step.p99_us / 1000.0,
            p999_ms: step.p999_us / 1000.0,
            max_ms: step.max_us / 1000.0,
            max_p99_ms: args.max_p99_ms,
            max_error_rate: args.max_error_rate,
        }
    }

    /// Messages sent in the window that were not delivered in time.
    pub fn undelivered(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    /// The larger of two fractions: measured messages not delivered, and error frames
    /// per message sent in the whole run (at most 1). An error frame answering a send is
    /// also an undelivered message, so the two are not added; error frames that lose
    /// nothing (a refused acknowledgement) still count.
    pub fn error_rate(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        let undelivered = self.undelivered() as f64 / self.sent as f64;
        let errors = self.error_frames as f64 / self.dispatched.max(1) as f64;
        undelivered.max(errors).min(1.0)
    }

    /// The thresholds this run breached (empty: it passed).
    pub fn breaches(&self) -> Vec<Breach> {
        if self.sent == 0 {
            return vec![Breach::NothingSent];
        }
        let mut out = Vec::new();
        if self.p99_ms > self.max_p99_ms {
            out.push(Breach::P99 {
                measured_ms: self.p99_ms,
                max_ms: self.max_p99_ms,
            });
        }
        let rate = self.error_rate();
        if rate > self.max_error_rate {
            out.push(Breach::ErrorRate {
                measured: rate,
                max: self.max_error_rate,
                undelivered: self.undelivered(),
                error_frames: self.error_frames,
                sent: self.sent,
                dispatched: self.dispatched,
            });
        }
        out
    }

    /// The report as JSON (what `--report` writes).
    pub fn to_json(&self) -> serde_json::Value {
        let breaches: Vec<String> = self.breaches().iter().map(ToString::to_string).collect();
        json!({
            "url": self.url,
            "clients": self.clients,
            "offered_per_sec": self.rate,
            "duration_secs": self.duration.as_secs_f64(),
            "sent": self.sent,
            "sent_with_warmup": self.dispatched,
            "delivered": self.delivered,
            "undelivered": self.undelivered(),
            "error_frames": self.error_frames,
            "error_rate": self.error_rate(),
            "delivered_per_sec": self.delivered_per_sec,
            "latency_ms": {
                "p50": self.p50_ms,
                "p99": self.p99_ms,
                "p999": self.p999_ms,
                "max": self.max_ms,
            },
            "thresholds": {
                "max_p99_ms": self.max_p99_ms,
                "max_error_rate": self.max_error_rate,
            },
            "passed": breaches.is_empty(),
            "breaches": breaches,
        })
    }

    /// The report as a Markdown table (what `--summary` writes and stdout shows).
    pub fn to_markdown(&self) -> String {
        let breaches = self.breaches();
        let verdict = if breaches.is_empty() {
            "passed".to_string()
        } else {
            format!(
                "FAILED: {}",
                breaches
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        format!(
            "### Load test of {url}: {verdict}\n\n\
             {clients} clients, {rate} msgs/s offered for {secs} s\n\n\
             | measure | value | threshold |\n\
             |---|--:|--:|\n\
             | p50 latency ms | {p50:.1} | |\n\
             | p99 latency ms | {p99:.1} | ≤ {max_p99} |\n\
             | p99.9 latency ms | {p999:.1} | |\n\
             | max latency ms | {max:.1} | |\n\
             | sent | {sent} | |\n\
             | delivered | {delivered} | |\n\
             | error frames (whole run, {dispatched} sent) | {errors} | |\n\
             | error rate | {rate_err:.4} | ≤ {max_err} |\n\
             | delivered/s | {dps:.0} | |\n",
            url = self.url,
            clients = self.clients,
            rate = self.rate,
            secs = self.duration.as_secs_f64(),
            p50 = self.p50_ms,
            p99 = self.p99_ms,
            max_p99 = self.max_p99_ms,
            p999 = self.p999_ms,
            max = self.max_ms,
            sent = self.sent,
            delivered = self.delivered,
            errors = self.error_frames,
            dispatched = self.dispatched,
            rate_err = self.error_rate(),
            max_err = self.max_error_rate,
            dps = self.delivered_per_sec,
        )
    }
}

/// Installs the TLS crypto provider `wss://` connections use (ring, as the rest of the
/// workspace). Safe to call more than once.
fn install_crypto_provider() {
    // Err means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Connects the clients, runs the measured step and returns its report. Failing to
/// connect any client is an error (the relay is not usable); breached thresholds are
/// in [`Report::breaches`].
pub async fn run(args: &ExternalArgs) -> Result<Report, BenchError> {
    install_crypto_provider();
    let target = Target::Relay(args.url.clone());
    let rec = Recorder::new();
    let clients = args.clients as usize;
    let eps = connect(
        &target,
        clients,
        args.parallel as usize,
        0,
        Duration::from_millis(args.ack_delay_ms),
        &rec,
    )
    .await?;
    let (mut seq, mut rng) = (0u64, Rng::new(0x10ad));
    let step = Step {
        rate: args.rate,
        warmup: args.warmup,
        measure: args.duration,
        payload: args.payload as usize,
        drain: args.drain,
    };
    let result = run_step(&eps, &rec, Pattern::Direct, step, &mut seq, &mut rng, None).await;
    // `seq` numbers every message dispatched, warm-up included.
    Ok(Report::new(
        args,
        &result,
        seq,
        rec.errors.load(Ordering::Relaxed),
    ))
}

/// Writes the report files that were asked for.
pub fn write_reports(args: &ExternalArgs, report: &Report) -> Result<(), BenchError> {
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|source| BenchError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    };
    if let Some(path) = &args.report {
        let text =
            serde_json::to_string_pretty(&report.to_json()).map_err(|e| BenchError::Run {
                what: "encoding the report".into(),
                reason: e.to_string(),
            })?;
        write(path, text + "\n")?;
    }
    if let Some(path) = &args.summary {
        write(path, report.to_markdown())?;
    }
    Ok(())
}

/// The whole command: run, print and write the report, then fail when a threshold was
/// breached (the reports are written first, so a failed run still has them).
pub async fn main(args: ExternalArgs) -> Result<(), BenchError> {
    eprintln!(
        "load test of {}: {} clients, {} msgs/s, warm-up {:?}, measuring {:?}",
        args.url, args.clients, args.rate, args.warmup, args.duration
    );
    let report = run(&args).await?;
    print!("{}", report.to_markdown());
    write_reports(&args, &report)?;
    let breaches = report.breaches();
    if breaches.is_empty() {
        return Ok(());
    }
    Err(BenchError::Run {
        what: "load test thresholds".into(),
        reason: breaches
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExternalArgs,
    }

    fn args(extra: &[&str]) -> Result<ExternalArgs, clap::Error> {
        let mut all = vec!["x", "--url", "ws://127.0.0.1:7070/v1/ws"];
        all.extend_from_slice(extra);
        Cli::try_parse_from(all).map(|c| c.args)
    }

    fn report(sent: u64, delivered: u64, error_frames: u64, p99_ms: f64) -> Report {
        Report {
            url: "ws://r/v1/ws".into(),
            clients: 10,
            rate: 100.0,
            duration: Duration::from_secs(60),
            sent,
            dispatched: sent,
            delivered,
            error_frames,
            delivered_per_sec: delivered as f64 / 60.0,
            p50_ms: 1.0,
            p99_ms,
            p999_ms: p99_ms,
            max_ms: p99_ms,
            max_p99_ms: 500.0,
            max_error_rate: 0.01,
        }
    }

    #[test]
    fn defaults_and_bad_values() {
        let a = args(&[]).unwrap();
        assert_eq!(a.clients, 20);
        assert_eq!(a.duration, Duration::from_secs(60));
        assert_eq!(a.max_p99_ms, 500.0);
        let a = args(&["--duration", "2m", "--max-error-rate", "0.05"]).unwrap();
        assert_eq!(a.duration, Duration::from_secs(120));
        assert_eq!(a.max_error_rate, 0.05);
        for bad in [
            &["--url", "http://relay/v1/ws"][..],
            &["--url", "wss://"],
            &["--clients", "1"],
            &["--rate", "0"],
            &["--rate", "NaN"],
            &["--duration", "0s"],
            &["--duration", "soon"],
            &["--max-error-rate", "5"],
            &["--max-p99-ms", "0"],
        ] {
            let err = args(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
            assert!(err.to_string().contains(bad[0]), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_clean_fast_run_passes() {
        let r = report(1000, 1000, 0, 12.0);
        assert_eq!(r.error_rate(), 0.0);
        assert!(r.breaches().is_empty());
        assert_eq!(r.to_json()["passed"], true);
        assert!(r.to_markdown().contains(": passed"));
    }

    #[test]
    fn each_threshold_is_named_with_its_measured_value() {
        let slow = report(1000, 1000, 0, 812.34);
        assert_eq!(
            slow.breaches()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["p99 delivery latency 812.3 ms is above --max-p99-ms 500"]
        );
        let lossy = report(1000, 970, 30, 12.0);
        let msg = lossy.breaches()[0].to_string();
        assert_eq!(
            msg,
            "error rate 0.0300 (30 of 1000 measured messages not delivered; 30 error frames for 1000 messages sent) is above --max-error-rate 0.01"
        );
        let json = lossy.to_json();
        assert_eq!(json["passed"], false);
        assert_eq!(json["undelivered"], 30);
        assert_eq!(json["breaches"][0], msg);
        assert!(lossy.to_markdown().contains("FAILED: error rate 0.0300"));
    }

    #[test]
    fn error_frames_without_loss_count_and_are_not_added_to_losses() {
        // Refused acknowledgements lose nothing but still mean something is wrong.
        assert_eq!(report(100, 100, 5, 1.0).error_rate(), 0.05);
        // A refused send is one undelivered message and one error frame: counted once.
        assert_eq!(report(100, 95, 5, 1.0).error_rate(), 0.05);
        // At the threshold is not above it.
        assert!(report(100, 99, 1, 1.0).breaches().is_empty());
    }

    #[test]
    fn nothing_sent_fails() {
        let r = report(0, 0, 0, 0.0);
        assert_eq!(r.breaches(), [Breach::NothingSent]);
        assert_eq!(r.error_rate(), 1.0);
    }

    #[test]
    fn error_frames_count_against_every_message_sent_and_the_rate_stays_a_fraction() {
        // Errors during the warm-up too: 10 frames for 200 messages sent in all.
        let mut r = report(100, 100, 10, 1.0);
        r.dispatched = 200;
        assert_eq!(r.error_rate(), 0.05);
        // More error frames than messages (every ack refused as well) is still 100%.
        let mut r = report(100, 0, 500, 1.0);
        r.dispatched = 200;
        assert_eq!(r.error_rate(), 1.0);
    }
}

//! Soak (issue 23): the relay under steady load for a long time, with client churn, and
//! a check that nothing was lost or duplicated and that its memory and file descriptors
//! stay flat.
//!
//! - **Load.** `clients` authenticated clients; an open-loop Poisson dispatcher (as in
//!   [`crate::driver`]) sends `rate` direct messages per second from a random connected
//!   client to a random other client, online or not.
//! - **Churn.** Every second `reconnect_per_sec × clients` random online clients close
//!   their connection cleanly and reconnect at once with the same key.
//! - **Offline recipients.** `offline_fraction × clients` clients are offline at any
//!   time, a rotating set: each stays away for `offline_for` (the first wave for a random
//!   part of it, so that returns are spread out), then reconnects and receives what was
//!   stored for it meanwhile; another online client takes its place.
//! - **Clients behave as the protocol asks.** Each delivery is recorded once and
//!   acknowledged (quietly, deferred up to `ack_delay` or 64 deliveries). A client that
//!   goes away sends what is queued for it, waits (up to 5 s) for the answers, sends its
//!   deferred acks, closes the WebSocket and reads to its end: answers still count,
//!   deliveries read after its close are left to the relay (which stores them again,
//!   unacknowledged). Every `send` left unanswered by a connection is sent again, with
//!   the same id, on the next one; `overloaded` and `storage_unavailable` refusals are
//!   retried too.
//! - **End.** After `duration` the dispatcher stops; every client (offline ones come
//!   back) waits until all its sends are answered, then all drain: acknowledge, `fetch`,
//!   until a round delivers nothing.
//! - **Accounting** ([`Ledger`]). Every message id is `s3-<sender>-<seq>` (as in
//!   [`crate::s3`]); its payload carries the scheduled time, the sequence and the
//!   recipient index. A message is **accepted** when its `sent` answer is `delivered`,
//!   `stored` or `duplicate` (a resend of an accepted id). After the final drain, an
//!   accepted message never received is **lost**; a copy received after the client had
//!   sent its ack (the relay must have applied it: a connection's frames are handled in
//!   order) is **duplicated**; a copy received again whose first copy's ack never left
//!   (the connection broke) is a **redelivery**, which at-least-once allows.
//! - **Relay process.** Every `interval` the relay's RSS (`/proc/PID/status` `VmRSS`, and
//!   its peak over the interval, read every second), its open file descriptors
//!   (`/proc/PID/fd`), its CPU share and the machine's load average are sampled into a
//!   [`Row`] and handed to the caller as the run goes; [`verdicts`] judges them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dchat_relay::client::{generate_key, public_key};
use dchat_relay::protocol::frame::MAX_FETCH_LIMIT;
use dchat_relay::protocol::{
    decode_server_frame, AckRef, Base64Bytes, ClientFrame, Envelope, ErrorCode, KeyHex, Kind,
    SendStatus, ServerFrame, MAX_ACK_BATCH,
};
use ed25519_dalek::SigningKey;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::driver::{wait_until, Recorder, Rng, HEADER};
use crate::procs::{self, ServerProc};
use crate::s3::{self, message_id, parse_id, Backend, PgTarget, RelayLaunch};
use crate::BenchError;

/// Smallest payload: the generator's header plus the recipient index.
pub const MIN_PAYLOAD: usize = HEADER + 4;
/// Deferred acknowledgements after which a client sends them without waiting.
const MAX_DEFERRED_ACKS: usize = 64;
/// Most queued sends a client writes before one flush.
const BURST: usize = 64;
/// Pause before reconnecting after a failed connect or a lost connection.
const RECONNECT_PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for a handshake (connect, challenge, auth, welcome).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the relay to end a connection the client closed.
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Longest wait for the answers to a client's sends before it goes away.
const LEAVE_WAIT: Duration = Duration::from_secs(5);
/// Wait before resending a send the relay refused as `overloaded` or `storage_unavailable`.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Resends of one refused send before it counts as refused for good.
const MAX_ATTEMPTS: u32 = 50;
/// How often the controller reconnects, rotates offline clients and checks the relay.
const TICK: Duration = Duration::from_millis(100);
/// How often the relay's RSS is read for the interval's peak (and its liveness checked).
const RSS_EVERY: Duration = Duration::from_secs(1);
/// Relay file descriptors beyond its open connections that may come and go after the
/// warm-up without counting as growth (store files, the metrics listener's sockets).
pub const FD_SLACK: i64 = 32;
/// Largest RSS growth after the warm-up that counts as flat.
pub const RSS_GROWTH_LIMIT: f64 = 0.10;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sizes and rates of one soak run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Clients (each an authenticated key).
    pub clients: usize,
    /// Offered direct messages per second (Poisson).
    pub rate: f64,
    /// How long the load runs.
    pub duration: Duration,
    /// Time between two samples ([`Row`]s).
    pub interval: Duration,
    /// Warm-up: the fd verdict starts from the first sample at or after it; the RSS
    /// verdict compares the peaks after one more window as long with those in it.
    pub warmup: Duration,
    /// Fraction of the clients that reconnect every second.
    pub reconnect_per_sec: f64,
    /// Fraction of the clients offline at any time.
    pub offline_fraction: f64,
    /// How long an offline client stays away.
    pub offline_for: Duration,
    /// Payload bytes per message (at least [`MIN_PAYLOAD`]).
    pub payload: usize,
    /// Longest time a client holds an acknowledgement back.
    pub ack_delay: Duration,
    /// Handshakes in progress at a time.
    pub parallel: usize,
    /// Upper bound of each end phase (answers, then the final drain).
    pub final_timeout: Duration,
    /// Seed of the schedule, the pairs and the churn.
    pub seed: u64,
    /// Fault injection for the loss detector's own test: client 0 acknowledges its
    /// first delivery without recording it, as a client that lost it would.
    pub drop_one_delivery: bool,
}

impl Params {
    /// Checks that the sizes make a run.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |reason: String| BenchError::Run {
            what: "soak parameters".into(),
            reason,
        };
        if self.clients < 2 {
            return Err(bad(format!(
                "--clients {} must be at least 2 (messages go to another client)",
                self.clients
            )));
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(bad(format!("--rate {} must be above 0", self.rate)));
        }
        if self.duration.is_zero() || self.interval.is_zero() {
            return Err(bad("--duration and --interval must be above 0".into()));
        }
        if self.payload < MIN_PAYLOAD {
            return Err(bad(format!(
                "--payload {} must be at least {MIN_PAYLOAD} bytes",
                self.payload
            )));
        }
        if !(0.0..=1.0).contains(&self.reconnect_per_sec) {
            return Err(bad(format!(
                "--reconnect-rate {} must be a fraction between 0 and 1",
                self.reconnect_per_sec
            )));
        }
        if !(0.0..1.0).contains(&self.offline_fraction) {
            return Err(bad(format!(
                "--offline {} must be a fraction from 0 up to (not including) 1",
                self.offline_fraction
            )));
        }
        if self.offline_clients() > 0 && self.offline_for.is_zero() {
            return Err(bad("--offline-secs must be above 0".into()));
        }
        if self.clients - self.offline_clients() < 2 {
            return Err(bad(format!(
                "--offline {} leaves fewer than 2 of {} clients online",
                self.offline_fraction, self.clients
            )));
        }
        if self.parallel == 0 {
            return Err(bad("--parallel must be at least 1".into()));
        }
        Ok(())
    }

    /// Clients offline at any time.
    pub fn offline_clients(&self) -> usize {
        (self.clients as f64 * self.offline_fraction).round() as usize
    }
}

// ---------------------------------------------------------------------------------------
// Accounting (pure).

const WRITTEN: u8 = 1;
const ACCEPTED: u8 = 1 << 1;
const REFUSED: u8 = 1 << 2;
const ACK_SENT: u8 = 1 << 3;
const COPY_SHIFT: u8 = 4;
const COPY_MASK: u8 = 0b11 << COPY_SHIFT;
const RESENT: u8 = 1 << 6;

/// What one received copy of a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipt {
    /// The first copy.
    First,
    /// Another copy, while the acknowledgement of the first had not been sent (the
    /// connection broke first): allowed by at-least-once delivery.
    Redelivered,
    /// Another copy after the acknowledgement had been sent: a duplicate.
    Duplicate {
        /// The message was sent again on a later connection (its answer was lost), so
        /// the relay had to recognise the repeated id.
        resent: bool,
    },
}

/// The fate of every message of a run, one byte per message sequence number.
#[derive(Debug, Default)]
pub struct Ledger {
    state: Vec<u8>,
}

/// What a [`Ledger`] adds up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages sent at least once.
    pub written: u64,
    /// Messages the relay accepted (`delivered`, `stored` or `duplicate`).
    pub accepted: u64,
    /// Messages refused for good (an error other than a retryable one, or too many).
    pub refused: u64,
    /// Messages sent but never answered.
    pub unanswered: u64,
    /// Messages received at least once.
    pub received: u64,
    /// Accepted messages never received.
    pub lost: u64,
    /// Copies beyond the first (redeliveries and duplicates).
    pub extra_copies: u64,
    /// Messages received that the relay had not accepted (refused or unanswered).
    pub received_unaccepted: u64,
}

impl Ledger {
    /// An empty ledger with room for `n` messages.
    pub fn with_capacity(n: usize) -> Ledger {
        Ledger {
            state: Vec::with_capacity(n),
        }
    }

    fn slot(&mut self, seq: u64) -> &mut u8 {
        let i = seq as usize;
        if i >= self.state.len() {
            let len = (i + 1).max(self.state.len() * 2);
            self.state.resize(len, 0);
        }
        &mut self.state[i]
    }

    /// Message `seq` was sent; true the first time.
    pub fn written(&mut self, seq: u64) -> bool {
        let s = self.slot(seq);
        let first = *s & WRITTEN == 0;
        *s |= WRITTEN;
        first
    }

    /// The relay answered message `seq`: accepted it or refused it for good. An
    /// acceptance stands (a later refusal of a resend does not undo it).
    pub fn answered(&mut self, seq: u64, accepted: bool) {
        let s = self.slot(seq);
        if accepted {
            *s = (*s | ACCEPTED) & !REFUSED;
        } else if *s & ACCEPTED == 0 {
            *s |= REFUSED;
        }
    }

    /// Message `seq` was sent again on a new connection, its first answer lost.
    pub fn resent(&mut self, seq: u64) {
        *self.slot(seq) |= RESENT;
    }

    /// The acknowledgement of message `seq` was written to the relay.
    pub fn ack_sent(&mut self, seq: u64) {
        *self.slot(seq) |= ACK_SENT;
    }

    /// A copy of message `seq` arrived.
    pub fn received(&mut self, seq: u64) -> Receipt {
        let s = self.slot(seq);
        let copies = (*s & COPY_MASK) >> COPY_SHIFT;
        let receipt = match copies {
            0 => Receipt::First,
            _ if *s & ACK_SENT != 0 => Receipt::Duplicate {
                resent: *s & RESENT != 0,
            },
            _ => Receipt::Redelivered,
        };
        // Three copies are enough to tell the classes apart; more saturate.
        *s = (*s & !COPY_MASK) | ((copies + 1).min(3) << COPY_SHIFT);
        receipt
    }

    /// Adds up every message.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for &s in &self.state {
            let copies = u64::from((s & COPY_MASK) >> COPY_SHIFT);
            let accepted = s & ACCEPTED != 0;
            if s & WRITTEN != 0 {
                t.written += 1;
                if accepted {
                    t.accepted += 1;
                } else if s & REFUSED != 0 {
                    t.refused += 1;
                } else {
                    t.unanswered += 1;
                }
            }
            if copies > 0 {
                t.received += 1;
                t.extra_copies += copies - 1;
                if !accepted {
                    t.received_unaccepted += 1;
                }
            } else if accepted {
                t.lost += 1;
            }
        }
        t
    }
}

/// The event counters of a run (monotonic).
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    delivered: AtomicU64,
    stored: AtomicU64,
    duplicate_answers: AtomicU64,
    refused: AtomicU64,
    retried: AtomicU64,
    overloaded: AtomicU64,
    resent: AtomicU64,
    received: AtomicU64,
    received_live: AtomicU64,
    received_stored: AtomicU64,
    redelivered: AtomicU64,
    duplicated: AtomicU64,
    duplicated_resent: AtomicU64,
    unexpected: AtomicU64,
    reconnects: AtomicU64,
    lost_connections: AtomicU64,
    connect_failures: AtomicU64,
    ack_errors: AtomicU64,
    other_errors: AtomicU64,
}

/// A snapshot of the event counters (or the difference of two).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// First attempts of `send` written.
    pub sent: u64,
    /// `sent` answers `delivered`.
    pub delivered: u64,
    /// `sent` answers `stored`.
    pub stored: u64,
    /// `sent` answers `duplicate` (resends of accepted ids).
    pub duplicate_answers: u64,
    /// Sends refused for good.
    pub refused: u64,
    /// Refused sends (`overloaded`, `storage_unavailable`) sent again.
    pub retried: u64,
    /// Of those, refused as `overloaded` (the relay's load shedding).
    pub overloaded: u64,
    /// Unanswered sends sent again on a new connection.
    pub resent: u64,
    /// First copies received.
    pub received: u64,
    /// First copies pushed live (`deliver` without `seq`).
    pub received_live: u64,
    /// First copies from storage (`deliver` with `seq`).
    pub received_stored: u64,
    /// Copies again, the first one's ack not sent.
    pub redelivered: u64,
    /// Copies again after the ack was sent.
    pub duplicated: u64,
    /// Of those, copies of messages sent again after a lost answer.
    pub duplicated_resent: u64,
    /// Deliveries that were not ours: unknown id, wrong sender key or recipient.
    pub unexpected: u64,
    /// Clean reconnects (the churn).
    pub reconnects: u64,
    /// Connections that ended without the client closing them.
    pub lost_connections: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// `error` frames about a quiet ack.
    pub ack_errors: u64,
    /// Other `error` frames, undecodable frames, answers to unknown sends.
    pub other_errors: u64,
}

impl Counters {
    fn snap(&self) -> Totals {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            sent: g(&self.sent),
            delivered: g(&self.delivered),
            stored: g(&self.stored),
            duplicate_answers: g(&self.duplicate_answers),
            refused: g(&self.refused),
            retried: g(&self.retried),
            overloaded: g(&self.overloaded),
            resent: g(&self.resent),
            received: g(&self.received),
            received_live: g(&self.received_live),
            received_stored: g(&self.received_stored),
            redelivered: g(&self.redelivered),
            duplicated: g(&self.duplicated),
            duplicated_resent: g(&self.duplicated_resent),
            unexpected: g(&self.unexpected),
            reconnects: g(&self.reconnects),
            lost_connections: g(&self.lost_connections),
            connect_failures: g(&self.connect_failures),
            ack_errors: g(&self.ack_errors),
            other_errors: g(&self.other_errors),
        }
    }
}

impl Totals {
    /// `self − earlier`, field by field.
    pub fn since(&self, earlier: &Totals) -> Totals {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        Totals {
            sent: d(self.sent, earlier.sent),
            delivered: d(self.delivered, earlier.delivered),
            stored: d(self.stored, earlier.stored),
            duplicate_answers: d(self.duplicate_answers, earlier.duplicate_answers),
            refused: d(self.refused, earlier.refused),
            retried: d(self.retried, earlier.retried),
            overloaded: d(self.overloaded, earlier.overloaded),
            resent: d(self.resent, earlier.resent),
            received: d(self.received, earlier.received),
            received_live: d(self.received_live, earlier.received_live),
            received_stored: d(self.received_stored, earlier.received_stored),
            redelivered: d(self.redelivered, earlier.redelivered),
            duplicated: d(self.duplicated, earlier.duplicated),
            duplicated_resent: d(self.duplicated_resent, earlier.duplicated_resent),
            unexpected: d(self.unexpected, earlier.unexpected),
            reconnects: d(self.reconnects, earlier.reconnects),
            lost_connections: d(self.lost_connections, earlier.lost_connections),
            connect_failures: d(self.connect_failures, earlier.connect_failures),
            ack_errors: d(self.ack_errors, earlier.ack_errors),
            other_errors: d(self.other_errors, earlier.other_errors),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Samples and verdicts (pure).

/// One sample of the run, covering the interval before `at`.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// When the sample was due: a whole number of intervals since the load started.
    pub at: Duration,
    /// Messages sent (first attempts) in the interval.
    pub sent: u64,
    /// `sent` answers `delivered` in the interval.
    pub delivered: u64,
    /// `sent` answers `stored` in the interval.
    pub stored: u64,
    /// First copies received in the interval (live and from storage).
    pub received: u64,
    /// p99 latency of live pushes (scheduled send → received), ms; `None` without any.
    pub p99_live_ms: Option<f64>,
    /// The relay's CPU over the interval (one core = 1.0).
    pub relay_cpu: f64,
    /// The relay's resident set at the sample, KiB.
    pub rss_kib: u64,
    /// The highest resident set over the interval (sampled every second), KiB.
    pub rss_max_kib: u64,
    /// The relay's open file descriptors.
    pub fds: u64,
    /// Client connections open at the sample (the generator's count).
    pub connections: i64,
    /// Clean reconnects in the interval.
    pub reconnects: u64,
    /// The machine's 1-minute load average.
    pub load1: f64,
}

impl Row {
    /// The Markdown table header of [`Row::markdown`].
    pub const HEADER: &'static str = "| t | sent | answered delivered | answered stored | received | p99 live ms | relay cpu | relay RSS MiB | RSS max MiB | relay fds | connections | reconnects | load 1m |\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|";

    /// One Markdown table row.
    pub fn markdown(&self) -> String {
        let s = self.at.as_secs();
        let p99 = self
            .p99_live_ms
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "-".into());
        format!(
            "| {}:{:02} | {} | {} | {} | {} | {p99} | {:.0}% | {:.1} | {:.1} | {} | {} | {} | {:.2} |",
            s / 60,
            s % 60,
            self.sent,
            self.delivered,
            self.stored,
            self.received,
            self.relay_cpu * 100.0,
            mib(self.rss_kib),
            mib(self.rss_max_kib),
            self.fds,
            self.connections,
            self.reconnects,
            self.load1
        )
    }
}

/// The relay's memory and file descriptors while no client was connected.
#[derive(Clone, Copy, Debug, Default)]
pub struct Idle {
    /// RSS, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// Everything a soak run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Store name.
    pub store: String,
    /// The warm-up (see [`Params::warmup`]).
    pub warmup: Duration,
    /// Seconds to connect every client.
    pub connect_secs: f64,
    /// The samples, in order.
    pub rows: Vec<Row>,
    /// Event counters over the whole run.
    pub totals: Totals,
    /// Event counters of the end phases only (answers and final drain).
    pub end_phase: Totals,
    /// The ledger after the final drain.
    pub tally: Tally,
    /// Seconds until every send was answered after the load stopped.
    pub answer_secs: f64,
    /// Seconds of the final drain.
    pub drain_secs: f64,
    /// Clients that did not finish the final drain (failed, or the phase timed out).
    pub unfinished_clients: u64,
    /// The relay before any client connected.
    pub idle_before: Idle,
    /// The relay after every client disconnected at the end.
    pub idle_after: Idle,
}

impl Report {
    /// True when an accepted message was lost or duplicated, a foreign delivery
    /// arrived, a send stayed unanswered, or the final drain did not finish.
    pub fn failed(&self) -> bool {
        self.tally.lost > 0
            || self.totals.duplicated > 0
            || self.totals.unexpected > 0
            || self.tally.unanswered > 0
            || self.unfinished_clients > 0
    }

    /// The fd baseline: the first sample at or after the warm-up.
    fn baseline(&self) -> Option<usize> {
        self.rows.iter().position(|r| r.at >= self.warmup)
    }

    /// The RSS verdict's windows: the samples of the first warm-up-long window after
    /// the warm-up (the baseline, so that a cache filling and emptying in cycles is
    /// compared top to top) and every sample after it.
    fn rss_windows(&self) -> (&[Row], &[Row]) {
        let w = self.warmup.max(Duration::from_secs(1));
        let start = self.rows.partition_point(|r| r.at <= self.warmup);
        let end = self.rows.partition_point(|r| r.at <= self.warmup + w);
        (&self.rows[start..end], &self.rows[end..])
    }
}

/// One criterion of the soak and how the run fared.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The criterion.
    pub criterion: &'static str,
    /// Met, not met, or not judged (no sample after the warm-up).
    pub pass: Option<bool>,
    /// The figures behind it.
    pub detail: String,
}

impl Verdict {
    /// `verdict: <criterion>: PASS|FAIL|NOT JUDGED (<detail>)`.
    pub fn line(&self) -> String {
        let v = match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "NOT JUDGED",
        };
        format!("verdict: {}: {v} ({})", self.criterion, self.detail)
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The soak's criteria: nothing lost or duplicated; after the warm-up and one more
/// warm-up-long window (the baseline), the relay's RSS stays within
/// [`RSS_GROWTH_LIMIT`] of its peak in that window; after the warm-up, the file
/// descriptors beyond the open connections stay within [`FD_SLACK`] of their number
/// at the first sample.
pub fn verdicts(r: &Report) -> Vec<Verdict> {
    let t = &r.tally;
    let mut out = vec![
        Verdict {
            criterion: "lost = 0",
            pass: Some(t.lost == 0 && t.unanswered == 0 && r.unfinished_clients == 0),
            detail: format!(
                "{} of {} accepted messages lost; {} sends unanswered; {} clients did not finish the final drain",
                t.lost, t.accepted, t.unanswered, r.unfinished_clients
            ),
        },
        Verdict {
            criterion: "duplicated = 0",
            pass: Some(r.totals.duplicated == 0 && r.totals.unexpected == 0),
            detail: format!(
                "{} copies after their ack was sent ({} of messages sent again after a lost answer), {} foreign deliveries; {} redeliveries of unacknowledged copies (allowed)",
                r.totals.duplicated, r.totals.duplicated_resent, r.totals.unexpected, r.totals.redelivered
            ),
        },
    ];
    let criterion = "RSS growth after warm-up ≤ 10 %";
    let (base_rows, later) = r.rss_windows();
    let peak = |rows: &[Row]| rows.iter().map(|x| x.rss_max_kib.max(x.rss_kib)).max();
    let w = r.warmup.max(Duration::from_secs(1)).as_secs();
    out.push(match (peak(base_rows), peak(later)) {
        (Some(base), Some(max)) if base > 0 => {
            // The trend apart from passing peaks: the last window as long as the baseline's.
            let end = later.last().map(|x| x.at).unwrap_or_default();
            let tail = later.partition_point(|x| x.at + Duration::from_secs(w) <= end);
            let last = peak(&later[tail..]).unwrap_or(max);
            let pct = |v: u64| (v as f64 / base as f64 - 1.0) * 100.0;
            Verdict {
                criterion,
                pass: Some(max as f64 <= base as f64 * (1.0 + RSS_GROWTH_LIMIT)),
                detail: format!(
                    "{:+.1} %: at most {:.1} MiB from {} to {} s, at most {:.1} MiB after; in the last {w} s at most {:.1} MiB ({:+.1} %)",
                    pct(max),
                    mib(base),
                    r.warmup.as_secs(),
                    r.warmup.as_secs() + w,
                    mib(max),
                    mib(last),
                    pct(last)
                ),
            }
        }
        _ => Verdict {
            criterion,
            pass: None,
            detail: format!(
                "needs samples from {} to {} s and after",
                r.warmup.as_secs(),
                r.warmup.as_secs() + w
            ),
        },
    });
    let Some(b) = r.baseline() else {
        out.push(Verdict {
            criterion: "fds flat",
            pass: None,
            detail: format!(
                "no sample at or after the warm-up of {} s",
                r.warmup.as_secs()
            ),
        });
        return out;
    };
    let after = &r.rows[b..];
    let base = &r.rows[b];
    // A connection is one descriptor; what the relay holds beyond them must not grow.
    let other = |x: &Row| x.fds as i64 - x.connections;
    let base_other = other(base);
    let max_other = after.iter().map(other).max().unwrap_or(base_other);
    let (lo, hi) = (
        after.iter().map(|x| x.fds).min().unwrap_or(0),
        after.iter().map(|x| x.fds).max().unwrap_or(0),
    );
    out.push(Verdict {
        criterion: "fds flat",
        pass: Some(max_other - base_other <= FD_SLACK),
        detail: format!(
            "beyond the open connections {base_other} at {} s, at most {max_other} after (slack {FD_SLACK}); fds {lo}–{hi}; idle {} before the run, {} after",
            base.at.as_secs(),
            r.idle_before.fds,
            r.idle_after.fds
        ),
    });
    out
}

// ---------------------------------------------------------------------------------------
// The run.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Connecting = 0,
    Online = 1,
    Closing = 2,
    Offline = 3,
    Done = 4,
    Failed = 5,
}

impl Status {
    fn of(v: u8) -> Status {
        match v {
            1 => Status::Online,
            2 => Status::Closing,
            3 => Status::Offline,
            4 => Status::Done,
            5 => Status::Failed,
            _ => Status::Connecting,
        }
    }
}

/// What the clients are doing, set by the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Load and churn.
    Load,
    /// The load stopped: come back, send what is queued, wait for every answer.
    Answer,
    /// Every send is answered: drain the inbox, then close.
    Drain,
}

/// A message the dispatcher hands to its sender.
#[derive(Clone, Copy, Debug)]
struct Job {
    seq: u64,
    to: u32,
    sched: u64,
}

/// The controller's orders to a client.
#[derive(Clone, Copy, Debug)]
enum Ctl {
    Reconnect,
    Offline(Duration),
}

/// What every client task, the dispatcher and the controller share.
struct Shared {
    url: String,
    keys: Vec<KeyHex>,
    rec: Arc<Recorder>,
    payload: usize,
    ack_delay: Duration,
    ledger: Mutex<Ledger>,
    counters: Counters,
    live: Mutex<Histogram<u64>>,
    status: Vec<AtomicU8>,
    /// Ordered offline (and not back yet).
    away: Vec<AtomicBool>,
    away_count: AtomicUsize,
    connections: AtomicI64,
    handshakes: Semaphore,
    answered: AtomicUsize,
    finished: AtomicUsize,
    give_up: Instant,
    stop: AtomicBool,
}

impl Shared {
    fn status(&self, i: usize) -> Status {
        Status::of(self.status[i].load(Ordering::Relaxed))
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, c: impl Fn(&Counters) -> &AtomicU64) {
        c(&self.counters).fetch_add(1, Ordering::Relaxed);
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 120 s at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 120_000_000_000, 3)
        .unwrap_or_else(|e| panic!("constant histogram bounds rejected: {e}"))
}

/// A send not answered yet.
#[derive(Clone, Copy, Debug)]
struct Pending {
    to: u32,
    sched: u64,
    attempts: u32,
}

/// How a connection ended.
enum End {
    Reconnect,
    Offline(Duration),
    Lost,
    Done,
}

/// What a frame read from the relay meant to the session loop.
enum Event {
    Nothing,
    Delivered,
    Retry,
    Fetched { count: u32, more: bool },
}

/// One load client: its connections one after another, its queue of messages to send,
/// its unanswered sends and its deferred acknowledgements.
struct ClientTask {
    i: usize,
    key: SigningKey,
    sh: Arc<Shared>,
    jobs: mpsc::UnboundedReceiver<Job>,
    jobs_done: bool,
    ctl: mpsc::UnboundedReceiver<Ctl>,
    ctl_done: bool,
    phase: watch::Receiver<Phase>,
    phase_done: bool,
    inflight: HashMap<u64, Pending>,
    retry: VecDeque<(u64, Pending)>,
    acks: Vec<AckRef>,
    ack_seqs: Vec<u64>,
    answered: bool,
    drop_one: bool,
}

impl ClientTask {
    fn set(&self, s: Status) {
        self.sh.status[self.i].store(s as u8, Ordering::Relaxed);
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    async fn run(mut self) {
        let mut offline = None;
        loop {
            if let Some(d) = offline.take() {
                self.set(Status::Offline);
                self.stay_offline(d).await;
                self.sh.away[self.i].store(false, Ordering::Relaxed);
                self.sh.away_count.fetch_sub(1, Ordering::Relaxed);
            }
            self.set(Status::Connecting);
            let Some(mut ws) = self.connect().await else {
                self.set(Status::Failed);
                self.sh.finished.fetch_add(1, Ordering::Relaxed);
                return;
            };
            self.sh.connections.fetch_add(1, Ordering::Relaxed);
            self.set(Status::Online);
            let end = self.session(&mut ws).await;
            drop(ws);
            self.sh.connections.fetch_sub(1, Ordering::Relaxed);
            match end {
                End::Reconnect => self.sh.count(|c| &c.reconnects),
                End::Offline(d) => offline = Some(d),
                End::Lost => {
                    self.sh.count(|c| &c.lost_connections);
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
                End::Done => {
                    self.set(Status::Done);
                    self.sh.finished.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Away for `d`, or until the load ends.
    async fn stay_offline(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        while self.phase() == Phase::Load {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                r = self.phase.changed(), if !self.phase_done => {
                    if r.is_err() {
                        self.phase_done = true;
                    }
                }
                c = self.ctl.recv(), if !self.ctl_done => {
                    if c.is_none() {
                        self.ctl_done = true;
                    }
                }
            }
        }
    }

    /// Connects and authenticates, retrying until the run gives up.
    async fn connect(&mut self) -> Option<Ws> {
        loop {
            let permit = self.sh.handshakes.acquire().await.ok()?;
            let r = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                s3::connect_sender(&self.sh.url, &self.key),
            )
            .await;
            drop(permit);
            if let Ok(Ok(ws)) = r {
                return Some(ws);
            }
            self.sh.count(|c| &c.connect_failures);
            if Instant::now() >= self.sh.give_up || self.sh.stop.load(Ordering::Relaxed) {
                return None;
            }
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }

    /// One connection: sends, answers, deliveries and acks until the controller asks
    /// for a reconnect or an absence, the connection breaks, or the final drain is done.
    async fn session(&mut self, ws: &mut Ws) -> End {
        if !self.retry.is_empty() {
            {
                let mut l = self.sh.ledger();
                for (seq, _) in self.retry.iter().filter(|(_, p)| p.attempts == 0) {
                    l.resent(*seq);
                    self.sh.count(|c| &c.resent);
                }
            }
            if self.resend(ws).await.is_err() {
                return self.lost();
            }
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
        let ack_timer = tokio::time::sleep_until(far);
        let retry_timer = tokio::time::sleep_until(far);
        let leave_timer = tokio::time::sleep_until(far);
        tokio::pin!(ack_timer, retry_timer, leave_timer);
        let (mut ack_armed, mut retry_armed) = (false, false);
        // The final drain: deliveries seen since the last `fetch` was sent.
        let mut fetching: Option<u64> = None;
        // Going away (ordered): how the connection will end, once every send is answered.
        let mut leaving: Option<End> = None;
        let mut leave_now = false;
        loop {
            if leaving.is_some()
                && (leave_now || (self.inflight.is_empty() && self.retry.is_empty()))
            {
                if let Some(end) = leaving.take() {
                    return self.close(ws, end).await;
                }
            }
            let phase = self.phase();
            if phase >= Phase::Answer
                && !self.answered
                && self.jobs_done
                && self.inflight.is_empty()
                && self.retry.is_empty()
            {
                self.answered = true;
                self.sh.answered.fetch_add(1, Ordering::Relaxed);
            }
            if phase == Phase::Drain && self.answered && fetching.is_none() {
                let fetch = ClientFrame::Fetch {
                    limit: Some(MAX_FETCH_LIMIT),
                };
                if self.write(ws, &[], Some(&fetch)).await.is_err() {
                    return self.lost();
                }
                ack_armed = false;
                fetching = Some(0);
            }
            tokio::select! {
                biased;
                c = self.ctl.recv(), if !self.ctl_done && leaving.is_none() => {
                    let end = match c {
                        Some(Ctl::Reconnect) => End::Reconnect,
                        Some(Ctl::Offline(d)) => End::Offline(d),
                        None => {
                            self.ctl_done = true;
                            continue;
                        }
                    };
                    // As an app going to the background would: send what is queued, then
                    // wait for the answers before closing, so that nothing needs a resend
                    // (the relay recognises a resend of a live-pushed id only for seconds).
                    self.set(Status::Closing);
                    let seqs = self.take_jobs(None, usize::MAX);
                    if self.write(ws, &seqs, None).await.is_err() {
                        return self.lost();
                    }
                    ack_armed = false;
                    leave_timer.as_mut().reset(tokio::time::Instant::now() + LEAVE_WAIT);
                    leaving = Some(end);
                }
                () = &mut leave_timer, if leaving.is_some() => leave_now = true,
                r = self.phase.changed(), if !self.phase_done => {
                    if r.is_err() {
                        self.phase_done = true;
                    }
                }
                m = ws.next() => {
                    let text = match m {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return self.lost(),
                        Some(Ok(_)) => continue,
                    };
                    match self.on_frame(text.as_str(), true) {
                        Event::Nothing => {}
                        Event::Delivered => {
                            if let Some(n) = fetching.as_mut() {
                                *n += 1;
                            }
                            if self.acks.len() >= MAX_DEFERRED_ACKS {
                                if self.write(ws, &[], None).await.is_err() {
                                    return self.lost();
                                }
                                ack_armed = false;
                            } else if !ack_armed {
                                ack_timer.as_mut().reset(tokio::time::Instant::now() + self.sh.ack_delay);
                                ack_armed = true;
                            }
                        }
                        Event::Retry => {
                            if !retry_armed {
                                retry_timer.as_mut().reset(tokio::time::Instant::now() + RETRY_PAUSE);
                                retry_armed = true;
                            }
                        }
                        Event::Fetched { count, more } => {
                            if fetching == Some(0) && count == 0 && !more {
                                return self.close(ws, End::Done).await;
                            }
                            // Acknowledge what came, then ask again.
                            fetching = None;
                        }
                    }
                }
                j = self.jobs.recv(), if !self.jobs_done && leaving.is_none() => match j {
                    Some(first) => {
                        let seqs = self.take_jobs(Some(first), BURST);
                        if self.write(ws, &seqs, None).await.is_err() {
                            return self.lost();
                        }
                        ack_armed = false;
                    }
                    None => self.jobs_done = true,
                },
                () = &mut ack_timer, if ack_armed => {
                    ack_armed = false;
                    if self.write(ws, &[], None).await.is_err() {
                        return self.lost();
                    }
                }
                () = &mut retry_timer, if retry_armed => {
                    retry_armed = false;
                    if self.resend(ws).await.is_err() {
                        return self.lost();
                    }
                }
            }
        }
    }

    /// Writes the deferred acks, the sends `seqs` (from `inflight`) and `extra`, then
    /// flushes once; the acks count as sent once the flush succeeded.
    async fn write(
        &mut self,
        ws: &mut Ws,
        seqs: &[u64],
        extra: Option<&ClientFrame>,
    ) -> Result<(), ()> {
        let acks = std::mem::take(&mut self.acks);
        let ack_seqs = std::mem::take(&mut self.ack_seqs);
        for chunk in acks.chunks(MAX_ACK_BATCH) {
            let frame = ClientFrame::Ack {
                messages: chunk.to_vec(),
                quiet: true,
            };
            feed(ws, &frame).await?;
        }
        for &seq in seqs {
            let Some(p) = self.inflight.get(&seq).copied() else {
                continue;
            };
            let frame = ClientFrame::Send {
                envelope: self.envelope(seq, p),
            };
            feed(ws, &frame).await?;
        }
        if let Some(f) = extra {
            feed(ws, f).await?;
        }
        ws.flush().await.map_err(|_| ())?;
        if !ack_seqs.is_empty() {
            let mut l = self.sh.ledger();
            for seq in ack_seqs {
                l.ack_sent(seq);
            }
        }
        Ok(())
    }

    fn envelope(&self, seq: u64, p: Pending) -> Envelope {
        let mut payload = Recorder::payload(self.sh.payload, p.sched, seq);
        payload[HEADER..MIN_PAYLOAD].copy_from_slice(&p.to.to_le_bytes());
        Envelope {
            id: message_id(self.i, seq as usize),
            from: None,
            to: Some(self.sh.keys[p.to as usize]),
            channel: None,
            ts: 0,
            kind: Kind::Text,
            payload: Base64Bytes(payload),
            media: None,
        }
    }

    /// Sends everything in the retry queue again.
    async fn resend(&mut self, ws: &mut Ws) -> Result<(), ()> {
        let mut seqs = Vec::with_capacity(self.retry.len());
        while let Some((seq, p)) = self.retry.pop_front() {
            self.inflight.insert(seq, p);
            seqs.push(seq);
        }
        self.write(ws, &seqs, None).await
    }

    /// Unanswered sends wait for the next connection; deferred acks are dropped (the
    /// relay delivers those messages again).
    fn requeue(&mut self) {
        let mut left: Vec<(u64, Pending)> = self.inflight.drain().collect();
        left.sort_by_key(|(seq, _)| *seq);
        for (seq, mut p) in left {
            p.attempts = 0;
            self.retry.push_back((seq, p));
        }
        self.acks.clear();
        self.ack_seqs.clear();
    }

    fn lost(&mut self) -> End {
        self.requeue();
        End::Lost
    }

    /// Moves `first` and up to `max` queued messages in all into `inflight`; their
    /// sequence numbers, to write.
    fn take_jobs(&mut self, first: Option<Job>, max: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        let mut job = first.or_else(|| self.jobs.try_recv().ok());
        while let Some(j) = job {
            if self.sh.ledger().written(j.seq) {
                self.sh.count(|c| &c.sent);
            }
            let p = Pending {
                to: j.to,
                sched: j.sched,
                attempts: 0,
            };
            self.inflight.insert(j.seq, p);
            seqs.push(j.seq);
            job = if seqs.len() < max {
                self.jobs.try_recv().ok()
            } else {
                None
            };
        }
        seqs
    }

    /// Closes cleanly: deferred acks out, close frame, then reads to the end (answers
    /// count; deliveries are left unacknowledged, so the relay keeps them; sends still
    /// unanswered go again on the next connection, messages still queued are sent there
    /// for the first time).
    async fn close(&mut self, ws: &mut Ws, end: End) -> End {
        self.set(Status::Closing);
        if self.write(ws, &[], None).await.is_ok() && ws.close(None).await.is_ok() {
            let until = tokio::time::Instant::now() + CLOSE_WAIT;
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, ws.next()).await {
                if let Message::Text(t) = m {
                    self.on_frame(t.as_str(), false);
                }
            }
        }
        self.requeue();
        end
    }

    fn on_frame(&mut self, text: &str, recording: bool) -> Event {
        let Ok(frame) = decode_server_frame(text) else {
            self.sh.count(|c| &c.other_errors);
            return Event::Nothing;
        };
        match frame {
            ServerFrame::Sent { id, status, .. } => {
                self.on_answer(&id, status);
                Event::Nothing
            }
            ServerFrame::Deliver { seq, envelope } if recording => {
                self.on_deliver(seq.is_some(), envelope);
                Event::Delivered
            }
            ServerFrame::Error {
                code, reference, ..
            } => self.on_error(code, reference.as_deref()),
            ServerFrame::Fetched { count, more } => Event::Fetched { count, more },
            _ => Event::Nothing,
        }
    }

    fn own_seq(&self, id: &str) -> Option<u64> {
        match parse_id(id) {
            Some((s, seq)) if s == self.i => Some(seq as u64),
            _ => None,
        }
    }

    fn on_answer(&mut self, id: &str, status: SendStatus) {
        let Some(seq) = self
            .own_seq(id)
            .filter(|s| self.inflight.remove(s).is_some())
        else {
            self.sh.count(|c| &c.other_errors);
            return;
        };
        let accepted = match status {
            SendStatus::Delivered => {
                self.sh.count(|c| &c.delivered);
                true
            }
            SendStatus::Stored => {
                self.sh.count(|c| &c.stored);
                true
            }
            SendStatus::Duplicate => {
                self.sh.count(|c| &c.duplicate_answers);
                true
            }
            SendStatus::Fanout => {
                self.sh.count(|c| &c.other_errors);
                false
            }
        };
        if !accepted {
            self.sh.count(|c| &c.refused);
        }
        self.sh.ledger().answered(seq, accepted);
    }

    fn on_error(&mut self, code: ErrorCode, reference: Option<&str>) -> Event {
        if reference == Some("ack") {
            self.sh.count(|c| &c.ack_errors);
            return Event::Nothing;
        }
        let Some((seq, mut p)) = reference
            .and_then(|r| self.own_seq(r))
            .and_then(|seq| self.inflight.remove(&seq).map(|p| (seq, p)))
        else {
            self.sh.count(|c| &c.other_errors);
            return Event::Nothing;
        };
        let retryable = matches!(code, ErrorCode::Overloaded | ErrorCode::StorageUnavailable);
        if retryable && p.attempts < MAX_ATTEMPTS {
            p.attempts += 1;
            self.sh.count(|c| &c.retried);
            if code == ErrorCode::Overloaded {
                self.sh.count(|c| &c.overloaded);
            }
            self.retry.push_back((seq, p));
            return Event::Retry;
        }
        self.sh.count(|c| &c.refused);
        self.sh.ledger().answered(seq, false);
        Event::Nothing
    }

    fn on_deliver(&mut self, from_store: bool, env: Envelope) {
        let now = self.sh.rec.now_ns();
        let p = &env.payload.0;
        let field = |r: std::ops::Range<usize>| -> Option<u64> {
            let b = p.get(r)?;
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(b);
            Some(u64::from_le_bytes(a))
        };
        let ours = parse_id(&env.id).and_then(|(s, seq)| {
            let from_ok = env.from.is_some() && self.sh.keys.get(s) == env.from.as_ref();
            let to_ok = field(HEADER..MIN_PAYLOAD) == Some(self.i as u64);
            let seq_ok = field(8..16) == Some(seq as u64);
            (from_ok && to_ok && seq_ok).then_some(seq as u64)
        });
        if let Some(from) = env.from {
            self.acks.push(AckRef { from, id: env.id });
        }
        let Some(seq) = ours else {
            self.sh.count(|c| &c.unexpected);
            return;
        };
        self.ack_seqs.push(seq);
        if std::mem::take(&mut self.drop_one) {
            return;
        }
        let receipt = self.sh.ledger().received(seq);
        match receipt {
            Receipt::First => {
                self.sh.count(|c| &c.received);
                if from_store {
                    self.sh.count(|c| &c.received_stored);
                } else {
                    self.sh.count(|c| &c.received_live);
                    if let Some(sched) = field(0..8) {
                        let _ = self
                            .sh
                            .live
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .record(now.saturating_sub(sched).max(1));
                    }
                }
            }
            Receipt::Redelivered => self.sh.count(|c| &c.redelivered),
            Receipt::Duplicate { resent } => {
                self.sh.count(|c| &c.duplicated);
                if resent {
                    self.sh.count(|c| &c.duplicated_resent);
                }
            }
        }
    }
}

async fn feed(ws: &mut Ws, frame: &ClientFrame) -> Result<(), ()> {
    let text = frame.to_json().map_err(|_| ())?;
    ws.feed(Message::Text(text.into())).await.map_err(|_| ())
}

/// Hands each scheduled message to its sender: a random client that is not away, to a
/// random other client (online or not). Runs on its own thread (see
/// [`crate::driver`]); returns the number of messages dispatched.
fn dispatch(
    sh: Arc<Shared>,
    txs: Vec<mpsc::UnboundedSender<Job>>,
    rate: f64,
    start: u64,
    end: u64,
    mut rng: Rng,
) -> u64 {
    let n = txs.len();
    let mut t = start as f64;
    let mut seq = 0u64;
    loop {
        t += -rng.unit().ln() / rate * 1e9;
        let sched = t as u64;
        if sched >= end || sh.stop.load(Ordering::Relaxed) {
            return seq;
        }
        wait_until(&sh.rec, sched);
        let from = pick(&sh, &mut rng, |s| {
            !matches!(s, Status::Offline | Status::Done | Status::Failed)
        })
        .unwrap_or_else(|| rng.below(n));
        let mut to = rng.below(n - 1);
        if to >= from {
            to += 1;
        }
        seq += 1;
        let _ = txs[from].send(Job {
            seq,
            to: to as u32,
            sched,
        });
    }
}

/// A random client that is not away and whose status passes `ok` (a few tries).
fn pick(sh: &Shared, rng: &mut Rng, ok: impl Fn(Status) -> bool) -> Option<usize> {
    let n = sh.status.len();
    (0..64).find_map(|_| {
        let i = rng.below(n);
        (!sh.away[i].load(Ordering::Relaxed) && ok(sh.status(i))).then_some(i)
    })
}

/// Open file descriptors of `pid` (0 if unreadable).
pub fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// The machine's 1-minute load average (0 if unreadable).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// The relay of a run; its process and data are removed on drop.
struct RelayRun {
    proc_: ServerProc,
    url: String,
    data: Option<PathBuf>,
}

impl Drop for RelayRun {
    fn drop(&mut self) {
        if let Some(d) = &self.data {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Starts the relay on `backend` (a fresh embedded store, or the PostgreSQL database
/// with its relay tables dropped first).
async fn start_relay(launch: &RelayLaunch, backend: &Backend) -> Result<RelayRun, BenchError> {
    let port = procs::free_port()?;
    let mport = procs::free_port()?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let mut env: Vec<(String, String)> = vec![
        ("DCHAT_LISTEN".into(), addr.to_string()),
        ("DCHAT_METRICS_LISTEN".into(), format!("127.0.0.1:{mport}")),
        // Load clients send far above a phone's rate; the limiter is not under test.
        ("DCHAT_RATE_PER_SEC".into(), "1000000".into()),
        ("DCHAT_RATE_BURST".into(), "1000000".into()),
        ("RUST_LOG".into(), "warn".into()),
        // One relay: nothing inherited from the caller's environment may add peers.
        ("DCHAT_PEERS".into(), String::new()),
        ("DCHAT_PEER_DNS".into(), String::new()),
    ];
    let mut data = None;
    match backend {
        Backend::Embedded { root } => {
            let d = root.join(format!(
                "dchat-soak-data-{}-{}",
                std::process::id(),
                now_ms()
            ));
            std::fs::create_dir_all(&d).map_err(|source| BenchError::Io {
                what: format!("creating {}", d.display()),
                source,
            })?;
            env.push(("DCHAT_DATA_DIR".into(), d.display().to_string()));
            // An inherited DB_HOST (scripts/with-postgres.sh) would select PostgreSQL.
            env.push(("DB_HOST".into(), String::new()));
            data = Some(d);
        }
        Backend::Postgres(pg) => {
            s3::reset_pg(pg)?;
            env.extend([
                ("DB_HOST".into(), pg.host.clone()),
                ("DB_PORT".into(), pg.port.to_string()),
                ("DB_NAME".into(), pg.dbname.clone()),
                ("DB_USER".into(), pg.user.clone()),
                ("DB_PASSWORD".into(), pg.password.clone()),
            ]);
        }
    }
    env.extend(launch.env.iter().cloned());
    let dir = procs::scratch_dir("soak-relay")?;
    let proc_ = procs::spawn(
        "relay",
        launch.cpu,
        &launch.program,
        &launch.args,
        &env,
        dir,
    )?;
    let run = RelayRun {
        proc_,
        url: format!("ws://{addr}/v1/ws"),
        data,
    };
    procs::wait_port("relay", addr, Duration::from_secs(60)).await?;
    Ok(run)
}

/// Polls `done` every 50 ms until it holds or `within` passed; the time it took.
async fn wait_for(within: Duration, done: impl Fn() -> bool) -> (bool, f64) {
    let t0 = Instant::now();
    loop {
        if done() {
            return (true, t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() >= within {
            return (false, t0.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes one sample of the relay and the counters since the previous one.
struct Sampler {
    pid: u32,
    rss_max_kib: u64,
    prev: Totals,
    prev_cpu: Duration,
    prev_at: Instant,
}

impl Sampler {
    /// Reads the relay's RSS for the interval's peak; false when the relay is gone.
    fn observe(&mut self) -> bool {
        let rss = procs::rss_kib(self.pid);
        self.rss_max_kib = self.rss_max_kib.max(rss);
        rss > 0
    }

    /// The row of the interval ending at `at` (since `t0`).
    fn sample(&mut self, sh: &Shared, at: Duration) -> Result<Row, BenchError> {
        let now = Instant::now();
        let rss_kib = procs::rss_kib(self.pid);
        if rss_kib == 0 {
            return Err(BenchError::Server {
                what: "relay".into(),
                reason: format!("process {} is gone (see its stderr.log)", self.pid),
            });
        }
        let cpu = procs::cpu_time(Some(self.pid));
        let totals = sh.counters.snap();
        let d = totals.since(&self.prev);
        let h = {
            let mut h = sh.live.lock().unwrap_or_else(|e| e.into_inner());
            let c = h.clone();
            h.reset();
            c
        };
        let secs = now.duration_since(self.prev_at).as_secs_f64().max(1e-9);
        let row = Row {
            at,
            sent: d.sent,
            delivered: d.delivered,
            stored: d.stored,
            received: d.received,
            p99_live_ms: (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1e6),
            relay_cpu: cpu.saturating_sub(self.prev_cpu).as_secs_f64() / secs,
            rss_kib,
            rss_max_kib: std::mem::take(&mut self.rss_max_kib).max(rss_kib),
            fds: fd_count(self.pid),
            connections: sh.connections.load(Ordering::Relaxed),
            reconnects: d.reconnects,
            load1: load_average(),
        };
        self.prev = totals;
        self.prev_cpu = cpu;
        self.prev_at = now;
        Ok(row)
    }
}

/// Runs the soak against a relay started from `launch` on `backend`; `on_row` gets each
/// sample as it is taken. Fails for setup errors and when the relay dies; lost and
/// duplicated messages are in the report (see [`Report::failed`]).
pub async fn run(
    launch: &RelayLaunch,
    backend: &Backend,
    p: &Params,
    mut on_row: impl FnMut(&Row),
) -> Result<Report, BenchError> {
    p.validate()?;
    let relay = start_relay(launch, backend).await?;
    let pid = relay.proc_.pid;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_before = Idle {
        rss_kib: procs::rss_kib(pid),
        fds: fd_count(pid),
    };
    let n = p.clients;
    let keys: Vec<SigningKey> = (0..n)
        .map(|i| {
            generate_key().map_err(|e| BenchError::Run {
                what: format!("client {i} key"),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    let expected = (p.rate * p.duration.as_secs_f64() * 1.1) as usize + 1024;
    let sh = Arc::new(Shared {
        url: relay.url.clone(),
        keys: keys.iter().map(public_key).collect(),
        rec: Recorder::new(),
        payload: p.payload,
        ack_delay: p.ack_delay,
        ledger: Mutex::new(Ledger::with_capacity(expected)),
        counters: Counters::default(),
        live: Mutex::new(new_hist()),
        status: (0..n)
            .map(|_| AtomicU8::new(Status::Connecting as u8))
            .collect(),
        away: (0..n).map(|_| AtomicBool::new(false)).collect(),
        away_count: AtomicUsize::new(0),
        connections: AtomicI64::new(0),
        handshakes: Semaphore::new(p.parallel),
        answered: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        give_up: Instant::now()
            + p.duration
            + p.final_timeout * 2
            + Duration::from_secs(60 + n as u64 / p.parallel as u64),
        stop: AtomicBool::new(false),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Load);
    let mut job_txs = Vec::with_capacity(n);
    let mut ctl_txs = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for (i, key) in keys.into_iter().enumerate() {
        let (jt, jobs) = mpsc::unbounded_channel();
        let (ct, ctl) = mpsc::unbounded_channel();
        job_txs.push(jt);
        ctl_txs.push(ct);
        tasks.push(tokio::spawn(
            ClientTask {
                i,
                key,
                sh: sh.clone(),
                jobs,
                jobs_done: false,
                ctl,
                ctl_done: false,
                phase: phase_rx.clone(),
                phase_done: false,
                inflight: HashMap::new(),
                retry: VecDeque::new(),
                acks: Vec::new(),
                ack_seqs: Vec::new(),
                answered: false,
                drop_one: p.drop_one_delivery && i == 0,
            }
            .run(),
        ));
    }
    let result = drive(&sh, &relay, p, job_txs, &ctl_txs, &phase_tx, &mut on_row).await;
    sh.stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    let mut report = result?;
    report.store = backend.name().to_string();
    report.idle_before = idle_before;
    Ok(report)
}

/// The phases of a run once the clients exist: connect, load and churn, answers,
/// final drain, tally.
async fn drive(
    sh: &Arc<Shared>,
    relay: &RelayRun,
    p: &Params,
    job_txs: Vec<mpsc::UnboundedSender<Job>>,
    ctl_txs: &[mpsc::UnboundedSender<Ctl>],
    phase_tx: &watch::Sender<Phase>,
    on_row: &mut impl FnMut(&Row),
) -> Result<Report, BenchError> {
    let n = p.clients;
    let pid = relay.proc_.pid;
    let within = Duration::from_secs(60 + n as u64 / p.parallel as u64);
    let (ok, connect_secs) = wait_for(within, || {
        (0..n).all(|i| matches!(sh.status(i), Status::Online | Status::Failed))
    })
    .await;
    let online = (0..n).filter(|&i| sh.status(i) == Status::Online).count();
    if !ok || online < n {
        return Err(BenchError::Run {
            what: "connecting the clients".into(),
            reason: format!("{online} of {n} connected in {connect_secs:.1} s"),
        });
    }

    // Load and churn.
    let t0 = Instant::now();
    let start = sh.rec.now_ns();
    let end_ns = start + p.duration.as_nanos() as u64;
    // As in the driver: a fine timer slack for the dispatcher thread (inherited).
    let _ = std::fs::write("/proc/self/timerslack_ns", "1000");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    {
        let sh = sh.clone();
        let rng = Rng::new(p.seed);
        let rate = p.rate;
        std::thread::Builder::new()
            .name("soak-dispatch".into())
            .spawn(move || {
                let _ = done_tx.send(dispatch(sh, job_txs, rate, start, end_ns, rng));
            })
            .map_err(|source| BenchError::Io {
                what: "starting the dispatcher thread".into(),
                source,
            })?;
    }
    let mut rng = Rng::new(p.seed ^ 0x50a6);
    let mut sampler = Sampler {
        pid,
        rss_max_kib: 0,
        prev: sh.counters.snap(),
        prev_cpu: procs::cpu_time(Some(pid)),
        prev_at: t0,
    };
    let mut rows = Vec::new();
    let end = t0 + p.duration;
    let mut next_row = t0 + p.interval;
    let mut next_observe = t0;
    let mut last = t0;
    let mut due_reconnects = 0.0;
    let mut first_wave = true;
    let offline_target = p.offline_clients();
    loop {
        let now = Instant::now();
        let wake = (now + TICK).min(next_row).min(end);
        tokio::time::sleep_until(wake.into()).await;
        let now = Instant::now();
        due_reconnects += n as f64 * p.reconnect_per_sec * now.duration_since(last).as_secs_f64();
        last = now;
        while due_reconnects >= 1.0 {
            due_reconnects -= 1.0;
            if let Some(i) = pick(sh, &mut rng, |s| s == Status::Online) {
                let _ = ctl_txs[i].send(Ctl::Reconnect);
            }
        }
        while sh.away_count.load(Ordering::Relaxed) < offline_target {
            let Some(i) = pick(sh, &mut rng, |s| s == Status::Online) else {
                break;
            };
            sh.away[i].store(true, Ordering::Relaxed);
            sh.away_count.fetch_add(1, Ordering::Relaxed);
            // The first wave leaves for a random part of the absence, so that returns
            // (and the stored backlogs they drain) are spread out from the start.
            let d = if first_wave {
                p.offline_for.mul_f64(rng.unit())
            } else {
                p.offline_for
            };
            let _ = ctl_txs[i].send(Ctl::Offline(d));
        }
        first_wave = false;
        if now >= next_row {
            let row = sampler.sample(sh, next_row.duration_since(t0))?;
            on_row(&row);
            rows.push(row);
            next_row += p.interval;
        } else if now >= next_observe {
            next_observe = now + RSS_EVERY;
            if !sampler.observe() {
                sh.stop.store(true, Ordering::Relaxed);
                return Err(BenchError::Server {
                    what: "relay".into(),
                    reason: format!("process {pid} is gone during the load"),
                });
            }
        }
        if now >= end {
            break;
        }
    }
    let _ = done_rx.await;
    let before_end = sh.counters.snap();

    // Every send answered (offline clients come back), then the final drain.
    let _ = phase_tx.send(Phase::Answer);
    let (_, answer_secs) = wait_for(p.final_timeout, || {
        sh.answered.load(Ordering::Relaxed) + failed(sh) >= n
    })
    .await;
    let _ = phase_tx.send(Phase::Drain);
    let (_, drain_secs) =
        wait_for(p.final_timeout, || sh.finished.load(Ordering::Relaxed) >= n).await;
    let unfinished_clients = (0..n).filter(|&i| sh.status(i) != Status::Done).count() as u64;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_after = Idle {
        rss_kib: procs::rss_kib(pid),
        fds: fd_count(pid),
    };
    let totals = sh.counters.snap();
    let tally = sh.ledger().tally();
    Ok(Report {
        store: String::new(),
        warmup: p.warmup,
        connect_secs,
        rows,
        totals,
        end_phase: totals.since(&before_end),
        tally,
        answer_secs,
        drain_secs,
        unfinished_clients,
        idle_before: Idle::default(),
        idle_after,
    })
}

fn failed(sh: &Shared) -> usize {
    (0..sh.status.len())
        .filter(|&i| sh.status(i) == Status::Failed)
        .count()
}

// ---------------------------------------------------------------------------------------
// Command line.

/// The store of the soaked relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    /// The embedded store, in a fresh directory under `--data-root`.
    Embedded,
    /// PostgreSQL (`--pg-*`, or the `DB_*` variables of `scripts/with-postgres.sh`); the
    /// relay's tables are dropped first, so use a scratch database.
    Postgres,
}

/// `dchat-loadgen soak`.
#[derive(Clone, Debug, clap::Args)]
pub struct SoakArgs {
    /// CPU the relay is pinned to (taskset); pin the generator elsewhere.
    #[arg(long)]
    pub server_cpu: Option<usize>,
    /// The relay binary (default: `dchat-relay` next to this binary).
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
    /// Clients.
    #[arg(long, default_value = "2000")]
    pub clients: usize,
    /// Offered messages per second: half the relay's S1 capacity on the benchmark
    /// machine (30,008 msgs/s, docs/performance.md).
    #[arg(long, default_value = "15000")]
    pub rate: f64,
    /// Seconds of load.
    #[arg(long, default_value = "1800")]
    pub duration: f64,
    /// Seconds between two samples (table rows).
    #[arg(long, default_value = "60")]
    pub interval: f64,
    /// Seconds of warm-up. The fd verdict starts from the first sample at or after it;
    /// the RSS verdict compares later peaks with those of one more window as long.
    #[arg(long, default_value = "300")]
    pub warmup: f64,
    /// Fraction of the clients that reconnect every second.
    #[arg(long, default_value = "0.01")]
    pub reconnect_rate: f64,
    /// Fraction of the clients offline at any time (a rotating set).
    #[arg(long, default_value = "0.1")]
    pub offline: f64,
    /// Seconds an offline client stays away before it comes back and drains.
    #[arg(long, default_value = "60")]
    pub offline_secs: f64,
    /// Payload bytes.
    #[arg(long, default_value = "256")]
    pub payload: usize,
    /// Longest time a client holds an acknowledgement back, ms.
    #[arg(long, default_value = "200")]
    pub ack_delay_ms: u64,
    /// Concurrent handshakes.
    #[arg(long, default_value = "64")]
    pub parallel: usize,
    /// Upper bound, seconds, of each end phase (every send answered; final drain).
    #[arg(long, default_value = "300")]
    pub final_timeout: f64,
    /// The relay's store.
    #[arg(long, value_enum, default_value = "embedded")]
    pub store: Store,
    /// Parent directory of the embedded store's data (a disk, not tmpfs).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// PostgreSQL host (`--store postgres`).
    #[arg(long, env = "DB_HOST")]
    pub pg_host: Option<String>,
    /// PostgreSQL port.
    #[arg(long, env = "DB_PORT", default_value = "5432")]
    pub pg_port: u16,
    /// PostgreSQL database (its relay tables are dropped first).
    #[arg(long, env = "DB_NAME", default_value = "dchat")]
    pub pg_db: String,
    /// PostgreSQL user.
    #[arg(long, env = "DB_USER", default_value = "dchat")]
    pub pg_user: String,
    /// PostgreSQL password.
    #[arg(long, env = "DB_PASSWORD", default_value = "", hide_env_values = true)]
    pub pg_password: String,
    /// Seed of the schedule and the churn.
    #[arg(long, default_value = "23")]
    pub seed: u64,
}

fn secs(flag: &str, v: f64) -> Result<Duration, BenchError> {
    Duration::try_from_secs_f64(v).map_err(|e| BenchError::Run {
        what: "soak parameters".into(),
        reason: format!("{flag} {v}: {e}"),
    })
}

impl SoakArgs {
    /// The run's parameters.
    pub fn params(&self) -> Result<Params, BenchError> {
        let p = Params {
            clients: self.clients,
            rate: self.rate,
            duration: secs("--duration", self.duration)?,
            interval: secs("--interval", self.interval)?,
            warmup: secs("--warmup", self.warmup)?,
            reconnect_per_sec: self.reconnect_rate,
            offline_fraction: self.offline,
            offline_for: secs("--offline-secs", self.offline_secs)?,
            payload: self.payload,
            ack_delay: Duration::from_millis(self.ack_delay_ms),
            parallel: self.parallel,
            final_timeout: secs("--final-timeout", self.final_timeout)?,
            seed: self.seed,
            drop_one_delivery: false,
        };
        p.validate()?;
        Ok(p)
    }

    /// The relay's store.
    pub fn backend(&self) -> Result<Backend, BenchError> {
        match self.store {
            Store::Embedded => Ok(Backend::Embedded {
                root: self.data_root.clone().unwrap_or_else(std::env::temp_dir),
            }),
            Store::Postgres => {
                let host = self
                    .pg_host
                    .clone()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| BenchError::Run {
                        what: "soak parameters".into(),
                        reason: "--store postgres needs --pg-host (or DB_HOST)".into(),
                    })?;
                Ok(Backend::Postgres(PgTarget {
                    host,
                    port: self.pg_port,
                    dbname: self.pg_db.clone(),
                    user: self.pg_user.clone(),
                    password: self.pg_password.clone(),
                    truncate: false,
                }))
            }
        }
    }
}

/// `dchat-loadgen soak`: prints the parameters, a row per interval as the run goes, a
/// summary and the verdicts; fails when a message was lost or duplicated.
pub async fn main(a: SoakArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let p = a.params()?;
    let backend = a.backend()?;
    let program = match &a.relay_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("dchat-relay"),
    };
    let launch = RelayLaunch {
        program,
        args: Vec::new(),
        env: Vec::new(),
        cpu: a.server_cpu,
    };
    println!(
        "# Soak: {} clients, {:.0} msgs/s of {} B for {} s; {:.1} % of the clients reconnect per second; {} offline at a time, {} s each; ack delay {} ms; {}; warm-up {} s",
        p.clients,
        p.rate,
        p.payload,
        p.duration.as_secs(),
        p.reconnect_per_sec * 100.0,
        p.offline_clients(),
        p.offline_for.as_secs_f64(),
        p.ack_delay.as_millis(),
        match &backend {
            Backend::Embedded { root } => format!(
                "embedded store under {} on {}",
                root.display(),
                s3::fs_type(root)
            ),
            Backend::Postgres(pg) => format!("PostgreSQL {}:{}/{}", pg.host, pg.port, pg.dbname),
        },
        p.warmup.as_secs()
    );
    println!("{}", Row::HEADER);
    let r = run(&launch, &backend, &p, |row| {
        println!("{}", row.markdown());
        let _ = std::io::stdout().flush();
    })
    .await?;
    let (t, x) = (&r.tally, &r.totals);
    println!();
    println!("# Soak summary ({})", r.store);
    println!(
        "- clients connected in {:.1} s; relay idle before: {:.1} MiB, {} fds; after every client left: {:.1} MiB, {} fds",
        r.connect_secs,
        mib(r.idle_before.rss_kib),
        r.idle_before.fds,
        mib(r.idle_after.rss_kib),
        r.idle_after.fds
    );
    println!(
        "- messages: {} sent, {} accepted ({} answered delivered, {} stored, {} duplicate), {} refused, {} unanswered; {} resent after a reconnect, {} retried after a refusal ({} `overloaded`)",
        t.written, t.accepted, x.delivered, x.stored, x.duplicate_answers, t.refused, t.unanswered, x.resent, x.retried, x.overloaded
    );
    println!(
        "- received: {} ({} live, {} from storage); {} in the end phases (answers {:.1} s, final drain {:.1} s)",
        t.received, x.received_live, x.received_stored, r.end_phase.received, r.answer_secs, r.drain_secs
    );
    println!(
        "- lost {}, duplicated {}, redelivered {}, foreign {}; {} reconnects, {} connections lost, {} failed connects, {} ack errors, {} other errors",
        t.lost,
        x.duplicated,
        x.redelivered,
        x.unexpected,
        x.reconnects,
        x.lost_connections,
        x.connect_failures,
        x.ack_errors,
        x.other_errors
    );
    for v in verdicts(&r) {
        println!("{}", v.line());
    }
    if r.failed() {
        anyhow::bail!(
            "soak failed: {} lost, {} duplicated, {} foreign, {} unanswered, {} clients unfinished",
            t.lost,
            x.duplicated,
            x.unexpected,
            t.unanswered,
            r.unfinished_clients
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            clients: 10,
            rate: 100.0,
            duration: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            warmup: Duration::from_secs(1),
            reconnect_per_sec: 0.1,
            offline_fraction: 0.2,
            offline_for: Duration::from_secs(1),
            payload: 64,
            ack_delay: Duration::from_millis(10),
            parallel: 4,
            final_timeout: Duration::from_secs(10),
            seed: 1,
            drop_one_delivery: false,
        }
    }

    /// A ledger of `n` messages, all sent and accepted.
    fn accepted(n: u64) -> Ledger {
        let mut l = Ledger::default();
        for seq in 1..=n {
            assert!(l.written(seq));
            l.answered(seq, true);
        }
        l
    }

    #[test]
    fn every_accepted_message_received_once_is_clean() {
        let mut l = accepted(5);
        for seq in 1..=5 {
            assert_eq!(l.received(seq), Receipt::First);
            l.ack_sent(seq);
        }
        let t = l.tally();
        assert_eq!((t.written, t.accepted, t.received), (5, 5, 5));
        assert_eq!((t.lost, t.extra_copies, t.unanswered), (0, 0, 0));
    }

    /// The loss detector: one accepted message never arrives.
    #[test]
    fn a_dropped_message_counts_as_lost() {
        let mut l = accepted(5);
        for seq in [1, 2, 4, 5] {
            l.received(seq);
        }
        let t = l.tally();
        assert_eq!((t.accepted, t.received, t.lost), (5, 4, 1));
    }

    #[test]
    fn a_copy_after_the_ack_is_a_duplicate_and_before_it_a_redelivery() {
        let mut l = accepted(2);
        assert_eq!(l.received(1), Receipt::First);
        assert_eq!(l.received(1), Receipt::Redelivered);
        l.ack_sent(1);
        assert_eq!(l.received(1), Receipt::Duplicate { resent: false });
        l.resent(1);
        assert_eq!(l.received(1), Receipt::Duplicate { resent: true });
        assert_eq!(l.received(2), Receipt::First);
        let t = l.tally();
        // Copies saturate at 3 per message: 2 extra for message 1.
        assert_eq!((t.received, t.extra_copies, t.lost), (2, 2, 0));
    }

    #[test]
    fn unanswered_and_refused_messages_are_not_lost() {
        let mut l = accepted(1);
        l.written(2);
        l.written(3);
        l.answered(3, false);
        l.written(4);
        l.answered(4, true);
        // A resend of an accepted message refused later stays accepted.
        l.answered(4, false);
        l.received(1);
        l.received(2);
        l.received(4);
        assert!(!l.written(4), "written twice is one message");
        let t = l.tally();
        assert_eq!(
            (t.written, t.accepted, t.refused, t.unanswered, t.lost),
            (4, 2, 1, 1, 0)
        );
        assert_eq!(t.received_unaccepted, 1);
    }

    fn row(at: u64, rss_mib: u64, fds: u64, connections: i64) -> Row {
        Row {
            at: Duration::from_secs(at),
            rss_kib: rss_mib * 1024,
            fds,
            connections,
            ..Row::default()
        }
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            warmup: Duration::from_secs(300),
            rows,
            tally: Tally {
                written: 10,
                accepted: 10,
                received: 10,
                ..Tally::default()
            },
            ..Report::default()
        }
    }

    fn pass(r: &Report, criterion: &str) -> Option<bool> {
        verdicts(r)
            .into_iter()
            .find(|v| v.criterion.starts_with(criterion))
            .unwrap()
            .pass
    }

    #[test]
    fn rss_is_judged_against_its_peak_in_the_window_after_the_warm_up() {
        // Warm-up 300 s: the baseline is the peak of (300, 600] s, 100 MiB (the peak
        // within an interval counts, not only the sample); later peaks up to 110 MiB
        // are within 10 %; growth during the warm-up does not count.
        let mut peak = row(480, 80, 100, 90);
        peak.rss_max_kib = 100 * 1024;
        let rows = vec![
            row(60, 150, 100, 90),
            row(300, 90, 100, 90),
            row(420, 95, 100, 90),
            peak,
            row(600, 90, 100, 90),
            row(900, 110, 100, 90),
        ];
        let r = report(rows.clone());
        assert_eq!(pass(&r, "RSS"), Some(true));
        let v = verdicts(&r);
        assert!(
            v[2].detail
                .contains("in the last 300 s at most 110.0 MiB (+10.0 %)"),
            "{v:?}"
        );
        assert_eq!(pass(&r, "lost"), Some(true));
        assert!(!r.failed());
        let mut grown = rows.clone();
        grown.push(row(960, 80, 100, 90));
        grown.last_mut().unwrap().rss_max_kib = 111 * 1024;
        assert_eq!(pass(&report(grown), "RSS"), Some(false));
        // Nothing after the baseline window: not judged.
        let r = report(rows[..5].to_vec());
        assert_eq!(pass(&r, "RSS"), None);
        let r = report(vec![row(60, 100, 100, 90)]);
        assert_eq!(pass(&r, "RSS"), None);
        assert_eq!(pass(&r, "fds"), None);
    }

    #[test]
    fn fds_are_judged_beyond_the_open_connections() {
        // More connections at a sample explain more descriptors.
        let r = report(vec![row(300, 100, 100, 90), row(360, 100, 140, 120)]);
        assert_eq!(pass(&r, "fds"), Some(true));
        let slack = FD_SLACK as u64;
        let r = report(vec![row(300, 100, 100, 90), row(360, 100, 101 + slack, 90)]);
        assert_eq!(pass(&r, "fds"), Some(false));
    }

    #[test]
    fn a_lost_or_duplicated_message_fails_the_run() {
        let mut r = report(vec![]);
        r.tally.lost = 1;
        assert_eq!(pass(&r, "lost"), Some(false));
        assert!(r.failed());
        let mut r = report(vec![]);
        r.totals.duplicated = 1;
        assert_eq!(pass(&r, "duplicated"), Some(false));
        assert!(r.failed());
        let mut r = report(vec![]);
        r.totals.redelivered = 3;
        assert_eq!(pass(&r, "duplicated"), Some(true));
        assert!(!r.failed());
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(params().validate().is_ok());
        let mut p = params();
        p.clients = 1;
        assert!(p.validate().unwrap_err().to_string().contains("--clients"));
        let mut p = params();
        p.payload = MIN_PAYLOAD - 1;
        assert!(p.validate().unwrap_err().to_string().contains("--payload"));
        let mut p = params();
        p.offline_fraction = 1.0;
        assert!(p.validate().unwrap_err().to_string().contains("--offline"));
        let mut p = params();
        p.clients = 2;
        p.offline_fraction = 0.5;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("fewer than 2"));
        let mut p = params();
        p.rate = f64::NAN;
        assert!(p.validate().is_err());
        assert!(secs("--duration", -1.0).is_err());
    }

    #[test]
    fn rows_print_minutes_and_mib() {
        let mut r = row(125, 100, 2100, 1800);
        r.p99_live_ms = Some(1.234);
        r.relay_cpu = 0.5;
        let line = r.markdown();
        assert!(
            line.starts_with("| 2:05 | 0 | 0 | 0 | 0 | 1.23 | 50% | 100.0 | 0.0 | 2100 | 1800 |"),
            "{line}"
        );
        assert_eq!(
            Row::HEADER.lines().next().unwrap().matches('|').count(),
            line.matches('|').count()
        );
    }
}

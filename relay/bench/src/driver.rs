//! Open-loop Poisson dispatch and latency recording.
//!
//! Every message carries its *scheduled* send time in the first 8 payload bytes and a
//! sequence number in the next 8; latency is receive time − scheduled time, so a
//! sender that falls behind its schedule shows up as latency (no coordinated omission).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

/// Bytes at the start of every payload used by the generator (time + sequence).
pub const HEADER: usize = 16;

/// One message to send, handed to a client's writer task.
#[derive(Debug)]
pub enum Out {
    /// To recipient `to` (client index).
    Direct {
        /// Recipient index.
        to: usize,
        /// Payload (header + padding).
        payload: Vec<u8>,
        /// Unique sequence (also the message id).
        seq: u64,
    },
    /// To channel `channel` (index).
    Channel {
        /// Channel index.
        channel: usize,
        /// Payload.
        payload: Vec<u8>,
        /// Unique sequence.
        seq: u64,
    },
    /// Relay acknowledgements (sender key, id).
    Ack(Vec<dchat_relay::protocol::AckRef>),
}

/// The sending side of one connected load client.
pub struct Endpoint {
    /// Queue to the client's writer task.
    pub tx: mpsc::UnboundedSender<Out>,
}

/// Shared latency recorder of one run.
pub struct Recorder {
    base: Instant,
    window: Mutex<(u64, u64)>,
    hist: Mutex<Histogram<u64>>,
    last: Mutex<Histogram<u64>>,
    fanout: Mutex<HashMap<u64, (u32, u64)>>,
    fanout_members: AtomicU64,
    received_in_window: AtomicU64,
    /// Error frames or failed sends seen by clients.
    pub errors: AtomicU64,
    /// Copies the relay stored instead of pushing live: `sent` answers with status
    /// `stored` (recipient behind or offline), plus the `stored` count of fan-outs.
    pub stored: AtomicU64,
    /// Relay `sent` answers (any status).
    pub acked_sends: AtomicU64,
}

fn new_hist() -> Histogram<u64> {
    // 1 ns .. 120 s at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 120_000_000_000, 3)
        .unwrap_or_else(|e| panic!("constant histogram bounds rejected: {e}"))
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            base: Instant::now(),
            window: Mutex::new((u64::MAX, u64::MAX)),
            hist: Mutex::new(new_hist()),
            last: Mutex::new(new_hist()),
            fanout: Mutex::new(HashMap::new()),
            fanout_members: AtomicU64::new(0),
            received_in_window: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            acked_sends: AtomicU64::new(0),
        })
    }

    /// Nanoseconds since the recorder's start.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Builds a payload of `len` bytes scheduled at `sched_ns`.
    pub fn payload(len: usize, sched_ns: u64, seq: u64) -> Vec<u8> {
        let mut p = vec![0x5a; len.max(HEADER)];
        p[..8].copy_from_slice(&sched_ns.to_le_bytes());
        p[8..16].copy_from_slice(&seq.to_le_bytes());
        p
    }

    /// Records a received payload.
    pub fn record(&self, payload: &[u8]) {
        if payload.len() < HEADER {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = self.now_ns();
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[..8]);
        let sched = u64::from_le_bytes(b);
        b.copy_from_slice(&payload[8..16]);
        let seq = u64::from_le_bytes(b);
        let (start, end) = *self.window.lock().unwrap_or_else(|e| e.into_inner());
        if sched < start || sched >= end {
            return;
        }
        let lat = now.saturating_sub(sched).max(1);
        self.received_in_window.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .hist
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(lat);
        let members = self.fanout_members.load(Ordering::Relaxed) as u32;
        if members > 0 {
            let mut f = self.fanout.lock().unwrap_or_else(|e| e.into_inner());
            let e = f.entry(seq).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(lat);
            if e.0 == members {
                let max = e.1;
                f.remove(&seq);
                let _ = self
                    .last
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(max);
            }
        }
    }

    fn reset(&self, start: u64, end: u64, fanout_members: u32) {
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = (start, end);
        self.hist.lock().unwrap_or_else(|e| e.into_inner()).reset();
        self.last.lock().unwrap_or_else(|e| e.into_inner()).reset();
        self.fanout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.fanout_members
            .store(u64::from(fanout_members), Ordering::Relaxed);
        self.received_in_window.store(0, Ordering::Relaxed);
    }
}

/// Small deterministic PRNG (xorshift64*), so runs are repeatable and cheap.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// What one step sends.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    /// Random sender to a random other client.
    Direct,
    /// Random member to its channel; `members` clients per channel, fanned out to the
    /// other `members - 1`. Client `i` is in channel `i / members`.
    Channel {
        /// Members per channel.
        members: usize,
    },
}

/// Parameters of one rate step.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// Offered messages per second (Poisson).
    pub rate: f64,
    /// Warm-up (not recorded).
    pub warmup: Duration,
    /// Measurement.
    pub measure: Duration,
    /// Payload bytes.
    pub payload: usize,
    /// How long to wait for stragglers after the last send.
    pub drain: Duration,
}

/// Result of one rate step.
#[derive(Clone, Debug, Default)]
pub struct StepResult {
    /// Offered rate (msgs/s).
    pub offered: f64,
    /// Messages scheduled in the measurement window.
    pub sent: u64,
    /// Deliveries expected from them (fan-out counted).
    pub expected: u64,
    /// Deliveries received from them.
    pub received: u64,
    /// Deliveries per second over the window.
    pub delivered_per_sec: f64,
    /// Latency percentiles (µs): p50, p99, p99.9, max.
    pub p50_us: f64,
    /// p99 (µs).
    pub p99_us: f64,
    /// p99.9 (µs).
    pub p999_us: f64,
    /// Max (µs).
    pub max_us: f64,
    /// Fan-out: p99 of the latency to the last member (µs).
    pub last_p99_us: f64,
    /// Fraction of one core used by this generator during the window.
    pub gen_cpu: f64,
    /// Fraction of one core used by the server during the window (when known).
    pub server_cpu: Option<f64>,
    /// p99 of how late the dispatcher handed a send to its client (µs): the generator's
    /// own share of the latency before any frame is written.
    pub dispatch_late_p99_us: f64,
}

impl StepResult {
    /// True when every delivery arrived and p99 is within `p99_ms`.
    pub fn meets(&self, p99_ms: f64) -> bool {
        self.received >= self.expected && self.p99_us <= p99_ms * 1000.0
    }
}

/// Timer slack asked for the dispatcher (Linux default: 50 µs), so its sleeps end
/// close to when they were asked to.
const TIMER_SLACK_NS: u64 = 1_000;
/// The dispatcher sleeps until this long before a send is due, then yields the CPU
/// until it is (sleeps overshoot by the timer slack plus the wake-up latency).
const SPIN_NS: u64 = 60_000;

/// Waits until `sched` on the recorder's clock without keeping the CPU: a thread sleep
/// while the send is far, then `sched_yield` (which lets the runtime thread on the same
/// core run) for the last [`SPIN_NS`]. The async runtime's timer has 1 ms resolution,
/// and yielding inside the runtime instead made it poll epoll about a million times a
/// second, which took the generator's core from the clients.
pub(crate) fn wait_until(rec: &Recorder, sched: u64) {
    loop {
        let now = rec.now_ns();
        if now >= sched {
            return;
        }
        let left = sched - now;
        if left > SPIN_NS {
            std::thread::sleep(Duration::from_nanos(left - SPIN_NS));
        } else {
            std::thread::yield_now();
        }
    }
}

/// What the dispatcher thread needs for one step.
struct Dispatch {
    rec: Arc<Recorder>,
    txs: Vec<mpsc::UnboundedSender<Out>>,
    pattern: Pattern,
    rate: f64,
    payload: usize,
    start: u64,
    m_start: u64,
    m_end: u64,
    seq: u64,
    rng: Rng,
    server: Option<crate::procs::ServerProcs>,
}

/// What the dispatcher thread hands back.
struct Dispatched {
    seq: u64,
    rng: Rng,
    sent_in_window: u64,
    cpu0: Option<(Duration, Option<Duration>)>,
    cpu1: (Duration, Option<Duration>),
    /// How late each send of the window left the dispatcher (ns after its schedule).
    late: Histogram<u64>,
}

impl Dispatch {
    /// Draws the Poisson schedule and hands each message to its client's writer task
    /// at its scheduled time (never earlier; later shows up as latency).
    fn run(mut self) -> Dispatched {
        let n = self.txs.len();
        let mut t = self.start as f64;
        let mut sent_in_window = 0u64;
        let mut cpu0 = None;
        let mut late = new_hist();
        loop {
            t += -self.rng.unit().ln() / self.rate * 1e9;
            let sched = t as u64;
            if sched >= self.m_end {
                break;
            }
            wait_until(&self.rec, sched);
            if cpu0.is_none() && sched >= self.m_start {
                cpu0 = Some((
                    crate::procs::cpu_time(None),
                    self.server.as_ref().map(|s| s.cpu_time()),
                ));
            }
            self.seq += 1;
            let s = self.seq;
            let (from, out) = match self.pattern {
                Pattern::Direct => {
                    let from = self.rng.below(n);
                    let mut to = self.rng.below(n.saturating_sub(1).max(1));
                    if to >= from && n > 1 {
                        to += 1;
                    }
                    (
                        from,
                        Out::Direct {
                            to,
                            payload: Recorder::payload(self.payload, sched, s),
                            seq: s,
                        },
                    )
                }
                Pattern::Channel { members } => {
                    let from = self.rng.below(n);
                    (
                        from,
                        Out::Channel {
                            channel: from / members.max(1),
                            payload: Recorder::payload(self.payload, sched, s),
                            seq: s,
                        },
                    )
                }
            };
            if sched >= self.m_start {
                sent_in_window += 1;
                let _ = late.record(self.rec.now_ns().saturating_sub(sched).max(1));
            }
            if self.txs[from].send(out).is_err() {
                self.rec.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let cpu1 = (
            crate::procs::cpu_time(None),
            self.server.as_ref().map(|s| s.cpu_time()),
        );
        Dispatched {
            seq: self.seq,
            rng: self.rng,
            sent_in_window,
            cpu0,
            cpu1,
            late,
        }
    }
}

/// Runs one open-loop step over `eps` and returns what was measured.
///
/// The schedule is dispatched from its own OS thread (see [`wait_until`]); the
/// clients' tasks stay on the caller's runtime. `server` is sampled for CPU time
/// during the measurement window.
pub async fn run_step(
    eps: &[Endpoint],
    rec: &Arc<Recorder>,
    pattern: Pattern,
    step: Step,
    seq: &mut u64,
    rng: &mut Rng,
    server: Option<crate::procs::ServerProcs>,
) -> StepResult {
    let rate = step.rate.max(1.0);
    let fan = match pattern {
        Pattern::Direct => 1u64,
        Pattern::Channel { members } => members.saturating_sub(1) as u64,
    };
    let start = rec.now_ns() + 1_000_000;
    let m_start = start + step.warmup.as_nanos() as u64;
    let m_end = m_start + step.measure.as_nanos() as u64;
    rec.reset(m_start, m_end, fan as u32);
    // Best effort: this sets the slack of the process's main thread (where
    // `dchat-loadgen` runs its current-thread runtime), which a thread it creates
    // inherits. Without it sleeps overshoot by ~50 µs more and the dispatcher yields
    // longer; the schedule, and so the measurement, is the same either way.
    let _ = std::fs::write("/proc/self/timerslack_ns", TIMER_SLACK_NS.to_string());
    let plan = Dispatch {
        rec: rec.clone(),
        txs: eps.iter().map(|e| e.tx.clone()).collect(),
        pattern,
        rate,
        payload: step.payload,
        start,
        m_start,
        m_end,
        seq: *seq,
        rng: rng.clone(),
        server,
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("loadgen-dispatch".into())
        .spawn(move || {
            let _ = done_tx.send(plan.run());
        });
    let done = match spawned {
        Ok(_) => done_rx.await.ok(),
        Err(_) => None,
    };
    let Some(done) = done else {
        // The dispatcher could not run: nothing was sent; report an empty step.
        rec.errors.fetch_add(1, Ordering::Relaxed);
        return StepResult {
            offered: rate,
            ..StepResult::default()
        };
    };
    *seq = done.seq;
    *rng = done.rng;
    let sent_in_window = done.sent_in_window;
    let (cpu0, cpu1) = (done.cpu0, Some(done.cpu1));
    let dispatch_late_p99_us = done.late.value_at_quantile(0.99) as f64 / 1000.0;
    let expected = sent_in_window * fan;
    let deadline = Instant::now() + step.drain;
    while rec.received_in_window.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let received = rec.received_in_window.load(Ordering::Relaxed);
    let secs = step.measure.as_secs_f64();
    let h = rec.hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let last = rec.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let us = |v: u64| v as f64 / 1000.0;
    let (gen_cpu, server_cpu) = match (cpu0, cpu1) {
        (Some((g0, s0)), Some((g1, s1))) => {
            let gen = g1.saturating_sub(g0).as_secs_f64() / secs;
            let srv = match (s0, s1) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() / secs),
                _ => None,
            };
            (gen, srv)
        }
        _ => (0.0, None),
    };
    StepResult {
        offered: rate,
        sent: sent_in_window,
        expected,
        received,
        delivered_per_sec: received as f64 / secs,
        p50_us: us(h.value_at_quantile(0.50)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
        last_p99_us: us(last.value_at_quantile(0.99)),
        gen_cpu,
        server_cpu,
        dispatch_late_p99_us,
    }
}

/// Median, min and max of a list (NaN-free input).
pub fn median_range(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

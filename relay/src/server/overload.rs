//! Load shedding: new sends are refused with `overloaded` while the relay cannot keep up.
//!
//! Past saturation a relay that keeps taking sends does not just get slower, it
//! collapses: the queueing delay grows until the acknowledgements of live pushes come
//! back too late, recipients' in-flight windows fill, they fall behind, and every send
//! then stores copies for them — a path several times as expensive per delivery as a
//! push, which deepens the overload (docs/performance.md, S2). Refusing a send costs a
//! decode and a small error frame; accepting one can cost a hundred deliveries.
//!
//! Two delays signal overload, sampled every [`SAMPLE_EVERY`]:
//!
//! - the **scheduling delay** of the async runtime: a task that sleeps measures how much
//!   later than due it runs again. That is what every frame and push waits before its
//!   task is polled (fan-out, parsing, writing);
//! - the **behind-store wait**: the longest it took since the last sample to store
//!   copies for recipients connected here that fell behind (their in-flight window or
//!   queue was full). Once many recipients fall behind, the work moves to the store's
//!   writer and reader threads, and the runtime itself may look idle, waiting for
//!   them. Stores for recipients that are simply offline do not count: those are the
//!   normal durable path, slowed by group commit under load, and their senders are
//!   already held back by waiting for the store.
//!
//! When the larger of the two reaches the configured delay (`DCHAT_SHED_DELAY`) the
//! relay refuses new sends for [`ShedPolicy::hold`], long enough for the queued work to
//! drain and for recipients that fell behind to catch up; acknowledgements, fetches and
//! everything else are still served, since they relieve the load.
//!
//! [`ShedPolicy`] is the pure decision; [`monitor`] is the sampling task.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// How often the two delays are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Whether sends are refused right now; set by [`monitor`], read by every send.
#[derive(Debug, Default)]
pub struct Overload {
    shedding: AtomicBool,
    /// Longest store for behind recipients since the last sample, microseconds.
    store_wait_us: AtomicU64,
}

impl Overload {
    /// True while new sends are refused with `overloaded`.
    pub fn shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    /// Runs `store`; when it stores copies for recipients connected here that fell
    /// `behind`, records how long it took.
    pub async fn measure_store<T>(&self, behind: bool, store: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = store.await;
        if behind {
            self.note_behind_store(started.elapsed());
        }
        out
    }

    /// Records how long storing copies for recipients connected here that fell behind
    /// took.
    pub fn note_behind_store(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.store_wait_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The longest behind-store wait since the last call.
    fn take_store_wait(&self) -> Duration {
        Duration::from_micros(self.store_wait_us.swap(0, Ordering::Relaxed))
    }

    fn set(&self, on: bool) {
        self.shedding.store(on, Ordering::Relaxed);
    }
}

/// When to shed, from delay samples (the larger of the two delays at each sample).
#[derive(Debug, Clone)]
pub struct ShedPolicy {
    /// A sample at or above this starts (or extends) shedding; zero never sheds.
    threshold: Duration,
    /// Shedding lasts this long after the last sample at or above the threshold.
    hold: Duration,
    until: Option<Instant>,
}

impl ShedPolicy {
    /// A policy that sheds when a sampled delay reaches `threshold` (zero: never).
    pub fn new(threshold: Duration) -> ShedPolicy {
        ShedPolicy {
            threshold,
            hold: Self::hold(threshold),
            until: None,
        }
    }

    /// How long shedding lasts after a late sample: twice the threshold (the delay
    /// that built up needs about that long to drain once new sends stop), at least
    /// five samples so that one burst is not followed by flapping on and off.
    pub fn hold(threshold: Duration) -> Duration {
        (threshold * 2).max(SAMPLE_EVERY * 5)
    }

    /// Records a sample taken at `now` showing `delay`; returns whether sends are to be
    /// refused until the next sample.
    pub fn observe(&mut self, now: Instant, delay: Duration) -> bool {
        if self.threshold.is_zero() {
            return false;
        }
        if delay >= self.threshold {
            self.until = Some(now + self.hold);
        }
        matches!(self.until, Some(until) if now < until)
    }
}

/// Logs about shedding at most this often (it can switch on and off several times a
/// second under sustained overload).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Samples both delays until `stop`, publishing them as metrics and the shedding
/// decision in `shared.overload`.
pub async fn monitor(shared: Arc<Shared>, stop: CancellationToken) {
    let mut policy = ShedPolicy::new(shared.cfg.shed_delay);
    let mut last_log: Option<Instant> = None;
    let mut periods = 0u64;
    loop {
        let due = Instant::now() + SAMPLE_EVERY;
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(due) => {}
        }
        let now = Instant::now();
        let scheduling = now.saturating_duration_since(due);
        let behind_store = shared.overload.take_store_wait();
        shared
            .metrics
            .scheduling_delay
            .set(scheduling.as_secs_f64());
        shared
            .metrics
            .behind_store_wait
            .set(behind_store.as_secs_f64());
        let shed = policy.observe(now, scheduling.max(behind_store));
        if shed == shared.overload.shedding() {
            continue;
        }
        shared.overload.set(shed);
        shared.metrics.shedding.set(i64::from(shed));
        if shed {
            periods += 1;
            if last_log.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                last_log = Some(now);
                tracing::warn!(
                    scheduling_delay_ms = scheduling.as_millis() as u64,
                    behind_store_wait_ms = behind_store.as_millis() as u64,
                    shed_periods = periods,
                    "overloaded: refusing new sends with `overloaded` for a while"
                );
            }
        }
    }
    shared.overload.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn zero_threshold_never_sheds() {
        let mut p = ShedPolicy::new(Duration::ZERO);
        let t = Instant::now();
        assert!(!p.observe(t, Duration::from_secs(5)));
    }

    #[test]
    fn a_late_sample_sheds_for_the_hold_then_stops() {
        let mut p = ShedPolicy::new(100 * MS);
        let t = Instant::now();
        assert!(!p.observe(t, 99 * MS), "below the threshold");
        assert!(p.observe(t + 20 * MS, 100 * MS), "at the threshold");
        // Prompt samples during the hold do not end it early...
        assert!(p.observe(t + 40 * MS, MS));
        assert!(p.observe(t + 20 * MS + 199 * MS, MS));
        // ...and it ends once the hold (2 × threshold) has passed.
        assert!(!p.observe(t + 20 * MS + 200 * MS, MS));
    }

    #[test]
    fn late_samples_extend_the_hold() {
        let mut p = ShedPolicy::new(100 * MS);
        let t = Instant::now();
        assert!(p.observe(t, 150 * MS));
        assert!(p.observe(t + 150 * MS, 120 * MS));
        assert!(
            p.observe(t + 300 * MS, MS),
            "held from the second late sample"
        );
        assert!(!p.observe(t + 350 * MS, MS));
    }

    #[test]
    fn small_thresholds_hold_for_several_samples() {
        assert_eq!(ShedPolicy::hold(10 * MS), SAMPLE_EVERY * 5);
        assert_eq!(ShedPolicy::hold(250 * MS), 500 * MS);
    }
}

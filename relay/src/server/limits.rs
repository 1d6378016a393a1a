//! Per-connection token bucket.

use tokio::time::Instant;

/// A token bucket: `burst` tokens, refilled at `rate` per second. Uses tokio's clock
/// so tests can pause and advance time.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes one token; false when empty (the request must be refused).
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn refills_at_rate() {
        let mut b = TokenBucket::new(10, 3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.take());
        assert!(!b.take());
        tokio::time::advance(Duration::from_secs(10)).await;
        // Capped at burst.
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take());
    }
}

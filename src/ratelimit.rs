//! A token bucket: the one rate limiter, used for registrations per address
//! (`server::admission`) and for log lines per address (`logging`).

use std::time::Instant;

/// Tokens refill at `rate` per second up to `burst`; each event takes one.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> TokenBucket {
        TokenBucket { tokens: burst, at: now }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
    }

    /// Take a token if there is one.
    pub fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Has the bucket refilled (it is then the same as a new one)?
    pub fn is_full(&self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate >= burst
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::full(3.0, t);
        assert_eq!((0..10).filter(|_| b.take(t, 2.0, 3.0)).count(), 3);
        assert!(!b.is_full(t, 2.0, 3.0));
        let t1 = t + Duration::from_secs(1);
        assert_eq!((0..10).filter(|_| b.take(t1, 2.0, 3.0)).count(), 2);
        assert!(b.is_full(t1 + Duration::from_secs(2), 2.0, 3.0));
    }
}

//! The retry budget: retries may add at most a share of the requests the
//! edge is sending (Envoy's retry budget, Finagle's `RetryBudget`), so a
//! failing world gets each request tried about once instead of a storm of
//! `1 + max_retries` attempts each.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Retries per second, as a percentage of requests in the same second.
    pub percent: u32,
    /// Retries per second always allowed, however few the requests.
    pub min_per_second: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { percent: 20, min_per_second: 10 }
    }
}

pub struct RetryBudget {
    config: BudgetConfig,
    started: Instant,
    /// (second, requests in it, retries in it)
    window: Mutex<(u64, u64, u64)>,
    pub denied: AtomicU64,
    pub retries: AtomicU64,
}

impl RetryBudget {
    pub fn new(config: BudgetConfig) -> RetryBudget {
        RetryBudget {
            config,
            started: Instant::now(),
            window: Mutex::new((0, 0, 0)),
            denied: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    fn now_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// A request starts (its first attempt).
    pub fn request(&self) {
        self.request_at(self.now_s());
    }

    /// May a request try another region now? Counts the retry if so.
    pub fn try_retry(&self) -> bool {
        self.try_retry_at(self.now_s())
    }

    fn roll(w: &mut (u64, u64, u64), second: u64) {
        if w.0 != second {
            *w = (second, 0, 0);
        }
    }

    pub fn request_at(&self, second: u64) {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut w, second);
        w.1 += 1;
    }

    pub fn try_retry_at(&self, second: u64) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Self::roll(&mut w, second);
        let allowed = u64::from(self.config.min_per_second).max(w.1 * u64::from(self.config.percent) / 100);
        if w.2 < allowed {
            w.2 += 1;
            self.retries.fetch_add(1, Relaxed);
            true
        } else {
            self.denied.fetch_add(1, Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_a_share_of_requests_with_a_floor() {
        let b = RetryBudget::new(BudgetConfig { percent: 20, min_per_second: 10 });
        // 1,000 requests in one second, all wanting a retry: 200 get one.
        let mut granted = 0;
        for _ in 0..1000 {
            b.request_at(5);
        }
        for _ in 0..1000 {
            granted += u32::from(b.try_retry_at(5));
        }
        assert_eq!(granted, 200);
        assert_eq!(b.denied.load(Relaxed), 800);
        // A quiet second: the floor.
        b.request_at(6);
        let granted = (0..50).filter(|_| b.try_retry_at(6)).count();
        assert_eq!(granted, 10);
    }
}

//! What a version answered in a region: requests, server errors and a
//! latency histogram, as counters that only grow. A reader takes two
//! snapshots and compares the difference (a window), which is how a
//! rollout's health gate judges a step: the new version's window against
//! the old version's window, same region, same time.

use crate::VersionId;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Bucket `i` holds latencies up to `FIRST_US × GROWTH^i` µs: 100 µs to
/// about 70 s in 61 buckets, each 25 % wider than the one before (a p99
/// read from it is within 25 % of the true one).
const BUCKETS: usize = 61;
const FIRST_US: f64 = 100.0;
const GROWTH: f64 = 1.25;

fn upper_us(i: usize) -> f64 {
    FIRST_US * GROWTH.powi(i as i32)
}

fn bucket_of(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    if us <= FIRST_US {
        return 0;
    }
    ((us / FIRST_US).ln() / GROWTH.ln()).ceil().clamp(0.0, (BUCKETS - 1) as f64) as usize
}

/// Live counters of one version (shared by every request it serves).
pub struct VersionStats {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for VersionStats {
    fn default() -> VersionStats {
        VersionStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl VersionStats {
    /// One answered request: `error` for a 5xx (the platform's or the
    /// app's own).
    pub fn record(&self, latency: Duration, error: bool) {
        self.requests.fetch_add(1, Relaxed);
        if error {
            self.errors.fetch_add(1, Relaxed);
        }
        self.buckets[bucket_of(latency)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self, version: &VersionId) -> StatsSnapshot {
        StatsSnapshot {
            version: version.clone(),
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

/// `GET /_meridian/apps/<app>/stats`: one version's counters at one moment.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    pub version: VersionId,
    pub requests: u64,
    pub errors: u64,
    pub buckets: Vec<u64>,
}

impl StatsSnapshot {
    /// What happened between `earlier` and `self` (same version); a
    /// counter that went back (a restarted region) counts from zero.
    pub fn since(&self, earlier: Option<&StatsSnapshot>) -> StatsSnapshot {
        let Some(e) = earlier.filter(|e| e.requests <= self.requests) else { return self.clone() };
        StatsSnapshot {
            version: self.version.clone(),
            requests: self.requests - e.requests,
            errors: self.errors.saturating_sub(e.errors),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| b.saturating_sub(e.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Share of answers that were 5xx (0 with no requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The latency below which a fraction `q` of answers fell (the upper
    /// bound of the bucket holding it), if any request was answered.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= rank {
                return Some(Duration::from_secs_f64(upper_us(i) / 1e6));
            }
        }
        Some(Duration::from_secs_f64(upper_us(self.buckets.len().saturating_sub(1)) / 1e6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_error_rates_and_quantiles() {
        let v: VersionId = "a".repeat(64).parse().unwrap();
        let s = VersionStats::default();
        for _ in 0..98 {
            s.record(Duration::from_millis(1), false);
        }
        let before = s.snapshot(&v);
        for _ in 0..99 {
            s.record(Duration::from_millis(2), false);
        }
        s.record(Duration::from_millis(500), true);
        let w = s.snapshot(&v).since(Some(&before));
        assert_eq!((w.requests, w.errors), (100, 1));
        assert!((w.error_rate() - 0.01).abs() < 1e-9);
        let p50 = w.quantile(0.5).unwrap();
        assert!(p50 >= Duration::from_millis(2) && p50 < Duration::from_micros(2500), "{p50:?}");
        let p999 = w.quantile(0.999).unwrap();
        assert!(p999 >= Duration::from_millis(500) && p999 < Duration::from_millis(625), "{p999:?}");
        // A counter that went back (restart) is a fresh window.
        assert_eq!(before.since(Some(&s.snapshot(&v))).requests, 98);
        assert_eq!(VersionStats::default().snapshot(&v).quantile(0.99), None);
    }
}

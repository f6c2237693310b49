//! Per-region health: active probes, passive outlier detection, smoothed
//! round-trip times and the hysteresis that keeps a flapping region out.
//!
//! Pure state machine: callers pass the observations and the time, so tests
//! drive it without sockets or sleeps.

use std::time::Duration;

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Interval between active probes of each region.
    pub interval_ms: u64,
    /// A probe slower than this counts as failed.
    pub timeout_ms: u64,
    /// Consecutive failed probes that take a healthy region out.
    pub unhealthy_after: u32,
    /// Consecutive good probes a region needs before it is put back.
    pub healthy_after: u32,
    /// Consecutive platform 5xx responses (passive) that take a region out.
    pub max_consecutive_5xx: u32,
    /// Good probes after which a re-admitted region counts as stable again
    /// (its next ejection starts the back-off over).
    pub stable_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 500,
            timeout_ms: 1000,
            unhealthy_after: 2,
            healthy_after: 3,
            max_consecutive_5xx: 3,
            stable_after: 30,
        }
    }
}

/// Why a region was taken out of rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ejection {
    ProbesFailed,
    ConnectionFailed,
    ServerErrors,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RegionHealth {
    pub healthy: bool,
    /// Set while unhealthy: why it was taken out.
    pub ejected_for: Option<Ejection>,
    /// Good probes in a row since it was taken out.
    pub good_probes: u32,
    pub failed_probes: u32,
    pub consecutive_5xx: u32,
    /// Exponentially weighted moving average of probe round trips.
    pub rtt_ms: Option<f64>,
    pub ejections: u64,
    /// Ejections since it was last stable: each doubles the good probes
    /// needed to come back (outlier detection's growing back-off, as
    /// Envoy's), up to 32 times `healthy_after`.
    pub ejections_in_a_row: u32,
    /// Good probes since it was last admitted.
    pub stable_probes: u32,
}

/// Weight of the newest probe in the smoothed round trip.
const RTT_ALPHA: f64 = 0.3;

impl RegionHealth {
    /// Regions start unhealthy and earn traffic by answering probes; the
    /// first success admits them at once so a new edge serves immediately.
    pub fn new() -> Self {
        RegionHealth {
            healthy: false,
            ejected_for: None,
            good_probes: 0,
            failed_probes: 0,
            consecutive_5xx: 0,
            rtt_ms: None,
            ejections: 0,
            ejections_in_a_row: 0,
            stable_probes: 0,
        }
    }

    /// Good probes in a row an ejected region needs now.
    pub fn readmit_after(&self, cfg: &HealthConfig) -> u32 {
        cfg.healthy_after.saturating_mul(1 << self.ejections_in_a_row.saturating_sub(1).min(5))
    }

    pub fn probe_ok(&mut self, rtt: Duration, cfg: &HealthConfig) {
        let ms = rtt.as_secs_f64() * 1000.0;
        self.rtt_ms = Some(match self.rtt_ms {
            Some(old) => old + RTT_ALPHA * (ms - old),
            None => ms,
        });
        self.failed_probes = 0;
        if self.healthy {
            self.stable_probes = self.stable_probes.saturating_add(1);
            if self.stable_probes >= cfg.stable_after {
                self.ejections_in_a_row = 0;
            }
        } else {
            self.good_probes += 1;
            // Never ejected (just started): admit at once. Ejected: only after
            // it proved itself for `healthy_after` probes in a row, more for
            // a region ejected again and again.
            if self.ejected_for.is_none() || self.good_probes >= self.readmit_after(cfg) {
                self.healthy = true;
                self.ejected_for = None;
                self.good_probes = 0;
                self.consecutive_5xx = 0;
                self.stable_probes = 0;
            }
        }
    }

    pub fn probe_failed(&mut self, cfg: &HealthConfig) {
        self.failed_probes += 1;
        self.good_probes = 0;
        if self.healthy && self.failed_probes >= cfg.unhealthy_after {
            self.eject(Ejection::ProbesFailed);
        } else if !self.healthy && self.ejected_for.is_none() {
            // Never admitted and failing: mark it so recovery needs the full streak.
            self.ejected_for = Some(Ejection::ProbesFailed);
        }
    }

    /// A proxied request could not connect or the connection broke.
    pub fn connection_failed(&mut self) {
        self.good_probes = 0;
        if self.healthy {
            self.eject(Ejection::ConnectionFailed);
        }
    }

    /// The region answered a proxied request with a platform 5xx.
    pub fn server_error(&mut self, cfg: &HealthConfig) {
        self.consecutive_5xx += 1;
        if self.healthy && self.consecutive_5xx >= cfg.max_consecutive_5xx {
            self.eject(Ejection::ServerErrors);
        }
    }

    pub fn request_ok(&mut self) {
        self.consecutive_5xx = 0;
    }

    fn eject(&mut self, why: Ejection) {
        self.healthy = false;
        self.ejected_for = Some(why);
        self.good_probes = 0;
        self.ejections += 1;
        self.ejections_in_a_row = self.ejections_in_a_row.saturating_add(1);
    }
}

impl Default for RegionHealth {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_new_region_is_admitted_on_its_first_good_probe() {
        let mut h = RegionHealth::new();
        assert!(!h.healthy);
        h.probe_ok(MS, &HealthConfig::default());
        assert!(h.healthy);
    }

    #[test]
    fn a_connection_failure_ejects_at_once_and_recovery_needs_a_streak() {
        let cfg = HealthConfig::default();
        let mut h = RegionHealth::new();
        h.probe_ok(MS, &cfg);
        h.connection_failed();
        assert!(!h.healthy);
        assert_eq!(h.ejected_for, Some(Ejection::ConnectionFailed));
        h.probe_ok(MS, &cfg);
        h.probe_ok(MS, &cfg);
        assert!(!h.healthy, "back after two probes: would flap");
        h.probe_failed(&cfg);
        h.probe_ok(MS, &cfg);
        h.probe_ok(MS, &cfg);
        assert!(!h.healthy, "a failure in the streak restarts it");
        h.probe_ok(MS, &cfg);
        assert!(h.healthy);
        assert_eq!(h.ejections, 1);
    }

    #[test]
    fn probes_and_server_errors_eject_after_their_thresholds() {
        let cfg = HealthConfig::default();
        let mut h = RegionHealth::new();
        h.probe_ok(MS, &cfg);
        h.probe_failed(&cfg);
        assert!(h.healthy, "one lost probe is not an outage");
        h.probe_failed(&cfg);
        assert!(!h.healthy);

        let mut h = RegionHealth::new();
        h.probe_ok(MS, &cfg);
        h.server_error(&cfg);
        h.server_error(&cfg);
        h.request_ok();
        h.server_error(&cfg);
        h.server_error(&cfg);
        assert!(h.healthy, "errors interrupted by a success do not add up");
        h.server_error(&cfg);
        assert!(!h.healthy);
    }

    #[test]
    fn a_region_ejected_again_and_again_waits_longer_each_time_until_it_is_stable() {
        let cfg = HealthConfig::default();
        let mut h = RegionHealth::new();
        h.probe_ok(MS, &cfg);
        let probes_to_return = |h: &mut RegionHealth| {
            h.connection_failed();
            let mut n = 0;
            while !h.healthy {
                h.probe_ok(MS, &cfg);
                n += 1;
            }
            n
        };
        assert_eq!(probes_to_return(&mut h), 3);
        assert_eq!(probes_to_return(&mut h), 6);
        assert_eq!(probes_to_return(&mut h), 12);
        for _ in 0..10 {
            probes_to_return(&mut h);
        }
        assert_eq!(probes_to_return(&mut h), 96, "capped at 32 times");
        // Stable for `stable_after` probes: the back-off starts over.
        for _ in 0..cfg.stable_after {
            h.probe_ok(MS, &cfg);
        }
        assert_eq!(probes_to_return(&mut h), 3);
    }

    #[test]
    fn round_trips_are_smoothed() {
        let cfg = HealthConfig::default();
        let mut h = RegionHealth::new();
        h.probe_ok(Duration::from_millis(100), &cfg);
        h.probe_ok(Duration::from_millis(200), &cfg);
        assert!((h.rtt_ms.unwrap() - 130.0).abs() < 1e-9);
    }
}

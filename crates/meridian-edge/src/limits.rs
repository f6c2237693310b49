//! Per-app rate limits at the edge: an app's `[limits] requests_per_second`
//! is enforced here too, so a flood aimed at one app is refused next to
//! the user instead of crossing the WAN to be refused by a region.
//!
//! The edge does not talk to the control plane; it learns each app's
//! hostnames and rate from the regions' health answers. An edge admits at
//! most what one region would admit for the app (a region's limit is per
//! region, and an edge sends an app's traffic to one region at a time).

use arc_swap::ArcSwap;
use meridian_core::wire::AppLimit;
use std::collections::HashMap;
use std::sync::Arc;

struct Limiter {
    rps: u32,
    gcra: governor::DefaultDirectRateLimiter,
}

#[derive(Default)]
struct Table {
    /// What the regions reported, to skip rebuilding when nothing changed.
    reported: Vec<AppLimit>,
    by_app: HashMap<String, Arc<Limiter>>,
    by_host: HashMap<String, Arc<Limiter>>,
    default: Option<Arc<Limiter>>,
}

#[derive(Default)]
pub struct AppLimits {
    table: ArcSwap<Table>,
}

impl AppLimits {
    /// Takes what a region reported. An app whose rate is unchanged keeps
    /// its limiter (and the budget it has used).
    pub fn update(&self, mut reported: Vec<AppLimit>) {
        reported.sort_by(|a, b| a.app.cmp(&b.app));
        let current = self.table.load();
        if current.reported == reported {
            return;
        }
        let mut t = Table::default();
        for l in &reported {
            let Some(n) = std::num::NonZeroU32::new(l.requests_per_second) else { continue };
            let limiter = match current.by_app.get(&l.app) {
                Some(x) if x.rps == l.requests_per_second => x.clone(),
                _ => Arc::new(Limiter {
                    rps: l.requests_per_second,
                    gcra: governor::RateLimiter::direct(governor::Quota::per_second(n)),
                }),
            };
            for h in &l.hosts {
                t.by_host.insert(h.clone(), limiter.clone());
            }
            if l.default {
                t.default = Some(limiter.clone());
            }
            t.by_app.insert(l.app.clone(), limiter);
        }
        t.reported = reported;
        self.table.store(Arc::new(t));
    }

    /// Whether a request for `host` (normalised) may go on; `false` means
    /// the app is over its rate.
    pub fn admit(&self, host: Option<&str>) -> bool {
        let t = self.table.load();
        let limiter = match host {
            Some(h) => match t.by_host.get(h) {
                Some(l) => Some(l),
                None if meridian_core::wire::is_bare_address(h) => t.default.as_ref(),
                None => None,
            },
            None => t.default.as_ref(),
        };
        limiter.is_none_or(|l| l.gcra.check().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(app: &str, host: &str, rps: u32, default: bool) -> AppLimit {
        AppLimit { app: app.into(), hosts: vec![host.into()], default, requests_per_second: rps }
    }

    #[test]
    fn each_app_has_its_own_budget_kept_across_reports() {
        let l = AppLimits::default();
        l.update(vec![limit("a", "a.test", 3, true), limit("b", "b.test", 1000, false)]);
        let admitted = (0..10).filter(|_| l.admit(Some("a.test"))).count();
        assert_eq!(admitted, 3, "a burst of one second's worth");
        assert!(!l.admit(Some("127.0.0.1")), "bare addresses are the default app, a");
        assert!(l.admit(Some("b.test")), "b has its own budget");
        assert!(l.admit(Some("unknown.test")), "no limit known: the region decides");
        // The same report again keeps the spent budget.
        l.update(vec![limit("b", "b.test", 1000, false), limit("a", "a.test", 3, true)]);
        assert!(!l.admit(Some("a.test")));
        // A new rate starts a new budget.
        l.update(vec![limit("a", "a.test", 5, true)]);
        assert!(l.admit(Some("a.test")));
    }
}

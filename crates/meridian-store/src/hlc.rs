//! Hybrid logical clocks (Kulkarni et al., 2014): timestamps that follow
//! physical time closely, never go backwards, and order every write after
//! the writes its region had seen.

use std::sync::Mutex;

/// A point in hybrid logical time. Ordered by wall time, then the logical
/// counter; equal timestamps from different regions are ordered by the
/// caller with the region name as tie-break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    pub logical: u32,
}

/// A clock for one region. The physical clock is a parameter so tests can
/// drive it.
pub struct Hlc<C: Fn() -> u64 = fn() -> u64> {
    physical: C,
    last: Mutex<Timestamp>,
}

/// A region's physical clock, in ms since the epoch: the system's, or a
/// simulation's.
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

/// The system's clock as a [`Clock`].
pub fn system_clock() -> Clock {
    Box::new(system_ms)
}

pub fn system_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Hlc {
    pub fn system() -> Hlc {
        Hlc::new(system_ms)
    }
}

impl<C: Fn() -> u64> Hlc<C> {
    pub fn new(physical: C) -> Self {
        Hlc { physical, last: Mutex::new(Timestamp::default()) }
    }

    /// A timestamp for a local event, greater than every one issued or
    /// observed before.
    pub fn now(&self) -> Timestamp {
        let pt = (self.physical)();
        let mut last = self.last.lock().unwrap();
        *last = if pt > last.wall_ms {
            Timestamp { wall_ms: pt, logical: 0 }
        } else if last.logical < u32::MAX {
            Timestamp { wall_ms: last.wall_ms, logical: last.logical + 1 }
        } else {
            // 4 billion events within one millisecond: borrow the next one.
            // (Remote timestamps far in the future are refused before they
            // are observed, so wall time is never near its maximum.)
            Timestamp { wall_ms: last.wall_ms.saturating_add(1), logical: 0 }
        };
        *last
    }

    /// A timestamp every later [`Hlc::now`] exceeds, without issuing one
    /// (so asking changes nothing: the clock's next timestamps are the
    /// same whether or not anyone asked).
    pub fn bound(&self) -> Timestamp {
        let pt = (self.physical)();
        let last = *self.last.lock().unwrap();
        // A later local event is after `last`, and at or after (pt, 0).
        // (Not the logical maximum itself: peers refuse that.)
        let below_now = Timestamp { wall_ms: pt.saturating_sub(1), logical: u32::MAX - 1 };
        if pt > 0 && below_now > last {
            below_now
        } else {
            last
        }
    }

    /// Takes a remote timestamp into account, so later local events order
    /// after it even if this region's physical clock is behind.
    pub fn observe(&self, remote: Timestamp) {
        let mut last = self.last.lock().unwrap();
        if remote > *last {
            *last = remote;
        }
    }
}

/// How far ahead of this region's clock a peer's timestamp may be. Beyond
/// it a message is refused rather than observed: observing it would drag
/// every later local write of this region that far into the future (and a
/// timestamp at the maximum would leave no room at all).
pub const MAX_AHEAD_MS: u64 = 60_000;

/// Why a timestamp from elsewhere is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {wall_ms}.{logical} is {ahead_ms} ms ahead of this region's clock (at most {MAX_AHEAD_MS} ms is accepted)")]
pub struct TooFarAhead {
    pub wall_ms: u64,
    pub logical: u32,
    pub ahead_ms: u64,
}

/// Checks a remote timestamp against the local physical time `now_ms`.
pub fn check_remote(ts: Timestamp, now_ms: u64) -> Result<(), TooFarAhead> {
    if ts.wall_ms > now_ms.saturating_add(MAX_AHEAD_MS) || ts.logical == u32::MAX {
        return Err(TooFarAhead {
            wall_ms: ts.wall_ms,
            logical: ts.logical,
            ahead_ms: ts.wall_ms.saturating_sub(now_ms),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// The watermark's bound: below every later timestamp, acceptable to a
    /// peer, and asking for it changes nothing.
    #[test]
    fn a_bound_is_below_every_later_timestamp_and_asking_changes_nothing() {
        let t = Arc::new(AtomicU64::new(1_000));
        let t2 = t.clone();
        let hlc = Hlc::new(move || t2.load(Ordering::SeqCst));
        let a = hlc.now();
        let b = hlc.bound();
        assert!(b >= a);
        assert!(check_remote(b, 1_000).is_ok(), "{b:?}");
        assert_eq!(hlc.bound(), b);
        assert!(hlc.now() > b);
        t.store(2_000, Ordering::SeqCst);
        let c = hlc.bound();
        assert!(c > b && hlc.now() > c);
    }

    #[test]
    fn timestamps_never_go_backwards_even_when_the_clock_does() {
        let t = Arc::new(AtomicU64::new(1000));
        let t2 = t.clone();
        let hlc = Hlc::new(move || t2.load(Ordering::SeqCst));
        let a = hlc.now();
        t.store(900, Ordering::SeqCst);
        let b = hlc.now();
        assert!(b > a);
        assert_eq!(b, Timestamp { wall_ms: 1000, logical: 1 });
        t.store(2000, Ordering::SeqCst);
        assert_eq!(hlc.now(), Timestamp { wall_ms: 2000, logical: 0 });
    }

    #[test]
    fn events_after_a_remote_one_order_after_it() {
        let hlc = Hlc::new(|| 100);
        hlc.observe(Timestamp { wall_ms: 5000, logical: 7 });
        assert_eq!(hlc.now(), Timestamp { wall_ms: 5000, logical: 8 });
    }

    #[test]
    fn the_logical_part_never_overflows_and_far_future_timestamps_are_refused() {
        let hlc = Hlc::new(|| 100);
        hlc.observe(Timestamp { wall_ms: 100, logical: u32::MAX - 1 });
        assert_eq!(hlc.now(), Timestamp { wall_ms: 100, logical: u32::MAX });
        assert_eq!(hlc.now(), Timestamp { wall_ms: 101, logical: 0 });
        assert!(check_remote(Timestamp { wall_ms: u64::MAX, logical: u32::MAX }, 1000).is_err());
        assert!(check_remote(Timestamp { wall_ms: 1000, logical: u32::MAX }, 1000).is_err());
        assert!(check_remote(Timestamp { wall_ms: 1000 + MAX_AHEAD_MS + 1, logical: 0 }, 1000).is_err());
        assert!(check_remote(Timestamp { wall_ms: 1000 + MAX_AHEAD_MS, logical: 7 }, 1000).is_ok());
    }
}

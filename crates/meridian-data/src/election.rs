//! When a member of a strong group campaigns, and whom it helps to.
//!
//! openraft 0.9 campaigns on a timer of its own: a follower waits its
//! leader lease (`election_timeout_max`) plus a random election timeout
//! after the last word from its leader, and it has no pre-vote. Measured
//! from outside, that made a killed leader's group leaderless for 6-10 s:
//! the follower that campaigned first was often the one whose log was a
//! few entries short (the farther one), was refused, and then backed off
//! for twice the timeout; an isolated member kept raising its term and,
//! once healed, deposed a healthy leader.
//!
//! Meridian turns openraft's timer off and campaigns itself:
//!
//! - **When**: a member that has heard nothing from a leader for the
//!   lease, plus a step per rank (the members in the manifest's order,
//!   the preferred leader first), asks the others first.
//! - **Pre-vote** (Raft thesis §9.6): a member answers "yes" only if it
//!   too has heard nothing from a leader for the lease and the asker's log
//!   is at least as complete as its own. Only with a quorum of "yes"
//!   (itself included) does the asker start a real election. So a member
//!   whose log is behind never campaigns while a better one can (the
//!   better one, asking a step later, wins at once), and a member cut off
//!   from the rest never raises its term and cannot depose anyone when it
//!   comes back.
//! - **One campaign at a time**: a member that starts an election (or
//!   grants a vote) counts that as a leader's word, and refuses pre-votes
//!   for a lease: two members asking a step apart would otherwise both get
//!   a "yes" from the other, and the second, raising the term, would depose
//!   the leader the first had just become.
//! - **Retry**: a pre-vote or election that did not lead anywhere is tried
//!   again after a short random back-off, not after another full timeout.
//!
//! The lease is openraft's: a real vote is refused while the voter's lease
//! runs, and the pre-vote asks for exactly that condition, so a granted
//! pre-vote is followed by a granted vote unless something changed.
//!
//! The policy is pure (time in, decision out) so it is tested without
//! clocks or networks; `strong.rs` runs it.

use std::time::{Duration, Instant};

/// Election timing of a group.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a member keeps following a leader it no longer hears from
    /// (openraft's leader lease: it refuses votes for that long).
    pub lease: Duration,
    /// Added per rank: the first-ranked surviving member asks first (rank 0,
    /// the preferred leader, asks as soon as the lease has run out).
    pub step: Duration,
    /// Back-off after an attempt that did not produce a leader: random in
    /// `[retry, 2 * retry)`.
    pub retry: Duration,
}

impl Timing {
    /// How long after the last word from a leader a member of `rank` may
    /// first campaign: the time a group is without a leader, before the
    /// round trip of the vote itself.
    pub fn campaign_after(&self, rank: u32) -> Duration {
        self.lease + self.step * rank
    }
}

/// What one member knows about its leader, and its own attempts.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    /// Last time a leader was heard from (an append it sent was taken), this
    /// member granted a vote, started a campaign, or led.
    pub contact: Instant,
    /// No attempt before this (back-off after a failed one).
    pub not_before: Instant,
    pub attempts: u64,
}

impl Pacer {
    /// A member that just started: it waits an extra lease before it may
    /// campaign, so a restarted member first hears from a living leader
    /// (the leader retries an unreachable member every few hundred ms).
    pub fn new(now: Instant, t: &Timing) -> Pacer {
        Pacer { contact: now + t.lease, not_before: now, attempts: 0 }
    }

    /// A leader was heard from, a vote was granted, or this member leads.
    pub fn heard(&mut self, now: Instant) {
        if now > self.contact {
            self.contact = now;
        }
    }

    /// Time since the last word from a leader.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.contact)
    }

    /// Whether a member of `rank` that is not leading should ask for
    /// pre-votes now.
    pub fn due(&self, now: Instant, rank: u32, t: &Timing) -> bool {
        now >= self.not_before && self.silent_for(now) >= t.campaign_after(rank)
    }

    /// An attempt was made; the next waits a back-off chosen by `jitter`
    /// (any u64: the caller's randomness).
    pub fn attempted(&mut self, now: Instant, t: &Timing, jitter: u64) {
        self.attempts += 1;
        let extra = t.retry.as_nanos() as u64;
        let extra = if extra == 0 { 0 } else { jitter % extra };
        self.not_before = now + t.retry + Duration::from_nanos(extra);
    }
}

/// Why a pre-vote was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This member leads and a quorum acknowledged it within the lease.
    Leading,
    /// This member heard from a leader within the lease.
    LeaderAlive { heard_ms_ago: u64 },
    /// The asker's log lacks entries this member has.
    LogBehind,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Leading => f.write_str("I lead, with a quorum"),
            Refusal::LeaderAlive { heard_ms_ago } => write!(f, "I heard from a leader {heard_ms_ago} ms ago"),
            Refusal::LogBehind => f.write_str("your log is behind mine"),
        }
    }
}

/// Whether to say "yes" to a pre-vote: the asker's last log position
/// against this member's (`Ord` as Raft compares logs: term, then index),
/// and what this member knows of its leader.
pub fn pre_vote<L: Ord>(
    now: Instant,
    me: &Pacer,
    leading_with_quorum: bool,
    asker_last_log: &Option<L>,
    my_last_log: &Option<L>,
    t: &Timing,
) -> Result<(), Refusal> {
    if leading_with_quorum {
        return Err(Refusal::Leading);
    }
    let silent = me.silent_for(now);
    if silent < t.lease {
        return Err(Refusal::LeaderAlive { heard_ms_ago: silent.as_millis() as u64 });
    }
    if asker_last_log < my_last_log {
        return Err(Refusal::LogBehind);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            lease: Duration::from_millis(1500),
            step: Duration::from_millis(100),
            retry: Duration::from_millis(200),
        }
    }

    #[test]
    fn a_member_campaigns_a_lease_and_its_rank_after_the_last_word_from_its_leader() {
        let t = timing();
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, &t);
        // Just started: an extra lease of grace.
        assert!(!p.due(t0 + t.campaign_after(0), 0, &t));
        assert!(p.due(t0 + t.lease + t.campaign_after(0), 0, &t));
        p.heard(t0 + Duration::from_secs(10));
        let last = t0 + Duration::from_secs(10);
        for rank in 0..3 {
            let at = last + t.campaign_after(rank);
            assert!(!p.due(at - Duration::from_millis(1), rank, &t));
            assert!(p.due(at, rank, &t));
        }
        // The second-ranked asks a step after the first.
        assert_eq!(t.campaign_after(1) - t.campaign_after(0), t.step);
    }

    #[test]
    fn a_failed_attempt_is_retried_after_a_short_back_off_not_a_timeout() {
        let t = timing();
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, &t);
        let at = t0 + Duration::from_secs(5);
        assert!(p.due(at, 1, &t));
        p.attempted(at, &t, 12_345_678);
        assert_eq!(p.attempts, 1);
        assert!(!p.due(at + t.retry - Duration::from_millis(1), 1, &t));
        assert!(p.due(at + t.retry * 2, 1, &t));
        // Hearing from a (new) leader stops the campaign.
        p.heard(at + t.retry);
        assert!(!p.due(at + t.retry * 2, 1, &t));
    }

    #[test]
    fn hearing_from_a_leader_never_moves_contact_back() {
        let t = timing();
        let t0 = Instant::now();
        let mut p = Pacer::new(t0, &t);
        p.heard(t0);
        assert_eq!(p.contact, t0 + t.lease, "start-up grace kept");
        p.heard(t0 + Duration::from_secs(3));
        p.heard(t0 + Duration::from_secs(2));
        assert_eq!(p.contact, t0 + Duration::from_secs(3));
    }

    #[test]
    fn a_pre_vote_is_granted_only_to_a_complete_log_when_no_leader_is_heard() {
        let t = timing();
        let t0 = Instant::now();
        let mut me = Pacer::new(t0, &t);
        me.heard(t0 + Duration::from_secs(2));
        let now = t0 + Duration::from_secs(3);
        // (term, index) as Raft orders logs.
        let mine = Some((3u64, 40u64));
        assert_eq!(
            pre_vote(now, &me, false, &Some((3, 40)), &mine, &t),
            Err(Refusal::LeaderAlive { heard_ms_ago: 1000 })
        );
        let later = now + t.lease;
        assert_eq!(pre_vote(later, &me, false, &Some((3, 40)), &mine, &t), Ok(()));
        assert_eq!(pre_vote(later, &me, false, &Some((4, 1)), &mine, &t), Ok(()), "a later term wins");
        assert_eq!(pre_vote(later, &me, false, &Some((3, 39)), &mine, &t), Err(Refusal::LogBehind));
        assert_eq!(pre_vote(later, &me, false, &Some((2, 90)), &mine, &t), Err(Refusal::LogBehind));
        assert_eq!(pre_vote(later, &me, false, &None, &mine, &t), Err(Refusal::LogBehind));
        assert_eq!(pre_vote(later, &me, true, &Some((9, 9)), &mine, &t), Err(Refusal::Leading));
        assert_eq!(pre_vote::<(u64, u64)>(later, &me, false, &None, &None, &t), Ok(()));
    }
}

//! A linearizability checker for registers (Wing & Gong's search with
//! Lowe's memoization): is there a total order of the operations, each
//! taking effect at one instant between its call and its return, in which
//! every read returns the latest write?
//!
//! Linearizability is compositional, so a key-value history is checked one
//! key (register) at a time. A write whose outcome is unknown (the client
//! gave up) may take effect at any time after its call, or never.

use std::collections::HashSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Write(u64),
    /// What the read returned (`None`: the key was absent).
    Read(Option<u64>),
}

#[derive(Clone, Debug)]
pub struct Op {
    /// When the client sent the operation (any monotonic unit).
    pub call: u64,
    /// When it got the answer; `None` if it never knew the outcome.
    pub ret: Option<u64>,
    pub kind: Kind,
}

/// `Ok` if the history of one register is linearizable from `initial`.
pub fn check(ops: &[Op], initial: Option<u64>) -> Result<(), String> {
    // Unknown-outcome reads have no effect: drop them. An unknown-outcome
    // write whose value no read returned can be taken as never having
    // happened (it could only make reads harder to explain): drop it too.
    let read_values: HashSet<u64> = ops
        .iter()
        .filter(|o| o.ret.is_some())
        .filter_map(|o| match o.kind {
            Kind::Read(v) => v,
            Kind::Write(_) => None,
        })
        .collect();
    let mut ops: Vec<Op> = ops
        .iter()
        .filter(|o| match o.kind {
            Kind::Read(_) => o.ret.is_some(),
            Kind::Write(v) => o.ret.is_some() || read_values.contains(&v),
        })
        .cloned()
        .collect();
    ops.sort_by_key(|o| o.call);
    let n = ops.len();
    let ret = |o: &Op| o.ret.unwrap_or(u64::MAX);
    let words = n.div_ceil(64).max(1);
    let required: Vec<usize> = (0..n).filter(|&i| ops[i].ret.is_some()).collect();
    let mut seen: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    // Depth-first search over (set of linearized ops, register value).
    let mut stack: Vec<(Vec<u64>, Option<u64>)> = vec![(vec![0; words], initial)];
    let mut steps = 0u64;
    while let Some((mut done, value)) = stack.pop() {
        steps += 1;
        if steps > 5_000_000 {
            return Err(format!("gave up after {steps} steps ({n} operations)"));
        }
        let is_done = |d: &[u64], i: usize| d[i / 64] >> (i % 64) & 1 == 1;
        // An op may go next only if no pending op returned before it was called.
        let min_ret = |d: &[u64]| (0..n).filter(|&i| !is_done(d, i)).map(|i| ret(&ops[i])).min().unwrap_or(u64::MAX);
        // A read that may go next and returns the current value can be
        // taken at once: it changes nothing, and taking it early only
        // widens the choices for the rest (Lowe's optimization).
        loop {
            let m = min_ret(&done);
            let read = (0..n).find(|&i| !is_done(&done, i) && ops[i].call <= m && ops[i].kind == Kind::Read(value));
            match read {
                Some(i) => done[i / 64] |= 1 << (i % 64),
                None => break,
            }
        }
        if required.iter().all(|&i| is_done(&done, i)) {
            return Ok(());
        }
        let min_ret = min_ret(&done);
        let is_done = |i: usize| is_done(&done, i);
        for i in (0..n).filter(|&i| !is_done(i) && ops[i].call <= min_ret) {
            let next = match ops[i].kind {
                Kind::Write(v) => Some(v),
                // Matching reads were taken above.
                Kind::Read(_) => continue,
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            if seen.insert((d.clone(), next)) {
                stack.push((d, next));
            }
        }
    }
    Err(format!("no linearization of {n} operations exists"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random concurrent history that is linearizable by construction:
    /// each op takes effect at a random instant inside its interval.
    fn history(seed: u64, clients: usize, per_client: usize) -> Vec<Op> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rnd = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut ops = Vec::new();
        for c in 0..clients {
            let mut t = rnd(10);
            for k in 0..per_client {
                let call = t;
                let ret = call + 1 + rnd(30);
                let at = call + rnd(ret - call);
                let kind = if rnd(2) == 0 { Kind::Write((c * 1000 + k) as u64 + 1) } else { Kind::Read(None) };
                ops.push((at, Op { call, ret: Some(ret), kind }));
                t = ret + rnd(5);
            }
        }
        // Apply in effect order to fill in what reads saw.
        ops.sort_by_key(|(at, _)| *at);
        let mut value = None;
        for (_, op) in &mut ops {
            match &mut op.kind {
                Kind::Write(v) => value = Some(*v),
                Kind::Read(r) => *r = value,
            }
        }
        ops.into_iter().map(|(_, o)| o).collect()
    }

    #[test]
    fn linearizable_histories_pass_over_many_seeds() {
        for seed in 0..300 {
            let h = history(seed, 4, 12);
            check(&h, None).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }

    #[test]
    fn a_stale_or_invented_read_fails_over_many_seeds() {
        let mut caught = 0;
        for seed in 0..300 {
            let mut h = history(seed, 4, 12);
            // A read of a value no one ever wrote can never be explained.
            if let Some(op) = h.iter_mut().find(|o| matches!(o.kind, Kind::Read(_))) {
                op.kind = Kind::Read(Some(999_999));
                assert!(check(&h, None).is_err(), "seed {seed}: invented value accepted");
                caught += 1;
            }
        }
        assert!(caught > 250);
        // A read after a completed overwrite that returns the old value.
        let stale = vec![
            Op { call: 0, ret: Some(10), kind: Kind::Write(1) },
            Op { call: 20, ret: Some(30), kind: Kind::Write(2) },
            Op { call: 40, ret: Some(50), kind: Kind::Read(Some(1)) },
        ];
        assert!(check(&stale, None).is_err());
        // The same read concurrent with the overwrite is fine.
        let concurrent = vec![
            Op { call: 0, ret: Some(10), kind: Kind::Write(1) },
            Op { call: 20, ret: Some(30), kind: Kind::Write(2) },
            Op { call: 25, ret: Some(50), kind: Kind::Read(Some(1)) },
        ];
        assert!(check(&concurrent, None).is_ok());
        // A write whose outcome is unknown may have happened...
        let maybe = vec![
            Op { call: 0, ret: None, kind: Kind::Write(7) },
            Op { call: 40, ret: Some(50), kind: Kind::Read(Some(7)) },
        ];
        assert!(check(&maybe, None).is_ok());
        // ...or not.
        let maybe_not = vec![
            Op { call: 0, ret: None, kind: Kind::Write(7) },
            Op { call: 40, ret: Some(50), kind: Kind::Read(None) },
        ];
        assert!(check(&maybe_not, None).is_ok());
        // But once seen, it cannot un-happen.
        let flicker = vec![
            Op { call: 0, ret: None, kind: Kind::Write(7) },
            Op { call: 40, ret: Some(50), kind: Kind::Read(Some(7)) },
            Op { call: 60, ret: Some(70), kind: Kind::Read(None) },
        ];
        assert!(check(&flicker, None).is_err());
    }
}

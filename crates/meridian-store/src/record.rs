//! Records, their deterministic merge, and their versioned binary form (the
//! same bytes on disk and, later, on the replication wire).

use crate::hlc::Timestamp;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// Format version of an encoded record. Bumped on any incompatible change;
/// a decoder refuses versions it does not know instead of guessing.
/// (Version 1 lacked `seen`; it never left development.)
pub const RECORD_FORMAT: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Bytes(Vec<u8>),
    /// A delete. Kept (and replicated) like a value so that an older write
    /// arriving later cannot resurrect the key.
    Tombstone,
    /// A counter as a PN-counter: total increments and decrements made by
    /// each region. Merging takes the per-region maximum, so concurrent
    /// increments in different regions all count, exactly once.
    Counter {
        incs: BTreeMap<String, u64>,
        decs: BTreeMap<String, u64>,
    },
}

impl Value {
    /// A counter's exact total (i128 cannot overflow for any number of
    /// regions this side of 2^64).
    pub fn counter_total_exact(&self) -> Option<i128> {
        match self {
            Value::Counter { incs, decs } => {
                Some(incs.values().map(|&v| v as i128).sum::<i128>() - decs.values().map(|&v| v as i128).sum::<i128>())
            }
            _ => None,
        }
    }

    /// A counter's total as the `wasi:keyvalue` API sees it. Stored counters
    /// always fit (a local increment that would leave the i64 range is
    /// refused, and so is a peer's record whose total does not fit), so the
    /// clamp below never changes a value this build accepted.
    pub fn counter_total(&self) -> Option<i64> {
        self.counter_total_exact().map(|t| t.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub value: Value,
    pub ts: Timestamp,
    /// Region that made the write; breaks timestamp ties deterministically.
    pub origin: String,
    /// Timestamp of the version this write replaced where it was made
    /// (zero if the key was new there). A write that replaced a version at
    /// least as new as another one has seen it; otherwise the two were
    /// concurrent, and whichever loses the merge is a conflict.
    pub seen: Timestamp,
}

impl Record {
    /// Last-writer-wins order: timestamp, then origin name.
    fn lww_cmp(&self, other: &Record) -> Ordering {
        self.ts.cmp(&other.ts).then_with(|| self.origin.cmp(&other.origin))
    }

    /// If merging `other` into `self` discards a write that the winner had
    /// not seen, the discarded record: a conflict. Counters never conflict.
    pub fn conflict_loser<'a>(&'a self, other: &'a Record) -> Option<&'a Record> {
        if matches!((&self.value, &other.value), (Value::Counter { .. }, Value::Counter { .. })) {
            return None;
        }
        let (winner, loser) = match self.lww_cmp(other) {
            Ordering::Less => (other, self),
            Ordering::Greater => (self, other),
            Ordering::Equal => return None,
        };
        (winner.origin != loser.origin && winner.seen < loser.ts).then_some(loser)
    }

    /// The merge of two versions of the same key. Commutative, associative
    /// and idempotent, so replicas converge whatever the delivery order.
    pub fn merge(&self, other: &Record) -> Record {
        let newer = if self.lww_cmp(other) == Ordering::Less { other } else { self };
        match (&self.value, &other.value) {
            (Value::Counter { incs: ai, decs: ad }, Value::Counter { incs: bi, decs: bd }) => Record {
                value: Value::Counter { incs: max_merge(ai, bi), decs: max_merge(ad, bd) },
                ts: newer.ts,
                origin: newer.origin.clone(),
                seen: newer.seen,
            },
            _ => newer.clone(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.origin.len());
        out.push(RECORD_FORMAT);
        out.push(match self.value {
            Value::Bytes(_) => 0,
            Value::Tombstone => 1,
            Value::Counter { .. } => 2,
        });
        out.extend_from_slice(&self.ts.wall_ms.to_le_bytes());
        out.extend_from_slice(&self.ts.logical.to_le_bytes());
        out.extend_from_slice(&self.seen.wall_ms.to_le_bytes());
        out.extend_from_slice(&self.seen.logical.to_le_bytes());
        put_str(&mut out, &self.origin);
        match &self.value {
            Value::Bytes(b) => {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            Value::Tombstone => {}
            Value::Counter { incs, decs } => {
                for m in [incs, decs] {
                    out.extend_from_slice(&(m.len() as u16).to_le_bytes());
                    for (region, n) in m {
                        put_str(&mut out, region);
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { b: bytes };
        let version = r.u8()?;
        if version != RECORD_FORMAT {
            return Err(DecodeError::Version(version));
        }
        let kind = r.u8()?;
        let ts = Timestamp { wall_ms: r.u64()?, logical: r.u32()? };
        let seen = Timestamp { wall_ms: r.u64()?, logical: r.u32()? };
        let origin = r.str()?;
        let value = match kind {
            0 => {
                let n = r.u32()? as usize;
                Value::Bytes(r.take(n)?.to_vec())
            }
            1 => Value::Tombstone,
            2 => {
                let mut maps = [BTreeMap::new(), BTreeMap::new()];
                for m in &mut maps {
                    for _ in 0..r.u16()? {
                        let region = r.str()?;
                        let n = r.u64()?;
                        if m.insert(region, n).is_some() {
                            return Err(DecodeError::Corrupt("a counter names a region twice"));
                        }
                    }
                }
                let [incs, decs] = maps;
                Value::Counter { incs, decs }
            }
            _ => return Err(DecodeError::Corrupt("unknown value kind")),
        };
        if !r.b.is_empty() {
            return Err(DecodeError::Corrupt("trailing bytes after the record"));
        }
        Ok(Record { value, ts, origin, seen })
    }
}

fn max_merge(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out = a.clone();
    for (k, &v) in b {
        let e = out.entry(k.clone()).or_insert(0);
        *e = (*e).max(v);
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record format version {0} is not supported (this build reads version {RECORD_FORMAT})")]
    Version(u8),
    #[error("record is truncated")]
    Truncated,
    #[error("record is corrupt: {0}")]
    Corrupt(&'static str),
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::Corrupt("a name is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: Value, wall_ms: u64, origin: &str) -> Record {
        Record { value: v, ts: Timestamp { wall_ms, logical: 0 }, origin: origin.into(), seen: Timestamp::default() }
    }

    fn counter(incs: &[(&str, u64)]) -> Value {
        Value::Counter { incs: incs.iter().map(|(k, v)| (k.to_string(), *v)).collect(), decs: BTreeMap::new() }
    }

    #[test]
    fn last_writer_wins_with_a_deterministic_tie_break_in_any_order() {
        let a = rec(Value::Bytes(b"a".to_vec()), 10, "eu-west");
        let b = rec(Value::Bytes(b"b".to_vec()), 10, "us-east");
        let c = rec(Value::Tombstone, 9, "ap-southeast");
        let orders = [[&a, &b, &c], [&c, &b, &a], [&b, &a, &c], [&c, &a, &b]];
        for o in orders {
            let m = o[0].merge(o[1]).merge(o[2]);
            assert_eq!(m, b, "tie at the same ms goes to the greater region name");
        }
        // A later delete wins over the value; an older write cannot resurrect it.
        let d = rec(Value::Tombstone, 11, "eu-west");
        assert_eq!(b.merge(&d), d);
        assert_eq!(d.merge(&a), d);
    }

    #[test]
    fn counters_merge_without_losing_increments() {
        let eu = rec(counter(&[("eu-west", 5)]), 10, "eu-west");
        let us = rec(counter(&[("us-east", 7)]), 12, "us-east");
        let eu_later = rec(counter(&[("eu-west", 6)]), 13, "eu-west");
        let m1 = eu.merge(&us).merge(&eu_later);
        let m2 = eu_later.merge(&us).merge(&eu).merge(&us);
        assert_eq!(m1, m2);
        assert_eq!(m1.value.counter_total(), Some(13));
    }

    #[test]
    fn concurrent_overwrites_are_conflicts_and_causal_ones_are_not() {
        let a = rec(Value::Bytes(b"a".to_vec()), 10, "eu-west");
        let mut b = rec(Value::Bytes(b"b".to_vec()), 12, "us-east");
        // b was written without having seen a: whichever order they merge
        // in, a is the conflict's loser.
        assert_eq!(a.conflict_loser(&b), Some(&a));
        assert_eq!(b.conflict_loser(&a), Some(&a));
        // b written after its region had a (or something newer): no conflict.
        b.seen = a.ts;
        assert_eq!(a.conflict_loser(&b), None);
        assert_eq!(a.conflict_loser(&a), None);
    }

    #[test]
    fn encoding_round_trips() {
        let mut decs = BTreeMap::new();
        decs.insert("us-east".to_string(), 2);
        for v in [Value::Bytes(b"hello".to_vec()), Value::Tombstone, Value::Counter { incs: BTreeMap::new(), decs }] {
            let r = Record {
                value: v,
                ts: Timestamp { wall_ms: 123, logical: 4 },
                origin: "eu-west".into(),
                seen: Timestamp { wall_ms: 99, logical: 1 },
            };
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn corrupt_truncated_and_wrong_version_records_are_refused() {
        let r = rec(counter(&[("eu-west", 5)]), 10, "eu-west").encode();
        for n in 0..r.len() {
            assert_eq!(Record::decode(&r[..n]), Err(DecodeError::Truncated), "prefix of {n} bytes");
        }
        let mut v1 = r.clone();
        v1[0] = 1;
        assert_eq!(Record::decode(&v1), Err(DecodeError::Version(1)));
        let mut kind = r.clone();
        kind[1] = 9;
        assert!(matches!(Record::decode(&kind), Err(DecodeError::Corrupt(_))));
        let mut trailing = r.clone();
        trailing.push(0);
        assert!(matches!(Record::decode(&trailing), Err(DecodeError::Corrupt(_))));
    }
}

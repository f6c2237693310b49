//! The replication wire format: what one region sends another.
//!
//! ```text
//! "MRPL" | format u8 | kind u8 | body | crc32 (LE) of everything before it
//! ```
//!
//! A message is decoded and checked in full before anything is applied, so
//! a corrupt, truncated or unknown-version message changes nothing. The same
//! [`Change`] encoding is the body of the local replication log on disk.

use crate::hlc::Timestamp;
use crate::record::{DecodeError, Record};

pub const MAGIC: &[u8; 4] = b"MRPL";
/// Version of the replication message format. A receiver refuses versions
/// it does not know; both sides of a link must speak the same one.
pub const WIRE_FORMAT: u8 = 1;
/// Largest key, in bytes.
pub const MAX_KEY: usize = 4096;

/// One record of one key of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub ns: String,
    pub key: Vec<u8>,
    pub record: Record,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// The origin's log entries with sequence numbers in
    /// `(prev_seq, last_seq]`. Entries of namespaces the receiver may not
    /// hold were left out by the sender; the range still covers them.
    ///
    /// `stable`: every write the origin made with a timestamp at or below it
    /// is in this message or an earlier one (heartbeats, with no changes,
    /// advance it while the origin is idle).
    Push { origin: String, incarnation: u64, prev_seq: u64, last_seq: u64, stable: Timestamp, changes: Vec<Change> },
    /// One part of a full copy of the sender's state, sent when the receiver
    /// needs log entries the sender no longer has. After the `complete`
    /// part, the receiver has everything the origin logged up to `upto_seq`.
    Snapshot { origin: String, incarnation: u64, upto_seq: u64, complete: bool, changes: Vec<Change> },
}

/// A well-formed message whose content this region refuses to apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unacceptable {
    #[error("a record's clock is unacceptable: {0}")]
    Clock(#[from] crate::hlc::TooFarAhead),
    #[error("a counter in namespace {ns:?} totals outside the 64-bit signed range")]
    CounterRange { ns: String },
}

/// Checks what a peer sent beyond its encoding: no timestamp may be far
/// ahead of this region's clock (`now_ms`) or at the logical maximum, and
/// every counter must total within i64 — so applying it can never overflow
/// the clock or a counter here.
pub fn check_changes(changes: &[Change], now_ms: u64) -> Result<(), Unacceptable> {
    for c in changes {
        crate::hlc::check_remote(c.record.ts, now_ms)?;
        crate::hlc::check_remote(c.record.seen, now_ms)?;
        if let Some(t) = c.record.value.counter_total_exact() {
            if i64::try_from(t).is_err() {
                return Err(Unacceptable::CounterRange { ns: c.ns.clone() });
            }
        }
    }
    Ok(())
}

impl Message {
    /// [`check_changes`] for a whole message, its stable time included.
    pub fn check_content(&self, now_ms: u64) -> Result<(), Unacceptable> {
        match self {
            Message::Push { stable, changes, .. } => {
                crate::hlc::check_remote(*stable, now_ms)?;
                check_changes(changes, now_ms)
            }
            Message::Snapshot { changes, .. } => check_changes(changes, now_ms),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a replication message (bad magic)")]
    Magic,
    #[error("replication format version {0} is not supported (this build speaks version {WIRE_FORMAT})")]
    Version(u8),
    #[error("replication message is truncated")]
    Truncated,
    #[error("replication message checksum mismatch (corrupted in transit?)")]
    Checksum,
    #[error("replication message is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("replication message carries a bad record: {0}")]
    Record(#[from] DecodeError),
}

impl Change {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        put_str(out, &self.ns);
        put_bytes(out, &self.key);
        put_bytes(out, &self.record.encode());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.key.len());
        self.encode_into(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Change, WireError> {
        let mut r = Reader { b: bytes };
        let c = r.change()?;
        if !r.b.is_empty() {
            return Err(WireError::Corrupt("trailing bytes after a change"));
        }
        Ok(c)
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.push(WIRE_FORMAT);
        let changes = match self {
            Message::Push { origin, incarnation, prev_seq, last_seq, stable, changes } => {
                out.push(1);
                put_str(&mut out, origin);
                for n in [incarnation, prev_seq, last_seq, &stable.wall_ms] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                out.extend_from_slice(&stable.logical.to_le_bytes());
                changes
            }
            Message::Snapshot { origin, incarnation, upto_seq, complete, changes } => {
                out.push(2);
                put_str(&mut out, origin);
                for n in [incarnation, upto_seq] {
                    out.extend_from_slice(&n.to_le_bytes());
                }
                out.push(*complete as u8);
                changes
            }
        };
        out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
        for c in changes {
            c.encode_into(&mut out);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() < 6 {
            return Err(if MAGIC.starts_with(&bytes[..bytes.len().min(4)]) {
                WireError::Truncated
            } else {
                WireError::Magic
            });
        }
        if &bytes[..4] != MAGIC {
            return Err(WireError::Magic);
        }
        if bytes[4] != WIRE_FORMAT {
            return Err(WireError::Version(bytes[4]));
        }
        if bytes.len() < 10 {
            return Err(WireError::Truncated);
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(WireError::Checksum);
        }
        let mut r = Reader { b: &body[5..] };
        let kind = r.u8()?;
        let origin = r.str()?;
        if origin.is_empty() {
            return Err(WireError::Corrupt("empty origin"));
        }
        let incarnation = r.u64()?;
        let msg = match kind {
            1 => {
                let prev_seq = r.u64()?;
                let last_seq = r.u64()?;
                if last_seq < prev_seq {
                    return Err(WireError::Corrupt("sequence range ends before it starts"));
                }
                let stable = Timestamp { wall_ms: r.u64()?, logical: r.u32()? };
                Message::Push { origin, incarnation, prev_seq, last_seq, stable, changes: r.changes()? }
            }
            2 => {
                let upto_seq = r.u64()?;
                let complete = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError::Corrupt("bad flag")),
                };
                Message::Snapshot { origin, incarnation, upto_seq, complete, changes: r.changes()? }
            }
            _ => return Err(WireError::Corrupt("unknown message kind")),
        };
        if !r.b.is_empty() {
            return Err(WireError::Corrupt("trailing bytes"));
        }
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Corrupt("a name is not UTF-8"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn change(&mut self) -> Result<Change, WireError> {
        let ns = self.str()?;
        if ns.is_empty() || ns.contains('\0') {
            return Err(WireError::Corrupt("bad namespace name"));
        }
        let key = self.bytes()?.to_vec();
        if key.len() > MAX_KEY {
            return Err(WireError::Corrupt("key too long"));
        }
        let record = Record::decode(self.bytes()?)?;
        Ok(Change { ns, key, record })
    }
    fn changes(&mut self) -> Result<Vec<Change>, WireError> {
        let n = self.u32()? as usize;
        // Every change takes at least 10 bytes: refuse counts the message
        // cannot hold before allocating for them.
        if n > self.b.len() / 10 {
            return Err(WireError::Truncated);
        }
        (0..n).map(|_| self.change()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Timestamp, Value};

    fn sample() -> Message {
        let rec = |v: &[u8], ms| Record {
            value: Value::Bytes(v.to_vec()),
            ts: Timestamp { wall_ms: ms, logical: 0 },
            origin: "eu-west".into(),
            seen: Timestamp::default(),
        };
        Message::Push {
            origin: "eu-west".into(),
            incarnation: 7,
            prev_seq: 10,
            last_seq: 12,
            stable: Timestamp { wall_ms: 6, logical: 1 },
            changes: vec![
                Change { ns: "sessions".into(), key: b"a".to_vec(), record: rec(b"1", 5) },
                Change { ns: "sessions".into(), key: b"b".to_vec(), record: rec(b"2", 6) },
            ],
        }
    }

    #[test]
    fn messages_round_trip() {
        let m = sample();
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        let s = Message::Snapshot { origin: "x".into(), incarnation: 1, upto_seq: 9, complete: true, changes: vec![] };
        assert_eq!(Message::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn every_truncation_every_flipped_byte_and_other_versions_are_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(Message::decode(&bytes[..n]).is_err(), "prefix of {n} bytes accepted");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Message::decode(&b).is_err(), "flipped byte {i} accepted");
        }
        let mut v = bytes.clone();
        v[4] = 9;
        assert_eq!(Message::decode(&v), Err(WireError::Version(9)));
        assert_eq!(Message::decode(b"GET / HTTP/1.1\r\n"), Err(WireError::Magic));
    }
}

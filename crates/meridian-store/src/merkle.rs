//! The anti-entropy tree of a namespace: a fixed-shape Merkle tree over the
//! SHA-256 of the keys, kept by the writer as records change.
//!
//! Every record sits at the leaf named by the first [`LEAF_DEPTH`] nibbles of
//! the hash of its key. A node holds the XOR of the hashes of every record
//! below it and how many there are; XOR makes the tree incremental: a
//! record that changes XORs its old hash out of, and its new hash into, the
//! [`LEAF_DEPTH`] + 1 nodes on its path, without reading a sibling. Two
//! regions holding the same records have equal roots; where they differ,
//! only the nodes on the paths to the differing records differ, so a peer
//! finds them by descending from the root into differing children only.
//!
//! The first level is the 16-bucket digest that builds before this tree
//! compared (bucket = low nibble of the first byte of the hash), so a peer
//! of either build can still compare with this one.

use sha2::{Digest, Sha256};
use std::fmt;

/// Children per node.
pub const FANOUT: usize = 16;
/// Levels below the root. 16⁴ = 65,536 leaves: a namespace of a million
/// keys has about 15 per leaf, and finding one differing key reads
/// 1 + 4 × 16 nodes on each side.
pub const LEAF_DEPTH: usize = 4;

/// Bytes of a key's packed position at the head of an index entry.
pub(crate) const POSITION_BYTES: usize = LEAF_DEPTH / 2;

/// One node: the XOR of the hashes of the records below it, and their number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub hash: [u8; 32],
    pub count: u64,
}

/// Bytes of an encoded [`Node`].
pub const NODE_BYTES: usize = 40;

impl Node {
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.hash == [0; 32]
    }

    /// Adds (`delta` 1), removes (-1) or replaces (0) a record's hash.
    pub(crate) fn apply(&mut self, hash: &[u8; 32], delta: i64) {
        xor_into(&mut self.hash, hash);
        self.count = self.count.saturating_add_signed(delta);
    }

    /// Adds the records of another node (a child) to this one.
    pub(crate) fn add(&mut self, other: &Node) {
        self.apply(&other.hash, 0);
        self.count = self.count.saturating_add(other.count);
    }

    pub fn encode(&self) -> [u8; NODE_BYTES] {
        let mut out = [0; NODE_BYTES];
        out[..32].copy_from_slice(&self.hash);
        out[32..].copy_from_slice(&self.count.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Node> {
        if b.len() != NODE_BYTES {
            return None;
        }
        let mut hash = [0; 32];
        hash.copy_from_slice(&b[..32]);
        Some(Node { hash, count: u64::from_le_bytes(b[32..].try_into().ok()?) })
    }
}

/// `into ^= other`: how a hash goes into (or out of) a node.
pub(crate) fn xor_into(into: &mut [u8; 32], other: &[u8; 32]) {
    for (o, x) in into.iter_mut().zip(other) {
        *o ^= x;
    }
}

/// The hash a record adds to the tree: of its key and its stored bytes.
pub fn record_hash(key: &[u8], encoded: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((key.len() as u32).to_le_bytes());
    h.update(key);
    h.update(encoded);
    h.finalize().into()
}

/// The leaf of a key: the first [`LEAF_DEPTH`] nibbles of SHA-256(key), the
/// low nibble of each byte first.
pub fn position(key: &[u8]) -> [u8; LEAF_DEPTH] {
    let h = Sha256::digest(key);
    let mut p = [0; LEAF_DEPTH];
    for (i, n) in p.iter_mut().enumerate() {
        let b = h[i / 2];
        *n = if i % 2 == 0 { b & 0x0f } else { b >> 4 };
    }
    p
}

/// A node's place: the nibbles from the root to it (none: the root).
/// Written as that many hex digits ("" is the root, "3a" a node of the
/// second level).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePath(Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("a tree path is at most {LEAF_DEPTH} hex digits; got {0}")]
    TooDeep(usize),
    #[error("a tree path is hex digits; got {0:?}")]
    NotHex(String),
}

impl NodePath {
    pub fn root() -> NodePath {
        NodePath(Vec::new())
    }

    pub fn parse(s: &str) -> Result<NodePath, PathError> {
        if s.len() > LEAF_DEPTH {
            return Err(PathError::TooDeep(s.len()));
        }
        s.chars()
            .map(|c| c.to_digit(16).map(|d| d as u8))
            .collect::<Option<Vec<u8>>>()
            .map(NodePath)
            .ok_or_else(|| PathError::NotHex(s.to_string()))
    }

    pub fn nibbles(&self) -> &[u8] {
        &self.0
    }

    pub fn depth(&self) -> usize {
        self.0.len()
    }

    pub fn is_leaf(&self) -> bool {
        self.0.len() == LEAF_DEPTH
    }

    /// Its `i`-th child (`i` < [`FANOUT`]); `None` below a leaf.
    pub fn child(&self, i: usize) -> Option<NodePath> {
        if self.is_leaf() || i >= FANOUT {
            return None;
        }
        let mut v = self.0.clone();
        v.push(i as u8);
        Some(NodePath(v))
    }

    /// Whether a key at `position` is below this node.
    pub fn covers(&self, position: &[u8; LEAF_DEPTH]) -> bool {
        position.starts_with(&self.0)
    }
}

impl fmt::Display for NodePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for n in &self.0 {
            write!(f, "{n:x}")?;
        }
        Ok(())
    }
}

/// A `tree` table key: `ns \0 depth nibbles…` (the children of one node
/// are adjacent).
pub(crate) fn node_key(ns: &[u8], nibbles: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + 2 + nibbles.len());
    k.extend_from_slice(ns);
    k.push(0);
    k.push(nibbles.len() as u8);
    k.extend_from_slice(nibbles);
    k
}

/// The namespace and the nibbles of a `tree` table key.
pub(crate) fn split_node_key(k: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = k.iter().position(|&b| b == 0)?;
    let depth = *k.get(end + 1)? as usize;
    let nibbles = &k[end + 2..];
    (nibbles.len() == depth).then_some((&k[..end], nibbles))
}

fn packed(position: &[u8; LEAF_DEPTH]) -> [u8; POSITION_BYTES] {
    let mut out = [0; POSITION_BYTES];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (position[2 * i] << 4) | position[2 * i + 1];
    }
    out
}

/// An `index` table key: `ns \0 position key`, so the keys under one node
/// are one range.
pub(crate) fn index_key(ns: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + 1 + POSITION_BYTES + key.len());
    k.extend_from_slice(ns);
    k.push(0);
    k.extend_from_slice(&packed(&position(key)));
    k.extend_from_slice(key);
    k
}

/// The `index` keys of everything under `path`: `[start, end)`.
pub(crate) fn index_range(ns: &[u8], path: &NodePath) -> (Vec<u8>, Vec<u8>) {
    let d = path.depth();
    let v = path.0.iter().fold(0u32, |acc, &n| (acc << 4) | n as u32);
    let shift = 4 * (LEAF_DEPTH - d) as u32;
    let (lo, hi) = (v << shift, (v + 1) << shift);
    let mut start = ns.to_vec();
    start.push(0);
    start.extend_from_slice(&lo.to_be_bytes()[4 - POSITION_BYTES..]);
    let mut end = ns.to_vec();
    if hi >> (8 * POSITION_BYTES) != 0 {
        // The last node of the namespace: up to the next namespace.
        end.push(1);
    } else {
        end.push(0);
        end.extend_from_slice(&hi.to_be_bytes()[4 - POSITION_BYTES..]);
    }
    (start, end)
}

/// The key of an `index` key (after `ns \0 position`).
pub(crate) fn key_of_index(ns_len: usize, index_key: &[u8]) -> &[u8] {
    index_key.get(ns_len + 1 + POSITION_BYTES..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_print_and_nest() {
        let p = NodePath::parse("3a").unwrap();
        assert_eq!(p.nibbles(), &[3, 10]);
        assert_eq!(p.to_string(), "3a");
        assert_eq!(NodePath::parse("").unwrap(), NodePath::root());
        assert_eq!(NodePath::parse("12345"), Err(PathError::TooDeep(5)));
        assert!(matches!(NodePath::parse("g"), Err(PathError::NotHex(_))));
        let leaf = NodePath::parse("0f0f").unwrap();
        assert!(leaf.is_leaf() && leaf.child(0).is_none());
        assert_eq!(p.child(15).unwrap().to_string(), "3af");
    }

    /// Every key's index entry falls in the range of each node on its path
    /// and of no sibling, at every depth, including the last node.
    #[test]
    fn index_ranges_hold_exactly_the_keys_below_a_node() {
        for i in 0..2000u32 {
            let key = i.to_le_bytes();
            let pos = position(&key);
            let ik = index_key(b"ns", &key);
            assert_eq!(key_of_index(2, &ik), key);
            for d in 0..=LEAF_DEPTH {
                let on = NodePath(pos[..d].to_vec());
                let (s, e) = index_range(b"ns", &on);
                assert!(s <= ik && ik < e, "key {i} depth {d}");
                if d > 0 {
                    let mut other = on.0.clone();
                    other[d - 1] = (other[d - 1] + 1) % 16;
                    let (s, e) = index_range(b"ns", &NodePath(other));
                    assert!(!(s <= ik && ik < e), "key {i} in a sibling at depth {d}");
                }
            }
        }
        let (_, end) = index_range(b"ns", &NodePath::parse("ffff").unwrap());
        assert_eq!(end, b"ns\x01");
        let (start, end) = index_range(b"ns", &NodePath::root());
        assert_eq!((start.as_slice(), end.as_slice()), (&b"ns\0\0\0"[..], &b"ns\x01"[..]));
    }
}

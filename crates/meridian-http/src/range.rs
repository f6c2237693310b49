//! Byte ranges (RFC 9110 section 14): which part of a whole body a `Range`
//! asks for, and whether an `If-Range` lets it. Edges cut ranges from cached
//! objects with this, regions from static files.

/// What a GET with `Range` gets from a whole body.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole body, 200: no `Range`, an `If-Range` for another
    /// representation, or a `Range` not served in parts (several ranges, a
    /// unit other than bytes, a malformed one — RFC 9110 lets a server
    /// ignore those).
    Full,
    /// 206 with these bytes (`start..end`, end exclusive).
    Partial(std::ops::Range<usize>),
    /// 416: no byte of the body is in the range.
    Unsatisfiable,
}

impl RangeAnswer {
    /// The `Content-Range` this answer carries for a body of `len` bytes:
    /// `bytes a-b/len` for a part, `bytes */len` for a 416, none for the
    /// whole body.
    pub fn content_range(&self, len: usize) -> Option<http::HeaderValue> {
        let value = match self {
            RangeAnswer::Full => return None,
            RangeAnswer::Partial(r) => format!("bytes {}-{}/{len}", r.start, r.end.saturating_sub(1)),
            RangeAnswer::Unsatisfiable => format!("bytes */{len}"),
        };
        // Digits, spaces and ASCII punctuation only.
        http::HeaderValue::from_str(&value).ok()
    }
}

/// `Range: bytes=…` with a single range, against a body of `len` bytes.
pub fn byte_range(range: &str, len: usize) -> RangeAnswer {
    let Some((unit, spec)) = range.trim().split_once('=') else {
        return RangeAnswer::Full;
    };
    let spec = spec.trim();
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| -> Option<Option<u64>> {
        let s = s.trim();
        if s.is_empty() {
            return Some(None);
        }
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Past u64: as far as any body goes.
        Some(Some(s.parse::<u64>().unwrap_or(u64::MAX)))
    };
    let (Some(first), Some(last)) = (number(first), number(last)) else {
        return RangeAnswer::Full;
    };
    let len64 = len as u64;
    match (first, last) {
        (Some(a), Some(b)) if a > b => RangeAnswer::Full,
        (Some(a), _) if a >= len64 => RangeAnswer::Unsatisfiable,
        (Some(a), Some(b)) => RangeAnswer::Partial(a as usize..(b.min(len64 - 1) + 1) as usize),
        (Some(a), None) => RangeAnswer::Partial(a as usize..len),
        (None, Some(0)) => RangeAnswer::Unsatisfiable,
        (None, Some(_)) if len == 0 => RangeAnswer::Unsatisfiable,
        (None, Some(n)) => RangeAnswer::Partial(len - n.min(len64) as usize..len),
        (None, None) => RangeAnswer::Full,
    }
}

/// What a GET with these `Range` and `If-Range` values gets from a whole
/// body of `len` bytes with these validators: a range only of the
/// representation the client holds part of (else all of it).
pub fn answer(
    range: Option<&str>,
    if_range: Option<&str>,
    etag: Option<&str>,
    last_modified: Option<&str>,
    len: usize,
) -> RangeAnswer {
    let Some(range) = range else { return RangeAnswer::Full };
    if if_range.is_some_and(|v| !if_range_holds(v, etag, last_modified)) {
        return RangeAnswer::Full;
    }
    byte_range(range, len)
}

/// Does `If-Range: if_range` name the representation with these
/// validators? Only a strong entity tag that is equal, or a date equal to
/// `Last-Modified`, does (RFC 9110 section 13.1.5): a weak tag cannot vouch
/// for bytes.
pub fn if_range_holds(if_range: &str, etag: Option<&str>, last_modified: Option<&str>) -> bool {
    let v = if_range.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        let etag = etag.map(str::trim);
        return !v.starts_with("W/") && etag.is_some_and(|e| !e.starts_with("W/") && e == v);
    }
    let lm = last_modified.and_then(|d| httpdate::parse_http_date(d).ok());
    lm.is_some_and(|lm| httpdate::parse_http_date(v).ok() == Some(lm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        use RangeAnswer::*;
        // (Range, body length, answer)
        let cases: &[(&str, usize, RangeAnswer)] = &[
            ("bytes=0-3", 10, Partial(0..4)),
            ("bytes=2-", 10, Partial(2..10)),
            ("bytes=-3", 10, Partial(7..10)),
            ("bytes=-30", 10, Partial(0..10)),
            ("bytes=5-100", 10, Partial(5..10)),
            ("bytes=9-9", 10, Partial(9..10)),
            ("bytes=0-99999999999999999999999", 10, Partial(0..10)),
            ("BYTES = 1-2", 10, Partial(1..3)),
            ("bytes=10-", 10, Unsatisfiable),
            ("bytes=10-20", 10, Unsatisfiable),
            ("bytes=-0", 10, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            // Ignored: the whole body.
            ("bytes=5-2", 10, Full),
            ("bytes=0-1,4-5", 10, Full),
            ("items=0-1", 10, Full),
            ("bytes=a-b", 10, Full),
            ("bytes=-", 10, Full),
            ("bytes=+1-2", 10, Full),
            ("bytes", 10, Full),
        ];
        for (range, len, want) in cases {
            assert_eq!(&byte_range(range, *len), want, "{range} of {len} bytes");
        }
    }

    #[test]
    fn content_range_names_the_part_sent_and_the_whole_length() {
        assert_eq!(RangeAnswer::Partial(4..6).content_range(11).unwrap(), "bytes 4-5/11");
        assert_eq!(RangeAnswer::Partial(0..11).content_range(11).unwrap(), "bytes 0-10/11");
        assert_eq!(RangeAnswer::Unsatisfiable.content_range(11).unwrap(), "bytes */11");
        assert_eq!(RangeAnswer::Full.content_range(11), None);
    }

    #[test]
    fn if_range_needs_a_strong_equal_tag_or_the_same_date() {
        let lm = "Tue, 14 Nov 2023 22:13:20 GMT";
        assert!(if_range_holds("\"v1\"", Some("\"v1\""), None));
        assert!(!if_range_holds("\"v0\"", Some("\"v1\""), None));
        assert!(!if_range_holds("W/\"v1\"", Some("\"v1\""), None));
        assert!(!if_range_holds("\"v1\"", Some("W/\"v1\""), None));
        assert!(!if_range_holds("\"v1\"", None, Some(lm)));
        assert!(if_range_holds(lm, None, Some(lm)));
        assert!(!if_range_holds("Tue, 14 Nov 2023 22:13:19 GMT", None, Some(lm)));
        assert!(!if_range_holds("yesterday", None, Some(lm)));
    }
}

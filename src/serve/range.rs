//! HTTP `Range` headers (RFC 9110 §14): one byte range of a NAR.
//!
//! ```text
//! Range: bytes=0-1023      the first KiB
//! Range: bytes=1024-       from 1024 to the end
//! Range: bytes=-1024       the last KiB
//! ```
//! Several ranges at once, or another unit, are answered with the whole object (the
//! RFC lets a server ignore a Range it does not support); a range that starts past
//! the end is unsatisfiable (416). Pure: no IO.

use std::ops::Range;

/// One range as asked, before the object's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// `first-last`, both included.
    FromTo(u64, u64),
    /// `first-`.
    From(u64),
    /// `-n`: the last n bytes.
    Last(u64),
}

/// The range of a `Range` header's value, None when it is to be ignored (malformed,
/// several ranges, not bytes).
pub fn parse(header: &str) -> Option<Spec> {
    let set = header.trim().strip_prefix("bytes=")?.trim();
    if set.contains(',') {
        return None;
    }
    let (first, last) = set.split_once('-')?;
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, true) => None,
        (true, false) => num(last).map(Spec::Last),
        (false, true) => num(first).map(Spec::From),
        (false, false) => {
            let (a, b) = (num(first)?, num(last)?);
            (a <= b).then_some(Spec::FromTo(a, b))
        }
    }
}

/// The bytes of an object of `size` bytes that `spec` asks for; Err when none of them
/// exist (416 Range Not Satisfiable).
pub fn resolve(spec: Spec, size: u64) -> Result<Range<u64>, Unsatisfiable> {
    match spec {
        Spec::FromTo(a, b) if a < size => Ok(a..b.saturating_add(1).min(size)),
        Spec::From(a) if a < size => Ok(a..size),
        Spec::Last(n) if n > 0 && size > 0 => Ok(size.saturating_sub(n)..size),
        _ => Err(Unsatisfiable),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(parse("bytes=0-1023"), Some(Spec::FromTo(0, 1023)));
        assert_eq!(parse("bytes=1024-"), Some(Spec::From(1024)));
        assert_eq!(parse("bytes=-1024"), Some(Spec::Last(1024)));
        assert_eq!(parse(" bytes= 5 - 9 "), Some(Spec::FromTo(5, 9)));
    }

    #[test]
    fn what_is_ignored() {
        for h in [
            "",
            "bytes=",
            "bytes=-",
            "bytes=5-4",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1",
            "bytes=99999999999999999999999-",
            "bytes=--1",
        ] {
            assert_eq!(parse(h), None, "{h:?}");
        }
    }

    #[test]
    fn resolves_against_the_size() {
        assert_eq!(resolve(Spec::FromTo(0, 9), 100), Ok(0..10));
        assert_eq!(resolve(Spec::FromTo(90, 200), 100), Ok(90..100));
        assert_eq!(resolve(Spec::FromTo(99, 99), 100), Ok(99..100));
        assert_eq!(resolve(Spec::FromTo(0, u64::MAX), 100), Ok(0..100));
        assert_eq!(resolve(Spec::From(10), 100), Ok(10..100));
        assert_eq!(resolve(Spec::Last(10), 100), Ok(90..100));
        assert_eq!(resolve(Spec::Last(1000), 100), Ok(0..100));
        assert_eq!(resolve(Spec::FromTo(100, 200), 100), Err(Unsatisfiable));
        assert_eq!(resolve(Spec::From(100), 100), Err(Unsatisfiable));
        assert_eq!(resolve(Spec::Last(0), 100), Err(Unsatisfiable));
        assert_eq!(resolve(Spec::Last(5), 0), Err(Unsatisfiable));
        assert_eq!(resolve(Spec::From(0), 0), Err(Unsatisfiable));
    }
}

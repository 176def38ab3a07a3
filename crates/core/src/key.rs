//! The canonical actor key codec.
//!
//! An actor key is an array of string segments. Its canonical string joins the segments with
//! `/`, escaping `\` and `/` inside a segment with a backslash, writing an empty segment as
//! `\0` and the empty key as `/`. The same string is used in URLs, logs and storage, so
//! `decode(encode(k)) == k` must hold for every key, and distinct keys must never share a string.

use crate::config::Limits;
use crate::error::{Error, Result};

/// Encodes key segments as the canonical key string.
pub fn encode(key: &[String]) -> String {
    if key.is_empty() {
        return "/".to_string();
    }
    let mut out = String::with_capacity(key.iter().map(|s| s.len() + 1).sum());
    for (i, segment) in key.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        if segment.is_empty() {
            out.push_str("\\0");
            continue;
        }
        for ch in segment.chars() {
            if ch == '\\' || ch == '/' {
                out.push('\\');
            }
            out.push(ch);
        }
    }
    out
}

/// Decodes a canonical key string back into segments.
pub fn decode(canonical: &str) -> Result<Vec<String>> {
    if canonical == "/" {
        return Ok(Vec::new());
    }
    if canonical.is_empty() {
        return Err(invalid("the canonical key string is empty"));
    }
    let mut segments = Vec::new();
    let mut current = String::new();
    // Tracks whether the current segment was written as the empty-segment marker `\0`.
    let mut empty_marker = false;
    let mut chars = canonical.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' => match chars.next() {
                Some('0') if current.is_empty() && !empty_marker => empty_marker = true,
                Some(escaped @ ('\\' | '/')) if !empty_marker => current.push(escaped),
                _ => return Err(invalid("bad escape in key string")),
            },
            '/' => {
                if current.is_empty() && !empty_marker {
                    return Err(invalid("a key segment is empty but not written as \\0"));
                }
                segments.push(std::mem::take(&mut current));
                empty_marker = false;
            }
            _ if empty_marker => return Err(invalid("text follows the empty-segment marker")),
            other => current.push(other),
        }
    }
    if current.is_empty() && !empty_marker {
        return Err(invalid("a key segment is empty but not written as \\0"));
    }
    segments.push(current);
    Ok(segments)
}

/// Checks a key against the configured size limits.
/// The key's size is its canonical string's length, so separators, escapes and empty
/// segments count too and many empty segments cannot slip past the limit.
pub fn validate(key: &[String], limits: &Limits) -> Result<()> {
    for segment in key {
        if segment.len() > limits.max_key_segment_bytes {
            return Err(invalid(format!(
                "a key segment is {} bytes; the limit is {}",
                segment.len(),
                limits.max_key_segment_bytes
            )));
        }
    }
    let total = encode(key).len();
    if total > limits.max_key_bytes {
        return Err(invalid(format!(
            "the key is {total} bytes; the limit is {}",
            limits.max_key_bytes
        )));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidKey {
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(encode(&[]), "/");
        assert_eq!(encode(&key(&["room-1"])), "room-1");
        assert_eq!(encode(&key(&["a", "b"])), "a/b");
        assert_eq!(encode(&key(&["a/b"])), "a\\/b");
        assert_eq!(encode(&key(&["a\\b"])), "a\\\\b");
        assert_eq!(encode(&key(&[""])), "\\0");
        assert_eq!(encode(&key(&["", ""])), "\\0/\\0");
    }

    #[test]
    fn round_trip_of_tricky_keys() {
        let cases: Vec<Vec<String>> = vec![
            vec![],
            key(&[""]),
            key(&["", ""]),
            key(&["/"]),
            key(&["\\"]),
            key(&["\\0"]),
            key(&["0"]),
            key(&["a", "", "b"]),
            key(&["a/", "/b"]),
            key(&["\\/", "//", "\\\\"]),
            key(&["ünïcödé", "日本"]),
            key(&["trailing\\"]),
        ];
        for case in cases {
            let encoded = encode(&case);
            assert_eq!(decode(&encoded).unwrap(), case, "round trip of {encoded:?}");
        }
    }

    #[test]
    fn distinct_keys_have_distinct_strings() {
        let keys = [
            vec![],
            key(&[""]),
            key(&["/"]),
            key(&["", ""]),
            key(&["a/b"]),
            key(&["a", "b"]),
            key(&["\\0"]),
        ];
        let strings: std::collections::HashSet<String> = keys.iter().map(|k| encode(k)).collect();
        assert_eq!(strings.len(), keys.len());
    }

    #[test]
    fn exhaustive_round_trip_over_a_small_alphabet() {
        // Every key of up to three segments, each up to three characters drawn from the
        // characters that matter to the codec.
        let alphabet = ['a', '/', '\\', '0'];
        let mut segments = vec![String::new()];
        for len in 1..=3 {
            let mut stack = vec![String::new()];
            for _ in 0..len {
                stack = stack
                    .into_iter()
                    .flat_map(|s| {
                        alphabet.iter().map(move |c| {
                            let mut t = s.clone();
                            t.push(*c);
                            t
                        })
                    })
                    .collect();
            }
            segments.extend(stack);
        }
        let mut seen = std::collections::HashMap::new();
        for a in &segments {
            for b in segments.iter().take(12) {
                for k in [
                    vec![a.clone()],
                    vec![a.clone(), b.clone()],
                    vec![b.clone(), a.clone(), b.clone()],
                ] {
                    let encoded = encode(&k);
                    assert_eq!(decode(&encoded).unwrap(), k);
                    if let Some(previous) = seen.insert(encoded.clone(), k.clone()) {
                        assert_eq!(previous, k, "two keys share {encoded:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_strings_are_rejected() {
        for bad in ["", "a//b", "a/", "/a", "\\x", "\\0a", "a\\"] {
            assert!(decode(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits::default();
        assert!(validate(&key(&["x"]), &limits).is_ok());
        let long = "x".repeat(limits.max_key_segment_bytes + 1);
        assert_eq!(
            validate(&[long], &limits).unwrap_err().code(),
            "invalid_key"
        );
        let many: Vec<String> = (0..20).map(|_| "y".repeat(100)).collect();
        assert_eq!(validate(&many, &limits).unwrap_err().code(), "invalid_key");
        let empties = vec![String::new(); 100_000];
        assert_eq!(
            validate(&empties, &limits).unwrap_err().code(),
            "invalid_key"
        );
    }
}

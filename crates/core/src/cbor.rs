//! Just enough CBOR (RFC 8949) for core to read a request envelope, and to check that every
//! value in it is one keel's value decoder accepts.
//!
//! A CBOR request body is a map with text keys (`key`, `args`, `mode`, `input`). Core needs
//! the key and mode, and passes `args` and `input` on to the host untouched, as the exact
//! bytes the client sent. So this module only walks items to find their extent and decodes
//! text strings and arrays of them; every other value stays opaque bytes.
//!
//! The walk is also the check: an item is accepted only if the host's decoder
//! (`ts/cbor.ts`) takes it, so bad bytes are refused here as `request.malformed` before any
//! user code runs. What must stay true, in step with that decoder:
//! - every length is definite (no indefinite-length strings, arrays or maps);
//! - text strings are valid UTF-8;
//! - map keys are text strings, except inside tag 259;
//! - the only tags are 1 (around an integer within ±(2^53 − 1) or a float), 2 and 3 (around a
//!   byte string), 258 (around an array) and 259 (around a map);
//! - the only simple values are false, true, null and undefined, and the floats are 16, 32
//!   or 64 bits wide;
//! - nesting is at most [`MAX_DEPTH`] levels, counted from the top of the body.
//!
//! Why a hand-written walker and not `ciborium` or `minicbor`: the walk must refuse exactly
//! what the host's decoder refuses and keep `args` as the client's bytes, while a general
//! decoder accepts what keel does not and builds a value tree. Measured with ciborium 0.2 in
//! a release loop on the shared 2-core dev machine, on a 971-byte action body (a key and a
//! state-like argument of 20 small objects): [`map_entries`] with its full check took 3.5 to
//! 3.7 us, `ciborium::from_reader` into a `Value` 36.5 to 37.2 us, and ciborium accepted an
//! indefinite-length array and an unknown tag (32), both of which keel must refuse, so it
//! would need this walk on top anyway.

use crate::error::{Error, Result};

/// Nesting deeper than this is refused, so a hostile body cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

fn malformed(message: &str) -> Error {
    Error::malformed(format!("invalid CBOR body: {message}"))
}

/// Reads an item's head at `pos`: (major type, additional info, argument, position after
/// the head). For indefinite lengths (info 31) the argument is 0.
fn head(bytes: &[u8], pos: usize) -> Result<(u8, u8, u64, usize)> {
    let first = *bytes.get(pos).ok_or_else(|| malformed("truncated"))?;
    let major = first >> 5;
    let info = first & 0x1f;
    let (argument, next) = match info {
        0..=23 => (u64::from(info), pos + 1),
        24..=27 => {
            let width = 1usize << (info - 24);
            let end = pos + 1 + width;
            let slice = bytes
                .get(pos + 1..end)
                .ok_or_else(|| malformed("truncated"))?;
            let value = slice.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            (value, end)
        }
        31 if matches!(major, 2..=5 | 7) => (0, pos + 1),
        _ => return Err(malformed("reserved additional information")),
    };
    Ok((major, info, argument, next))
}

/// Epoch-seconds date: a number.
const TAG_EPOCH_DATE: u64 = 1;
/// Positive and negative bignums: a byte string.
const TAG_POSITIVE_BIGNUM: u64 = 2;
const TAG_NEGATIVE_BIGNUM: u64 = 3;
/// A set: an array.
const TAG_SET: u64 = 258;
/// A map whose keys may be any value.
const TAG_MAP: u64 = 259;

/// The largest integer JS decodes as a number rather than a `BigInt` (2^53 − 1).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Returns the position just after the item that starts at `pos`, having checked that the
/// item is one keel accepts (see the module doc).
pub fn skip(bytes: &[u8], pos: usize) -> Result<usize> {
    skip_at_depth(bytes, pos, 0)
}

fn skip_at_depth(bytes: &[u8], pos: usize, depth: usize) -> Result<usize> {
    if depth > MAX_DEPTH {
        return Err(malformed("nested too deeply"));
    }
    let (major, info, argument, next) = head(bytes, pos)?;
    if info == 31 {
        return Err(malformed(
            "indefinite lengths (and their breaks) are not accepted",
        ));
    }
    match major {
        0 | 1 => Ok(next),
        2 | 3 => {
            let end = usize::try_from(argument)
                .ok()
                .and_then(|len| next.checked_add(len))
                .filter(|end| *end <= bytes.len())
                .ok_or_else(|| malformed("truncated string"))?;
            if major == 3 && std::str::from_utf8(&bytes[next..end]).is_err() {
                return Err(malformed("text is not UTF-8"));
            }
            Ok(end)
        }
        4 => skip_items(bytes, next, argument, 1, depth),
        5 => skip_map(bytes, next, argument, true, depth),
        6 => skip_tagged(bytes, argument, next, depth),
        7 => match info {
            20..=23 => Ok(next),
            25..=27 => Ok(next),
            _ => Err(malformed(
                "only false, true, null, undefined and floats are accepted",
            )),
        },
        _ => unreachable!("the major type has three bits"),
    }
}

/// Skips `count` groups of `per_entry` items starting at `pos`.
fn skip_items(
    bytes: &[u8],
    mut pos: usize,
    count: u64,
    per_entry: u64,
    depth: usize,
) -> Result<usize> {
    let items = count
        .checked_mul(per_entry)
        .filter(|items| *items <= bytes.len() as u64)
        .ok_or_else(|| malformed("length exceeds the body"))?;
    for _ in 0..items {
        pos = skip_at_depth(bytes, pos, depth + 1)?;
    }
    Ok(pos)
}

/// Skips the `count` entries of a map whose first key is at `pos`; outside tag 259 every key
/// must be a text string.
fn skip_map(
    bytes: &[u8],
    mut pos: usize,
    count: u64,
    text_keys: bool,
    depth: usize,
) -> Result<usize> {
    if count > bytes.len() as u64 {
        return Err(malformed("length exceeds the body"));
    }
    for _ in 0..count {
        if text_keys && bytes.get(pos).is_some_and(|b| b >> 5 != 3) {
            return Err(malformed("map keys must be text strings outside tag 259"));
        }
        pos = skip_at_depth(bytes, pos, depth + 1)?;
        pos = skip_at_depth(bytes, pos, depth + 1)?;
    }
    Ok(pos)
}

/// Skips the content of tag `tag`, whose item starts at `pos`, checking that the tag is one
/// keel knows and that its content has the type the tag needs.
fn skip_tagged(bytes: &[u8], tag: u64, pos: usize, depth: usize) -> Result<usize> {
    let (major, info, argument, next) = head(bytes, pos)?;
    let fits = match tag {
        TAG_EPOCH_DATE => match major {
            0 | 1 => argument <= MAX_SAFE_INTEGER,
            7 => matches!(info, 25..=27),
            _ => false,
        },
        TAG_POSITIVE_BIGNUM | TAG_NEGATIVE_BIGNUM => major == 2,
        TAG_SET => major == 4,
        TAG_MAP => major == 5,
        _ => return Err(malformed(&format!("tag {tag} is not accepted"))),
    };
    if !fits {
        return Err(malformed(&format!("tag {tag} holds the wrong type")));
    }
    if tag == TAG_MAP && info != 31 {
        return skip_map(bytes, next, argument, false, depth + 1);
    }
    skip_at_depth(bytes, pos, depth + 1)
}

/// Decodes a definite-length text string at `pos`.
pub fn text(bytes: &[u8], pos: usize) -> Result<String> {
    let (major, info, argument, next) = head(bytes, pos)?;
    if major != 3 || info == 31 {
        return Err(malformed("expected a text string"));
    }
    let end = skip(bytes, pos)?;
    debug_assert_eq!(end - next, argument as usize);
    String::from_utf8(bytes[next..end].to_vec()).map_err(|_| malformed("text is not UTF-8"))
}

/// Decodes an unsigned integer at `pos`.
pub fn uint(bytes: &[u8], pos: usize) -> Result<u64> {
    let (major, info, argument, _) = head(bytes, pos)?;
    if major != 0 || info == 31 {
        return Err(malformed("expected an unsigned integer"));
    }
    Ok(argument)
}

/// Decodes a definite-length array of text strings at `pos`.
pub fn text_array(bytes: &[u8], pos: usize) -> Result<Vec<String>> {
    let (major, info, count, mut next) = head(bytes, pos)?;
    if major != 4 || info == 31 {
        return Err(malformed("expected an array of text strings"));
    }
    let mut items = Vec::new();
    for _ in 0..count {
        items.push(text(bytes, next)?);
        next = skip(bytes, next)?;
    }
    Ok(items)
}

/// Splits a whole body that is one map with text keys into (key, value range) entries.
pub fn map_entries(bytes: &[u8]) -> Result<Vec<(String, std::ops::Range<usize>)>> {
    let (major, info, count, mut next) = head(bytes, 0)?;
    if major != 5 || info == 31 {
        return Err(malformed("the body must be a map"));
    }
    let mut entries = Vec::new();
    for _ in 0..count {
        let key = text(bytes, next)?;
        next = skip(bytes, next)?;
        let end = skip(bytes, next)?;
        entries.push((key, next..end));
        next = end;
    }
    if next != bytes.len() {
        return Err(malformed("trailing bytes after the map"));
    }
    Ok(entries)
}

/// Whether the item at `pos` is an array.
pub fn is_array(bytes: &[u8], pos: usize) -> bool {
    bytes.get(pos).is_some_and(|b| b >> 5 == 4)
}

/// Writes `{"output": <output>}` as CBOR, with `output` copied verbatim.
pub fn output_envelope(output: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(output.len() + 8);
    write_head(&mut body, 5, 1);
    write_text(&mut body, "output");
    body.extend_from_slice(output);
    body
}

/// Writes an item head: major type and argument, in the shortest form.
pub fn write_head(out: &mut Vec<u8>, major: u8, argument: u64) {
    let m = major << 5;
    match argument {
        0..=23 => out.push(m | argument as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, argument as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(argument as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(argument as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&argument.to_be_bytes());
        }
    }
}

/// Writes a text string.
pub fn write_text(out: &mut Vec<u8>, text: &str) {
    write_head(out, 3, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// Writes a JSON value as the equivalent CBOR.
pub fn write_json(out: &mut Vec<u8>, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null => out.push(0xf6),
        Value::Bool(false) => out.push(0xf4),
        Value::Bool(true) => out.push(0xf5),
        Value::Number(number) => {
            if let Some(n) = number.as_u64() {
                write_head(out, 0, n);
            } else if let Some(n) = number.as_i64() {
                write_head(out, 1, (-1 - n) as u64);
            } else {
                out.push(0xfb);
                out.extend_from_slice(&number.as_f64().unwrap_or(f64::NAN).to_be_bytes());
            }
        }
        Value::String(text) => write_text(out, text),
        Value::Array(items) => {
            write_head(out, 4, items.len() as u64);
            for item in items {
                write_json(out, item);
            }
        }
        Value::Object(map) => {
            write_head(out, 5, map.len() as u64);
            for (key, item) in map {
                write_text(out, key);
                write_json(out, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_envelope() {
        // {"key": ["a", "bc"], "args": [1, {"x": h'00ff'}], "mode": "get"}
        let body = [
            0xa3, 0x63, b'k', b'e', b'y', 0x82, 0x61, b'a', 0x62, b'b', b'c', 0x64, b'a', b'r',
            b'g', b's', 0x82, 0x01, 0xa1, 0x61, b'x', 0x42, 0x00, 0xff, 0x64, b'm', b'o', b'd',
            b'e', 0x63, b'g', b'e', b't',
        ];
        let entries = map_entries(&body).unwrap();
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["key", "args", "mode"]);
        assert_eq!(text_array(&body, entries[0].1.start).unwrap(), ["a", "bc"]);
        assert_eq!(
            &body[entries[1].1.clone()],
            &[0x82, 0x01, 0xa1, 0x61, b'x', 0x42, 0x00, 0xff]
        );
        assert!(is_array(&body, entries[1].1.start));
        assert_eq!(text(&body, entries[2].1.start).unwrap(), "get");
    }

    #[test]
    fn walks_every_kind_of_value_keel_accepts() {
        // [tag 1 (1.5 as f16), undefined, tag 2 h'01', tag 258 [], tag 259 {1: "é"},
        //  tag 1 (-(2^53 - 1)), {"a": f32}, f64]
        let item = [
            0x88, 0xc1, 0xf9, 0x3e, 0x00, 0xf7, 0xc2, 0x41, 0x01, 0xd9, 0x01, 0x02, 0x80, 0xd9,
            0x01, 0x03, 0xa1, 0x01, 0x62, 0xc3, 0xa9, 0xc1, 0x3b, 0x00, 0x1f, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xfe, 0xa1, 0x61, b'a', 0xfa, 0, 0, 0, 0, 0xfb, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(skip(&item, 0).unwrap(), item.len());
    }

    #[test]
    fn refuses_what_the_value_decoder_refuses() {
        let cases: &[(&str, &[u8])] = &[
            ("invalid UTF-8 in a text string", &[0x81, 0x62, 0xc3, 0x28]),
            ("a lone continuation byte", &[0x61, 0x80]),
            ("an encoded surrogate", &[0x63, 0xed, 0xa0, 0x80]),
            ("an overlong encoding", &[0x62, 0xc0, 0xaf]),
            ("invalid UTF-8 in a map key", &[0xa1, 0x61, 0xff, 0x01]),
            (
                "invalid UTF-8 in a tag 259 key",
                &[0xd9, 0x01, 0x03, 0xa1, 0x61, 0xff, 0x01],
            ),
            ("an indefinite text string", &[0x7f, 0x61, b'a', 0xff]),
            ("an indefinite byte string", &[0x5f, 0x41, 0x00, 0xff]),
            ("an indefinite array", &[0x9f, 0x01, 0xff]),
            ("an indefinite map", &[0xbf, 0x61, b'a', 0x01, 0xff]),
            ("a stray break", &[0x81, 0xff]),
            ("an unknown tag", &[0xc0, 0x60]),
            ("tag 1 around text", &[0xc1, 0x60]),
            (
                "tag 1 around an unsafe integer",
                &[0xc1, 0x1b, 0, 0x20, 0, 0, 0, 0, 0, 0],
            ),
            ("a bignum around an integer", &[0xc2, 0x01]),
            ("tag 258 around a map", &[0xd9, 0x01, 0x02, 0xa0]),
            ("tag 259 around an array", &[0xd9, 0x01, 0x03, 0x80]),
            ("a map with an integer key", &[0xa1, 0x01, 0x02]),
            ("simple value 0", &[0xe0]),
            ("a one-byte simple value", &[0xf8, 0x20]),
        ];
        for (what, item) in cases {
            let err = skip(item, 0).expect_err(what);
            assert_eq!(err.code(), "malformed", "{what}");
        }
    }

    #[test]
    fn an_envelope_with_bad_bytes_in_any_value_is_malformed() {
        // {"args": ["\xc3("]} and {"input": "\xff", "key": []}
        let args = [0xa1, 0x64, b'a', b'r', b'g', b's', 0x81, 0x62, 0xc3, 0x28];
        assert!(map_entries(&args).is_err());
        let input = [
            0xa2, 0x65, b'i', b'n', b'p', b'u', b't', 0x61, 0xff, 0x63, b'k', b'e', b'y', 0x80,
        ];
        assert!(map_entries(&input).is_err());
    }

    #[test]
    fn writes_json_values_that_read_back() {
        let value = serde_json::json!({"a": [1, -2, 1.5, "x", null, true], "b": {"c": 300}});
        let mut out = Vec::new();
        write_json(&mut out, &value);
        assert_eq!(skip(&out, 0).unwrap(), out.len());
        let entries = map_entries(&out).unwrap();
        assert_eq!(entries.len(), 2);
        let mut head = Vec::new();
        write_head(&mut head, 0, 70_000);
        assert_eq!(head, [0x1a, 0x00, 0x01, 0x11, 0x70]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(skip(&[0x82, 0x01], 0).is_err(), "truncated array");
        assert!(
            skip(&[0x5a, 0xff, 0xff, 0xff, 0xff], 0).is_err(),
            "string longer than the body"
        );
        assert!(skip(&[0x1c], 0).is_err(), "reserved info");
        assert!(map_entries(&[0x80]).is_err(), "not a map");
        assert!(map_entries(&[0xa0, 0x00]).is_err(), "trailing bytes");
        let deep = vec![0x81; 1000];
        assert!(skip(&deep, 0).is_err(), "too deep");
        assert!(skip(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 0).is_err());
    }
}

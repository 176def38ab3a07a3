//! KV's one home: the format of a user's key (`c.kv` in JS), how keys are ordered and shown,
//! the KV limits (their defaults and the check core runs on every commit) and the overlay of a
//! call's own writes on what a list reads.
//!
//! A KV key is a string or a byte array. It is stored as one tag byte followed by the key:
//! `s` (0x73) and the string's UTF-8 bytes for a string key, `b` (0x62) and the bytes for a
//! byte key. Stored keys are ordered by their bytes, so every byte key sorts before every
//! string key, and keys of one kind sort by their own bytes; a prefix of one kind matches only
//! keys of that kind. This is the only definition of the format: keel's JS host hands core the
//! user's keys and gets them back decoded, and the inspector shows them decoded
//! (docs/observability.md). Data files written before this module existed hold the same bytes.
//!
//! A stored key with neither tag was not written through this codec (a host with its own key
//! format); [`decode`] reports it as [`StoredKey::Raw`].
//!
//! The limits: a key may hold [`DEFAULT_MAX_KEY_BYTES`] bytes, not counting its tag, and a
//! value, as the host encoded it, [`DEFAULT_MAX_VALUE_BYTES`]. The configured numbers are
//! [`Limits::max_kv_key_bytes`](crate::config::Limits::max_kv_key_bytes) and
//! [`Limits::max_kv_value_bytes`](crate::config::Limits::max_kv_value_bytes), which default to
//! these. What must stay true: every commit passes [`check`] before it reaches storage, so no
//! host can store what the limits refuse; a host may check earlier, with the same numbers.

use crate::error::{Error, Result};
use crate::host::KvWrite;

/// The tag of a string key.
pub const STRING_TAG: u8 = b's';
/// The tag of a byte key.
pub const BYTES_TAG: u8 = b'b';
/// How many bytes the tag takes; the key limit does not count them.
pub const TAG_LEN: usize = 1;

/// Default largest KV key, in bytes, not counting the tag.
pub const DEFAULT_MAX_KEY_BYTES: usize = 2 * 1024;
/// Default largest KV value as the host encoded it, in bytes.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 128 * 1024;

/// A user's KV key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum KvKey {
    /// A byte key.
    Bytes(Vec<u8>),
    /// A string key.
    Text(String),
}

/// A key as read from storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredKey {
    /// A key in this codec's format.
    Key(KvKey),
    /// A stored key in no format this codec knows: the stored bytes as they are.
    Raw(Vec<u8>),
}

/// The stored form of `key`.
pub fn encode(key: &KvKey) -> Vec<u8> {
    let (tag, bytes) = match key {
        KvKey::Text(text) => (STRING_TAG, text.as_bytes()),
        KvKey::Bytes(bytes) => (BYTES_TAG, bytes.as_slice()),
    };
    let mut encoded = Vec::with_capacity(TAG_LEN + bytes.len());
    encoded.push(tag);
    encoded.extend_from_slice(bytes);
    encoded
}

/// The user's key a stored key holds. A string key whose bytes are not UTF-8 (damage, or
/// another writer) is decoded with replacement characters, as keel's JS host always read it.
pub fn decode(stored: &[u8]) -> StoredKey {
    match stored.split_first() {
        Some((&STRING_TAG, rest)) => {
            StoredKey::Key(KvKey::Text(String::from_utf8_lossy(rest).into_owned()))
        }
        Some((&BYTES_TAG, rest)) => StoredKey::Key(KvKey::Bytes(rest.to_vec())),
        _ => StoredKey::Raw(stored.to_vec()),
    }
}

/// How long `key` is for the KV key limit: its bytes, without the tag.
pub fn limit_len(stored: &[u8]) -> usize {
    stored.len().saturating_sub(TAG_LEN)
}

/// Fails with `kv.key_too_large` or `kv.value_too_large` at the first of `writes` past the
/// limits (the configured `max_kv_key_bytes` and `max_kv_value_bytes`). Core runs this on
/// every commit, so no host can store what the limits refuse.
pub fn check(writes: &[KvWrite], max_key_bytes: usize, max_value_bytes: usize) -> Result<()> {
    for write in writes {
        let (key, value) = match write {
            KvWrite::Put { key, value } => (key, Some(value)),
            KvWrite::Delete { key } => (key, None),
        };
        if limit_len(key) > max_key_bytes {
            return Err(Error::KvKeyTooLarge {
                limit: max_key_bytes,
            });
        }
        if value.is_some_and(|value| value.len() > max_value_bytes) {
            return Err(Error::KvValueTooLarge {
                limit: max_value_bytes,
            });
        }
    }
    Ok(())
}

/// The entries a list by `prefix` returns while a call's own writes are not committed yet:
/// `stored` (what the store listed, in key order or reverse, at least `limit` plus the number
/// of `pending` writes long when there were that many) with `pending` laid over it (a put
/// replaces or adds, a delete removes), in key order (or reverse), at most `limit` of them.
pub fn overlay(
    stored: Vec<(Vec<u8>, Vec<u8>)>,
    pending: &[KvWrite],
    prefix: &[u8],
    limit: usize,
    reverse: bool,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut merged: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = stored
        .into_iter()
        .map(|(key, value)| (key, Some(value)))
        .collect();
    for write in pending {
        match write {
            KvWrite::Put { key, value } if key.starts_with(prefix) => {
                merged.insert(key.clone(), Some(value.clone()));
            }
            KvWrite::Delete { key } if key.starts_with(prefix) => {
                merged.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    let live = merged
        .into_iter()
        .filter_map(|(key, value)| value.map(|value| (key, value)));
    if reverse {
        live.rev().take(limit).collect()
    } else {
        live.take(limit).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_keep_their_stored_bytes() {
        for key in [
            KvKey::Text(String::new()),
            KvKey::Text("user:1 é".into()),
            KvKey::Bytes(vec![]),
            KvKey::Bytes(vec![0, 0xff, b's']),
        ] {
            assert_eq!(decode(&encode(&key)), StoredKey::Key(key));
        }
        assert_eq!(encode(&KvKey::Text("ab".into())), b"sab");
        assert_eq!(encode(&KvKey::Bytes(vec![1])), [b'b', 1]);
        assert_eq!(decode(b"xyz"), StoredKey::Raw(b"xyz".to_vec()));
        assert_eq!(decode(b""), StoredKey::Raw(vec![]));
        assert_eq!(limit_len(&encode(&KvKey::Text("abc".into()))), 3);
    }

    #[test]
    fn the_limits_count_the_key_without_its_tag_and_the_value_as_encoded() {
        let put = |key: &KvKey, len: usize| KvWrite::Put {
            key: encode(key),
            value: vec![0; len],
        };
        let at_limit = [
            put(&KvKey::Text("k".repeat(4)), 8),
            put(&KvKey::Bytes(vec![1; 4]), 0),
            KvWrite::Delete {
                key: encode(&KvKey::Text("k".repeat(4))),
            },
        ];
        assert!(check(&at_limit, 4, 8).is_ok());
        let long_key = [put(&KvKey::Text("k".repeat(5)), 1)];
        assert!(matches!(
            check(&long_key, 4, 8),
            Err(Error::KvKeyTooLarge { limit: 4 })
        ));
        let long_delete = [KvWrite::Delete {
            key: encode(&KvKey::Bytes(vec![1; 5])),
        }];
        assert!(matches!(
            check(&long_delete, 4, 8),
            Err(Error::KvKeyTooLarge { limit: 4 })
        ));
        let large_value = [put(&KvKey::Text("k".into()), 9)];
        assert!(matches!(
            check(&large_value, 4, 8),
            Err(Error::KvValueTooLarge { limit: 8 })
        ));
    }

    #[test]
    fn byte_keys_sort_before_string_keys() {
        let mut stored = [
            encode(&KvKey::Text("a".into())),
            encode(&KvKey::Bytes(vec![0xff])),
            encode(&KvKey::Text("".into())),
        ];
        stored.sort();
        assert_eq!(
            stored.map(|key| decode(&key)),
            [
                StoredKey::Key(KvKey::Bytes(vec![0xff])),
                StoredKey::Key(KvKey::Text("".into())),
                StoredKey::Key(KvKey::Text("a".into())),
            ]
        );
    }

    #[test]
    fn pending_writes_overlay_what_is_stored() {
        let key = |text: &str| encode(&KvKey::Text(text.into()));
        let stored = vec![
            (key("a"), b"1".to_vec()),
            (key("b"), b"2".to_vec()),
            (key("c"), b"3".to_vec()),
        ];
        let pending = [
            KvWrite::Delete { key: key("b") },
            KvWrite::Put {
                key: key("d"),
                value: b"4".to_vec(),
            },
            KvWrite::Put {
                key: key("a"),
                value: b"5".to_vec(),
            },
            // Outside the prefix: not listed.
            KvWrite::Put {
                key: encode(&KvKey::Bytes(vec![1])),
                value: b"6".to_vec(),
            },
        ];
        let listed = overlay(stored.clone(), &pending, b"s", 10, false);
        assert_eq!(
            listed,
            [
                (key("a"), b"5".to_vec()),
                (key("c"), b"3".to_vec()),
                (key("d"), b"4".to_vec()),
            ]
        );
        let reversed = overlay(stored, &pending, b"s", 2, true);
        assert_eq!(
            reversed,
            [(key("d"), b"4".to_vec()), (key("c"), b"3".to_vec())]
        );
    }
}
